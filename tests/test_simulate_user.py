"""The walk-forward simulation as a user meets it: its warnings, the registry it leaves, the run page."""

from __future__ import annotations

import logging
import re

import mlflow
import pytest
from conftest import ROOT
from mlflow import MlflowClient

from mlproject.config import load_config
from mlproject.data import load_source
from test_monitor import deployed  # noqa: F401 (fixture)
from test_registry import store  # noqa: F401 (fixture)


def test_a_simulation_warns_once_naming_the_file_and_leaves_no_sim_models_and_logs_equity_curves(
        tmp_path, mlflow_store, ray_session, caplog):
    """... and, with promotion.shadow_bars, a challenger shadows the next period in Staging before it
    may trade: the learning agent stays flat in the first period, and the shadow's verdict on it is
    reported (and acted on) at the second decision point."""
    from pipelines import orchestrate

    sets = ["train.iterations=1", "data.synthetic.n_bars=1400", "continuous_learning.evaluation_episodes=2",
            "train.val_windows=2", f"data.output_dir={tmp_path / 'bars'}", "promotion.min_trades=0",
            "promotion.shadow_bars=20", "promotion.shadow_min_trades=0"]
    cfg = load_config(ROOT / "conf" / "smoke.yaml", sets)
    bars = load_source(cfg)
    bars[["open", "high", "low", "close"]] = (bars[["open", "high", "low", "close"]] * 1.00001).round(4)
    user_file = tmp_path / "spot.parquet"  # prices with 4 decimals: off MES's 0.25 grid
    bars.to_parquet(user_file)
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [*sets, f"data.source={user_file}"])
    client = MlflowClient()
    # Leftovers of killed simulations: one whose run ended (deleted now), one still running (kept).
    experiment = mlflow.set_experiment("elsewhere").experiment_id
    killed, running = client.create_run(experiment), client.create_run(experiment)
    client.set_terminated(killed.info.run_id, "KILLED")
    for run in (killed, running):
        client.create_registered_model(f"nt8-agent-sim-{run.info.run_id[:8]}", tags={"sim.run_id": run.info.run_id})
    with caplog.at_level(logging.WARNING):
        result = orchestrate.main(cfg, "simulate", periods=2, start_fraction=0.6)
    client.set_terminated(running.info.run_id, "KILLED")
    grid = [r.getMessage() for r in caplog.records if "tick grid" in r.getMessage()]
    assert len(grid) == 1 and grid[0].startswith(f"{user_file}:"), grid
    names = {m.name for m in client.search_registered_models()}
    assert names == {f"nt8-agent-sim-{running.info.run_id[:8]}"}, names
    run_id = result.run_id
    for agent in ("learning", "never_retrained", "buy_hold"):
        history = client.get_metric_history(run_id, f"equity/{agent}")
        assert len(history) > 100 and max(m.step for m in history) == len(result.simulate.equity[agent]) - 1
        assert history[0].value == pytest.approx(cfg.env.initial_equity)
    assert "(deleted at the end of the simulation" in result.summary
    sim = result.simulate
    assert sim.decisions[0] == "staged" and sim.flat_periods[0].startswith("period 1: v1 shadow-trades in Staging")
    assert len(sim.shadow) == 1 and sim.shadow[0].startswith("point 2: Staging v1 shadowing flat (nothing in Production)")
    verdict = re.search(r" trades(?: \([^)]*\))?: (promoted|archived|waiting)", sim.shadow[0])
    assert verdict, sim.shadow  # 20 bars are enough: decided
    assert len(sim.flat_periods) == (1 if verdict.group(1) == "promoted" else 2), (sim.shadow, sim.flat_periods)
    assert "shadow evidence at point 2: Staging v1" in result.summary


def test_a_maintenance_cycle_links_the_versions_long_running_monitor_run(deployed, tmp_path):
    """The monitor run stays top level (one curve over every pass, whichever cycle made it), says
    so on its page, and each maintenance cycle run names it."""
    from pipelines import orchestrate

    cfg, paper, v1, v2 = deployed
    paper.trades([10.0, -5.0])
    runs = [orchestrate.main(cfg(), "maintenance") for _ in range(2)]
    monitor_runs = {mlflow.get_run(r.run_id).data.tags["cycle.monitor_run"] for r in runs}
    assert len(monitor_runs) == 1
    monitor_run = mlflow.get_run(monitor_runs.pop())
    assert monitor_run.info.run_name == f"monitor nt8-agent v{v2}" and "mlflow.parentRunId" not in monitor_run.data.tags
    assert "sits at top level" in monitor_run.data.tags["mlflow.note.content"]
    assert [m.step for m in MlflowClient().get_metric_history(monitor_run.info.run_id, "monitor/breaches")] == [1, 2]
    assert f"(run {monitor_run.info.run_id})" in runs[1].summary


def test_the_summary_names_the_experiment_the_run_is_in(tmp_path, mlflow_store, monkeypatch):
    """Under `mlflow run` (MLFLOW_RUN_ID: a run it created, in Default) the summary and its UI
    link name the run's experiment, not the configured one."""
    from pipelines import orchestrate

    cfg = load_config(ROOT / "conf" / "smoke.yaml", [f"continuous_learning.experience_storage={tmp_path / 'b'}",
                                                     f"continuous_learning.state_dir={tmp_path / 'state'}"])
    run = MlflowClient().create_run("0")  # what `mlflow run .` does without --experiment-name
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    result = orchestrate.main(cfg, "maintenance")
    assert result.run_id == run.info.run_id
    first = result.summary.splitlines()[0]
    assert "experiment Default, not mlflow.experiment nt8-rl-smoke" in first and "--experiment-name" in first, first
    assert "/#/experiments/0/runs" in result.summary
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # MLflow unsets it once it resumed the run
    again = orchestrate.main(cfg, "maintenance").summary.splitlines()[0]
    assert again.endswith("experiment nt8-rl-smoke)"), again
