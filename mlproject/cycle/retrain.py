"""Train, evaluate and gate in one pass, over typed hand-offs: the ingested bars
(:class:`~mlproject.ingestion.IngestResult`) -> training (:class:`~mlproject.training.TrainResult`)
-> one evaluation of the challenger and Production on the same windows
(:class:`~mlproject.evaluation.Evaluation`, logged by the evaluate run, decided on by the gate) ->
the gate's verdict (:class:`~mlproject.gate.PromoteResult`). The bars are loaded once and handed
on, Production is downloaded once.

Each step is the library function its command line calls (``mlproject.ingestion.ingest``,
``mlproject.training.train_policy``, ``mlproject.reporting.evaluate_models``,
``mlproject.gate.promote_candidate``), run through :func:`step`, which tags the cycle run with the
step that failed or was stopped.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from envs.market import Market
from mlproject.cluster import ray_session
from mlproject.config import Config
from mlproject.cycle.production import ProductionModel, production_model, retrain_plan
from mlproject.cycle.state import RETRAIN_IDS, CycleState, Due, due, retrain_window
from mlproject.evaluation import Evaluation, evaluate_policies, policy_env_config, test_split
from mlproject.experience import ExperienceBuffer
from mlproject.gate import PromoteResult, promote_candidate
from mlproject.ingestion import IngestResult, ingest
from mlproject.offline import BETA, OfflineResult, offline_pass
from mlproject.policy import LoadedPolicy, ModelMismatch, find_module_dir, load_policy_model
from mlproject.reporting import EvaluateResult, evaluate_models
from mlproject.signals import Stopped
from mlproject.tracking import experience_dataset, pipeline_run
from mlproject.training import TrainResult, train_policy

log = logging.getLogger(__name__)
T = TypeVar("T")


def step(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one step; a failure tags the cycle run with the step and the error, then propagates."""
    import mlflow

    try:
        return fn(*args, **kwargs)
    except (Stopped, KeyboardInterrupt) as exc:
        mlflow.set_tags({"cycle.stopped_step": name, "cycle.error": f"{type(exc).__name__}: {exc}"[:5000]})
        log.warning("cycle step %s stopped by a signal (Production is as it was)", name)
        raise
    except BaseException as exc:
        mlflow.set_tags({"cycle.failed_step": name, "cycle.error": f"{type(exc).__name__}: {exc}"[:5000]})
        log.error("cycle step %s failed: %s (Production is as it was)", name, exc)
        raise


@dataclass
class Retrained:
    """What one train-evaluate-promote pass produced."""

    ingest: IngestResult
    train: TrainResult
    model_uri: str
    """The challenger: its registered version's URI, or the logged model's when not registered."""
    evaluate: EvaluateResult
    promote: PromoteResult | None
    """The gate's verdict; None when the challenger was not registered (nothing to promote)."""
    offline: OfflineResult | None
    plan: str
    """What the training did and why (warm start, or a new model and how to continue Production)."""


def train_evaluate_promote(cfg: Config, ingested: IngestResult | None = None, since: pd.Timestamp | None = None,
                           buffer: ExperienceBuffer | None = None) -> Retrained:
    """Ingest (unless given), train (warm start from Production when it reads these observations,
    after the offline pass on ``buffer`` when configured), evaluate and gate, in one pass (see the
    module doc). ``since``: the time of the first new experience (the retrain learns from its bar
    on, plus ``retrain_history_bars`` of history)."""
    ingested = ingested or step("ingest", ingest, cfg)
    data_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(ingested.path)})})
    bars = _window(cfg, ingested, since)
    production = production_model(cfg)
    plan = _say_plan(cfg, production)
    trained, offline = _train(data_cfg, production, bars, buffer)
    model_uri = (f"models:/{cfg.train.register_model}/{trained.registered_version}"
                 if trained.registered_version else trained.model_uri)
    evaluated, decision = _evaluate_and_gate(data_cfg, test_split(bars, data_cfg), trained, model_uri, production)
    _tag_created(trained.registered_version or model_uri, production)
    return Retrained(ingested, trained, model_uri, evaluated, decision, offline, plan)


def _window(cfg: Config, ingested: IngestResult, since: pd.Timestamp | None) -> pd.DataFrame:
    """The bars the retrain learns from (:func:`retrain_window`), carrying the file they came from."""
    import mlflow

    bars, note = retrain_window(ingested.bars, cfg.continuous_learning.retrain_history_bars, since)
    if note:
        log.warning("retrain: %s", note)
        mlflow.set_tag("cycle.data_warning", note)
    bars = bars.copy(deep=False)
    bars.attrs.update(ingested.bars.attrs)
    bars.attrs.update(source=str(ingested.path), path=str(ingested.path))
    return bars


def _say_plan(cfg: Config, production: ProductionModel | None) -> str:
    """The plan, logged (a warning when Production cannot be continued) and tagged before training."""
    import mlflow

    plan = retrain_plan(cfg, production)
    log.log(logging.WARNING if production and not production.warm_start else logging.INFO, "retrain: %s", plan)
    mlflow.set_tag("cycle.plan", plan[:5000])
    return plan


def _train(cfg: Config, production: ProductionModel | None, bars: pd.DataFrame,
           buffer: ExperienceBuffer | None) -> tuple[TrainResult, OfflineResult | None]:
    """The offline pass (when configured and there is a buffer), then training from what it or
    Production left (a warm start), else from fresh weights."""
    warm = production if production and production.warm_start else None
    init, parent_tags = (str(warm.local), warm.tags()) if warm else (None, None)
    with ray_session(cfg), tempfile.TemporaryDirectory(prefix="nt8-cycle-") as tmp:
        offline = None
        if buffer is not None and cfg.continuous_learning.offline_pass != "none":
            offline = step("offline", offline_run, cfg, buffer, warm, bars, Path(tmp))
            init, parent_tags = str(offline.module_dir), {
                **(parent_tags or {}), "parent_uri": f"offline pass ({cfg.continuous_learning.offline_pass}) from "
                f"{parent_tags['parent_uri'] if parent_tags else 'fresh weights'}"}
        return step("train", train_policy, cfg, bars, init_from=init, parent_tags=parent_tags), offline


def _evaluate_and_gate(cfg: Config, test: pd.DataFrame, trained: TrainResult, model_uri: str,
                       production: ProductionModel | None) -> tuple[EvaluateResult, PromoteResult | None]:
    """One evaluation of the challenger (and Production, when it runs on these bars), logged by
    the evaluate run and decided on by the gate (when the challenger is registered)."""
    challenger = load_policy_model(model_uri)
    policies = [challenger, *_comparable(production, cfg, test)] if trained.registered_version else [challenger]
    evaluation: Evaluation = step("evaluate", evaluate_policies, policies, test, cfg)
    evaluated = step("evaluate", evaluate_models, cfg, [model_uri], test, policies=[challenger], evaluation=evaluation)
    decision = (step("promote", promote_candidate, cfg, model_uri, bars=test, challenger=challenger,
                     evaluation=evaluation) if trained.registered_version else None)
    return evaluated, decision


def _comparable(production: ProductionModel | None, cfg: Config, bars: pd.DataFrame) -> list[LoadedPolicy]:
    """Production, loaded, when it can run on these bars (else the gate says why it cannot compare)."""
    if production is None:
        return []
    compared = load_policy_model(production.uri, production.local)
    try:
        policy_env_config(compared, cfg.env, bars)
    except ModelMismatch:
        return []
    return [compared]


def _tag_created(created: str, production: ProductionModel | None) -> None:
    import mlflow

    tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags  # the active run object's tags are stale
    before = [v for v in tags.get("cycle.created_versions", "").split(",") if v]
    mlflow.set_tags({"cycle.created_versions": ",".join([*before, created]),
                     "cycle.compared_with": f"v{production.version}" if production else "none (first model)"})


def offline_run(cfg: Config, buffer: ExperienceBuffer, production: ProductionModel | None, bars: pd.DataFrame,
                work: Path) -> OfflineResult:
    """The offline pass as a child run (params, ``offline/...`` curves, the experiences it read)."""
    import mlflow

    market = Market.from_config({**cfg.env.model_dump(), "bars": bars})
    cl = cfg.continuous_learning
    with pipeline_run(cfg, "offline"):
        mlflow.log_params({"offline.algorithm": f"MARWIL (beta {BETA[cl.offline_pass]:g})",
                           "offline.iterations": cl.offline_iterations,
                           "offline.high_value_weight": cl.high_value_weight,
                           "offline.start": production.uri if production else "fresh weights"})
        mlflow.log_input(experience_dataset(buffer), context="offline")
        result = offline_pass(cfg, buffer, find_module_dir(production.local) if production else None,
                              market.observation_space(), market.action_space(), work)
        for it, metrics in enumerate(result.history, 1):
            mlflow.log_metrics(metrics, step=it)
        mlflow.log_metrics({"offline/experiences": result.experiences, "offline/high_value": result.high_value,
                            "offline/rows": result.rows})
    return result


def retrain(cfg: Config, buffer: ExperienceBuffer, state: CycleState, force: bool,
            ingested: IngestResult | None = None, known: Due | None = None) -> Retrained | None:
    """When due (or ``force``): :func:`train_evaluate_promote` on the new experiences' bars, then
    the watermarks move (only after it succeeded). ``known``: maintenance's :class:`Due`, when it
    just ran (the buffer is as it was). None when not due."""
    import mlflow

    d = known or due(cfg, buffer, state)
    if not (d.retrain_due or force):
        log.info("retrain not due: %d new experiences since the last retrain (needs %d), %d in all (needs %d)",
                 d.new_since_retrain, cfg.continuous_learning.retrain_frequency, d.experiences,
                 cfg.continuous_learning.min_experiences)
        mlflow.set_tag("cycle.retrain", "not due")
        return None
    if d.experiences:
        mlflow.log_input(experience_dataset(buffer), context="experiences")
    result = train_evaluate_promote(cfg, ingested, since=d.first_new_time, buffer=buffer)
    state.mark_bars(result.ingest.bars.index[-1])
    decision = result.promote
    state.advance("retrain", RETRAIN_IDS, d.ids, {
        "version": result.train.registered_version, "decision": decision.decision if decision else "not registered",
        "run_id": mlflow.active_run().info.run_id})
    mlflow.set_tags({"cycle.retrain": decision.decision if decision else "trained (not registered)",
                     "cycle.challenger": result.model_uri})
    return result
