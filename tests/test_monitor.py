"""The drift monitor's computations: live results as evaluation metrics, the feature-drift
statistic (PSI) and the hysteresis that keeps one bad day from flapping the deployment."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mlproject.monitor import Hysteresis, consecutive_losses, feature_psi, live_stats, psi, trade_pnls
from test_registry import store  # noqa: F401 (fixture)


def rows_of(steps: list[tuple[str | None, int, float, float]]) -> pd.DataFrame:
    """Experience rows from (trade_id, position after, realised pnl, equity) per bar."""
    return pd.DataFrame({"time": pd.date_range("2024-01-02 09:31", periods=len(steps), freq="1min", tz="UTC"),
                         "trade_id": [s[0] for s in steps], "position": [s[1] for s in steps],
                         "realised_pnl": [s[2] for s in steps], "equity": [s[3] for s in steps],
                         "slippage": [12.5 if s[0] else None for s in steps]})


def test_trades_win_rate_profit_factor_and_the_losing_streak():
    rows = rows_of([(None, 0, 0, 1000), ("a", 1, 0, 1010), ("a", 0, 50, 1050),  # win 50
                    ("b", -1, 0, 1040), ("b", 1, -30, 1020),  # reversal: b closes -30, c opens
                    ("c", 1, 0, 1000), ("c", 0, -20, 1000),  # loss 20
                    ("d", 1, 0, 990)])  # still open: left out
    assert trade_pnls(rows).to_dict() == {"a": 50, "b": -30, "c": -20}
    stats = live_stats(rows, periods_per_year=390 * 252)
    assert stats["n_trades"] == 3 and stats["win_rate"] == pytest.approx(1 / 3)
    assert stats["profit_factor"] == pytest.approx(50 / 50) and stats["consecutive_losses"] == 2
    assert stats["max_drawdown"] == pytest.approx(60 / 1050)
    assert stats["avg_slippage"] == pytest.approx((5 * 12.5 + 12.5 / 2) / 6)  # per contract: the reversal filled 2
    assert stats["n_bars"] == 8 and math.isfinite(stats["sharpe"])
    assert consecutive_losses(np.array([-1.0, 2.0, -1.0, -3.0])) == 2 and consecutive_losses(np.array([])) == 0


def test_psi_crosses_its_threshold_on_a_shifted_series_and_not_on_an_unshifted_one():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, 20000)
    same = rng.normal(0, 1, 2000)
    shifted = rng.normal(0.8, 1.3, 2000)
    assert psi(train, same) < 0.05
    assert psi(train, shifted) > 0.25
    assert psi(np.ones(100), np.ones(50)) == 0 and psi(np.ones(100), same) > 0.25  # a flat feature that moves
    assert math.isnan(psi(train, np.array([]))) and math.isnan(psi(train, np.array([np.nan])))
    drift = feature_psi(np.c_[train, train], np.c_[same, shifted], ["ret_1", "vol_z"])
    assert drift["ret_1"] < 0.05 < 0.25 < drift["vol_z"]
    with pytest.raises(ValueError, match="2 columns"):
        feature_psi(np.c_[train], np.c_[same], ["ret_1", "vol_z"])


def test_hysteresis_holds_through_a_short_dip_acts_once_and_rearms_after_clear_passes():
    watch = Hysteresis(confirm=3, clear=2)
    assert [watch.update(b) for b in (True, True, False, True, True)] == [False] * 5  # a dip, then recovery
    assert watch.update(True) is True  # the third bad pass in a row: act
    assert [watch.update(b) for b in (True, True, False, True)] == [False] * 4  # acted: no flapping
    assert [watch.update(b) for b in (False, False)] == [False, False] and not watch.acted  # clear again
    assert [watch.update(True) for _ in range(3)] == [False, False, True]
    again = Hysteresis.from_dict(watch.to_dict(), confirm=3, clear=2)
    assert again == watch


# -- the monitor against a real registry and buffer ---------------------------------------------


class Paper:
    """Writes paper-trading experiences of one version into a buffer: trades of three steps
    (open, hold, close) with the given PnL, equity carried along, observations of smoke size."""

    def __init__(self, path, version: str) -> None:
        from mlproject.experience import ExperienceBuffer

        self.buffer, self.version, self.equity, self.step = ExperienceBuffer(path), version, 100_000.0, 0
        self.rng = np.random.default_rng(1)

    def trades(self, pnls: list[float]) -> None:
        rows = []
        for pnl in pnls:
            trade = f"t{self.step}"
            for k, (position, realised) in enumerate(((1, 0.0), (1, 0.0), (0, pnl))):
                self.equity += realised
                rows.append({"experience_id": f"x{self.step}", "symbol": "ES", "bar_period": "1min",
                             "time": pd.Timestamp("2024-03-04 14:31", tz="UTC") + pd.Timedelta(minutes=self.step),
                             "model_name": "nt8-agent", "model_version": self.version, "source": "paper",
                             "observation": self.rng.normal(0, 1, 82).tolist(), "action": 2 if position else 1,
                             "reward": realised, "position": position, "equity": self.equity, "trade_id": trade,
                             "realised_pnl": realised, "slippage": 12.5 if k != 1 else None})
                self.step += 1
        self.buffer.add(rows)
        self.buffer.flush()


@pytest.fixture
def deployed(store, tmp_path):
    """v1 then v2 promoted (v2 Production, v1 its rollback target), each with the evaluation it
    was promoted on; a config whose monitor needs 10 trades, 30 steps and 2 bad passes in a row."""
    from mlproject import registry
    from test_registry import NAME, config, register_constant

    evaluation = {"win_rate": 0.6, "sharpe": 1.0, "profit_factor": 1.5, "max_drawdown": 0.05}
    v1, v2 = register_constant(store, 2), register_constant(store, 2)
    registry.promote(NAME, v1, "first", evaluation)
    registry.promote(NAME, v2, "second", evaluation)

    def cfg(action: str = "rollback", *more: str):
        return config(store, f"continuous_learning.experience_storage={tmp_path / 'buffer'}",
                      f"continuous_learning.state_dir={tmp_path / 'state'}", f"monitoring.action={action}",
                      "monitoring.min_trades=10", "monitoring.min_bars=30", "monitoring.confirm_passes=2",
                      "monitoring.clear_passes=2", "monitoring.max_psi=1000", *more)
    return cfg, Paper(tmp_path / "buffer", v2), v1, v2


def test_degrading_paper_results_roll_back_after_the_minimum_sample_with_an_audited_reason(deployed, tmp_path):
    import mlflow

    from mlproject import registry
    from mlproject.deploy import deployed_manifest
    from pipelines import monitor

    cfg, paper, v1, v2 = deployed
    paper.trades([-150.0] * 5)  # 5 trades: below min_trades, whatever they look like
    for _ in range(3):
        small = monitor.check(cfg())
        assert small.breaches and not small.enough and small.action is None
    assert registry.production_version("nt8-agent") == v2
    paper.trades([-150.0, 40.0] * 5)  # 15 trades now, losing
    first = monitor.check(cfg())
    assert first.enough and {"win_rate", "sharpe", "profit_factor"} <= set(first.breaches) and first.action is None
    second = monitor.check(cfg())
    assert second.action == "rollback" and registry.production_version("nt8-agent") == v1
    event = registry.history("nt8-agent")[-1]
    assert event["action"] == "rollback" and event["reason"].startswith("drift monitor: win rate")
    assert event["metrics"]["monitor/n_trades"] == 15
    assert deployed_manifest(tmp_path / "deploy")["version"] == v1
    history = mlflow.MlflowClient().get_metric_history(second.run_id, "monitor/win_rate")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    logged = mlflow.get_run(second.run_id).data.metrics
    assert logged["monitor/eval_win_rate"] == 0.6 and set(second.psi) == {"ret_z", "range_z", "volume_z"}
    assert "monitor/psi/ret_z" in logged
    assert monitor.check(cfg()).version == v1  # the next pass watches the version now in Production

    assert json.loads(mlflow.MlflowClient().get_model_version("nt8-agent", v1).tags["rollback_metrics"])["monitor/n_trades"] == 15
    v1_paper = Paper(tmp_path / "buffer", v1)  # v1 loses too (against its own evaluation, which the
    v1_paper.step = paper.step  # rollback kept), and nothing is left to roll back to: flat
    v1_paper.trades([-150.0, -150.0, 40.0] * 6)
    assert monitor.check(cfg()).action is None
    third = monitor.check(cfg())
    assert third.action == "rollback" and registry.production_version("nt8-agent") is None
    down = registry.history("nt8-agent")[-1]
    assert (down["action"], down["previous"]) == ("stand_down", v1) and "nothing to roll back to" in down["reason"]
    assert not (tmp_path / "deploy" / "current").exists() and (tmp_path / "deploy" / "reload.json").exists()
    assert monitor.check(cfg()).action is None  # nothing in Production: nothing to watch


def test_a_short_dip_does_not_act_and_alert_changes_nothing_but_the_status(deployed, tmp_path):
    from conftest import ROOT, run_module
    from mlproject import registry
    from pipelines import monitor

    cfg, paper, _, v2 = deployed
    paper.trades([-150.0, 40.0] * 6)  # 12 trades, losing
    assert monitor.check(cfg("alert")).breaches
    paper.trades([200.0, 90.0] * 12)  # the dip is over: the window looks fine again
    good = monitor.check(cfg("alert"))
    assert not good.breaches and good.action is None
    paper.trades([-150.0] * 9)  # bad again: one bad pass, not two in a row
    assert monitor.check(cfg("alert")).action is None
    assert registry.production_version("nt8-agent") == v2
    acted = monitor.check(cfg("alert"))  # the second bad pass in a row
    assert acted.action == "alert" and registry.production_version("nt8-agent") == v2
    out = run_module(["python", "-m", "pipelines.status", "--config", str(ROOT / "conf" / "smoke.yaml")], tmp_path)
    assert out.returncode == 1 and "DRIFT MONITOR ALERT" in out.stdout, out.stderr[-2000:]


def test_pause_switches_the_bridge_kill_switch_on_through_the_loop(deployed, tmp_path):
    from mlproject import registry
    from mlproject.bridge.server import kill_file_of
    from pipelines import monitor

    cfg, paper, _, v2 = deployed
    paper.trades([-150.0, 40.0] * 6)
    kill = kill_file_of(cfg("pause"))
    assert not kill.exists()
    passes = monitor.main(cfg("pause"), loop=True, every="0s", max_rounds=2)
    assert [p.action for p in passes] == [None, "pause"]
    assert kill.exists() and kill.read_text().startswith(f"drift monitor, v{v2}: Sharpe")
    assert registry.production_version("nt8-agent") == v2  # paused, not rolled back


def test_an_expired_model_alerts_or_pauses_without_a_trade_and_an_unexpired_one_does_not(deployed, tmp_path):
    """Model expiry: the training data's end (the training run's data.train_window) older than
    monitoring.max_model_age breaches with no live sample at all; confirmed like any breach, it
    alerts (with action rollback too: the version before is older still) or pauses the bridge."""
    import mlflow
    import pandas as pd

    from mlproject import registry
    from mlproject.bridge.server import kill_file_of
    from pipelines import monitor

    cfg, _, v1, v2 = deployed
    client = mlflow.MlflowClient()
    for version in (v1, v2):
        client.set_tag(client.get_model_version("nt8-agent", version).run_id, "data.train_window",
                       "2024-01-02 14:31:00+00:00 .. 2024-03-01 21:00:00+00:00")
    now = pd.Timestamp("2024-03-31 21:00", tz="UTC")
    assert monitor.model_age_breach("nt8-agent", v2, "31d", now) is None
    assert monitor.model_age_breach("nt8-agent", v2, "29d", now) == (
        "model age: trained on data up to 2024-03-01 21:00 UTC, 30 days ago > monitoring.max_model_age 29d")
    assert monitor.model_age_breach("nt8-agent", v2, None, now) is None
    assert monitor.check(cfg("rollback")).breaches == {}  # no max_model_age: no expiry
    aged = cfg("rollback", "monitoring.max_model_age=90d")  # the tag says 2024: long expired
    first = monitor.check(aged)
    assert set(first.breaches) == {"model_age"} and not first.enough and first.action is None
    second = monitor.check(aged)
    assert second.action == "alert" and registry.production_version("nt8-agent") == v2
    assert client.get_model_version("nt8-agent", v2).tags["monitor.alert"].startswith("alert: model age: trained")
    kill = kill_file_of(aged)
    assert not kill.exists()
    paused = cfg("pause", "monitoring.max_model_age=90d", f"continuous_learning.state_dir={tmp_path / 'state2'}")
    assert [monitor.check(paused).action for _ in range(2)] == [None, "pause"]
    assert kill.read_text().startswith(f"drift monitor, v{v2}: model age")
    with pytest.raises(ValueError, match="not a duration"):
        cfg("alert", "monitoring.max_model_age=ninety days")


def test_the_monitor_command_loops_until_sigterm(deployed, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    cfg, paper, _, _ = deployed
    paper.trades([40.0] * 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.monitor", "--config", str(ROOT / "conf" / "smoke.yaml"),
                             "--loop", "--every", "1s", "--set",
                             f"continuous_learning.experience_storage={tmp_path / 'buffer'} "
                             f"continuous_learning.state_dir={tmp_path / 'state'}"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.time() + 120
    while time.time() < deadline and sum("monitor: nt8-agent v" in line for line in lines) < 2:
        lines.append(proc.stderr.readline())
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines)[-3000:] + rest[-3000:]
    assert "stopped after" in rest and sum("monitor: nt8-agent v" in line for line in lines) >= 2


def test_two_monitors_at_once_lose_no_pass(deployed, tmp_path):
    """A --loop monitor beside maintenance's pass: the hysteresis is read, updated and written by
    one at a time (a lost update would count 1 pass, or make two monitor runs)."""
    import json
    import os
    import subprocess
    import sys

    import mlflow

    from conftest import ROOT

    cfg, paper, _, v2 = deployed
    paper.trades([-150.0, 40.0] * 6)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "pipelines.monitor", "--config", str(ROOT / "conf" / "smoke.yaml"), "--set",
            f"continuous_learning.experience_storage={tmp_path / 'buffer'} continuous_learning.state_dir={tmp_path / 'state'}"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    entry = json.loads((tmp_path / "state" / "monitor.json").read_text())[f"nt8-agent/{v2}"]
    assert entry["passes"] == 3
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`pipeline.step` = 'monitor'")
    assert len(runs) == 1
