"""The cycle's result (:class:`CycleResult`, what each step handed back) and the summary a person
reads at the end: versions, Production and why, key metrics, where to look."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlproject.config import Config
from mlproject.cycle.retrain import Retrained
from mlproject.cycle.review import Review
from mlproject.cycle.settle import Settled
from mlproject.cycle.simulate import SimulationResult
from mlproject.cycle.state import Due
from mlproject.intake import IntakeResult
from mlproject.registry import status


@dataclass
class Maintenance:
    """What maintenance did: the thresholds it found, and each step's result (None: not run)."""

    due: Due
    intake: IntakeResult | None = None
    compaction: dict[str, int] | None = None
    annotate: Any = None
    """``pipelines.annotate``'s result."""
    reconcile: Any = None
    monitor: Any = None
    """The drift monitor's pass (``pipelines.monitor.check``), when something is in Production."""
    shadow: Any = None
    """The Staging version's live verdict (``mlproject.shadow_verdict.ShadowVerdict``), when one shadows."""


@dataclass
class Finetuned:
    """The fine-tuning mode's outcome: ``status`` is ``not due``, ``skipped: <why>`` or the gate's
    decision; ``result`` is ``pipelines.finetune``'s, ``sample`` the reasoning engine's answer."""

    status: str
    result: Any = None
    engine_version: str | None = None
    sample: Any = None


@dataclass
class CycleResult:
    """What one mode of the cycle produced (None: that part did not run)."""

    run_id: str
    mode: str
    settled: Settled = field(default_factory=Settled)
    bootstrap: Retrained | None = None
    collect: Any = None
    """``pipelines.collect``'s result (paper trading), in mode ``all`` with ``paper_bars``."""
    maintenance: Maintenance | None = None
    retrain: Retrained | None = None
    """None also when the retrain was not due: see :attr:`mode`."""
    finetune: Finetuned | None = None
    review: Review | None = None
    simulate: SimulationResult | None = None
    summary: str = ""


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


def trained_line(step: Retrained) -> str:
    d = step.promote
    if d is None:
        return f"trained {step.model_uri} (not registered, not gated)"
    why = f": {'; '.join(d.reasons)[:300]}" if d.reasons else ""
    return f"trained {step.model_uri}, {d.decision}{why}"


def _maintenance_lines(cfg: Config, m: Maintenance) -> list[str]:
    lines = []
    if m.intake is not None:
        taken = m.intake
        rejected = "".join(f"\n    rejected {r['file']}: {r['error']}" for r in taken.rejected)
        lines.append(f"  intake: {len(taken.ingested)} new file(s), {taken.new_bars} new bars, history "
                     f"{taken.history_bars} bars ({cfg.data.intake.history}), {len(taken.waiting)} still "
                     f"being copied{rejected}")
    lines.append(f"  buffer: {m.due.experiences} experiences ({m.due.new_since_retrain} new), "
                 f"{m.due.annotated} annotated"
                 f"{f'; {m.due.shadow} shadow experiences (a Staging model, not counted)' if m.due.shadow else ''}")
    watched = m.monitor
    if watched is not None and watched.version is not None:
        lines.append(f"  monitor: v{watched.version}, {watched.stats.get('n_bars', 0):.0f} live/paper steps, "
                     f"{watched.stats.get('n_trades', 0):.0f} trades: "
                     f"{'; '.join(watched.breaches.values()) or 'no breach'}"
                     f"{'' if watched.enough else ' (sample too small to act)'}"
                     f"{f'; ACTION {watched.action}' if watched.action else ''} (run {watched.run_id})")
    if m.shadow is not None:
        lines.append(f"  shadow: {m.shadow.describe()}")
    return lines


def _learning_lines(cfg: Config, result: CycleResult) -> list[str]:
    lines = []
    if result.mode in ("retrain", "all"):
        lines.append(f"  retrain: {trained_line(result.retrain) if result.retrain else 'not due'}")
        if result.retrain:
            lines.append(f"    ({result.retrain.plan})")
    tuned = result.finetune
    if tuned is not None and tuned.result is not None:
        lines.append(f"  fine-tuning: {cfg.finetune.register_model} v{tuned.result.version} {tuned.result.decision} "
                     f"(validation loss {tuned.result.val_loss:.4f}); the reasoning engine answered with "
                     f"v{tuned.engine_version}")
    elif tuned is not None:
        lines.append(f"  fine-tuning: {tuned.status}")
    return lines


def _simulation_lines(sim: SimulationResult) -> list[str]:
    lines = ["  walk-forward (out of sample): " + ", ".join(
        f"{agent.replace('_', ' ')} {sim.metrics[agent]['total_return']:+.2%}" for agent in sim.metrics)
        + f"; gate at each point: {', '.join(sim.decisions)}"]
    if sim.flat_periods:
        lines.append(f"  the learning agent stayed flat (no model in Production): {'; '.join(sim.flat_periods)}")
    lines += ["  " + line for line in sim.report().splitlines()]
    return lines


def _registry_lines(cfg: Config, result: CycleResult) -> list[str]:
    if result.simulate is not None:  # its versions, as they were before the simulation deleted them
        return [f"{result.simulate.registry}\n  (deleted at the end of the simulation: its models stay in the "
                "runs' artifacts)"]
    try:
        return [status(cfg.promotion.model_name)]
    except ValueError:  # nothing registered yet
        return [f"no {cfg.promotion.model_name} version registered yet"]


def summary(cfg: Config, result: CycleResult) -> str:
    """What a person reads at the end: versions, Production and why, key metrics, where to look."""
    lines = [f"cycle {result.mode} done (MLflow run {result.run_id}, {run_experiment(cfg, result.run_id)})"]
    if result.settled:
        lines.append(f"  settled: {result.settled.describe()}")
    if result.bootstrap:
        lines.append(f"  first model: {trained_line(result.bootstrap)}")
        decision = result.bootstrap.promote.decision if result.bootstrap.promote else None
        if decision == "staged":
            lines.append("  no model in Production: the agent stays flat while the first model shadow-trades in Staging")
        elif decision != "promoted":
            lines.append("  no model in Production: the agent stays flat (no orders) until a model passes the gate")
    if result.collect:
        paper = result.collect.paper
        lines.append(f"  paper trading: {paper.decisions} bars through the bridge, version(s) "
                     f"{', '.join(sorted(paper.model_versions))}, {len(paper.trades)} trades, PnL {paper.realised_pnl:.2f}")
    if result.maintenance:
        lines += _maintenance_lines(cfg, result.maintenance)
    lines += _learning_lines(cfg, result)
    if result.simulate is not None:
        lines += _simulation_lines(result.simulate)
    if result.review is not None:
        lines.append(f"  review: compared versions {', '.join(result.review.versions) or 'none'}; archived "
                     f"{', '.join(result.review.archived) or 'none'}")
    lines += _registry_lines(cfg, result)
    lines.append(f"open the MLflow UI on this store: make ui, then {ui_link(result.run_id)}")
    return "\n".join(lines)
