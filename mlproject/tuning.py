"""The tracked search behind ``python -m pipelines.tune`` / ``mlflow run . -e tune``.

Ray Tune draws ``tune.num_samples`` settings from ``tune.space`` (PPO's learning rate, gamma and
entropy, the observation window, the feature set, the reward, the training history ...) and
trains each as ``pipelines.train`` does, on the training split. Every ``train.eval_every``
iterations a trial is scored on the validation split: the median of ``train.val_metric`` over
``train.val_windows`` consecutive folds, each traded only after its own observation window;
the test split is never looked at. ASHA stops the trials that trail at each rung. Each trial is
a nested MLflow run (Ray's ``MLflowLoggerCallback``: its drawn settings as params, its scores as
metrics) under the ``tune`` run.

The best checkpoint of the best trial is logged as the tune run's policy model and registered
as a new version; every validation of every trial counts as a trial for the Deflated Sharpe
(:func:`mlproject.registry.record_trials`), and the version goes through the promotion gate
(:func:`mlproject.gate.promote_candidate`) like any other challenger.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mlproject.cluster import ray_session
from mlproject.config import Config, ConfigError, config_from_dict
from mlproject.data import load_source, split_bars
from mlproject.gate import PromoteResult, promote_candidate
from mlproject.ood import reference_or_none
from mlproject.policy import PolicySettings, set_items
from mlproject.preflight import check_splits
from mlproject.quiet import quiet_env_reregistration
from mlproject.registry import record_trials, register_version
from mlproject.signals import Stopped
from mlproject.tracking import git_commit, log_dataset, pipeline_run, setup_tracking
from mlproject.training import (
    algorithm_config,
    check_finite,
    example_observations,
    iteration_metrics,
    log_policy_model,
    selection_score,
    training_env_config,
    validate,
)

log = logging.getLogger(__name__)

HISTORY_KEY = "continuous_learning.retrain_history_bars"
UNDEFINED_SCORE = -1000.0
"""What Tune is told for a validation whose score is undefined (no trades): Tune and MLflow take
no -inf, and such a checkpoint is never the best while another scored."""


@dataclass
class TuneResult:
    run_id: str
    trials: int
    validations: int
    """Validated checkpoints over all trials: the trials the Deflated Sharpe counts."""
    best_overrides: dict[str, Any]
    best_score: float
    model_uri: str
    registered_version: str | None
    decision: PromoteResult | None = None
    table: pd.DataFrame = field(default_factory=pd.DataFrame)


def with_overrides(cfg: Config, overrides: dict[str, Any], source: str = "tune.space") -> Config:
    """``cfg`` with dotted keys set to Python values (a misspelt key or a wrong type: ConfigError
    naming the key)."""
    raw = cfg.to_dict()
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: {part!r} is not a section of the configuration")
            node = node[part]
        if last not in node:
            raise ConfigError(f"{key}: no such setting")
        node[last] = value
    return config_from_dict(raw, source)


def check_space(cfg: Config) -> None:
    """Every value of every key in ``tune.space`` makes a valid configuration (before Ray starts)."""
    for key, choices in cfg.tune.space.items():
        for value in choices:
            try:
                with_overrides(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key} value {value!r}: {exc}") from None


def history(bars: pd.DataFrame, keep: int | None) -> pd.DataFrame:
    """The newest ``keep`` bars (all when None or fewer)."""
    return bars if keep is None or keep >= len(bars) else bars.iloc[-keep:]


def run_trial(config: dict[str, Any], base: dict[str, Any], train_bars: pd.DataFrame,
              val_bars: pd.DataFrame) -> None:
    """One Tune trial: train PPO with ``base`` + the drawn ``config``, score on the validation
    folds every ``train.eval_every`` iterations, report (with the module when it improved)."""
    import torch
    from ray import tune

    cfg = with_overrides(config_from_dict(base), config)
    torch.set_num_threads(cfg.train.torch_threads or 1)
    t = cfg.train
    with quiet_env_reregistration():
        algo = algorithm_config(cfg, training_env_config(cfg, history(train_bars, cfg.continuous_learning.retrain_history_bars)),
                                cfg.seed).build_algo()
    best, best_it, validations = -math.inf, 0, 0
    try:
        with tempfile.TemporaryDirectory(prefix="nt8-trial-") as tmp:
            for it in range(1, t.iterations + 1):
                metrics = iteration_metrics(algo.train())
                check_finite(algo, it)  # a diverged trial fails (its error in the table), as training does
                if it % t.eval_every and it != t.iterations:
                    continue
                val = validate(algo, val_bars, cfg)
                validations += 1
                score = selection_score(val, t.val_metric)
                checkpoint = None
                if score > best or best_it == 0:
                    best, best_it = score, it
                    folder = Path(tmp) / f"iteration-{it}"
                    algo.get_module().save_to_path(str(folder))
                    checkpoint = tune.Checkpoint.from_directory(str(folder))
                report = {"iteration": it, "score": _finite(score), "best_score": _finite(best),
                          "best_iteration": best_it, "validations": validations,
                          **{f"val/{k}": v for k, v in val.items() if math.isfinite(v)},
                          **{k: v for k, v in metrics.items() if k in ("train/episode_return_mean", "train/env_steps")}}
                tune.report(report, checkpoint=checkpoint)
                if it - best_it >= t.patience:
                    break
    finally:
        algo.stop()


def _finite(score: float) -> float:
    return score if math.isfinite(score) else UNDEFINED_SCORE


def search_space(cfg: Config) -> dict[str, Any]:
    from ray import tune

    return {key: tune.choice(list(choices)) for key, choices in cfg.tune.space.items()}


def tune_policy(cfg: Config, *, samples: int | None = None, dry_run: bool = False) -> TuneResult:
    """Search, register the winner and put it through the gate (``dry_run``: decide, change nothing)."""
    if samples is not None:
        cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"num_samples": samples})})
    check_space(cfg)
    setup_tracking(cfg)
    bars = load_source(cfg)
    sp = cfg.data.splits
    if sp.validation == 0:
        raise ValueError("data.splits.validation is 0: the search scores its trials on the validation split")
    splits = split_bars(bars, sp.train, sp.validation, sp.test, gap=sp.gap)
    source = bars.attrs.get("path") or str(bars.attrs.get("source", cfg.data.source))
    check_splits(splits, cfg, source)
    with pipeline_run(cfg, "tune") as run:
        log_dataset(splits.train, "train-split", source, "training")
        log_dataset(splits.validation, "validation-split", source, "validation")
        with ray_session(cfg), tempfile.TemporaryDirectory(prefix="nt8-tune-") as tmp:
            grid = _fit(cfg, splits, run, Path(tmp))
            return _register_winner(cfg, run, grid, splits, dry_run)


def _fit(cfg: Config, splits: Any, run: Any, work: Path) -> Any:
    import mlflow
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    tc = cfg.tune
    mlflow.log_params({"tune.num_samples": tc.num_samples, "tune.grace_period": tc.grace_period,
                       "tune.reduction_factor": tc.reduction_factor, "tune.scheduler": "ASHA",
                       "tune.score": f"median val {cfg.train.val_metric} over {cfg.train.val_windows} folds"})
    log.info("tune: %d trials over %s (ASHA, grace %d iterations, 1/%d go on at each rung), up to %d iterations each",
             tc.num_samples, ", ".join(f"{k} {v}" for k, v in tc.space.items()), min(tc.grace_period, cfg.train.iterations),
             tc.reduction_factor, cfg.train.iterations)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), train_bars=splits.train, val_bars=splits.validation),
        {"cpu": tc.cpus_per_trial})
    callback = MLflowLoggerCallback(tracking_uri=mlflow.get_tracking_uri(), experiment_name=cfg.mlflow.experiment,
                                    tags={"mlflow.parentRunId": run.info.run_id, "pipeline.step": "tune-trial"})
    tuner = tune.Tuner(
        trainable, param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric="best_score", mode="max", num_samples=tc.num_samples, max_concurrent_trials=tc.max_concurrent,
            scheduler=ASHAScheduler(time_attr="iteration", max_t=cfg.train.iterations,
                                    grace_period=min(tc.grace_period, cfg.train.iterations),
                                    reduction_factor=tc.reduction_factor)),
        run_config=tune.RunConfig(name="tune", storage_path=str(work / "ray_results"), callbacks=[callback],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1))
    try:
        return tuner.fit()
    except BaseException as exc:
        _end_open_trials(run.info.run_id)
        # A stop signal's exception raised inside Ray's wait comes out wrapped in a SystemError.
        cause = exc.__cause__ if isinstance(exc, SystemError) else None
        if isinstance(cause, (Stopped, KeyboardInterrupt)):
            raise cause from None
        raise


def _end_open_trials(parent_id: str) -> None:
    """Trial runs still open when the search stops (a signal, an error) end KILLED."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    for child in client.search_runs([parent.info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"):
        client.set_terminated(child.info.run_id, "KILLED")


def trial_table(grid: Any) -> pd.DataFrame:
    """One row per trial: its drawn settings, best score, iterations, validations, error."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        rows.append({"trial": metrics.get("trial_id", ""), **result.config, "best_score": metrics.get("best_score", math.nan),
                     "iterations": metrics.get("iteration", 0), "validations": metrics.get("validations", 0),
                     "error": str(result.error).splitlines()[0][:300] if result.error else ""})
    return pd.DataFrame(rows).astype(object).where(lambda t: t.notna(), None)


def _register_winner(cfg: Config, run: Any, grid: Any, splits: Any, dry_run: bool) -> TuneResult:
    import mlflow

    table = trial_table(grid)
    mlflow.log_table(table, "tune/trials.json")
    validations = int(table["validations"].sum())
    scored = [r for r in grid if r.checkpoint is not None and not r.error]
    if not scored:
        first = next((r.error for r in grid if r.error), None)
        raise RuntimeError(f"tune: no trial produced a scored checkpoint ({len(table)} trials)"
                           + (f"; first error: {str(first).splitlines()[0]}" if first else ""))
    best = max(scored, key=lambda r: r.metrics["best_score"])
    overrides = dict(best.config)
    winner = with_overrides(cfg, overrides)
    mlflow.log_metrics({"tune/trials": len(table), "tune/validations": validations,
                        "tune/best_score": float(best.metrics["best_score"]),
                        "tune/failed": int((table["error"] != "").sum())})
    mlflow.set_tags({"tune.best": " ".join(f"{k}={v}" for k, v in overrides.items())[:5000]})
    settings = PolicySettings.from_env(winner.env, splits.train)
    with best.checkpoint.as_directory() as folder:
        info = log_policy_model(Path(folder), example_observations(splits.validation, winner, 8), settings,
                                reference_or_none(splits.train, winner.env.vol_window, winner.env.norm_window))
    registered = None
    if cfg.train.register_model:
        tags = {"run_id": run.info.run_id, "git_commit": git_commit() or "unknown", "tune.trials": str(len(table)),
                "tune.overrides": " ".join(f"{k}={v}" for k, v in overrides.items())[:5000]}
        registered = str(register_version(info.model_uri, cfg.train.register_model, tags,
                                          description=f"best of {len(table)} tune trials").version)
        record_trials(cfg.train.register_model, registered, validations, cfg.promotion.lock_file)
    log.info("tune: best trial %s scored %.4g (median val %s); %d trials, %d validations; to train with it: %s",
             best.metrics.get("trial_id", "?"), best.metrics["best_score"], cfg.train.val_metric,
             len(table), validations, set_items([f"{k}={_yaml(v)}" for k, v in overrides.items()]))
    decision = (promote_candidate(winner, registered, dry_run=dry_run)
                if registered and cfg.train.register_model == cfg.promotion.model_name else None)
    return TuneResult(run.info.run_id, len(table), validations, overrides, float(best.metrics["best_score"]),
                      info.model_uri, registered, decision, table)


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
