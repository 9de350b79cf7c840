"""Training with a real Ray session and a real sqlite MLflow store."""

from __future__ import annotations

import math

import json
import shlex
import textwrap
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

from conftest import ROOT, momentum_bars, run_module
from mlproject.backtest import constant_policy, play_episode
from mlproject.config import load_config
from mlproject.data import split_bars
from mlproject.policy import fresh_module, load_module, module_policy, module_weights
from mlproject import training
from pipelines import train

LEARNABLE = [
    "env.window=2", "env.episode_bars=null",
    "env.instrument={symbol: T, tick_size: 0.25, point_value: 50, commission_per_side: 0.5, "
    "slippage_ticks: 0, max_contracts: 1}",
    "train.train_batch_size=1000", "train.minibatch_size=100", "train.num_epochs=4", "train.lr=0.001",
    "train.gamma=0.9", "train.train_episode_bars=200",
]


def test_learns_a_planted_signal_out_of_sample(ray_session):
    """Each bar follows the previous bar's direction 85% of the time: the trained policy must beat
    flat and buy-and-hold on the unseen test split (fixed seeded budget: 10 iterations)."""
    cfg = load_config(ROOT / "conf" / "smoke.yaml", LEARNABLE)
    splits = split_bars(momentum_bars(6000, seed=0))
    algo = training.algorithm_config(cfg, training.training_env_config(cfg, splits.train), seed=0).build_algo()
    try:
        for _ in range(10):
            algo.train()
        env = cfg.env.model_dump()
        trained = play_episode(module_policy(algo.get_module()), splits.test, env).metrics["total_return"]
    finally:
        algo.stop()
    flat = play_episode(constant_policy(1), splits.test, env).metrics["total_return"]
    buy_hold = play_episode(constant_policy(2), splits.test, env).metrics["total_return"]
    assert flat == 0.0
    assert trained > max(flat, buy_hold) + 0.05, (trained, flat, buy_hold)


def test_same_seed_same_first_iteration(ray_session, small_bars):
    cfg = load_config(ROOT / "conf" / "smoke.yaml")
    env_config = training.training_env_config(cfg, small_bars)

    def first_iteration(seed):
        algo = training.algorithm_config(cfg, env_config, seed).build_algo()
        try:
            return training.iteration_metrics(algo.train())
        finally:
            algo.stop()

    a, b, c = first_iteration(3), first_iteration(3), first_iteration(4)
    keys = ["train/policy_loss", "train/vf_loss", "train/entropy", "train/kl", "train/env_steps"]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert a["train/vf_loss"] != c["train/vf_loss"]


def test_skipping_rllibs_nan_gradient_checks_leaves_learning_unchanged(ray_session, small_bars):
    """Our config sets torch_skip_nan_gradients (no isfinite pass per gradient and parameter per
    minibatch): seeded, the weights after 3 iterations equal those of RLlib's default bit for bit."""
    cfg = load_config(ROOT / "conf" / "smoke.yaml")
    env_config = training.training_env_config(cfg, small_bars)

    def trained_weights(skip: bool):
        config = training.algorithm_config(cfg, env_config, seed=5)
        assert config.torch_skip_nan_gradients is True  # what training uses
        algo = config.framework(torch_skip_nan_gradients=skip).build_algo()
        try:
            start = module_weights(algo.get_module())
            results = [algo.train() for _ in range(3)]
            return start, module_weights(algo.get_module()), training.iteration_metrics(results[-1])
        finally:
            algo.stop()

    start, ours, metrics = trained_weights(True)
    _, default, _ = trained_weights(False)
    assert ours.keys() == default.keys() and ours
    assert all(np.array_equal(ours[k], default[k]) for k in ours)
    assert any(not np.array_equal(ours[k], start[k]) for k in ours)  # it did learn
    t = cfg.train
    assert metrics["train/sgd_steps"] >= t.num_epochs * t.train_batch_size / t.minibatch_size


def test_non_finite_weights_stop_training_naming_the_iteration():
    module = fresh_module(12, 3, seed=0)
    training.check_finite(SimpleNamespace(get_module=lambda: module), 4)  # finite: nothing happens
    with torch.no_grad():
        next(module.parameters())[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="iteration 7: non-finite weights"):
        training.check_finite(SimpleNamespace(get_module=lambda: module), 7)


def test_run_logs_metrics_params_data_checkpoint_and_version(trained_store):
    uri, result, cfg, _ = trained_store
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "train/env_steps")
    # Steps are env steps, so curves of runs with other batch sizes line up.
    assert [m.step for m in history] == [cfg.train.train_batch_size, 2 * cfg.train.train_batch_size]
    assert history[-1].value == 2 * cfg.train.train_batch_size
    for key in ("train/policy_loss", "train/vf_loss", "train/entropy", "train/kl", "train/steps_per_s",
                "val/sharpe", "val/total_return", "val/max_drawdown"):
        assert key in run.data.metrics, key
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    # Synthetic RTH minute bars: 390 a day, 252 days (validation split's timestamps).
    assert float(run.data.params["periods_per_year"]) == 390 * 252
    assert run.data.params["train.bar_period"] == "0 days 00:01:00"
    assert "data.warnings" not in run.data.tags  # the smoke data fits MES
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"train-split", "validation-split"}
    assert run.data.tags["device"] == "cpu" and run.data.tags["ray_version"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"checkpoint", "config.yaml"} <= artifacts
    version = mlflow.MlflowClient().get_model_version("nt8-agent", result.registered_version)
    for tag in ("config_digest", "git_commit", "data.train_window", "run_id"):
        assert version.tags[tag], tag
    assert version.tags["run_id"] == result.run_id and "parent_version" not in version.tags
    # One "validation Sharpe": the run's sharpe (the name evaluate and promote runs use) is the
    # selected checkpoint's val/sharpe, its median over the validation windows, and so are
    # val_best/sharpe, the selection score and the version's tag; no other name holds another.
    best = int(run.data.metrics["val_best/iteration"])
    curve = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(result.run_id, "val/sharpe")}
    selected = curve[best * cfg.train.train_batch_size]
    assert cfg.train.val_metric == "sharpe" and math.isfinite(selected)
    assert run.data.metrics["sharpe"] == selected == run.data.metrics["val_best/sharpe"] == result.best_metric
    assert float(version.tags["val_median_sharpe"]) == selected
    assert not [k for k in run.data.metrics if "selection" in k]


def test_pyfunc_loads_in_a_fresh_process_without_ray(trained_store, tmp_path):
    uri, result, cfg, _ = trained_store
    obs = training.example_observations(momentum_bars(400, seed=5), cfg, 6)
    np.save(tmp_path / "obs.npy", obs)
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, mlflow
        model = mlflow.pyfunc.load_model("models:/nt8-agent/{result.registered_version}")
        actions = model.predict(np.load("{tmp_path / 'obs.npy'}"))
        import ray
        print(json.dumps({{"actions": np.asarray(actions).tolist(), "ray_running": ray.is_initialized()}}))
    """)
    out = run_module(["python", "-c", script], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    n_actions = 2 * 2 + 1  # smoke profile: MES, max_contracts 2
    assert len(answer["actions"]) == 6 and all(0 <= a < n_actions for a in answer["actions"])
    assert answer["ray_running"] is False


def test_warm_start_records_parent_and_starts_from_its_weights(trained_store):
    uri, result, cfg, _ = trained_store
    parent_uri = f"models:/nt8-agent/{result.registered_version}"
    module_dir, parent, parent_settings = training.resolve_init_from(parent_uri)
    assert parent["parent_version"] == result.registered_version
    assert parent_settings.window == cfg.env.window  # the parent's recorded settings come along
    parent_weights = module_weights(load_module(module_dir))
    env_config = training.training_env_config(cfg, momentum_bars(1000, seed=1))
    algo = training.algorithm_config(cfg, env_config, seed=123).build_algo()
    try:
        fresh = module_weights(algo.get_module())
        shared = sorted(set(fresh) & set(parent_weights))
        assert shared and any(not np.array_equal(fresh[k], parent_weights[k]) for k in shared)
        training.warm_start(algo, module_dir, algo.get_module().observation_space.shape)
        loaded = module_weights(algo.get_module())
        learner = module_weights(algo.learner_group._learner.module["default_policy"])
        for k in shared:
            np.testing.assert_array_equal(loaded[k], parent_weights[k])
            np.testing.assert_array_equal(learner[k], parent_weights[k])
    finally:
        algo.stop()
    child = train.main(cfg.model_copy(update={"train": cfg.train.model_copy(update={"iterations": 1})}),
                       init_from=parent_uri)
    version = mlflow.MlflowClient().get_model_version("nt8-agent", child.registered_version)
    assert version.tags["parent_version"] == result.registered_version
    assert mlflow.get_run(child.run_id).data.tags["parent_uri"] == parent_uri


def test_warm_start_rejects_a_policy_for_other_observations(trained_store):
    uri, result, cfg, _ = trained_store
    from mlproject.policy import PolicySettings

    parent_uri = f"models:/nt8-agent/{result.registered_version}"
    module_dir, _, parent_settings = training.resolve_init_from(parent_uri)
    with pytest.raises(ValueError, match="expects observations of shape .* or drop --init-from"):
        training.warm_start(None, module_dir, (7,))
    training.check_init_from(parent_uri, module_dir, parent_settings, cfg)  # its own config: fine
    other = cfg.model_copy(update={"env": cfg.env.model_copy(update={"norm_window": 50})})
    with pytest.raises(ValueError, match=r"\(model vs config: norm_window 100 vs 50\).* e\.g\. --set env\.norm_window=100,"):
        training.check_init_from(parent_uri, module_dir, parent_settings, other)
    with pytest.raises(ValueError, match="no version of 'nt8-agent' is in stage 'Production'"):
        training.resolve_init_from("models:/nt8-agent/Production")


def test_init_from_a_model_of_other_settings_exits_2_saying_how_to_continue_it(trained_store):
    """docs/training.md's `python -m pipelines.train --init-from models:/nt8-agent/Production` with the
    default config (ES, window 32, 1 contract, 64x64 network) on the demo's model (MES, window 16,
    2 contracts, 32x32): one line naming the settings and the --set items that continue the model,
    before any run or Ray starts; those items make the check pass."""
    from mlproject.config import load_config

    uri, result, cfg, folder = trained_store
    parent_uri = f"models:/nt8-agent/{result.registered_version}"
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    out = run_module(["python", "-m", "pipelines.train", "--init-from", parent_uri,
                      "--set", f"mlflow.experiment={cfg.mlflow.experiment}"], cwd=folder, env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 2, out.stderr[-2000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert error == [
        f"error: --init-from {parent_uri} was trained with other settings than this config (model vs config: "
        "window 16 vs 32; max_contracts 2 vs 1; train.hiddens [32, 32] vs [64, 64]): use the config it was trained "
        "with (its settings are in the model's MLmodel metadata.nt8_policy and its training run's params), e.g. "
        "--set env.window=16 --set env.instrument.preset=MES --set env.instrument.max_contracts=2 "
        "--set 'train.hiddens=[32,32]', or drop --init-from to train from scratch"], out.stderr[-2000:]
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before
    suggested = [item for item in shlex.split(error[0].split("e.g. ")[1].split(", or drop")[0]) if item != "--set"]
    module_dir, _, parent_settings = training.resolve_init_from(parent_uri)
    training.check_init_from(parent_uri, module_dir, parent_settings, load_config(None, suggested))


def test_mlflow_run_train_entry_point(tmp_path, mlflow_store):
    out = run_module(["mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
                      "-P", "config=conf/smoke.yaml", "-P", "iterations=1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "val/sharpe" in runs[0].data.metrics
    assert mlflow.MlflowClient().get_model_version("nt8-agent", "1").run_id == runs[0].info.run_id
    # Third-party noise silenced at its source (quiet.py, tracking.py, log_sys_usage, the typed
    # predict): none of it may come back in a training run's output.
    output = out.stdout + out.stderr
    for noise in ("Install gputil", "Add type hints to the `predict` method", "Downloading artifacts",
                  "RLModule(config=", "new API stack"):
        assert noise not in output, noise


def test_early_stopping_keeps_the_best_checkpoint(ray_session, mlflow_store, small_bars, tmp_path):
    cfg = load_config(ROOT / "conf" / "smoke.yaml", ["train.eval_every=1", "train.patience=2"])
    splits = split_bars(small_bars)
    algo = training.algorithm_config(cfg, training.training_env_config(cfg, splits.train), seed=0).build_algo()
    try:
        with mlflow.start_run():
            best = training.train_loop(algo, cfg, 40, splits.validation, tmp_path)
    finally:
        algo.stop()
    assert best["iterations_run"] < 40  # a validation without improvement came before the budget ran out
    assert best["iterations_run"] - best["iteration"] == cfg.train.patience
    scores = [h.get("val/sharpe", -math.inf) for h in best["history"] if "val/total_return" in h]
    assert best["score"] == max(scores) == best["history"][best["iteration"] - 1].get("val/sharpe", -math.inf)
    saved = load_module(best["dir"])
    assert saved.observation_space.shape == (cfg.env.window * 5 + 2,)


def test_patience_shorter_than_the_evaluation_cadence_is_refused():
    from mlproject.config import ConfigError

    with pytest.raises(ConfigError, match=r"patience \(2\) must be >= eval_every \(5\)"):
        load_config(None, ["train.patience=2", "train.eval_every=5"])
