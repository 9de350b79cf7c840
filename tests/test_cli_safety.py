"""Junk arguments end in one line naming the argument (exit 2), and ingest never overwrites a
user's file or its own source."""

from __future__ import annotations

import sys

import pandas as pd
import pytest

from conftest import ROOT, run_module
from mlproject.config import load_config


@pytest.mark.parametrize("args, message", [
    (["pipelines.status", "--config", "{tmp}"], "is a folder, not a YAML file"),
    (["pipelines.status", "--config", "{tmp}/binary.yaml"], "binary.yaml: not a text (UTF-8) YAML file"),
    (["pipelines.status", "--set", "nosuch.key=1"], "--set nosuch.key: key 'nosuch': unknown key"),
    (["pipelines.ingest", "--source", "{tmp}"], "is a folder, not a bar file"),
    (["pipelines.ingest", "--output", "{tmp}"], "--output {tmp}: is a folder"),
    (["registry_hooks.reconcile", "--every", "0"], "--every '0': at least 1 s between passes"),
    (["pipelines.monitor", "--loop", "--every", "0"], "--every '0': at least 1 s between passes"),
])
def test_bad_arguments_exit_2_with_one_line_naming_them(tmp_path, mlflow_store, args, message):
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    argv = [a.format(tmp=tmp_path) for a in args]
    out = run_module([sys.executable, "-m", *argv], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message.format(tmp=tmp_path) in out.stderr and "Traceback" not in out.stderr


def _csv(path, n=400, offset=0.0):
    from mlproject.data import synthetic_bars

    bars = synthetic_bars(n, seed=1)
    bars[["open", "high", "low", "close"]] += offset
    bars.reset_index().to_csv(path, index=False)
    return path


def test_ingest_never_overwrites_a_users_file_or_its_source(tmp_path, mlflow_store):
    from pipelines import ingest

    src = _csv(tmp_path / "ES.csv")
    cfg = load_config(None, [f"data.source={src}", f"data.output_dir={tmp_path / 'out'}"])
    mine = tmp_path / "mine.parquet"
    mine.write_bytes(b"my own file")
    with pytest.raises(ValueError, match="mine.parquet: exists; pass --overwrite"):
        ingest.main(cfg, str(mine))
    assert mine.read_bytes() == b"my own file"
    ingest.main(cfg, str(mine), overwrite=True)
    assert len(pd.read_parquet(mine)) == 400
    parquet_src = tmp_path / "bars.parquet"
    pd.read_parquet(mine).to_parquet(parquet_src)
    own = load_config(None, [f"data.source={parquet_src}"])
    with pytest.raises(ValueError, match="is the source file itself"):
        ingest.main(own, str(parquet_src), overwrite=True)


def test_two_sources_with_one_file_name_get_two_outputs(tmp_path, mlflow_store):
    """ES.csv from two folders used to overwrite the same data/bars/ES.parquet."""
    from pipelines import ingest

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out = tmp_path / "out"
    first = ingest.main(load_config(None, [f"data.source={_csv(tmp_path / 'a' / 'ES.csv')}", f"data.output_dir={out}"]))
    assert first.path == out / "ES.parquet"
    stamp = first.path.stat().st_mtime_ns
    second = ingest.main(load_config(None, [f"data.source={_csv(tmp_path / 'b' / 'ES.csv', offset=100.0)}",
                                            f"data.output_dir={out}"]))
    assert second.path.name.startswith("ES-") and second.path != first.path
    assert first.path.stat().st_mtime_ns == stamp  # untouched
    assert pd.read_parquet(first.path)["close"].iloc[0] + 100.0 == pd.read_parquet(second.path)["close"].iloc[0]
    again = ingest.main(load_config(None, [f"data.source={tmp_path / 'a' / 'ES.csv'}", f"data.output_dir={out}"]))
    assert again.path == first.path and first.path.stat().st_mtime_ns == stamp  # same bars: reused, not rewritten
    synthetic = load_config(ROOT / "conf" / "smoke.yaml", [f"data.output_dir={out}"])
    assert ingest.main(synthetic).path == ingest.main(synthetic).path  # the demo's re-runs reuse one file
