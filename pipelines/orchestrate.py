"""Run the continuous-learning cycle.

    python -m pipelines.orchestrate --mode all [--config conf/smoke.yaml] [--force]
    mlflow run . --env-manager local                       # the `main` entry point (mode all)
    mlflow run . -e maintenance|retrain|finetune --env-manager local

Modes:

- ``maintenance``: compact the experience buffer down to ``experience_buffer_size``, annotate the
  closed trades not annotated yet (``pipelines.annotate``), reconcile the deployment with the
  registry, check the thresholds; logs and prints what is due.
- ``retrain``: when at least ``retrain_frequency`` experiences arrived since the last retrain and
  the buffer holds at least ``min_experiences`` (or ``--force``): ingest the market data, take
  the bars the new experiences came from plus ``retrain_history_bars`` of history, optionally an
  offline pass (``offline_pass``: RLlib MARWIL/BC on the buffer, high-value experiences weighted),
  train warm-started from the Production policy (or the offline pass's result), evaluate, and run
  the promotion gate against Production on the same held-out bars. A refusal is a normal outcome,
  logged with its reasons.
- ``finetune``: when enough new annotated experiences exist, the fine-tuning entry point
  (``pipelines.finetune``: QLoRA on the annotated trades, ``nt8-reasoner`` gated on validation
  loss), then the reasoning engine reflects on a trade with the Production adapter.
- ``review`` (the seed's monthly task): every live version evaluated on the same recent bars (a
  comparison table and plot), then old and refused versions archived (never Production nor its
  rollback target; ``continuous_learning.keep_versions`` kept).
- ``all``: when nothing is in Production yet, a first model (ingest, train, evaluate, promote);
  then paper trading through the bridge when ``continuous_learning.paper_bars`` is set (the demo);
  then maintenance, retrain if due, fine-tune if due. Ends with a summary.

``--loop`` runs maintenance, the retrain check and the review forever, each at its cadence
(``continuous_learning.maintenance_every``, ``retrain_every``, ``finetune_every``, ``review_every``:
1d, 1w, 1w, 30d); retrain and fine-tune run only when due.

Each mode is one parent MLflow run with a child run per step, tagged with what it did
(``cycle.*``). Watermarks (the experience ids the last retrain saw, when, which version it made)
are written atomically under ``continuous_learning.state_dir``, only after the step succeeded, so
a re-run does not retrain on the same experiences twice and a failed step leaves them as they were;
a lock there stops two orchestrators. A failed step never touches Production (promotion is the
last step and is itself atomic); the run is FAILED with ``cycle.failed_step`` naming the step.

A cycle killed outright (SIGKILL, a power cut: no ``finally`` runs) leaves its runs RUNNING and the
version it registered without a gate verdict. Each cycle run records its process and host
(``cycle.pid``, ``cycle.host``); the next cycle, under the lock, settles what a killed one left
(:func:`settle_killed`): its runs and their child runs still RUNNING end KILLED (tag
``cycle.settled_by``), and a version they registered without ``gate.decision`` is marked refused
("its cycle was killed before the gate"), so that ``review`` archives it first. The summary and the
log say what was settled.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlproject.atomic import atomic_write, atomic_write_text, read_json_state
from mlproject.cli import base_parser, run_cli
from mlproject.cluster import ray_session
from mlproject.config import Config, parse_duration
from envs.market import Market
from mlproject.backtest import constant_policy
from mlproject.data import load_source
from mlproject.deploy import reconcile
from mlproject.evaluation import EvalReport, backtest, evaluate_policies, paired_comparison, policy_env_config, test_split
from mlproject.experience import ExperienceBuffer
from mlproject.features import FEATURE_NAMES
from mlproject.instruments import resolve_instrument
from mlproject.intake import new_bars_since, run_intake
from mlproject.locks import file_lock
from mlproject.metrics import max_drawdown, periods_per_year, sharpe_ratio, total_return
from mlproject.offline import BETA, OfflineResult, offline_pass
from mlproject.policy import (
    ModelMismatch,
    PolicySettings,
    continue_differences,
    find_module_dir,
    load_module,
    load_policy_model,
    network_settings,
    read_settings,
    set_items,
)
from mlproject.preflight import CHECKED, warn_if_instrument_misfits
from mlproject.reasoner.engine import ReasonerUnavailable, ReasoningEngine
from mlproject.reflection import PROMPT
from mlproject.registry import (
    SIM_RUN_TAG,
    cleanup,
    drop_sim_models,
    production_version,
    record_verdict,
    rollback_target,
    status,
    was_production,
)
from mlproject.signals import Stopped, install, restore
from mlproject.tracking import log_curves, pipeline_run, setup_tracking
from pipelines import annotate, collect, evaluate, ingest, monitor, promote, train
from pipelines import finetune as finetune_step

log = logging.getLogger(__name__)

MODES = ("maintenance", "retrain", "finetune", "review", "all", "simulate")
LOOP_MODES = ("maintenance", "retrain", "finetune", "review")
LOCK_TIMEOUT_S = 5.0
STATE_FILE = "state.json"
RETRAIN_IDS = "retrain_ids.parquet"
FINETUNE_IDS = "finetune_ids.parquet"


@dataclass
class ProductionModel:
    """The Production version, downloaded once per cycle: the warm start, the offline pass's
    start and the gate's comparison all read this one copy."""

    version: str
    uri: str
    local: Path
    warm_start: bool
    """It reads this config's observations (and is the model this config trains), so training
    goes on from it; otherwise training starts fresh (``why_not`` says why)."""
    why_not: str = ""
    """Why there is no warm start, and how to get one (empty when ``warm_start``)."""

    def tags(self) -> dict[str, str]:
        return {"parent_uri": self.uri, "parent_version": self.version}


def production_model(cfg: Config) -> ProductionModel | None:
    """The Production version of ``promotion.model_name`` downloaded, or None when there is none."""
    import mlflow

    name = cfg.promotion.model_name
    version = production_version(name)
    if version is None:
        return None
    uri = f"models:/{name}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    why_not = (f"is {name}, this config trains {cfg.train.register_model}" if cfg.train.register_model != name
               else _why_not_warm(local, cfg))
    return ProductionModel(str(version), uri, local, not why_not, why_not)


def _why_not_warm(local: Path, cfg: Config) -> str:
    """Empty when the downloaded policy can go on training with this config, else why not."""
    settings = read_settings(local) if (local / "MLmodel").is_file() else None
    module = load_module(find_module_dir(local))
    if settings is None:
        shape = tuple(module.observation_space.shape)
        if shape != (cfg.env.window * len(FEATURE_NAMES) + 2,):
            return (f"takes observations of shape {shape}, this config makes {cfg.env.window * len(FEATURE_NAMES) + 2} "
                    f"(window {cfg.env.window})")
    return settings_mismatch(settings, cfg, network_settings(module))


MISMATCH_KEYS = ("vol_window", "norm_window", "max_contracts")
"""Observation settings named beside the instrument and window when they differ."""


def settings_mismatch(theirs: PolicySettings | None, cfg: Config, network: dict[str, Any] | None = None) -> str:
    """Empty when a policy of ``theirs`` settings (and ``network``) can go on training with ``cfg``
    (:func:`mlproject.policy.continue_differences`, the rule ``train --init-from`` follows); else
    what differs (the instrument and window always named) and the ``--set`` that continues it."""
    differ, wanted = continue_differences(theirs, network, cfg)
    if not differ:
        return ""
    ours = PolicySettings.from_env(cfg.env)
    if theirs is None:
        return f"was trained with another network ({'; '.join(differ)}). To continue it use {set_items(wanted)}"
    named = [k for k in MISMATCH_KEYS if getattr(theirs, k) != getattr(ours, k)]

    def describe(s: PolicySettings) -> str:
        return f"{s.instrument['symbol']} with window {s.window}" + "".join(f", {k} {getattr(s, k)}" for k in named)

    text = f"trades {describe(theirs)}; this config is {describe(ours)}"
    text += "".join(f"; {d} (model vs config)" for d in differ if d.startswith("train."))
    if (theirs.features, theirs.feature_set_version) != (ours.features, ours.feature_set_version):
        return (f"{text}, and it reads other features (feature set v{theirs.feature_set_version} vs "
                f"v{ours.feature_set_version}): this code cannot continue it")
    return f"{text}. To continue the deployed model use the config it was trained with, e.g. {set_items(wanted)}"


def retrain_plan(cfg: Config, production: ProductionModel | None) -> str:
    """What the training is about to do and why, said before it starts (it may take hours)."""
    n = cfg.train.iterations
    budget = f"{n} iteration{'s' if n != 1 else ''} of {cfg.train.train_batch_size:,} steps"
    if production is None:
        return f"nothing in Production: training a first model from scratch ({budget})"
    label = f"Production {cfg.promotion.model_name} v{production.version}"
    if production.warm_start:
        return f"warm start from {label} ({budget})"
    text, to, fix = production.why_not.partition(". To continue")
    return f"{label} {text}: training a NEW model from scratch ({budget}), not a warm start{to}{fix}"


def retrain_window(bars: pd.DataFrame, history: int | None, since: pd.Timestamp | None) -> tuple[pd.DataFrame, str]:
    """The bars a retrain learns from: from ``history`` bars before the bar of ``since`` (the
    first new experience; at least the newest ``history`` bars) to the newest bar; all bars when
    ``history`` is None. Returns the slice and a note for when the experiences are not in the
    market data (newer than its last bar: export the bars they traded and ingest them)."""
    note = ""
    if since is not None and len(bars):
        index = bars.index
        since = pd.Timestamp(since)
        if index.tz is not None:
            since = since.tz_localize(index.tz) if since.tz is None else since.tz_convert(index.tz)
        elif since.tz is not None:
            since = since.tz_convert("UTC").tz_localize(None)
        if since > index[-1]:
            note = (f"the new experiences start at {since}, after the market data ends ({index[-1]}): the retrain "
                    "learns from the market data it has; export and ingest the bars they traded to learn from them")
    if history is None:
        return bars, note
    start = len(bars) - history
    if since is not None and not note:
        start = min(start, int(bars.index.searchsorted(since)) - history)
    return bars.iloc[max(0, start):], note


# -- durable state -------------------------------------------------------------------------------


class CycleState:
    """Watermarks under ``continuous_learning.state_dir``: ``state.json`` (when and what the last
    retrain and fine-tune did) and the experience ids each one had seen (Parquet). Experience
    ids, not times: paper replays record old bar times, and compaction rewrites files."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = read_json_state(self.folder / STATE_FILE, "orchestrator",
                                                    "move it aside to start the watermarks afresh")

    def seen(self, name: str) -> set[str]:
        path = self.folder / name
        return set(pq.read_table(path).column("experience_id").to_pylist()) if path.exists() else set()

    def mark_bars(self, last_bar: Any) -> None:
        """The newest bar a model was trained on (the intake's new bars count from there)."""
        self.data["bars_trained_to"] = str(last_bar)
        atomic_write_text(self.folder / STATE_FILE, json.dumps(self.data, indent=2))

    def advance(self, key: str, ids_file: str, ids: set[str], record: dict[str, Any]) -> None:
        """The ids first, then the JSON that points at them (a crash between keeps the old watermark)."""
        table = pa.table({"experience_id": pa.array(sorted(ids), pa.string())})
        atomic_write(self.folder / ids_file, lambda p: pq.write_table(table, p))
        self.data[key] = {**record, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "experiences_seen": len(ids)}
        atomic_write_text(self.folder / STATE_FILE, json.dumps(self.data, indent=2))


def thresholds(cfg: Config, buffer: ExperienceBuffer, state: CycleState) -> dict[str, Any]:
    """What the buffer holds against the watermarks, and what is due."""
    cl = cfg.continuous_learning
    rows = buffer.query(columns=["experience_id", "time", "quality"])
    ids = set(rows["experience_id"])
    annotated = set(rows.loc[rows["quality"].notna(), "experience_id"])
    fresh = ~rows["experience_id"].isin(state.seen(RETRAIN_IDS))
    new = len(set(rows.loc[fresh, "experience_id"]))
    new_annotated = len(annotated - state.seen(FINETUNE_IDS))
    new_bars, first_bar = (new_bars_since(cfg.data.intake.history, state.data.get("bars_trained_to"))
                           if cfg.data.intake.folder else (0, None))
    bars_due = cl.retrain_new_bars is not None and new_bars >= cl.retrain_new_bars
    firsts = [t for t in (rows.loc[fresh, "time"].min() if new else None, first_bar if bars_due else None)
              if t is not None]
    return {"experiences": len(ids), "new_since_retrain": new, "annotated": len(annotated),
            "new_annotated_since_finetune": new_annotated, "new_bars_since_retrain": new_bars,
            "retrain_due": (new >= cl.retrain_frequency and len(ids) >= cl.min_experiences) or bars_due,
            "finetune_due": new_annotated >= cl.min_annotated_for_finetune,
            "first_new_time": min(firsts, key=_utc) if firsts else None,
            "ids": ids, "annotated_ids": annotated}


def _utc(t: Any) -> pd.Timestamp:
    """A time comparable with any other: naive times are taken as UTC."""
    t = pd.Timestamp(t)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def with_history(cfg: Config) -> Config:
    """``cfg`` reading the intake's merged history instead of ``data.source`` once it exists."""
    intake = cfg.data.intake
    if intake.folder and Path(intake.history).exists() and cfg.data.source != intake.history:
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": intake.history})})
    return cfg


def intake(cfg: Config) -> Any:
    """Take the new files of ``data.intake.folder`` into the history; log what happened."""
    import mlflow

    d = cfg.data
    result = run_intake(d.intake.folder, d.intake.history, cfg.continuous_learning.state_dir,
                        tick_period=d.tick_period, tz=d.tz, drop_duplicates=d.drop_duplicates,
                        settle_seconds=d.intake.settle_seconds)
    mlflow.log_metrics({"intake/files_ingested": len(result.ingested), "intake/files_rejected": len(result.rejected),
                        "intake/new_bars": result.new_bars, "intake/history_bars": result.history_bars})
    if result.rejected:
        mlflow.set_tag("intake.rejected", "; ".join(f"{r['file']}: {r['error']}" for r in result.rejected)[:5000])
    if result.ingested:
        mlflow.set_tag("intake.ingested", ", ".join(i["file"] for i in result.ingested)[:5000])
    return result


# -- steps ---------------------------------------------------------------------------------------


def _step(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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


def train_evaluate_promote(cfg: Config, ingested: Any = None, since: pd.Timestamp | None = None,
                           buffer: ExperienceBuffer | None = None) -> dict[str, Any]:
    """Ingest (unless given), train (warm start from Production when it reads these observations,
    after the offline pass on ``buffer`` when configured), evaluate and gate, in one pass: the
    bars are loaded once and handed on, Production is downloaded once, the challenger and
    Production are backtested once on the same windows, and that one evaluation is what the
    evaluate run logs and what the gate decides on. ``since``: the time of the first new
    experience (the retrain learns from its bar on, plus ``retrain_history_bars`` of history)."""
    import mlflow

    ingested = ingested or _step("ingest", ingest.main, cfg)
    data_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(ingested.path)})})
    bars, note = retrain_window(ingested.bars, cfg.continuous_learning.retrain_history_bars, since)
    if note:
        log.warning("retrain: %s", note)
        mlflow.set_tag("cycle.data_warning", note)
    bars = bars.copy(deep=False)
    bars.attrs.update(ingested.bars.attrs)
    bars.attrs.update(source=str(ingested.path), path=str(ingested.path))
    production = production_model(cfg)
    init, parent_tags = (str(production.local), production.tags()) if production and production.warm_start else (None, None)
    plan = retrain_plan(cfg, production)
    log.log(logging.WARNING if production and not production.warm_start else logging.INFO, "retrain: %s", plan)
    mlflow.set_tag("cycle.plan", plan[:5000])
    with ray_session(cfg), tempfile.TemporaryDirectory(prefix="nt8-cycle-") as tmp:
        offline = None
        if buffer is not None and cfg.continuous_learning.offline_pass != "none":
            offline = _step("offline", _offline, cfg, buffer, production if init else None, bars, Path(tmp))
            init, parent_tags = str(offline.module_dir), {
                **(parent_tags or {}), "parent_uri": f"offline pass ({cfg.continuous_learning.offline_pass}) from "
                f"{parent_tags['parent_uri'] if parent_tags else 'fresh weights'}"}
        trained = _step("train", train.main, data_cfg, init_from=init, bars=bars, parent_tags=parent_tags)
    model_uri = (f"models:/{cfg.train.register_model}/{trained.registered_version}"
                 if trained.registered_version else trained.model_uri)
    test = test_split(bars, data_cfg)
    challenger = load_policy_model(model_uri)
    policies = [challenger]
    before = production.version if production else None
    if production is not None and trained.registered_version:
        compared = load_policy_model(production.uri, production.local)
        try:
            policy_env_config(compared, data_cfg.env, test)
            policies.append(compared)
        except ModelMismatch:  # the gate says why it cannot compare; the evaluation goes on without it
            pass
    evaluation = _step("evaluate", evaluate_policies, policies, test, data_cfg)
    evaluated = _step("evaluate", evaluate.main, data_cfg, [model_uri], bars=test, policies=[challenger],
                      evaluation=evaluation)
    decision = (_step("promote", promote.main, data_cfg, model_uri, bars=test, challenger=challenger,
                      evaluation=evaluation) if trained.registered_version else None)
    tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags  # the active run object's tags are stale
    created = [v for v in tags.get("cycle.created_versions", "").split(",") if v]
    mlflow.set_tags({"cycle.created_versions": ",".join([*created, trained.registered_version or model_uri]),
                     "cycle.compared_with": f"v{before}" if before else "none (first model)"})
    return {"ingest": ingested, "train": trained, "model_uri": model_uri, "evaluate": evaluated, "promote": decision,
            "offline": offline, "plan": plan}


def _offline(cfg: Config, buffer: ExperienceBuffer, production: ProductionModel | None, bars: pd.DataFrame,
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
        mlflow.log_input(buffer.snapshot(), context="offline")
        result = offline_pass(cfg, buffer, find_module_dir(production.local) if production else None,
                              market.observation_space(), market.action_space(), work)
        for it, metrics in enumerate(result.history, 1):
            mlflow.log_metrics(metrics, step=it)
        mlflow.log_metrics({"offline/experiences": result.experiences, "offline/high_value": result.high_value,
                            "offline/rows": result.rows})
    return result


def maintenance(cfg: Config, buffer: ExperienceBuffer, state: CycleState) -> dict[str, Any]:
    import mlflow

    cl, p = cfg.continuous_learning, cfg.promotion
    out: dict[str, Any] = {}
    if cfg.data.intake.folder:
        out["intake"] = _step("intake", intake, cfg)
    if len(buffer) > cl.experience_buffer_size:
        out["compaction"] = _step("compact", buffer.compact, cl.experience_buffer_size)
    out["annotate"] = _step("annotate", annotate.main, cfg)
    if production_version(p.model_name) is not None:
        out["reconcile"] = _step("reconcile", reconcile, p.model_name, p.deploy_dir, p.keep_releases,
                                 lock_file=p.lock_file)
        out["monitor"] = _step("monitor", monitor.check, cfg)
        if out["monitor"].run_id:  # the version's long-running monitor run (top level: one curve over passes)
            mlflow.set_tag("cycle.monitor_run", out["monitor"].run_id)
    due = thresholds(cfg, buffer, state)
    out["thresholds"] = due
    mlflow.log_metrics({f"cycle/{k}": float(v) for k, v in due.items() if isinstance(v, (int, float))})
    mlflow.set_tags({"cycle.retrain_due": str(due["retrain_due"]).lower(),
                     "cycle.finetune_due": str(due["finetune_due"]).lower()})
    log.info("thresholds: %d experiences (%d new since the last retrain; retrain needs %d new and %d in all), "
             "%d new bars (%s): retrain %s; %d annotated (%d new; fine-tuning needs %d): fine-tune %s",
             due["experiences"], due["new_since_retrain"], cl.retrain_frequency, cl.min_experiences,
             due["new_bars_since_retrain"], f"retrain_new_bars {cl.retrain_new_bars}" if cl.retrain_new_bars
             else "not a trigger",
             "DUE" if due["retrain_due"] else "not due", due["annotated"], due["new_annotated_since_finetune"],
             cl.min_annotated_for_finetune, "DUE" if due["finetune_due"] else "not due")
    return out


def retrain(cfg: Config, buffer: ExperienceBuffer, state: CycleState, force: bool,
            ingested: Any = None, due: dict[str, Any] | None = None) -> dict[str, Any] | None:
    import mlflow

    due = due or thresholds(cfg, buffer, state)  # maintenance's, when it just ran: the buffer is as it was
    if not (due["retrain_due"] or force):
        log.info("retrain not due: %d new experiences since the last retrain (needs %d), %d in all (needs %d)",
                 due["new_since_retrain"], cfg.continuous_learning.retrain_frequency, due["experiences"],
                 cfg.continuous_learning.min_experiences)
        mlflow.set_tag("cycle.retrain", "not due")
        return None
    if due["experiences"]:
        mlflow.log_input(buffer.snapshot(), context="experiences")
    result = train_evaluate_promote(cfg, ingested, since=due["first_new_time"], buffer=buffer)
    state.mark_bars(result["ingest"].bars.index[-1])
    decision = result["promote"]
    state.advance("retrain", RETRAIN_IDS, due["ids"], {
        "version": result["train"].registered_version, "decision": decision.decision if decision else "not registered",
        "run_id": mlflow.active_run().info.run_id})
    mlflow.set_tags({"cycle.retrain": decision.decision if decision else "trained (not registered)",
                     "cycle.challenger": result["model_uri"]})
    return result


def finetune(cfg: Config, buffer: ExperienceBuffer, state: CycleState, force: bool,
             due: dict[str, Any] | None = None) -> dict[str, Any] | str:
    """When enough new annotated experiences exist (or ``--force``): the fine-tuning entry point
    (``pipelines.finetune``: QLoRA, register, gate on validation loss), then the reasoning engine
    with the Production adapter reflects on the newest validation trade (logged as
    ``cycle/reasoner_sample.json``). The watermark moves only after both succeeded."""
    import mlflow

    due = due or thresholds(cfg, buffer, state)  # a retrain in between moves only the retrain watermark
    if not (due["finetune_due"] or force):
        mlflow.set_tag("cycle.finetune", "not due")
        return "not due"
    try:
        tuned = _step("finetune", finetune_step.main, cfg)
    except ReasonerUnavailable as exc:  # a base model not downloaded: a setup problem, not a failed cycle
        log.error("fine-tuning is due but skipped: %s", exc)
        mlflow.set_tag("cycle.finetune", f"skipped: {exc}"[:5000])
        return f"skipped: {exc}"
    engine = ReasoningEngine.from_config(cfg)
    sample = tuned.prepared.validation.iloc[-1]  # prepared from the buffer here: it carries the facts
    reply = _step("reasoner", engine.generate, PROMPT.format(facts=sample["facts"]))
    mlflow.log_dict({"version": engine.version, "trade_id": sample["trade_id"], "reasoning": reply.reasoning,
                     "answer": reply.answer, "think_closed": reply.closed}, "cycle/reasoner_sample.json")
    state.advance("finetune", FINETUNE_IDS, due["annotated_ids"], {
        "version": tuned.version, "decision": tuned.decision, "val_loss": tuned.val_loss,
        "run_id": mlflow.active_run().info.run_id})
    mlflow.set_tags({"cycle.finetune": tuned.decision, "cycle.reasoner": f"v{engine.version}"})
    return {"finetune": tuned, "engine_version": engine.version, "sample": reply}


def review(cfg: Config) -> dict[str, Any]:
    """The seed's monthly task: every live version (not archived, plus Production and its rollback
    target; the newest ten) evaluated on the same recent bars, a comparison table and plot (the
    compare run), then old and refused versions archived (never Production nor its rollback target)."""
    import mlflow
    from mlflow import MlflowClient

    def registered(model: str) -> bool:
        return bool(MlflowClient().search_registered_models(filter_string=f"name='{model}'"))

    name = cfg.promotion.model_name
    out: dict[str, Any] = {"versions": [], "archived": []}
    if registered(name):
        versions = sorted(MlflowClient().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version),
                          reverse=True)
        protected = {production_version(name), rollback_target(name)}
        live = [str(v.version) for v in versions if v.current_stage != "Archived" or str(v.version) in protected][:10]
        out["versions"] = live
        if live:
            out["evaluate"] = _step("evaluate", evaluate.main, cfg, [f"models:/{name}/{v}" for v in live])
        out["archived"] = _step("cleanup", cleanup, name, cfg.continuous_learning.keep_versions,
                                lock_file=cfg.promotion.lock_file)
    reasoner = cfg.finetune.register_model  # the adapters too: refused and old ones, never Production
    if registered(reasoner):
        out["archived_reasoner"] = _step("cleanup", cleanup, reasoner, cfg.continuous_learning.keep_versions,
                                         lock_file=cfg.promotion.lock_file)
    mlflow.set_tags({"cycle.review.versions": ",".join(out["versions"]) or "none",
                     "cycle.review.archived": ",".join(out["archived"]) or "none",
                     "cycle.review.archived_reasoner": ",".join(out.get("archived_reasoner", [])) or "none"})
    return out


@dataclass
class _Loaded:
    """What ingest hands on (the bars and the file they are in), for the simulation's history slices."""

    path: Path
    bars: pd.DataFrame


def _sim_config(cfg: Config, work: Path, name: str) -> Config:
    """The simulation's own registered model, deploy folder, buffer and state: it never touches the
    real Production."""
    return cfg.model_copy(update={
        "promotion": cfg.promotion.model_copy(update={"model_name": name, "deploy_dir": str(work / "deploy"),
                                                      "lock_file": str(work / "registry.lock")}),
        "train": cfg.train.model_copy(update={"register_model": name}),
        "data": cfg.data.model_copy(update={"output_dir": str(work / "bars")}),
        "continuous_learning": cfg.continuous_learning.model_copy(update={
            "experience_storage": str(work / "buffer"), "state_dir": str(work / "state"), "paper_bars": None})})


def simulate(cfg: Config, periods: int, start_fraction: float) -> dict[str, Any]:
    """Walk forward through ``data.source`` as if live: at each of ``periods`` decision points
    the model is retrained (warm-started from the Production of that time) on the bars before the
    point only and gated on the last held-out part of them; the period up to the next point is
    traded by the Production of that time (the learning agent), by the first Production (never
    retrained) and by buy-and-hold, each a deterministic backtest through the env (the paper path
    gives the same bits: tests/test_bridge.py). Out-of-sample equity, metrics, a paired test and a
    plot in the run. Versions are registered under their own name (``<model>-sim-<run>``)."""
    import mlflow

    if periods < 1 or not 0 < start_fraction < 1:
        raise ValueError(f"simulate: --periods >= 1 and 0 < --start-fraction < 1 (got {periods}, {start_fraction})")
    bars = load_source(cfg)
    n = len(bars)
    first = int(n * start_fraction)
    step = (n - first) // periods
    points = [first + k * step for k in range(periods)] + [n]
    history_bars = Market.first_bar(cfg.env)
    if first < history_bars + 2 or step < 2:
        raise ValueError(f"simulate: {n} bars split at {start_fraction:g} into {periods} periods leave {first} bars "
                         f"before the first decision point and {step} per period; need at least {history_bars + 2} "
                         "and 2: a larger --start-fraction, fewer --periods or more bars")
    # Once on the whole file, naming it; the slices each step reads are marked checked.
    warn_if_instrument_misfits(bars, cfg)
    bars.attrs[CHECKED] = str(bars.attrs.get("path") or bars.attrs.get("source") or cfg.data.source)
    run_id = mlflow.active_run().info.run_id
    name = f"{cfg.promotion.model_name}-sim-{run_id[:8]}"
    drop_sim_models(cfg.promotion.model_name, lock_file=cfg.promotion.lock_file)  # what killed simulations left
    mlflow.MlflowClient().create_registered_model(name, tags={SIM_RUN_TAG: run_id}, description=(
        f"Versions of the walk-forward simulation run {run_id}; deleted when it ends (its models stay "
        "in the run's artifacts)."))
    try:
        out = _walk_forward(cfg, bars, points, history_bars, name)
        out["registry"] = status(name)
    finally:  # the user's Models page lists their models, not every simulation's
        drop_sim_models(cfg.promotion.model_name, only=name, lock_file=cfg.promotion.lock_file)
    m = out["metrics"]
    log.info("simulate: learning %s vs never retrained %s vs buy-and-hold %s (total return); paired p=%.3g",
             f"{m['learning']['total_return']:.4f}", f"{m['never_retrained']['total_return']:.4f}",
             f"{m['buy_hold']['total_return']:.4f}", out["paired"].get("p_value", math.nan))
    return out


def _walk_forward(cfg: Config, bars: pd.DataFrame, points: list[int], history_bars: int,
                  name: str) -> dict[str, Any]:
    """The simulation proper (see :func:`simulate`), its versions registered as ``name``."""
    import mlflow

    periods = len(points) - 1
    reports = {agent: EvalReport(agent) for agent in ("learning", "never_retrained", "buy_hold")}
    decisions = []
    with tempfile.TemporaryDirectory(prefix="nt8-sim-") as tmp:
        sim = _sim_config(cfg, Path(tmp), name)
        frozen = None
        for k, point in enumerate(points[:-1]):
            seen = bars.iloc[:point].copy()  # nothing at or after the decision point
            seen.attrs.update(bars.attrs)
            path = Path(tmp) / f"bars-until-{k}.parquet"
            seen.to_parquet(path)
            step_result = train_evaluate_promote(sim, _Loaded(path, seen))
            verdict = step_result["promote"]
            decisions.append(verdict.decision if verdict else "not registered")
            production = production_version(name)
            if production is None:
                raise ValueError(f"simulate: no model passed the gate at the first decision point "
                                 f"({'; '.join(verdict.reasons) if verdict else 'not registered'})")
            frozen = frozen or production
            period = bars.iloc[point - history_bars:points[k + 1]]
            env = sim.env.model_dump()
            for agent, policy in (("learning", load_policy_model(f"models:/{name}/{production}")),
                                  ("never_retrained", load_policy_model(f"models:/{name}/{frozen}"))):
                result = backtest(policy.predict, period, policy_env_config(policy, sim.env, period), 1,
                                  seed=cfg.seed, name=agent, first_bar=history_bars)
                reports[agent].windows.extend(result.windows)
            max_c = resolve_instrument(sim.env.instrument).max_contracts
            reports["buy_hold"].windows.extend(backtest(constant_policy(2 * max_c), period, env, 1, name="buy_hold",
                                                        first_bar=history_bars).windows)
            log.info("simulate: period %d/%d (%s .. %s) traded by v%s (never retrained: v%s)", k + 1, periods,
                     period.index[history_bars], period.index[-1], production, frozen)
    ppy = periods_per_year(bars.index)
    equity, out = {}, {}
    for agent, report in reports.items():
        returns = report.returns()
        equity[agent] = cfg.env.initial_equity * np.cumprod(np.r_[1.0, 1.0 + returns])
        out[agent] = {"total_return": total_return(equity[agent]), "sharpe": sharpe_ratio(returns, ppy),
                      "max_drawdown": max_drawdown(equity[agent]),
                      "n_trades": float(sum(len(w.trades) for w in report.windows))}
        for k, window in enumerate(report.windows):
            mlflow.log_metric(f"sim/{agent}/period_return", float(window.metrics["total_return"]), step=k)
    # The curves as step metrics (step = out-of-sample bar): "equity/" sorts before "sim/", so the
    # run's page opens on them, not on single-value bars.
    log_curves(mlflow.active_run().info.run_id, {f"equity/{agent}": curve for agent, curve in equity.items()})
    paired = paired_comparison(reports["learning"], reports["never_retrained"])
    mlflow.log_metrics({f"sim/{agent}/{k}": v for agent, m in out.items() for k, v in m.items()
                        if math.isfinite(v)})
    mlflow.log_metrics({f"sim/paired/{k}": v for k, v in paired.items() if math.isfinite(v)})
    mlflow.set_tags({"sim.points": ",".join(str(bars.index[p]) for p in points[:-1]),
                     "sim.decisions": ",".join(decisions), "sim.model_name": name})
    mlflow.log_figure(_sim_figure(equity), "sim/equity.png")
    return {"metrics": out, "paired": paired, "decisions": decisions, "points": points, "equity": equity,
            "reports": reports, "model_name": name}


def _sim_figure(equity: dict[str, np.ndarray]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for agent, curve in equity.items():
        ax.plot(curve, label=agent.replace("_", " "))
    ax.set_xlabel("out-of-sample bar")
    ax.set_ylabel("equity")
    ax.set_title("walk-forward: continuously learning vs never retrained vs buy-and-hold")
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


def ui_link(run_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs list in the MLflow UI. MLflow 3.17's UI picks its GenAI or model
    training view from a per-browser switch (GenAI in a fresh browser), not from the experiment's
    kind tag; ``workflowType=machine_learning`` in the link selects the runs list."""
    import mlflow

    experiment = mlflow.get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def run_experiment(cfg: Config, run_id: str) -> str:
    """"experiment <name>" of the experiment the run is in, which is not ``mlflow.experiment``
    under `mlflow run` without --experiment-name (it creates the run, in Default, before our code
    chooses): said so, rather than naming an experiment the run is not in."""
    import mlflow

    name = mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id).name
    if name == cfg.mlflow.experiment:
        return f"experiment {name}"
    return (f"experiment {name}, not mlflow.experiment {cfg.mlflow.experiment}: `mlflow run` chose it; pass "
            f"--experiment-name {cfg.mlflow.experiment} to it")


def summary(cfg: Config, result: dict[str, Any]) -> str:
    """What a person reads at the end: versions, Production and why, key metrics, where to look."""
    lines = [f"cycle {result['mode']} done (MLflow run {result['run_id']}, {run_experiment(cfg, result['run_id'])})"]
    if result.get("settled"):
        lines.append(f"  settled: {result['settled'].describe()}")

    def trained(step: dict[str, Any]) -> str:
        d = step.get("promote")
        if d is None:
            return f"trained {step['model_uri']} (not registered, not gated)"
        why = f": {'; '.join(d.reasons)[:300]}" if d.reasons else ""
        return f"trained {step['model_uri']}, {d.decision}{why}"

    if result.get("bootstrap"):
        lines.append(f"  first model: {trained(result['bootstrap'])}")
    if result.get("collect"):
        paper = result["collect"].paper
        lines.append(f"  paper trading: {paper.decisions} bars through the bridge, version(s) "
                     f"{', '.join(sorted(paper.model_versions))}, {len(paper.trades)} trades, PnL {paper.realised_pnl:.2f}")
    if result.get("maintenance"):
        due = result["maintenance"]["thresholds"]
        taken = result["maintenance"].get("intake")
        if taken is not None:
            rejected = "".join(f"\n    rejected {r['file']}: {r['error']}" for r in taken.rejected)
            lines.append(f"  intake: {len(taken.ingested)} new file(s), {taken.new_bars} new bars, history "
                         f"{taken.history_bars} bars ({cfg.data.intake.history}), {len(taken.waiting)} still "
                         f"being copied{rejected}")
        lines.append(f"  buffer: {due['experiences']} experiences ({due['new_since_retrain']} new), "
                     f"{due['annotated']} annotated")
        watched = result["maintenance"].get("monitor")
        if watched is not None and watched.version is not None:
            lines.append(f"  monitor: v{watched.version}, {watched.stats.get('n_bars', 0):.0f} live/paper steps, "
                         f"{watched.stats.get('n_trades', 0):.0f} trades: "
                         f"{'; '.join(watched.breaches.values()) or 'no breach'}"
                         f"{'' if watched.enough else ' (sample too small to act)'}"
                         f"{f'; ACTION {watched.action}' if watched.action else ''} (run {watched.run_id})")
    if "retrain" in result:
        lines.append(f"  retrain: {trained(result['retrain']) if result['retrain'] else 'not due'}")
        if result["retrain"]:
            lines.append(f"    ({result['retrain']['plan']})")
    if isinstance(result.get("finetune"), dict):
        tuned = result["finetune"]["finetune"]
        lines.append(f"  fine-tuning: {cfg.finetune.register_model} v{tuned.version} {tuned.decision} (validation loss "
                     f"{tuned.val_loss:.4f}); the reasoning engine answered with v{result['finetune']['engine_version']}")
    elif "finetune" in result:
        lines.append(f"  fine-tuning: {result['finetune']}")
    if result.get("simulate"):
        m = result["simulate"]["metrics"]
        lines.append("  walk-forward (out of sample): " + ", ".join(
            f"{agent.replace('_', ' ')} {m[agent]['total_return']:+.2%}" for agent in m)
            + f"; gate at each point: {', '.join(result['simulate']['decisions'])}")
    if result.get("review"):
        rev = result["review"]
        lines.append(f"  review: compared versions {', '.join(rev['versions']) or 'none'}; archived "
                     f"{', '.join(rev['archived']) or 'none'}")
    name = cfg.promotion.model_name
    if result.get("simulate"):  # its versions, as they were before the simulation deleted them
        lines.append(f"{result['simulate']['registry']}\n  (deleted at the end of the simulation: its models "
                     f"stay in the runs' artifacts)")
    else:
        try:
            lines.append(status(name))
        except ValueError:  # nothing registered yet
            lines.append(f"no {name} version registered yet")
    lines.append(f"open the MLflow UI on this store: make ui, then {ui_link(result['run_id'])}")
    return "\n".join(lines)


# -- what a killed cycle left --------------------------------------------------------------------

PID_TAG, HOST_TAG = "cycle.pid", "cycle.host"
"""Tags of a cycle run: the process running it and its host, so that the next cycle can tell a
cycle that still runs from one that was killed."""
SETTLED_TAG = "cycle.settled_by"
"""Tag of a run that the next cycle ended KILLED: which cycle, and why."""
KILLED_BEFORE_GATE = "its cycle was killed before the gate"
"""The refusal reason recorded on a version whose cycle was killed before the gate decided."""


@dataclass
class Settled:
    """What a cycle settled of killed ones: the runs it ended KILLED and the versions it marked
    refused (``<model> v<N>``)."""

    runs: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.runs or self.versions)

    def describe(self) -> str:
        versions = ", ".join(self.versions) or "none"
        return (f"{len(self.runs)} run(s) of a killed cycle ended KILLED ({', '.join(self.runs) or 'none'}); "
                f"version(s) marked refused ({KILLED_BEFORE_GATE}): {versions}")


def _process_state(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in seconds since the epoch) of process ``pid`` from Linux's
    /proc (proc(5): fields 3 and 22 of /proc/<pid>/stat, boot time ``btime`` of /proc/stat);
    None where the system does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def process_gone(pid: int, host: str, since_ms: int) -> bool:
    """Whether the process ``pid`` of ``host``, which started a run at ``since_ms`` (ms since the
    epoch), is gone: ``host`` is this host and the process is not running (no such process, or a
    zombie), or the process of that id started after the run did (the id was reused). A process
    of another host is never judged gone: this host cannot tell."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive (and not ours, unless the id was reused)
        pass
    state = _process_state(pid)
    # The cycle's process imports for seconds before it creates its run; 1 s covers btime's rounding.
    return state is not None and (state[0] == "Z" or state[1] > since_ms / 1000 + 1)


def _search_runs(client: Any, experiments: list[str], filter_string: str) -> list[Any]:
    """Every run of ``experiments`` that matches ``filter_string`` (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiments, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _family(client: Any, experiments: list[str], run: Any) -> list[Any]:
    """``run`` and its child runs, theirs too (any status)."""
    family, todo = [run], [run.info.run_id]
    while todo:
        children = _search_runs(client, experiments, f"tags.mlflow.parentRunId = '{todo.pop()}'")
        family.extend(children)
        todo.extend(child.info.run_id for child in children)
    return family


def _refuse_ungated(client: Any, run_id: str, by_run: str) -> list[str]:
    """Mark refused the versions registered from run ``run_id`` that have no gate verdict (never a
    version that is or was Production: a cycle killed between its promotion and the verdict tag)."""
    refused = []
    for mv in client.search_model_versions(f"run_id = '{run_id}'"):
        if mv.tags.get("gate.decision") or mv.current_stage == "Production" or was_production(mv.name, mv.version):
            continue
        record_verdict(mv.name, mv.version, "refused", KILLED_BEFORE_GATE, by_run)
        refused.append(f"{mv.name} v{mv.version}")
    return refused


def settle_killed(cycle_run_id: str) -> Settled:
    """Settle what killed cycles left (see the module doc): the cycle runs still RUNNING whose
    process is gone (:func:`process_gone`, from their ``cycle.pid``/``cycle.host``) and their
    child runs still RUNNING end KILLED, tagged ``cycle.settled_by``; the versions any of those
    runs registered without a gate verdict are marked refused. Call it under the orchestrator
    lock from the cycle run ``cycle_run_id``."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client, out = MlflowClient(), Settled()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return out
    for run in _search_runs(client, experiments, "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if run.info.run_id == cycle_run_id or not tags.get(PID_TAG, "").isdigit():
            continue
        if not process_gone(int(tags[PID_TAG]), tags.get(HOST_TAG, ""), run.info.start_time or 0):
            continue
        why = (f"ended KILLED by the next cycle (run {cycle_run_id}): the process of cycle run {run.info.run_id} "
               f"({tags[PID_TAG]} on {tags.get(HOST_TAG)}) was gone")
        for member in _family(client, experiments, run):
            out.versions.extend(_refuse_ungated(client, member.info.run_id, cycle_run_id))
            if client.get_run(member.info.run_id).info.status == "RUNNING":
                client.set_tag(member.info.run_id, SETTLED_TAG, why)
                client.set_terminated(member.info.run_id, "KILLED")
                out.runs.append(member.info.run_id)
    if out:
        log.warning("settled what a killed cycle left: %s", out.describe())
    return out


# -- the cycle -----------------------------------------------------------------------------------


def main(cfg: Config, mode: str = "all", force: bool = False, periods: int = 4,
         start_fraction: float = 0.5) -> dict[str, Any]:
    """Run ``mode`` of the cycle under the orchestrator lock; returns what each step produced."""
    import mlflow

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    cl = cfg.continuous_learning
    setup_tracking(cfg)
    with file_lock(Path(cl.state_dir) / "orchestrator.lock", LOCK_TIMEOUT_S, "another orchestrator run"), \
            pipeline_run(cfg, f"cycle-{mode}") as run:
        mlflow.set_tags({PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
        result: dict[str, Any] = {"run_id": run.info.run_id, "mode": mode}
        result["settled"] = _step("settle", settle_killed, run.info.run_id)
        if result["settled"]:
            mlflow.set_tags({"cycle.settled_runs": ",".join(result["settled"].runs) or "none",
                             "cycle.settled_versions": ",".join(result["settled"].versions) or "none"})
        state = CycleState(cl.state_dir)
        buffer = ExperienceBuffer(cl.experience_storage)
        ingested = None
        cfg = with_history(cfg)
        if mode == "all" and production_version(cfg.promotion.model_name) is None:
            log.info("nothing in Production yet: training a first model")
            result["bootstrap"] = train_evaluate_promote(cfg)
            ingested = result["bootstrap"]["ingest"]
            state.mark_bars(ingested.bars.index[-1])
        if mode == "all" and cl.paper_bars and production_version(cfg.promotion.model_name) is not None:
            result["collect"] = _step("collect", collect.main, cfg, None, cl.paper_bars)
        if mode in ("maintenance", "all"):
            result["maintenance"] = maintenance(cfg, buffer, state)
            taken = result["maintenance"].get("intake")
            if taken is not None and taken.ingested:  # the next steps read the grown history
                cfg, ingested = with_history(cfg), None
        if mode in ("retrain", "all"):
            known = result["maintenance"]["thresholds"] if "maintenance" in result else None
            result["retrain"] = retrain(cfg, buffer, state, force, ingested, known)
        if mode in ("finetune", "all"):
            known = result["maintenance"]["thresholds"] if "maintenance" in result else None
            result["finetune"] = finetune(cfg, buffer, state, force, known)
        if mode == "review":
            result["review"] = review(cfg)
        if mode == "simulate":
            result["simulate"] = simulate(cfg, periods, start_fraction)
        text = summary(cfg, result)
        mlflow.log_text(text, "cycle/summary.txt")
        result["summary"] = text
        log.info("cycle %s done: %s", mode, run.info.run_id)
        return result


def loop(cfg: Config, max_rounds: int | None = None, tick_s: float = 60.0) -> list[tuple[str, str]]:
    """Run forever: maintenance, the retrain check and the review, each when its cadence
    (``continuous_learning.*_every``) has passed since it last ran (the times are kept in the
    state, so a restart does not run everything again). A failed mode is logged and retried at its
    next turn; SIGTERM/SIGINT stop the loop between modes. Returns (mode, outcome) per run."""
    cl = cfg.continuous_learning
    every = {"maintenance": parse_duration(cl.maintenance_every), "retrain": parse_duration(cl.retrain_every),
             "finetune": parse_duration(cl.finetune_every), "review": parse_duration(cl.review_every)}
    stop = {"now": False}

    def request_stop(signum: int, frame: Any) -> None:
        log.info("stopping the loop after the current mode (signal %d)", signum)
        stop["now"] = True

    previous = install(request_stop)
    done: list[tuple[str, str]] = []
    rounds = 0
    try:
        while not stop["now"] and (max_rounds is None or rounds < max_rounds):
            rounds += 1
            before = len(done)
            for mode in LOOP_MODES:
                last = CycleState(cl.state_dir).data.get("loop", {}).get(mode)
                if stop["now"] or (last is not None and time.time() - last < every[mode]):
                    continue
                try:
                    main(cfg, mode)
                    outcome = "ok"
                except Exception as exc:  # noqa: BLE001 - the loop outlives a failed mode; the run says why
                    log.exception("loop: mode %s failed; next try at its next turn", mode)
                    outcome = f"failed: {exc}"
                finally:  # a library a mode used may have replaced it (ray.init did): ours again
                    install(request_stop)
                with file_lock(Path(cl.state_dir) / "orchestrator.lock", LOCK_TIMEOUT_S, "another orchestrator run"):
                    state = CycleState(cl.state_dir)
                    state.data.setdefault("loop", {})[mode] = time.time()
                    atomic_write_text(state.folder / STATE_FILE, json.dumps(state.data, indent=2))
                done.append((mode, outcome))
            log.info("loop: turn %d done (%s); next check in %g s", rounds,
                     ", ".join(f"{m} {o}" for m, o in done[before:]) or "nothing due", tick_s)
            if max_rounds is not None and rounds >= max_rounds:
                break
            waited = 0.0
            while not stop["now"] and waited < tick_s:
                time.sleep(min(1.0, tick_s))
                waited += 1.0
    finally:
        restore(previous)
    return done


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--mode", default="all", choices=MODES, help="which part of the cycle to run")
    parser.add_argument("--force", action="store_true", help="retrain / fine-tune even when not due")
    parser.add_argument("--periods", type=int, default=4, help="simulate: decision points (retrain, gate, trade)")
    parser.add_argument("--start-fraction", type=float, default=0.5,
                        help="simulate: share of the bars before the first decision point")
    parser.add_argument("--loop", action="store_true", help="run maintenance, retrain and review forever, each "
                        "at its cadence (continuous_learning.*_every)")
    return parser


def _cli(cfg: Config, args: argparse.Namespace) -> None:
    if args.loop:
        loop(cfg)
        return
    result = main(cfg, args.mode, args.force, args.periods, args.start_fraction)
    print(result["summary"])


if __name__ == "__main__":
    run_cli(build_parser(), _cli)
