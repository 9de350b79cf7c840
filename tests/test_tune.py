"""The tracked search (pipelines.tune): Ray Tune trials as nested MLflow runs, the winner
registered with every validation counted as a trial, and put through the gate."""

from __future__ import annotations

import mlflow
import pytest

from conftest import ROOT, fresh_store


def _config(extra=()):
    from mlproject.config import load_config

    # Two trials that differ in the learning rate only; every other key of the space pinned.
    pins = ["tune.space.train.gamma=[0.99]", "tune.space.train.entropy_coeff=[0.0]", "tune.space.env.window=[16]",
            "tune.space.env.feature_set=[base]", "tune.space.env.reward=[money]",
            "tune.space.continuous_learning.retrain_history_bars=[null]", "tune.space.train.lr=[0.0001,0.001]"]
    return load_config(ROOT / "conf" / "smoke.yaml", [*pins, "tune.num_samples=2", "tune.grace_period=2",
                                                      "train.iterations=2", *extra])


def test_tune_runs_trials_as_nested_runs_and_gates_the_registered_winner(ray_session, tmp_path):
    from mlproject.tuning import tune_policy

    cfg = _config()
    with fresh_store(tmp_path):
        result = tune_policy(cfg)
        client = mlflow.MlflowClient()
        tune_run = client.get_run(result.run_id)
        children = client.search_runs([tune_run.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
        trials = [c for c in children if c.data.tags.get("pipeline.step") == "tune-trial"]
        assert len(trials) == 2 and result.trials == 2
        assert {float(t.data.params["train.lr"]) for t in trials} <= {0.0001, 0.001}  # drawn from the space
        assert all("best_score" in t.data.metrics and "val/sharpe" in t.data.metrics for t in trials)
        # Every validation of every trial is a trial for the Deflated Sharpe (eval_every 1, 2 iterations;
        # a grace period of 2: ASHA stops no trial before its end).
        assert result.validations == sum(int(t.data.metrics["validations"]) for t in trials) == 4
        version = client.get_model_version("nt8-agent", result.registered_version)
        assert version.tags["trials.checkpoints"] == "4" and version.tags["tune.trials"] == "2"
        assert float(version.tags["tune.overrides"].split("train.lr=")[1].split()[0]) == result.best_overrides["train.lr"]
        best = max(trials, key=lambda t: t.data.metrics["best_score"])
        assert result.best_score == pytest.approx(best.data.metrics["best_score"])
        promote = [c for c in children if c.data.tags.get("pipeline.step") == "promote"]
        assert len(promote) == 1 and result.decision is not None
        assert result.decision.version == result.registered_version


def test_a_bad_space_key_or_value_fails_before_ray_starts(tmp_path):
    from mlproject.config import ConfigError
    from mlproject.tuning import check_space

    with pytest.raises(ConfigError, match=r"tune.space.train.lrr value 0.1: train.lrr: no such setting"):
        check_space(_config(["tune.space.train.lrr=[0.1]"]))
    with pytest.raises(ConfigError, match=r"tune.space.env.reward value 'sharpe'"):
        check_space(_config(["tune.space.env.reward=[money,sharpe]"]))
