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
    # scale = 0.001 x the equity at entry (100,000 and 100,120): quality 0.5 + 0.5 tanh(PnL / (2 x scale))
    assert win["quality"] == pytest.approx(0.76856, abs=1e-4) and list(win["tags"]) == ["high_value"]
    assert loss["quality"] == pytest.approx(0.18269, abs=1e-4) and list(loss["tags"]) == ["failed"]
    assert win["lesson"].startswith("with the trend in low volatility paid")
    assert loss["lesson"].startswith("gave back an open profit larger than the loss")
    assert "long 1 MES" in win["reflection"] and "won +120.00" in win["reflection"]
    assert "short 1 MES" in loss["reflection"] and "best open +180.00" in loss["reflection"]
    assert set(notes["annotator"]) == {"rules"} and annotate_trades(rows().iloc[6:]).empty


def test_a_trades_quality_does_not_depend_on_the_trades_annotated_with_it():
    """Quality used to be scaled by the median trade of the pass: a lone winner always scored
    0.731 (high_value) and a lone loser 0.269 (failed), a $1.20 win the same as a $120 one."""
    both = annotate_trades(rows()).set_index("experience_id")
    alone = annotate_trades(rows().iloc[:3]).set_index("experience_id")
    assert alone.loc["e0", "quality"] == both.loc["e0", "quality"]
    tiny = rows().iloc[:3].assign(equity=[100_000.0, 100_000.5, 100_001.2], realised_pnl=[0.0, 0.0, 1.2])
    note = annotate_trades(tiny).set_index("experience_id").loc["e0"]
    assert 0.5 < note["quality"] < 0.51 and list(note["tags"]) == []


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


class FakeOpenAI:
    """A small OpenAI-compatible chat server on 127.0.0.1 (the real endpoint cannot exist here):
    answers like deepseek-r1 (a think block, then the answer), or slowly, or with junk."""

    def __init__(self, mode: str) -> None:
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.mode, self.requests = mode, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                if outer.mode == "slow":
                    time.sleep(1.5)
                content = ("<think>The entry followed an up-trend; the exit was late.</think>\n"
                           "LESSON: trail the stop once the trade is a point ahead.\nQUALITY: 0.82")
                if outer.mode == "opened":  # R1: the chat template opened the think block
                    content = ("The entry followed an up-trend.\nLESSON: maybe hold longer. QUALITY: 0.1 hmm\n"
                               "</think>\n\nLESSON: trail the stop once the trade is a point ahead.\nQUALITY: 0.82")
                data = (b"not json" if outer.mode == "junk" else
                        json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("mode", ["ok", "opened"])
def test_llm_annotator_parses_the_think_block_and_the_answer(mode):
    """With both tags, and with only the closing one (the reasoning's own LESSON/QUALITY words are
    not the answer)."""
    from mlproject.reflection import LLMAnnotator

    server = FakeOpenAI(mode)
    try:
        llm = LLMAnnotator(server.url, "deepseek-r1:8b", timeout_s=5, retries=0)
        notes = annotate_trades(rows(), llm=llm).set_index("experience_id")
    finally:
        server.close()
    note = notes.loc["e0"]
    assert note["lesson"] == "trail the stop once the trade is a point ahead." and note["quality"] == 0.82
    assert "The entry followed an up-trend" in note["reflection"] and "long 1 MES" in note["reflection"]
    assert list(note["tags"]) == ["high_value"] and note["annotator"] == "llm:deepseek-r1:8b"
    path, body = server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "deepseek-r1:8b"
    assert "won +120.00" in body["messages"][0]["content"] and llm.failures == 0


@pytest.mark.parametrize("mode", ["slow", "junk"])
def test_llm_annotator_falls_back_to_the_rules(mode):
    from mlproject.reflection import LLMAnnotator

    server = FakeOpenAI(mode)
    try:
        llm = LLMAnnotator(server.url, "deepseek-r1:8b", timeout_s=0.5, retries=1)
        notes = annotate_trades(rows(), llm=llm).set_index("experience_id")
    finally:
        server.close()
    assert llm.failures == 2 and len(server.requests) == 4  # 2 trades x (1 try + 1 retry)
    note = notes.loc["e0"]
    assert note["annotator"].startswith("rules (fallback: ") and note["lesson"].startswith("with the trend")
    assert ("timed out" in note["annotator"]) if mode == "slow" else ("JSONDecodeError" in note["annotator"])


def test_llm_annotator_needs_an_endpoint_in_config():
    from mlproject.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="annotator llm needs annotation.endpoint"):
        load_config(None, ["annotation.annotator=llm"])
