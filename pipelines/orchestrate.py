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
- ``simulate``: the walk-forward simulation (``pipelines.simulate``, its own step).

``--loop`` runs maintenance, the retrain check and the review forever, each at its cadence
(``continuous_learning.maintenance_every``, ``retrain_every``, ``finetune_every``, ``review_every``:
1d, 1w, 1w, 30d); retrain and fine-tune run only when due.

Each mode is one parent MLflow run with a child run per step, tagged with what it did
(``cycle.*``). Watermarks (the experience ids the last retrain saw, when, which version it made)
are written atomically under ``continuous_learning.state_dir``, only after the step succeeded, so
a re-run does not retrain on the same experiences twice and a failed step leaves them as they were;
a lock there stops two orchestrators. A failed step never touches Production (promotion is the
last step and is itself atomic); the run is FAILED with ``cycle.failed_step`` naming the step. A
cycle killed outright is settled by the next one (``mlproject.cycle.settle``).

What each step does lives in the library (``mlproject.cycle``); this module is the table of steps.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from typing import Any

from mlproject import shadow_verdict
from mlproject.cli import base_parser, run_cli
from mlproject.config import Config, parse_duration
from mlproject.cycle.retrain import retrain, step, train_evaluate_promote
from mlproject.cycle.review import review
from mlproject.cycle.run import cycle_lock, cycle_run
from mlproject.cycle.state import FINETUNE_IDS, CycleState, Due, describe_due, due, take_intake, with_history
from mlproject.cycle.summary import CycleResult, Finetuned, Maintenance
from mlproject.deploy import reconcile
from mlproject.experience import ExperienceBuffer
from mlproject.reasoner.engine import ReasonerUnavailable, ReasoningEngine
from mlproject.reflection import PROMPT
from mlproject.registry import production_version
from mlproject.signals import StopRequest, run_turns
from mlproject.staging import staging_version
from pipelines import annotate, collect, monitor
from pipelines import finetune as finetune_step
from pipelines import simulate as simulate_step

log = logging.getLogger(__name__)

MODES = ("maintenance", "retrain", "finetune", "review", "all", "simulate")
LOOP_MODES = ("maintenance", "retrain", "finetune", "review")


def maintenance(cfg: Config, buffer: ExperienceBuffer, state: CycleState) -> Maintenance:
    """Intake, compaction, annotation, reconcile and the drift monitor, then what is due."""
    import mlflow

    cl = cfg.continuous_learning
    intake = step("intake", take_intake, cfg) if cfg.data.intake.folder else None
    compaction = (step("compact", buffer.compact, cl.experience_buffer_size)
                  if len(buffer) > cl.experience_buffer_size else None)
    annotated = step("annotate", annotate.main, cfg)
    reconciled, watched = _watch_production(cfg)
    shadow = _judge_shadow(cfg, buffer)
    out = Maintenance(due(cfg, buffer, state), intake, compaction, annotated, reconciled, watched, shadow)
    mlflow.log_metrics({f"cycle/{k}": v for k, v in out.due.counts().items()})
    mlflow.set_tags({"cycle.retrain_due": str(out.due.retrain_due).lower(),
                     "cycle.finetune_due": str(out.due.finetune_due).lower()})
    log.info("thresholds: %s", describe_due(cfg, out.due))
    return out


def _watch_production(cfg: Config) -> tuple[Any, Any]:
    """With something in Production: reconcile the deployment, then the drift monitor's pass."""
    import mlflow

    p = cfg.promotion
    if production_version(p.model_name) is None:
        return None, None
    reconciled = step("reconcile", reconcile, p.model_name, p.deploy_dir, p.keep_releases, lock_file=p.lock_file)
    watched = step("monitor", monitor.check, cfg)
    if watched.run_id:  # the version's long-running monitor run (top level: one curve over passes)
        mlflow.set_tag("cycle.monitor_run", watched.run_id)
    return reconciled, watched


def _judge_shadow(cfg: Config, buffer: ExperienceBuffer) -> Any:
    """The Staging version's live verdict (``mlproject.shadow_verdict``); the deployment follows it."""
    p = cfg.promotion
    verdict = step("shadow", shadow_verdict.decide, cfg, buffer)
    if verdict is not None:
        import mlflow

        mlflow.set_tag("cycle.shadow", verdict.describe()[:5000])
        if verdict.decision in ("promoted", "archived"):
            step("reconcile", reconcile, p.model_name, p.deploy_dir, p.keep_releases, lock_file=p.lock_file)
    return verdict


def finetune(cfg: Config, buffer: ExperienceBuffer, state: CycleState, force: bool,
             known: Due | None = None) -> Finetuned:
    """When enough new annotated experiences exist (or ``--force``): the fine-tuning entry point
    (``pipelines.finetune``: QLoRA, register, gate on validation loss), then the reasoning engine
    with the Production adapter reflects on the newest validation trade (logged as
    ``cycle/reasoner_sample.json``). The watermark moves only after both succeeded."""
    import mlflow

    d = known or due(cfg, buffer, state)  # a retrain in between moves only the retrain watermark
    if not (d.finetune_due or force):
        mlflow.set_tag("cycle.finetune", "not due")
        return Finetuned("not due")
    try:
        tuned = step("finetune", finetune_step.main, cfg)
    except ReasonerUnavailable as exc:  # a base model not downloaded: a setup problem, not a failed cycle
        log.error("fine-tuning is due but skipped: %s", exc)
        mlflow.set_tag("cycle.finetune", f"skipped: {exc}"[:5000])
        return Finetuned(f"skipped: {exc}")
    engine = ReasoningEngine.from_config(cfg)
    sample = tuned.prepared.validation.iloc[-1]  # prepared from the buffer here: it carries the facts
    reply = step("reasoner", engine.generate, PROMPT.format(facts=sample["facts"]))
    mlflow.log_dict({"version": engine.version, "trade_id": sample["trade_id"], "reasoning": reply.reasoning,
                     "answer": reply.answer, "think_closed": reply.closed}, "cycle/reasoner_sample.json")
    state.advance("finetune", FINETUNE_IDS, d.annotated_ids, {
        "version": tuned.version, "decision": tuned.decision, "val_loss": tuned.val_loss,
        "run_id": mlflow.active_run().info.run_id})
    mlflow.set_tags({"cycle.finetune": tuned.decision, "cycle.reasoner": f"v{engine.version}"})
    return Finetuned(tuned.decision, tuned, engine.version, reply)


def main(cfg: Config, mode: str = "all", force: bool = False, periods: int = 4,
         start_fraction: float = 0.5) -> CycleResult:
    """Run ``mode`` of the cycle under the orchestrator lock; returns what each step produced."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    if mode == "simulate":
        return simulate_step.main(cfg, periods, start_fraction)
    with cycle_run(cfg, mode) as result:
        _run_mode(with_history(cfg), mode, force, result)
    return result


def _run_mode(cfg: Config, mode: str, force: bool, result: CycleResult) -> None:
    """The table of steps of ``mode``; each fills its part of ``result``."""
    cl = cfg.continuous_learning
    state, buffer = CycleState(cl.state_dir), ExperienceBuffer(cl.experience_storage)
    ingested = None
    if mode == "all" and production_version(cfg.promotion.model_name) is None:
        log.info("nothing in Production yet: training a first model")
        result.bootstrap = train_evaluate_promote(cfg)
        ingested = result.bootstrap.ingest
        state.mark_bars(ingested.bars.index[-1])
    name = cfg.promotion.model_name
    if mode == "all" and cl.paper_bars and (production_version(name) or staging_version(name)) is not None:
        result.collect = step("collect", collect.main, cfg, None, cl.paper_bars)
    if mode in ("maintenance", "all"):
        result.maintenance = maintenance(cfg, buffer, state)
        if result.maintenance.intake is not None and result.maintenance.intake.ingested:
            cfg, ingested = with_history(cfg), None  # the next steps read the grown history
    known = result.maintenance.due if result.maintenance else None
    if mode in ("retrain", "all"):
        result.retrain = retrain(cfg, buffer, state, force, ingested, known)
    if mode in ("finetune", "all"):
        result.finetune = finetune(cfg, buffer, state, force, known)
    if mode == "review":
        result.review = review(cfg)


def loop(cfg: Config, max_rounds: int | None = None, tick_s: float = 60.0) -> list[tuple[str, str]]:
    """Run forever: maintenance, the retrain check and the review, each when its cadence
    (``continuous_learning.*_every``) has passed since it last ran (the times are kept in the
    state, so a restart does not run everything again). A failed mode is logged and retried at its
    next turn; SIGTERM/SIGINT stop the loop between modes. Returns (mode, outcome) per run."""
    cl = cfg.continuous_learning
    every = {mode: parse_duration(getattr(cl, f"{mode}_every")) for mode in LOOP_MODES}
    done: list[tuple[str, str]] = []
    turns = itertools.count(1)

    def turn(stop: StopRequest) -> None:
        before = len(done)
        for mode in LOOP_MODES:
            last = CycleState(cl.state_dir).loop_ran(mode)
            if not stop.now and (last is None or time.time() - last >= every[mode]):
                done.append((mode, _loop_mode(cfg, mode, stop)))
        log.info("loop: turn %d done (%s); next check in %g s", next(turns),
                 ", ".join(f"{m} {o}" for m, o in done[before:]) or "nothing due", tick_s)

    run_turns("loop", tick_s, turn, max_rounds)
    return done


def _loop_mode(cfg: Config, mode: str, stop: StopRequest) -> str:
    """One mode in the loop: its outcome ("ok" or why it failed), its time recorded under the lock."""
    try:
        main(cfg, mode)
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - the loop outlives a failed mode; the run says why
        log.exception("loop: mode %s failed; next try at its next turn", mode)
        outcome = f"failed: {exc}"
    finally:  # a library a mode used may have replaced it (ray.init did): ours again
        stop.reinstall()
    with cycle_lock(cfg):
        CycleState(cfg.continuous_learning.state_dir).mark_loop(mode)
    return outcome


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
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
    print(main(cfg, args.mode, args.force, args.periods, args.start_fraction).summary)


if __name__ == "__main__":
    run_cli(build_parser(), _cli)
