"""Gated promotion: challenger vs current Production on the same held-out bars (the step behind
``python -m pipelines.promote`` and the cycle's gate, :func:`promote_candidate`).

Both models are backtested on the test split of ``data.source`` (the evaluation step, same
windows). The gate (``promotion.*``): valid actions (no NaN, in range), at least
``min_trades`` trades, worst-window drawdown within ``max_drawdown``, and, against flat (when
``beat_flat``) and against Production (when something is in it), a better ``metric`` by more than
``min_improvement``, a Probabilistic Sharpe Ratio of at least ``min_psr``, a Deflated Sharpe Ratio
over the candidates tried of at least ``min_dsr`` and a win in at least ``min_window_share`` of the
evaluation windows. Every decision is an MLflow run (tags ``decision``, ``reasons``;
both models' metrics). A promotion is a "Production" stage transition plus the alias, followed
by ``mlproject.deploy.reconcile`` (what ``registry_hooks.reconcile`` runs on a timer).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mlproject.config import Config
from mlproject.deploy import DeployRefused, check_version_deployable, reconcile
from mlproject.evaluation import (
    LOWER_IS_BETTER,
    Evaluation,
    default_bars,
    evaluate_policies,
    per_bar_sharpe,
    policy_env_config,
    psr_against,
)
from mlproject.metrics import deflated_sharpe_ratio
from mlproject.policy import LoadedPolicy, ModelMismatch, load_policy_model
from mlproject.preflight import warn_if_instrument_misfits
from mlproject.registry import (
    model_id_of,
    production_version,
    promote,
    record_verdict,
    register_version,
    registry_lock,
    resolve_version,
    trials_of,
)
from mlproject.staging import stage
from mlproject.tracking import log_dataset, log_headline, pipeline_run, setup_tracking

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    """The gate's verdict and everything it looked at."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PromoteResult:
    """What the promote step decided."""

    decision: str
    version: str
    production_before: str | None
    reasons: list[str]
    run_id: str
    metrics: dict[str, float]


FLAT_VALUES = {"profit_factor": 1.0, "payoff_ratio": 1.0}
"""What flat (no trading) scores on a metric it leaves undefined: break-even; 0 elsewhere."""


def _beats(ours: float, theirs: float, metric: str, min_improvement: float, against: str,
           reasons: list[str]) -> float:
    """Improvement of ``ours`` over ``theirs`` on ``metric`` (lower-is-better aware); appends the
    reason when it is not more than ``min_improvement``."""
    if not math.isfinite(ours):
        reasons.append(f"challenger {metric} is undefined")
        return math.nan
    if not math.isfinite(theirs):
        return math.inf  # an undefined incumbent metric cannot be defended
    improvement = (theirs - ours) if metric in LOWER_IS_BETTER else (ours - theirs)
    if not improvement > min_improvement:
        reasons.append(f"{metric} {ours:.4g} vs {against} {theirs:.4g}: improvement {improvement:.4g} "
                       f"is not > min_improvement {min_improvement:g}")
    return improvement


def gate(challenger: Any, production: Any | None, p: Any, trials: int = 1) -> GateResult:
    """Apply the promotion gate ``p`` (PromotionConfig) to evaluation reports: risk limits, the
    quality floor (beat flat, when ``p.beat_flat``), and beating Production when there is one
    (``trials``: the candidates tried for this model, which deflate the challenger's Sharpe)."""
    c = challenger.summary()
    reasons, metrics = [], {f"challenger/{k}": v for k, v in c.items() if not k.endswith("_std")}
    trades = sum(w.metrics["n_trades"] for w in challenger.windows)
    worst_dd = max(w.metrics["max_drawdown"] for w in challenger.windows)
    stops = challenger.stop_notes()
    metrics.update({"gate/trades": float(trades), "gate/worst_drawdown": worst_dd,
                    "gate/stopped_out_windows": float(len(stops))})
    if stops:
        reasons.append(f"hit the equity floor: {'; '.join(stops)}")
    if trades < p.min_trades:
        reasons.append(f"{trades:.0f} trades < min_trades {p.min_trades}")
    if worst_dd > p.max_drawdown:
        reasons.append(f"worst-window drawdown {worst_dd:.2%} > max_drawdown {p.max_drawdown:.2%}")
    ours = c.get(p.metric, math.nan)
    if p.beat_flat:
        if p.metric not in LOWER_IS_BETTER:  # flat has no drawdown or volatility: nothing beats it there
            metrics["gate/improvement_vs_flat"] = _beats(ours, FLAT_VALUES.get(p.metric, 0.0), p.metric,
                                                         p.min_improvement, "flat", reasons)
        psr_flat = psr_against(challenger, 0.0)
        metrics["gate/psr_vs_flat"] = psr_flat
        if not (psr_flat >= p.min_psr):
            reasons.append(f"PSR vs flat (Sharpe 0) {psr_flat:.3f} < min_psr {p.min_psr:g}")
        if p.beat_flat_by == "all":
            _beats_often_enough(challenger, None, p, trials, reasons, metrics)
    if production is not None:
        pm = production.summary()
        metrics.update({f"production/{k}": v for k, v in pm.items() if not k.endswith("_std")})
        metrics["gate/improvement"] = _beats(ours, pm.get(p.metric, math.nan), p.metric, p.min_improvement,
                                             "Production", reasons)
        psr = psr_against(challenger, production)
        metrics["gate/psr"] = psr
        if not (psr >= p.min_psr):
            reasons.append(f"PSR vs Production's Sharpe {psr:.3f} < min_psr {p.min_psr:g}")
        _beats_often_enough(challenger, production, p, trials, reasons, metrics)
    return GateResult(not reasons, reasons, metrics)


def _beats_often_enough(challenger: Any, production: Any | None, p: Any, trials: int, reasons: list[str],
                        metrics: dict[str, float]) -> None:
    """The checks that know how many tries it took and how often it won, against Production or
    (``production`` None) against flat: the Deflated Sharpe Ratio over ``trials`` candidates, and
    the share of evaluation windows won (flat returns 0 in each)."""
    against, suffix = ("Production", "") if production is not None else ("flat", "_vs_flat")
    benchmark = per_bar_sharpe(production) if production is not None else 0.0
    dsr = deflated_sharpe_ratio(challenger.returns(), benchmark, trials)
    theirs = [q.metrics["total_return"] for q in production.windows] if production is not None else \
        [0.0] * len(challenger.windows)
    won = sum(c.metrics["total_return"] > q for c, q in zip(challenger.windows, theirs))
    n = len(challenger.windows)
    metrics.update({f"gate/dsr{suffix}": dsr, "gate/trials": float(trials), f"gate/windows_won{suffix}": float(won),
                    "gate/windows": float(n)})
    if p.min_dsr > 0 and not (dsr >= p.min_dsr):
        reasons.append(f"Deflated Sharpe vs {against} {dsr:.3f} < min_dsr {p.min_dsr:g} ({trials} candidates tried "
                       "for this model)")
    if n and won / n < p.min_window_share:
        reasons.append(f"beat {against} in {won} of {n} evaluation windows, < min_window_share "
                       f"{p.min_window_share:g}")


CANDIDATE_FORMS = "a version number (7), or a models:/, runs:/ or local path URI of a policy model"


def resolve_candidate(name: str, candidate: str, dry_run: bool) -> tuple[str, str]:
    """(version, model URI) of the candidate: a version number, a ``models:/`` URI of a version
    of ``name``, or a ``runs:/`` URI or existing folder of a model, which is loaded (it must be a
    working model) and then registered (not in a dry run). Anything else is an error and nothing
    is registered."""
    from pathlib import Path

    text = candidate.strip()
    if text.isdigit() and int(text) > 0:
        text = f"models:/{name}/{int(text)}"
    elif not text.startswith(("models:/", "runs:/")) and not Path(text).is_dir():
        raise ValueError(f"--candidate {candidate!r}: expected {CANDIDATE_FORMS}")
    mv = resolve_version(text)
    if mv is not None:
        if mv.name != name:
            raise ValueError(f"{text} is a version of '{mv.name}', not of '{name}' (promotion.model_name)")
        return str(mv.version), f"models:/{name}/{mv.version}"
    if Path(text).is_dir():
        text = str(Path(text).resolve())
    load_policy_model(text)  # a junk URI or folder fails here, before anything is registered
    if dry_run:
        return "unregistered", text
    return str(register_version(text, name, {"registered_by": "promote"}).version), text


def evaluate_and_gate(challenger: Any, before: str | None, bars: Any, cfg: Config,
                      evaluation: Any = None, trials: int = 1) -> GateResult:
    """Backtest the challenger (a ``LoadedPolicy``) and Production version ``before`` on the same
    bars and windows, each with its own observation settings, and apply the gate. An
    ``evaluation`` that already holds both (the cycle's) is used as it is."""
    p = cfg.promotion
    production_uri = f"models:/{p.model_name}/{before}" if before is not None else None
    if evaluation is not None and challenger.uri in evaluation.reports and (
            production_uri is None or production_uri in evaluation.reports):
        _log_windows(evaluation)
        reports = evaluation.reports
        return gate(reports[challenger.uri], reports[production_uri] if production_uri else None, p, trials)
    policies = [challenger]
    policy_env_config(challenger, cfg.env, bars)  # a candidate that cannot run here is bad input: said first
    if before is not None:
        production = load_policy_model(f"models:/{p.model_name}/{before}")
        try:
            policy_env_config(production, cfg.env, bars)
        except ModelMismatch as exc:  # nothing to compare against: never promote blind
            return GateResult(False, [f"Production v{before} cannot run on these bars, so the candidate cannot be "
                                      f"shown better: {exc}"])
        policies.append(production)
    try:
        result = evaluate_policies(policies, bars, cfg, with_baselines=False)
    except ModelMismatch:
        raise
    except ValueError as exc:  # NaN or out-of-range actions: refused, not crashed
        return GateResult(False, [f"invalid policy output: {exc}"])
    _log_windows(result)
    reports = [result.reports[q.uri] for q in policies]
    return gate(reports[0], reports[1] if before is not None else None, p, trials)


def _log_windows(result: Any) -> None:
    import mlflow

    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    if "eval.first_bar" not in logged:  # a re-check under the lock evaluates again: params are written once
        mlflow.log_params({"periods_per_year": result.periods_per_year, "eval.first_bar": result.first_bar})


def promote_candidate(cfg: Config, candidate: str, *, dry_run: bool = False, bars: pd.DataFrame | None = None,
                      challenger: LoadedPolicy | None = None, evaluation: Evaluation | None = None) -> PromoteResult:
    """Evaluate, gate, promote or refuse ``candidate`` (a version number or a model URI); always an
    MLflow run. The cycle hands on the ``bars`` (default: the test split), the loaded
    ``challenger`` and its ``evaluation`` (which then decides, not a second backtest).

    The evaluation runs outside the registry lock; the decision is re-checked under it: if
    Production changed meanwhile (another promote or rollback), the gate runs again against the
    new Production before anything moves.
    """
    setup_tracking(cfg)
    p = cfg.promotion
    version, uri = resolve_candidate(p.model_name, candidate, dry_run)
    before = production_version(p.model_name)
    bars = default_bars(cfg) if bars is None else bars
    with pipeline_run(cfg, "promote"):
        warn_if_instrument_misfits(bars, cfg)
        log_dataset(bars, "evaluation-bars", bars.attrs.get("path") or str(bars.attrs.get("source", "")), "evaluation")
        challenger = challenger if challenger is not None and challenger.uri == uri else load_policy_model(uri)
        verdict = _first_verdict(cfg, challenger, version, before, bars, evaluation, dry_run)
        note = ""
        if verdict.passed and not dry_run:
            before, verdict, note = _promote_under_lock(cfg, challenger, version, before, bars, verdict)
        return _record(cfg, (version, uri), before, verdict, note, dry_run)


def _first_verdict(cfg: Config, challenger: LoadedPolicy, version: str, before: str | None, bars: pd.DataFrame,
                   evaluation: Evaluation | None, dry_run: bool) -> GateResult:
    """The gate's verdict before the lock; a candidate that cannot run on these bars is an error
    (bad input), and its version is still marked refused."""
    import mlflow

    p = cfg.promotion
    try:
        return _verdict(challenger, version, before, bars, cfg, evaluation)
    except ModelMismatch as exc:
        if version not in ("unregistered", before) and not dry_run:
            record_verdict(p.model_name, version, "refused", f"cannot run on these bars: {exc}",
                           mlflow.active_run().info.run_id)
            mlflow.set_tags({"decision": "refused", "reasons": f"cannot run on these bars: {exc}"[:5000]})
        raise


def _promote_under_lock(cfg: Config, challenger: LoadedPolicy, version: str, before: str | None,
                        bars: pd.DataFrame, verdict: GateResult) -> tuple[str | None, GateResult, str]:
    """Under the registry lock: gate again if Production moved, check the version deploys, then
    promote and reconcile. Returns (Production before, the final verdict, a note on re-gating)."""
    p, note = cfg.promotion, ""
    with registry_lock(p.lock_file):
        now = production_version(p.model_name)
        if now != before:  # someone promoted or rolled back while we evaluated
            log.info("Production moved from %s to %s during the evaluation: gating again", before or "none",
                     now or "none")
            before, verdict = now, _verdict(challenger, version, now, bars, cfg)
            note = f"Production changed to v{now} during the evaluation, gated again: "
        if verdict.passed:
            try:  # never a Production that reconcile would refuse to deploy
                check_version_deployable(p.model_name, version)
            except DeployRefused as exc:
                verdict = GateResult(False, [f"not deployable: {exc}"], verdict.metrics)
        if verdict.passed:
            key = {k.removeprefix("challenger/"): v for k, v in verdict.metrics.items()
                   if k.startswith("challenger/") and k.split("/")[1] in (p.metric, "total_return",
                                                                          "max_drawdown", "n_trades")}
            move = stage if p.shadow_bars else promote  # Staging: it earns Production by shadow-trading
            move(p.model_name, version, note + _reason_text(verdict, before, p),
                 {**key, **{k: v for k, v in verdict.metrics.items() if k.startswith("gate/")}}, lock_file=p.lock_file)
            reconcile(p.model_name, p.deploy_dir, p.keep_releases, lock_file=p.lock_file)
    return before, verdict, note


def _record(cfg: Config, candidate: tuple[str, str], before: str | None, verdict: GateResult, note: str,
            dry_run: bool) -> PromoteResult:
    """The decision on the promote run (tags, both sides' metrics linked to their models) and on
    the version."""
    import mlflow

    p, (version, uri) = cfg.promotion, candidate
    run_id = mlflow.active_run().info.run_id
    passed = ("would stage" if dry_run else "staged") if p.shadow_bars else ("would promote" if dry_run else "promoted")
    decision = passed if verdict.passed else "refused"
    reason_text = note + _reason_text(verdict, before, p)
    mlflow.set_tags({"decision": decision, "reasons": reason_text[:5000], "candidate": uri,
                     "candidate_version": version, "production_before": before or "none",
                     "dry_run": str(dry_run).lower()})
    _log_sides(verdict.metrics, uri, f"models:/{p.model_name}/{before}" if before else None)
    if version != "unregistered" and not dry_run and version != before:
        record_verdict(p.model_name, version, decision, reason_text, run_id)
    log.info("%s version %s (Production before: %s): %s", decision, version, before or "none", reason_text)
    return PromoteResult(decision, version, before, verdict.reasons, run_id, verdict.metrics)


def _log_sides(metrics: dict[str, float], uri: str, production_uri: str | None) -> None:
    """Each side's metrics linked to its logged model: the run page links the models compared."""
    import mlflow

    linked = {"challenger/": model_id_of(uri), "production/": model_id_of(production_uri) if production_uri else None}
    for prefix in (*linked, None):
        part = {k: v for k, v in metrics.items() if math.isfinite(v)
                and (k.startswith(prefix) if prefix else not k.startswith(tuple(linked)))}
        if part:
            mlflow.log_metrics(part, model_id=linked.get(prefix) if prefix else None)
    log_headline({k.removeprefix("challenger/"): v for k, v in metrics.items() if k.startswith("challenger/")},
                 model_id_of(uri))


def _verdict(challenger: Any, version: str, before: str | None, bars: Any, cfg: Config,
             evaluation: Any = None) -> GateResult:
    if version == before:
        return GateResult(False, [f"version {version} is already Production"])
    trials = trials_of(cfg.promotion.model_name, version) if version != "unregistered" else 1
    verdict = evaluate_and_gate(challenger, before, bars, cfg, evaluation, trials)
    if verdict.passed and before is None:
        verdict.reasons.append("nothing in Production: first valid candidate")
    return verdict


def _reason_text(verdict: GateResult, before: str | None, p: Any) -> str:
    floor = " and flat" if p.beat_flat else ""
    return "; ".join(verdict.reasons) or (
        f"{p.metric} better than Production v{before}{floor} by more than {p.min_improvement:g}; PSR, Deflated "
        "Sharpe, windows won and risk limits met")
