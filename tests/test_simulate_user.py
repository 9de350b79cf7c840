"""The walk-forward simulation as a user meets it: its warnings, the registry it leaves, the run page."""

from __future__ import annotations

import logging

import mlflow
import pytest
from conftest import ROOT
from mlflow import MlflowClient

from mlproject.config import load_config
from mlproject.data import load_source


def test_a_simulation_warns_once_naming_the_file_and_leaves_no_sim_models_and_logs_equity_curves(
        tmp_path, mlflow_store, ray_session, caplog):
    from pipelines import orchestrate

    sets = ["train.iterations=1", "data.synthetic.n_bars=1400", "continuous_learning.evaluation_episodes=2",
            "train.val_windows=2", f"data.output_dir={tmp_path / 'bars'}"]
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
    run_id = result["run_id"]
    for agent in ("learning", "never_retrained", "buy_hold"):
        history = client.get_metric_history(run_id, f"equity/{agent}")
        assert len(history) > 100 and max(m.step for m in history) == len(result["simulate"]["equity"][agent]) - 1
        assert history[0].value == pytest.approx(cfg.env.initial_equity)
    assert "(deleted at the end of the simulation" in result["summary"]
