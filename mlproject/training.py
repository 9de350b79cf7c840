"""Train the agent with Ray RLlib (PPO, new API stack) and track it in MLflow: the step behind
``python -m pipelines.train`` and the cycle's training (:func:`train_policy`).

Trains on the training split, runs a deterministic validation backtest every
``train.eval_every`` iterations (``val/<metric>``: each metric's median over
``train.val_windows`` windows), keeps the checkpoint with the best ``val/<train.val_metric>`` and
stops early after ``train.patience`` iterations without improvement. The selected checkpoint's
values are the run's ``val_best/<metric>`` and its ``sharpe``, ``total_return``, ... (the names
evaluate and promote runs use). The best policy is logged as an
MLflow pyfunc model (no Ray needed to load it) and registered as a new version of
``train.register_model`` (``nt8-agent``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import envs
from envs.futures_env import FuturesTradingEnv
from mlproject.cluster import ray_session
from mlproject.config import Config
from mlproject.data import load_source, split_bars
from mlproject.ensemble import ensemble_policy
from mlproject.evaluation import backtest
from mlproject.metrics import periods_per_year
from mlproject.ood import REFERENCE_KEY, reference_or_none
from mlproject.policy import (
    MODULE_SUBDIR,
    SETTINGS_KEY,
    PolicySettings,
    continue_differences,
    greedy_actions,
    load_module,
    member_artifact,
    module_policy,
    module_weights,
    network_settings,
    resolve_init_from,
    set_items,
)
from mlproject.preflight import check_splits, warn_if_instrument_misfits
from mlproject.quiet import quiet_env_reregistration, quiet_rllib
from mlproject.registry import record_trials, register_version
from mlproject.tracking import git_commit, log_dataset, log_headline, pipeline_run, setup_tracking

log = logging.getLogger(__name__)

RUNTIME_PACKAGES = ("mlflow", "ray", "torch", "numpy", "gymnasium", "pandas", "pyarrow")
"""Pinned in the logged model's pip requirements (versions as installed here)."""
POLICY_MODEL_FILE = Path(__file__).resolve().parent / "policy_model.py"


@dataclass
class TrainResult:
    """What a training run produced."""

    run_id: str
    model_uri: str
    registered_version: str | None
    best_metric: float
    best_iteration: int
    iterations_run: int
    checkpoint_uri: str
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoints_considered: int = 1
    """Validated checkpoints the best was selected from (trials for the Deflated Sharpe)."""


# -- pieces ------------------------------------------------------------------------------------


def gpus_per_learner(cfg: Config) -> int:
    """1 when a GPU learner is wanted and torch sees one, else 0; an explicit request for a GPU
    on a machine without one is an error, not a silent CPU run."""
    import torch

    available = torch.cuda.is_available()
    if cfg.train.use_gpu and not available:
        raise ValueError("train.use_gpu is true but torch sees no GPU")
    return 1 if available and cfg.train.use_gpu is not False else 0


def training_env_config(cfg: Config, bars: pd.DataFrame) -> dict[str, Any]:
    """The env_config RLlib trains on: random windows of the training bars, scaled rewards (the
    money reward by ``train.reward_scale`` too; the differential Sharpe ratio is unitless)."""
    env = cfg.env.model_dump()
    money = cfg.train.reward_scale if cfg.env.reward == "money" else 1.0
    env.update(bars=bars, random_start=True, episode_bars=cfg.train.train_episode_bars,
               reward_scale=cfg.env.reward_scale * money)
    return env


def algorithm_config(cfg: Config, env_config: dict[str, Any], seed: int) -> Any:
    """RLlib PPOConfig from ``cfg.train``; sampling goes through the numpy vector env."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    envs.register_rllib()
    quiet_rllib()
    t = cfg.train
    return (
        PPOConfig()
        # Discrete actions need no normalising or clipping; skipping the connector saves ~1 ms
        # per sampled vector step (benchmarks/train_throughput.py).
        .environment(envs.ENV_ID, env_config=env_config, normalize_actions=False, clip_actions=False)
        .env_runners(num_env_runners=t.num_env_runners, num_envs_per_env_runner=t.num_envs_per_env_runner,
                     gym_env_vectorize_mode="vector_entry_point")
        .learners(num_learners=0, num_gpus_per_learner=gpus_per_learner(cfg))
        .training(train_batch_size_per_learner=t.train_batch_size, minibatch_size=t.minibatch_size,
                  num_epochs=t.num_epochs, lr=t.lr, gamma=t.gamma, lambda_=t.gae_lambda,
                  entropy_coeff=t.entropy_coeff, clip_param=t.clip_param, vf_clip_param=t.vf_clip_param,
                  use_kl_loss=t.use_kl_loss)
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(t.hiddens), fcnet_activation=t.activation))
        # torch_skip_nan_gradients: RLlib otherwise checks every gradient and every parameter
        # for NaN/inf with two isfinite passes per minibatch (~8-10% of a CPU iteration here,
        # benchmarks/train_throughput.py); the weights are bit-identical without them
        # (tests/test_train.py). A non-finite update is caught once per iteration instead
        # (check_finite in train_loop), which names the iteration rather than zeroing it silently.
        .framework(torch_skip_nan_gradients=True)
        # log_sys_usage: RLlib's system-usage monitor is not used (MLflow records the run) and,
        # without the optional gputil package, only logs "Install gputil for GPU system monitoring".
        .debugging(seed=seed, log_sys_usage=False)
    )


def iteration_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The ``train/...`` metrics of one RLlib result (keys absent this iteration are left out)."""
    runners, learner = result.get("env_runners", {}), result.get("learners", {}).get("default_policy", {})
    seconds = result.get("time_this_iter_s") or float("nan")
    picks = {
        "train/episode_return_mean": runners.get("episode_return_mean"),
        "train/episode_len_mean": runners.get("episode_len_mean"),
        "train/policy_loss": learner.get("policy_loss"),
        "train/vf_loss": learner.get("vf_loss"),
        "train/entropy": learner.get("entropy"),
        "train/kl": learner.get("mean_kl_loss"),
        "train/env_steps": result.get("num_env_steps_sampled_lifetime"),
        "train/steps_per_s": runners.get("num_env_steps_sampled", 0) / seconds,
        "train/sgd_steps": sgd_steps(result),
    }
    return {k: float(v) for k, v in picks.items() if v is not None and math.isfinite(float(v))}


def sgd_steps(result: dict[str, Any]) -> float | None:
    """Minibatch updates of one RLlib iteration: rows trained over all epochs / minibatch size.
    More than ``num_epochs * train_batch_size / minibatch_size`` because RLlib's learner connector
    adds one masked row per episode chunk (64 envs: 2,112 rows for a 2,048-step batch)."""
    learner = result.get("learners", {}).get("default_policy", {})
    rows, size = learner.get("num_module_steps_trained"), learner.get("module_train_batch_size_mean")
    return float(rows) / float(size) if rows is not None and size else None


def check_finite(algo: Any, iteration: int) -> None:
    """Raise if the policy's weights stopped being finite (a NaN/inf gradient reached them)."""
    bad = [name for name, w in module_weights(algo.get_module()).items() if not np.isfinite(w).all()]
    if bad:
        raise FloatingPointError(
            f"training diverged at iteration {iteration}: non-finite weights in {', '.join(bad[:3])}; "
            "lower train.lr or look for extreme values in the bars")


EPISODE_KEYS = ("train/episode_return_mean", "train/episode_len_mean")
"""Episode statistics RLlib reports only when an episode ended (carried forward in between)."""

def selection_rule(cfg: Config) -> str:
    return (f"median {cfg.train.val_metric} over {cfg.train.val_windows} equal windows of the validation split "
            f"(deterministic backtests, every {cfg.train.eval_every} iterations)")


def validate(algo: Any, bars: pd.DataFrame, cfg: Config) -> dict[str, float]:
    """Deterministic backtest of the current policy on ``train.val_windows`` windows of the
    validation split: every metric's median over the windows (logged as ``val/<metric>``; the
    selected checkpoint's are ``val_best/<metric>`` and the run's ``sharpe``, ``total_return``, ...).
    For ``train.val_metric``, the selection score, a window where it is undefined (no trades)
    counts as the worst; the other metrics' medians skip such windows."""
    return validate_policy(module_policy(algo.get_module()), bars, cfg)


def validate_policy(policy: Any, bars: pd.DataFrame, cfg: Config) -> dict[str, float]:
    """:func:`validate` of a backtest policy (observation batch -> actions)."""
    report = backtest(policy, bars, cfg.env.model_dump(), cfg.train.val_windows, seed=cfg.seed, name="validation")
    frame = report.per_window()
    metrics = {k: float(frame[k].replace([np.inf, -np.inf], np.nan).median()) for k in frame.columns}
    per_window = frame[cfg.train.val_metric].to_numpy(dtype=float)
    metrics[cfg.train.val_metric] = float(np.median(np.where(np.isfinite(per_window), per_window, -np.inf)))
    return metrics


def selection_score(metrics: dict[str, float], name: str) -> float:
    value = metrics.get(name, float("nan"))
    return value if math.isfinite(value) else -math.inf  # undefined (e.g. no trades) never wins


def check_init_from(uri: str, module_dir: Path, parent: PolicySettings | None, cfg: Config) -> None:
    """Refuse an ``--init-from`` model recorded with other observation settings than this run's
    config (``PolicySettings.observation_differences``) or with another network (``train.hiddens``,
    ``train.activation``): a user who names a model to continue must not get a fresh one. The
    message names them and how to continue it (the ``--set`` items of the model's settings that
    this config lacks, its instrument included)."""
    settings = PolicySettings.from_env(cfg.env)
    differ, wanted = continue_differences(parent, network_settings(load_module(module_dir)), cfg)
    if not differ:
        return
    fix = set_items(wanted)
    features = (f" (its features, feature-set version {parent.feature_set_version}, need the code it was trained "
                "with: its git_commit tag)" if parent is not None and (parent.features != settings.features
                or parent.feature_set_version != settings.feature_set_version) else "")
    raise ValueError(f"--init-from {uri} was trained with other settings than this config (model vs config: "
                     f"{'; '.join(differ)}): use the config it was trained with (its settings are in the model's "
                     f"MLmodel metadata.nt8_policy and its training run's params){f', e.g. {fix}' if fix else ''}{features}, or drop --init-from "
                     "to train from scratch")


def warm_start(algo: Any, module_dir: Path, obs_shape: tuple[int, ...]) -> None:
    """Load a parent policy's weights into the learner and the env runners. Its recorded settings
    were checked before the run (:func:`check_init_from`); a model that records none must at least
    take observations of this config's shape."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE

    parent = load_module(module_dir)
    if tuple(parent.observation_space.shape) != tuple(obs_shape):
        raise ValueError(f"--init-from policy expects observations of shape {parent.observation_space.shape}, this "
                         f"config makes {obs_shape} (env.window or features differ): use the config it was trained "
                         "with, or drop --init-from to train from scratch")
    component = f"{COMPONENT_LEARNER_GROUP}/{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}/default_policy"
    algo.restore_from_path(str(module_dir), component=component)


def pip_requirements() -> list[str]:
    reqs = []
    for name in RUNTIME_PACKAGES:
        pinned = version(name).split("+")[0]
        reqs.append(f"ray[rllib]=={pinned}" if name == "ray" else f"{name}=={pinned}")
    return reqs


def log_policy_model(module_dirs: Path | list[Path], example_obs: np.ndarray, settings: Any = None,
                     reference: dict[str, Any] | None = None) -> Any:
    """Log the policy as a models-from-code pyfunc carrying the RLModule checkpoint (an
    ensemble's: one per member, :mod:`mlproject.ensemble`), the settings it was trained with
    (``PolicySettings``: in the MLmodel metadata, and as the logged model's params, which the
    MLflow UI shows on the model's page) and the training bars' feature reference
    (:func:`mlproject.ood.feature_reference`: the bridge's out-of-distribution guard)."""
    import mlflow
    from mlflow.models import infer_signature

    dirs = [module_dirs] if isinstance(module_dirs, Path) else list(module_dirs)
    example = np.ascontiguousarray(example_obs, dtype=np.float32)
    actions = (greedy_actions(load_module(dirs[0]), example) if len(dirs) == 1
               else ensemble_policy([load_module(d) for d in dirs])(example))
    return mlflow.pyfunc.log_model(
        name="policy", python_model=str(POLICY_MODEL_FILE),
        artifacts={member_artifact(k): str(d) for k, d in enumerate(dirs)},
        signature=infer_signature(example, actions), input_example=example, pip_requirements=pip_requirements(),
        metadata={**({SETTINGS_KEY: settings.to_dict()} if settings else {}),
                  **({REFERENCE_KEY: reference} if reference else {})} or None,
        params=settings.params() if settings else None)


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:16]


def example_observations(bars: pd.DataFrame, cfg: Config, n: int) -> np.ndarray:
    """Up to ``n`` real observations (for the model's signature and input example); fewer when
    the bars end first."""
    env = FuturesTradingEnv({**cfg.env.model_dump(), "bars": bars, "random_start": False, "episode_bars": None,
                             "max_episode_steps": None})
    obs, _ = env.reset()
    rows = [obs]
    for action in range(n - 1):
        obs, _, terminated, truncated, _ = env.step(action % env.action_space.n)
        rows.append(obs)
        if terminated or truncated:
            break
    return np.stack(rows)


# -- the loop ----------------------------------------------------------------------------------


def train_loop(algo: Any, cfg: Config, iterations: int, val_bars: pd.DataFrame, ckpt_root: Path) -> dict[str, Any]:
    """Train, validate every K iterations, keep the best checkpoint, stop early; logs as it goes."""
    import mlflow

    t = cfg.train
    best = {"score": -math.inf, "metrics": {}, "iteration": 0, "dir": ckpt_root / "best", "validations": 0}
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    episodes: dict[str, float] = {}
    for it in range(1, iterations + 1):
        metrics = iteration_metrics(algo.train())
        check_finite(algo, it)
        # RLlib reports the episode means (a window over recent episodes) only on iterations in
        # which an episode ended; the window's value still holds in between, so the curve carries
        # it forward instead of showing dots (and nan in the log).
        for key in EPISODE_KEYS:
            episodes[key] = metrics.setdefault(key, episodes.get(key, math.nan))
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        if it % t.eval_every == 0 or it == iterations:
            val = validate(algo, val_bars, cfg)
            best["validations"] += 1  # each a candidate the selection looked at: the gate deflates by them
            metrics.update({f"val/{k}": v for k, v in val.items() if math.isfinite(v)})
            if selection_score(val, t.val_metric) > best["score"] or best["iteration"] == 0:
                best.update(score=selection_score(val, t.val_metric), metrics=val, iteration=it)
                shutil.rmtree(best["dir"], ignore_errors=True)
                algo.save_to_path(str(best["dir"]))
        # Steps are env steps sampled so far: curves of runs with other batch sizes line up.
        mlflow.log_metrics(metrics, step=int(metrics.get("train/env_steps", it)))
        history.append(metrics)
        elapsed = time.perf_counter() - started
        log.info("iter %d/%d env_steps=%d return_mean=%.4g val median %s=%.4g (best %.4g @%d) steps/s=%.0f eta=%.0fs",
                 it, iterations, metrics.get("train/env_steps", 0), metrics.get("train/episode_return_mean", math.nan),
                 t.val_metric, metrics.get(f"val/{t.val_metric}", math.nan), best["score"], best["iteration"],
                 metrics.get("train/steps_per_s", math.nan), elapsed / it * (iterations - it))
        if it - best["iteration"] >= t.patience:
            log.info("early stop: no better median val %s for %d iterations", t.val_metric, t.patience)
            break
    best["iterations_run"] = it
    best["history"] = history
    return best


def preflight(cfg: Config, bars: pd.DataFrame) -> tuple[Any, str, Any]:
    """Splits, source name and the new policy's ``PolicySettings``, after the checks that make
    real data fail early (too few bars in a split) or warn (short splits, prices that do not fit
    the instrument); warnings are tagged on the active run as ``data.warnings``."""
    import mlflow

    sp = cfg.data.splits
    if sp.validation == 0:
        raise ValueError("data.splits.validation is 0: training needs a validation split to select the best policy")
    source = bars.attrs.get("path") or str(bars.attrs.get("source", cfg.data.source))
    splits = split_bars(bars, sp.train, sp.validation, sp.test, gap=sp.gap)
    found = check_splits(splits, cfg, source) + warn_if_instrument_misfits(bars, cfg)
    if found:
        mlflow.set_tag("data.warnings", " | ".join(found)[:5000])
    settings = PolicySettings.from_env(cfg.env, splits.train)
    mlflow.log_params({"periods_per_year": periods_per_year(splits.validation.index),
                       "train.bar_period": settings.bar_period, "train.selection_rule": selection_rule(cfg)})
    return splits, source, settings


def train_policy(cfg: Config, bars: pd.DataFrame | None = None, *, init_from: str | None = None,
                 parent_tags: dict[str, str] | None = None, iterations: int | None = None) -> TrainResult:
    """Train on ``bars`` (default: ``cfg.data.source`` loaded) and register the best policy.
    ``init_from``: a model to continue (``--init-from``); ``parent_tags``: what ``init_from`` (a
    local folder the cycle prepared) stands for, tagged on the run and the version."""
    import torch

    iterations = iterations or cfg.train.iterations
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    setup_tracking(cfg)
    # Before the data, the run and Ray: a model to continue that reads other observations fails here.
    parent = parent_policy(init_from, cfg, parent_tags) if init_from else None
    bars = load_source(cfg) if bars is None else bars
    with pipeline_run(cfg, "train") as run:
        # Before Ray starts and before any iteration: too few bars in a split fails here (a
        # FAILED run saying which split needs how many bars), not at the first validation.
        splits, source, settings = preflight(cfg, bars)
        with ray_session(cfg), tempfile.TemporaryDirectory(prefix="nt8-train-") as tmp:
            return _train(cfg, run, splits, source, settings, iterations, parent, Path(tmp))


def parent_policy(init_from: str, cfg: Config,
                  parent_tags: dict[str, str] | None = None) -> tuple[list[Path], dict[str, str]]:
    """The ``--init-from`` model's RLModule folders (one per member of an ensemble) and the tags
    that name it (``parent_tags`` on top: what a folder the cycle prepared stands for), after
    :func:`check_init_from`."""
    module_dirs, tags, recorded = resolve_init_from(init_from, members=True)
    check_init_from(init_from, module_dirs[0], recorded, cfg)
    return module_dirs, {**tags, **(parent_tags or {})}


def _train(cfg: Config, run: Any, splits: Any, source: str, settings: Any, iterations: int,
           parent: tuple[list[Path], dict[str, str]] | None, tmp: Path) -> TrainResult:
    """Train the policy (or the ensemble's members), log and register the best (inside the train run)."""
    import mlflow
    import ray
    import torch

    log_dataset(splits.train, "train-split", source, "training")
    log_dataset(splits.validation, "validation-split", source, "validation")
    size = cfg.train.ensemble
    device = "cuda" if gpus_per_learner(cfg) else "cpu"
    tags = {"ray_version": ray.__version__, "torch_version": torch.__version__, "device": device,
            "ray.cluster": ray.get_runtime_context().gcs_address, "ray.env_runners": str(cfg.train.num_env_runners),
            "algorithm": cfg.train.algorithm, "config_digest": config_digest(cfg),
            "data.train_window": f"{splits.train.index[0]} .. {splits.train.index[-1]}",
            **({"ensemble": str(size)} if size > 1 else {}), **(parent[1] if parent is not None else {})}
    mlflow.set_tags(tags)
    log.info("training %s%s on %d bars (%s), validating on %d, device=%s%s", cfg.train.algorithm,
             f" (ensemble of {size}, seeds {', '.join(str(member_seed(cfg.seed, k)) for k in range(size))})" if size > 1 else "",
             len(splits.train), tags["data.train_window"], len(splits.validation), device,
             f", warm start from {tags['parent_uri']}" if parent is not None else "")
    members = [_train_member(cfg, splits, iterations, parent, k, tmp) for k in range(size)]
    best = members[0] if size == 1 else _ensemble_best(cfg, members, splits.validation)
    # One-value summaries of the selected checkpoint under a prefix that sorts after train/ and
    # val/: the MLflow UI orders chart sections by name, and the learning curves come first.
    _log_best(best)
    for k, member in enumerate(members):
        mlflow.log_artifacts(str(member["dir"]), "checkpoint" if size == 1 else f"checkpoint/member-{k}")
    info = log_policy_model([m["dir"] / MODULE_SUBDIR for m in members], example_observations(splits.validation, cfg, 8),
                            settings, reference_or_none(splits.train, cfg.env.vol_window, cfg.env.norm_window))
    # The selected checkpoint's medians over the validation windows (its val/... values), under the
    # names the evaluate and promote runs use, so that "Compare" lines the three runs up.
    log_headline(best["metrics"], info.model_id)
    registered = None
    if cfg.train.register_model:
        version_tags = {**tags, "git_commit": git_commit() or "unknown", "run_id": run.info.run_id,
                        f"val_median_{cfg.train.val_metric}": best["score"]}
        registered = str(register_version(info.model_uri, cfg.train.register_model, version_tags,
                                          description=f"PPO trained on {tags['data.train_window']}").version)
        record_trials(cfg.train.register_model, registered, best["validations"], cfg.promotion.lock_file)
    log.info("best median val %s=%.4g at iteration %d; model %s%s", cfg.train.val_metric, best["score"],
             best["iteration"], info.model_uri, f", registered version {registered}" if registered else "")
    return TrainResult(run.info.run_id, info.model_uri, registered, best["score"], best["iteration"],
                       best["iterations_run"], f"runs:/{run.info.run_id}/checkpoint", best["history"],
                       best["validations"])


def _log_best(best: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_metrics({f"val_best/{k}": v for k, v in best["metrics"].items() if math.isfinite(v)})
    mlflow.log_metric("val_best/iteration", best["iteration"])


def _train_member(cfg: Config, splits: Any, iterations: int, parent: tuple[list[Path], dict[str, str]] | None,
                  k: int, tmp: Path) -> dict[str, Any]:
    """Train one policy (seed :func:`member_seed`; member ``k`` of an ensemble warm-starts from the
    parent's member ``k``, or its only one) and select its best checkpoint; an ensemble's member
    is a nested run with its own curves."""
    import mlflow

    size, seed = cfg.train.ensemble, member_seed(cfg.seed, k)
    with contextlib.ExitStack() as stack:
        if size > 1:
            stack.enter_context(mlflow.start_run(run_name=f"member-{k}", nested=True,
                                                 tags={"ensemble.member": str(k), "ensemble.seed": str(seed)}))
            log.info("ensemble member %d of %d (seed %d)", k + 1, size, seed)
        with quiet_env_reregistration():
            algo = algorithm_config(cfg, training_env_config(cfg, splits.train), seed).build_algo()
        if parent is not None:
            warm_start(algo, parent[0][k % len(parent[0])], algo.get_module().observation_space.shape)
        root = tmp / f"member-{k}" if size > 1 else tmp
        root.mkdir(parents=True, exist_ok=True)
        try:
            best = train_loop(algo, cfg, iterations, splits.validation, root)
        finally:
            algo.stop()
        if size > 1:
            _log_best(best)
    return best


def member_seed(seed: int, k: int) -> int:
    """Member ``k``'s seed: ``seed + 1000 k`` (runs with seeds 0, 1, 2 share no member)."""
    return seed + 1000 * k


def _ensemble_best(cfg: Config, members: list[dict[str, Any]], val_bars: pd.DataFrame) -> dict[str, Any]:
    """The ensemble of the members' selected checkpoints, validated as one policy. Its trials for
    the Deflated Sharpe are the most validations one member's selection looked at (the members
    were selected side by side, not picked from one another)."""
    import mlflow

    metrics = validate_policy(ensemble_policy([load_module(m["dir"] / MODULE_SUBDIR) for m in members]), val_bars, cfg)
    name = cfg.train.val_metric
    mlflow.log_metrics({f"ensemble/member{k}_val_{name}": m["score"] for k, m in enumerate(members)
                        if math.isfinite(m["score"])})
    return {"score": selection_score(metrics, name), "metrics": metrics, "iteration": members[0]["iteration"],
            "validations": max(m["validations"] for m in members),
            "iterations_run": sum(m["iterations_run"] for m in members), "history": members[0]["history"]}
