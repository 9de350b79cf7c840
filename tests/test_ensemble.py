"""train.ensemble: K policies acting on their mean logits, logged and served as one model."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from conftest import fresh_store
from mlproject.ensemble import ensemble_fast_greedy, ensemble_policy, mean_logits
from mlproject.policy import MODULE_SUBDIR, find_module_dirs, fresh_module, load_module, load_policy_model


def _reference(modules, obs: np.ndarray) -> np.ndarray:
    """argmax of the mean of forward_inference's logits (RLlib's own path), summed then divided."""
    from ray.rllib.core.columns import Columns

    batch = torch.from_numpy(obs)
    with torch.no_grad():
        logits = [m.forward_inference({Columns.OBS: batch})[Columns.ACTION_DIST_INPUTS] for m in modules]
    return torch.argmax(mean_logits(logits), dim=-1).numpy()


def _saved_ensemble(tmp_path, modules, size):
    from mlflow.models import infer_signature

    from mlproject.training import POLICY_MODEL_FILE, pip_requirements

    artifacts = {}
    for k, module in enumerate(modules):
        module.save_to_path(tmp_path / f"m{k}")
        artifacts["rl_module" if k == 0 else f"rl_module_{k}"] = str(tmp_path / f"m{k}")
    example = np.zeros((2, size), np.float32)
    mlflow.pyfunc.save_model(tmp_path / "model", python_model=str(POLICY_MODEL_FILE), artifacts=artifacts,
                             signature=infer_signature(example, np.zeros(2, np.int64)),
                             pip_requirements=pip_requirements())
    return tmp_path / "model"


def test_an_ensemble_acts_on_its_members_mean_logits_the_same_way_everywhere(tmp_path):
    """The logged pyfunc model, the backtest policy and the bridge's float64 path all give the
    argmax of the members' mean forward_inference logits, bit for bit, also on near ties; and
    the ensemble is not simply its first member (the test could not fail otherwise)."""
    size = 16 * 5 + 2
    modules = [fresh_module(size, 5, hiddens=(32, 32), seed=s) for s in (11, 12, 13)]
    model = _saved_ensemble(tmp_path, modules, size)
    assert [p.name for p in find_module_dirs(model)] == ["m0", "m1", "m2"]  # member order
    loaded = load_policy_model(str(model))
    backtest_policy, bridge_policy = ensemble_policy(modules), ensemble_fast_greedy(modules)
    rng = np.random.default_rng(0)
    differ = 0
    for rows in (1, 5, 256, 2048):
        obs = rng.normal(0.0, 2.0, (rows, size)).astype(np.float32)
        want = _reference(modules, obs)
        assert np.array_equal(loaded.predict(obs), want)
        assert np.array_equal(backtest_policy(obs), want)
        assert np.array_equal(bridge_policy(obs), want)
        for row in obs[:8]:  # the bridge decides one bar at a time
            assert bridge_policy(row)[0] == _reference(modules, row[None])[0]
        differ += int((want != _reference(modules[:1], obs)).sum())
    assert differ > 0
    # Where the two best mean logits are closer than float32 can tell apart, the bridge asks the
    # exact path: members whose logits cancel (a member and its negation) tie on every action.
    negated = fresh_module(size, 5, hiddens=(32, 32), seed=11)
    negated.pi.net.mlp[-1].weight.data.neg_()
    negated.pi.net.mlp[-1].bias.data.neg_()
    tied = [modules[0], negated]
    obs = rng.normal(0.0, 2.0, (64, size)).astype(np.float32)
    assert np.array_equal(ensemble_fast_greedy(tied)(obs), _reference(tied, obs))


def test_a_single_policy_model_is_an_ensemble_of_one(tmp_path):
    module = fresh_module(42, 5, seed=3)
    model = _saved_ensemble(tmp_path, [module], 42)
    assert len(find_module_dirs(model)) == 1
    obs = np.random.default_rng(1).normal(0.0, 2.0, (64, 42)).astype(np.float32)
    assert np.array_equal(load_policy_model(str(model)).predict(obs), _reference([module], obs))


def test_training_an_ensemble_registers_one_model_with_a_nested_run_per_member(ray_session, tmp_path):
    """train.ensemble=2: one registered version whose pyfunc carries both members and acts on
    their mean logits (equal to the members' checkpoints played as an ensemble), a nested run per
    member with its seed, the trials of one member's selection; the checkpoint folder holds each
    member, and --init-from the ensemble finds both members."""
    from mlproject.config import load_config
    from mlproject.training import parent_policy, train_policy

    from conftest import ROOT

    cfg = load_config(ROOT / "conf" / "smoke.yaml", ["train.iterations=2", "train.ensemble=2"])
    with fresh_store(tmp_path):
        result = train_policy(cfg)
        client = mlflow.MlflowClient()
        run = client.get_run(result.run_id)
        assert run.data.tags["ensemble"] == "2"
        children = client.search_runs([run.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{result.run_id}'")
        assert sorted(c.data.tags["ensemble.seed"] for c in children) == [str(cfg.seed), str(cfg.seed + 1000)]
        assert all("val_best/sharpe" in c.data.metrics or "val_best/iteration" in c.data.metrics for c in children)
        assert result.checkpoints_considered == 2  # eval_every 1, 2 iterations: one member's selection
        version = client.get_model_version("nt8-agent", result.registered_version)
        assert version.tags["trials.checkpoints"] == "2"
        local = mlflow.artifacts.download_artifacts(f"models:/nt8-agent/{result.registered_version}")
        dirs = find_module_dirs(local)
        assert len(dirs) == 2
        checkpoints = find_module_dirs(mlflow.artifacts.download_artifacts(result.checkpoint_uri))
        assert len(checkpoints) == 2
        modules = [load_module(d) for d in dirs]
        obs = np.random.default_rng(2).normal(0.0, 2.0, (512, modules[0].observation_space.shape[0])).astype(np.float32)
        loaded = load_policy_model(f"models:/nt8-agent/{result.registered_version}")
        assert np.array_equal(loaded.predict(obs), _reference(modules, obs))
        assert np.array_equal(loaded.predict(obs), ensemble_policy([load_module(c) for c in checkpoints])(obs))
        parents, tags = parent_policy(f"models:/nt8-agent/{result.registered_version}", cfg)
        assert len(parents) == 2 and tags["parent_version"] == result.registered_version
        assert all((p / "module_state.pkl").exists() or (p / MODULE_SUBDIR).exists() for p in parents)


def test_ensemble_size_is_checked():
    from mlproject.config import ConfigError, load_config

    from conftest import ROOT

    with pytest.raises(ConfigError, match="train.ensemble"):
        load_config(ROOT / "conf" / "smoke.yaml", ["train.ensemble=0"])
