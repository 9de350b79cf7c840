"""The rule-based annotator on hand-made trades, and `pipelines.annotate` over a real buffer."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from mlproject.experience import ExperienceBuffer, Query
from mlproject.reflection import annotate_trades, closed_trades, entry_context

UPTREND = [1.2, 0.4, 0.0, 0.0, 1.0] * 2 + [0.0, 0.0]  # window 2: ret_z, range_z, volume_z, tod; then account


def rows() -> pd.DataFrame:
    """A winning long (3 bars), a short that gave back an open profit (3 bars), an open long."""
    spec = [  # trade, position, equity, realised
        ("t1", 1, 100_000.0, 0.0), ("t1", 1, 100_050.0, 0.0), ("t1", 0, 100_120.0, 120.0),
        ("t2", -1, 100_120.0, 0.0), ("t2", -1, 100_300.0, 0.0), ("t2", 0, 99_970.0, -150.0),
        ("t3", 1, 99_970.0, 0.0), ("t3", 1, 99_990.0, 0.0),
    ]
    times = pd.date_range("2024-01-02 14:31", periods=len(spec), freq="1min", tz="UTC")
    return pd.DataFrame([{"experience_id": f"e{i}", "time": t, "trade_id": tid, "observation": UPTREND,
                          "action": pos + 1, "position": pos, "equity": eq, "realised_pnl": pnl, "symbol": "MES",
                          "model_name": "nt8-agent", "model_version": "1", "reward": 0.0, "source": "paper"}
                         for i, (t, (tid, pos, eq, pnl)) in enumerate(zip(times, spec))])


def test_closed_trades_and_entry_context():
    trades = closed_trades(rows())
    assert [(t.trade_id, t.side, t.pnl, t.bars, t.best, t.worst) for t in trades] == [
        ("t1", 1, 120.0, 3, 120.0, 0.0), ("t2", -1, -150.0, 3, 180.0, -150.0)]  # t3 is still open
    ctx = entry_context(UPTREND)
    assert ctx["direction"] == "up" and ctx["trend"] == pytest.approx(2.4 / 2 ** 0.5) and ctx["regime"] == "low"


def test_rule_based_reflections_on_hand_made_trades():
    notes = annotate_trades(rows(), high_value=0.7, failed=0.3).set_index("experience_id")
    assert list(notes.index) == [f"e{i}" for i in range(6)]  # every row of the two closed trades
    win, loss = notes.loc["e0"], notes.loc["e3"]
    # scale = median |PnL| = 135: quality 0.5 + 0.5 tanh(PnL / 270)
    assert win["quality"] == pytest.approx(0.7087, abs=1e-4) and list(win["tags"]) == ["high_value"]
    assert loss["quality"] == pytest.approx(0.2477, abs=1e-4) and list(loss["tags"]) == ["failed"]
    assert win["lesson"].startswith("with the trend in low volatility paid")
    assert loss["lesson"].startswith("gave back an open profit larger than the loss")
    assert "long 1 MES" in win["reflection"] and "won +120.00" in win["reflection"]
    assert "short 1 MES" in loss["reflection"] and "best open +180.00" in loss["reflection"]
    assert set(notes["annotator"]) == {"rules"} and annotate_trades(rows().iloc[6:]).empty


def test_annotate_pipeline_annotates_once(tmp_path, mlflow_store):
    from mlproject.config import load_config
    from pipelines import annotate

    storage = tmp_path / "buffer"
    buffer = ExperienceBuffer(storage)
    buffer.add(rows())
    buffer.flush()
    cfg = load_config(None, [f"continuous_learning.experience_storage={storage}"])
    first = annotate.main(cfg)
    assert (first.trades, first.experiences, first.high_value, first.failed) == (2, 6, 1, 1)
    run = mlflow.get_run(first.run_id)
    assert run.data.metrics["annotate/trades"] == 2 and run.data.metrics["buffer/annotated"] == 6
    assert "annotate/sample.json" in {a.path for a in mlflow.MlflowClient().list_artifacts(first.run_id, "annotate")}
    assert buffer.high_value(0.7, ["experience_id"])["experience_id"].tolist() == ["e0", "e1", "e2"]
    again = annotate.main(cfg)
    assert again.trades == 0  # nothing new to annotate
    assert len(buffer.query(Query(annotated=True), ["experience_id"])) == 6
