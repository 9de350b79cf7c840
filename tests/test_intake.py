"""New NT8 exports dropped into the intake folder: each file once, bad files aside with their
error, overlapping exports merged without duplicate bars, new bars counted toward the retrain."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, export_bars, momentum_bars
from mlproject.config import load_config
from mlproject.cycle.state import CycleState, due, with_history
from mlproject.experience import ExperienceBuffer
from mlproject.intake import INGESTED, REJECTED, merge_bars, new_bars_since, run_intake


def nt8_export(path, bars: pd.DataFrame, age: float = 600) -> None:
    """Bars as a NinjaTrader 8 minute-bar export (``yyyyMMdd HHmmss;open;high;low;close;volume``),
    last written ``age`` seconds ago (settled: not being copied any more)."""
    lines = [f"{t:%Y%m%d %H%M%S};{r.open:.2f};{r.high:.2f};{r.low:.2f};{r.close:.2f};{int(r.volume)}"
             for t, r in bars.iterrows()]
    path.write_text("\n".join(lines) + "\n")
    os.utime(path, (time.time() - age,) * 2)


@pytest.fixture
def market():
    return export_bars(600, seed=3)


def intake(tmp_path, **kw):
    return run_intake(tmp_path / "drop", tmp_path / "history" / "bars.parquet", tmp_path / "state", **kw)


def test_overlapping_exports_merge_without_duplicate_bars_and_each_file_is_taken_once(tmp_path, market):
    drop = tmp_path / "drop"
    drop.mkdir()
    nt8_export(drop / "ES 03-25.Last.txt", market.iloc[:400], age=900)
    later = market.iloc[300:].copy()
    later.iloc[0, later.columns.get_loc("volume")] += 7  # the older export ended on a half-built bar
    nt8_export(drop / "ES 03-25 later.Last.txt", later, age=600)
    first = intake(tmp_path)
    assert [i["file"] for i in first.ingested] == ["ES 03-25.Last.txt", "ES 03-25 later.Last.txt"]  # oldest first
    history = pd.read_parquet(tmp_path / "history" / "bars.parquet")
    assert history.index.is_unique and history.index.is_monotonic_increasing and len(history) == 600
    assert first.new_bars == 600 and first.history_bars == 600
    np.testing.assert_allclose(history["close"].to_numpy(), market["close"].to_numpy())
    assert history["volume"].iloc[300] == later["volume"].iloc[0]  # the newer export's bar won
    assert sorted(p.name for p in (drop / INGESTED).iterdir()) == ["ES 03-25 later.Last.txt", "ES 03-25.Last.txt"]
    assert not list(drop.glob("*.txt"))

    # The same export dropped again (another name, same bytes): recognised, nothing merged twice.
    shutil.copy(drop / INGESTED / "ES 03-25.Last.txt", drop / "copy.txt")
    os.utime(drop / "copy.txt", (time.time() - 600,) * 2)
    again = intake(tmp_path)
    assert again.ingested == [] and again.repeated == ["copy.txt"] and again.history_bars == 600
    assert (drop / INGESTED / "copy.txt").exists()


def test_a_corrupt_file_is_moved_aside_with_its_error_and_the_others_go_on(tmp_path, market):
    drop = tmp_path / "drop"
    drop.mkdir()
    nt8_export(drop / "a_good.txt", market.iloc[:200])
    nt8_export(drop / "b_bad.txt", market.iloc[200:300])
    lines = (drop / "b_bad.txt").read_text().splitlines()
    lines[41] = lines[41].replace(";", ";x", 1)  # a garbled price on line 42
    (drop / "b_bad.txt").write_text("\n".join(lines) + "\n")
    os.utime(drop / "b_bad.txt", (time.time() - 600,) * 2)
    five_min = market.iloc[300:].resample("5min", label="right", closed="right").agg(
        {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"}).dropna()
    nt8_export(drop / "c_5min.txt", five_min)
    nt8_export(drop / "d_good.txt", market.iloc[300:])
    result = intake(tmp_path)
    assert [i["file"] for i in result.ingested] == ["a_good.txt", "d_good.txt"]
    assert [r["file"] for r in result.rejected] == ["b_bad.txt", "c_5min.txt"]
    error = (drop / REJECTED / "b_bad.txt.error.txt").read_text()
    assert "b_bad.txt" in error and "line 42" in error
    assert "5min bars" in (drop / REJECTED / "c_5min.txt.error.txt").read_text()
    assert result.history_bars == 500 and (drop / REJECTED / "b_bad.txt").exists()


def test_a_file_still_being_copied_waits_and_a_lost_record_takes_files_again_harmlessly(tmp_path, market):
    drop = tmp_path / "drop"
    drop.mkdir()
    nt8_export(drop / "old.txt", market.iloc[:300])
    (drop / "copying.txt").write_text("20240102 093100;1;1;1;1;1\n")  # modified just now
    result = intake(tmp_path, settle_seconds=30)
    assert result.waiting == ["copying.txt"] and [i["file"] for i in result.ingested] == ["old.txt"]
    # A crash after the history was written but before the record (here: the record lost): the
    # file is taken again and changes nothing.
    (tmp_path / "state" / "intake.json").unlink()
    shutil.move(drop / INGESTED / "old.txt", drop / "old.txt")
    (drop / "copying.txt").unlink()
    again = intake(tmp_path)
    assert again.ingested[0]["new_bars"] == 0 and again.history_bars == 300
    assert json.loads((tmp_path / "state" / "intake.json").read_text())


def test_merge_and_new_bar_counting(tmp_path, market):
    merged, added = merge_bars(market.iloc[:100], market.iloc[50:150])
    assert added == 50 and len(merged) == 150 and merged.index.is_unique
    path = tmp_path / "h.parquet"
    merged.to_parquet(path)
    assert new_bars_since(path, str(market.index[119])) == (30, market.index[120])
    assert new_bars_since(path, None) == (150, market.index[0])
    assert new_bars_since(tmp_path / "none.parquet", None) == (0, None)


def test_maintenance_takes_new_exports_and_new_bars_make_the_retrain_due(tmp_path, mlflow_store, market):
    import mlflow

    from pipelines import orchestrate

    drop = tmp_path / "drop"
    drop.mkdir()
    nt8_export(drop / "MES.txt", market.iloc[:500])
    (drop / "junk.txt").write_text("not a bar file\n")
    os.utime(drop / "junk.txt", (time.time() - 600,) * 2)
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [
        f"data.intake.folder={drop}", f"data.intake.history={tmp_path / 'history.parquet'}",
        "continuous_learning.retrain_new_bars=50", f"continuous_learning.state_dir={tmp_path / 'state'}",
        f"continuous_learning.experience_storage={tmp_path / 'buffer'}"])
    out = orchestrate.main(cfg, "maintenance")
    taken = out.maintenance.intake
    assert [i["file"] for i in taken.ingested] == ["MES.txt"] and taken.rejected[0]["file"] == "junk.txt"
    due = out.maintenance.due
    assert due.new_bars_since_retrain == 500 and due.retrain_due  # nothing trained on them yet
    assert "intake: 1 new file(s), 500 new bars" in out.summary and "rejected junk.txt" in out.summary
    run = mlflow.get_run(out.run_id)
    assert run.data.metrics["intake/new_bars"] == 500 and "junk.txt" in run.data.tags["intake.rejected"]
    assert with_history(cfg).data.source == str(tmp_path / "history.parquet")

    state = CycleState(tmp_path / "state")
    state.mark_bars(market.index[499])  # as a retrain on these bars records
    nt8_export(drop / "MES later.txt", market.iloc[480:530])  # 30 new bars: below 50
    due = orchestrate.main(cfg, "maintenance").maintenance.due
    assert (due.new_bars_since_retrain, due.retrain_due) == (30, False)
    nt8_export(drop / "MES latest.txt", market.iloc[530:])
    due = orchestrate.main(cfg, "maintenance").maintenance.due
    assert (due.new_bars_since_retrain, due.retrain_due) == (100, True)
    assert due.first_new_time == market.index[500]


def test_a_retrain_after_intake_learns_from_the_history_and_moves_the_bar_watermark(tmp_path, mlflow_store,
                                                                                     ray_session):
    import mlflow

    from pipelines import orchestrate

    bars = momentum_bars(1500, seed=5)
    bars[["open", "high", "low", "close"]] = bars[["open", "high", "low", "close"]].round(2)
    bars["volume"] = bars["volume"].round()
    drop = tmp_path / "drop"
    drop.mkdir()
    nt8_export(drop / "MES.txt", bars)
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [
        f"data.intake.folder={drop}", f"data.intake.history={tmp_path / 'history.parquet'}",
        "continuous_learning.retrain_new_bars=100", "train.iterations=1",
        f"continuous_learning.state_dir={tmp_path / 'state'}", f"promotion.deploy_dir={tmp_path / 'deploy'}",
        f"continuous_learning.experience_storage={tmp_path / 'buffer'}", f"data.output_dir={tmp_path / 'bars'}"])
    assert orchestrate.main(cfg, "maintenance").maintenance.due.retrain_due
    out = orchestrate.main(cfg, "retrain")
    assert out.retrain is not None
    ingest_run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string="tags.`pipeline.step` = 'ingest'")[0]
    assert ingest_run.data.params["data.source"] == str(tmp_path / "history.parquet")
    assert ingest_run.data.metrics["data/n_bars"] == 1500
    state = CycleState(tmp_path / "state")
    assert state.data["bars_trained_to"] == str(bars.index[-1])
    assert due(cfg, ExperienceBuffer(tmp_path / "buffer"), state).new_bars_since_retrain == 0
