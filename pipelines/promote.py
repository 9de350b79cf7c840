"""Gated promotion: challenger vs current Production on the same held-out bars.

    python -m pipelines.promote --candidate 7                       # a version of nt8-agent
    python -m pipelines.promote --candidate models:/nt8-agent/7 --dry-run
    mlflow run . -e promote -P candidate=7 --env-manager local

Both models are backtested on the test split of ``data.source`` (the evaluation step, same
windows). The gate (``promotion.*``): valid actions (no NaN, in range), at least
``min_trades`` trades, worst-window drawdown within ``max_drawdown``, and, when something is in
Production, a better ``metric`` by more than ``min_improvement`` and a Probabilistic Sharpe
Ratio against Production's Sharpe of at least ``min_psr``. With nothing in Production the first
valid candidate is promoted. Every decision is an MLflow run (tags ``decision``, ``reasons``;
both models' metrics). A promotion is a "Production" stage transition plus the alias, followed
by ``registry_hooks.reconcile``.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from mlproject.config import Config
from pipelines.cli import base_parser, run_cli

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


def gate(challenger: Any, production: Any | None, p: Any) -> GateResult:
    """Apply the promotion gate ``p`` (PromotionConfig) to evaluation reports."""
    from mlproject.evaluation import LOWER_IS_BETTER, psr_against

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
    if production is not None:
        pm = production.summary()
        metrics.update({f"production/{k}": v for k, v in pm.items() if not k.endswith("_std")})
        ours, theirs = c.get(p.metric, math.nan), pm.get(p.metric, math.nan)
        improvement = (theirs - ours) if p.metric in LOWER_IS_BETTER else (ours - theirs)
        if not math.isfinite(ours):
            reasons.append(f"challenger {p.metric} is undefined")
            improvement = math.nan
        elif not math.isfinite(theirs):
            improvement = math.inf  # an undefined incumbent metric cannot be defended
        metrics["gate/improvement"] = improvement
        if math.isfinite(ours) and not improvement > p.min_improvement:
            reasons.append(f"{p.metric} {ours:.4g} vs Production {theirs:.4g}: improvement {improvement:.4g} "
                           f"is not > min_improvement {p.min_improvement:g}")
        psr = psr_against(challenger, production)
        metrics["gate/psr"] = psr
        if not (psr >= p.min_psr):
            reasons.append(f"PSR vs Production's Sharpe {psr:.3f} < min_psr {p.min_psr:g}")
    return GateResult(not reasons, reasons, metrics)


def resolve_candidate(name: str, candidate: str, dry_run: bool) -> tuple[str, str]:
    """(version, model URI) of the candidate; a model URI outside the registry is registered
    first (not in a dry run, where its URI is evaluated as it is)."""
    from mlproject.registry import register_version, resolve_version

    if candidate.isdigit():
        candidate = f"models:/{name}/{candidate}"
    mv = resolve_version(candidate)
    if mv is not None:
        if mv.name != name:
            raise ValueError(f"{candidate} is a version of '{mv.name}', not of '{name}' (promotion.model_name)")
        return str(mv.version), f"models:/{name}/{mv.version}"
    if dry_run:
        return "unregistered", candidate
    return str(register_version(candidate, name, {"registered_by": "promote"}).version), candidate


def evaluate_and_gate(challenger: Any, before: str | None, bars: Any, cfg: Config) -> GateResult:
    """Backtest the challenger (a ``LoadedPolicy``) and Production version ``before`` on the same
    bars and windows, each with its own observation settings, and apply the gate."""
    from mlproject.evaluation import evaluate_policies, policy_env_config
    from mlproject.policy import ModelMismatch, load_policy_model

    p = cfg.promotion
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
    import mlflow

    mlflow.log_params({"periods_per_year": result.periods_per_year, "eval.first_bar": result.first_bar})
    reports = [result.reports[q.uri] for q in policies]
    return gate(reports[0], reports[1] if before is not None else None, p)


def main(cfg: Config, candidate: str, dry_run: bool = False) -> PromoteResult:
    """Evaluate, gate, promote or refuse; always an MLflow run."""
    import mlflow

    from mlproject.evaluation import default_bars
    from mlproject.policy import load_policy_model
    from mlproject.preflight import warn_if_instrument_misfits
    from mlproject.registry import production_version, promote
    from mlproject.tracking import pipeline_run, setup_tracking
    from pipelines.ingest import log_dataset
    from registry_hooks.reconcile import reconcile

    setup_tracking(cfg)
    p = cfg.promotion
    version, uri = resolve_candidate(p.model_name, candidate, dry_run)
    before = production_version(p.model_name)
    bars = default_bars(cfg)
    with pipeline_run(cfg, "promote", nested=mlflow.active_run() is not None) as run:
        warn_if_instrument_misfits(bars, cfg)
        log_dataset(bars, "evaluation-bars", bars.attrs.get("path") or str(bars.attrs.get("source", "")), "evaluation")
        if version == before:
            verdict = GateResult(False, [f"version {version} is already Production"])
        else:
            verdict = evaluate_and_gate(load_policy_model(uri), before, bars, cfg)
        decision = ("would promote" if dry_run else "promoted") if verdict.passed else "refused"
        if verdict.passed and before is None:
            verdict.reasons.append("nothing in Production: first valid candidate")
        reason_text = "; ".join(verdict.reasons) or (
            f"{p.metric} better than Production v{before} by more than {p.min_improvement:g}, PSR and risk limits met")
        mlflow.set_tags({"decision": decision, "reasons": reason_text[:5000], "candidate": uri,
                         "candidate_version": version, "production_before": before or "none",
                         "dry_run": str(dry_run).lower()})
        mlflow.log_metrics({k: v for k, v in verdict.metrics.items() if math.isfinite(v)})
        if verdict.passed and not dry_run:
            key = {k.removeprefix("challenger/"): v for k, v in verdict.metrics.items()
                   if k.startswith("challenger/") and k.split("/")[1] in (p.metric, "total_return", "max_drawdown",
                                                                              "n_trades")}
            promote(p.model_name, version, reason_text, {**key, **{k: v for k, v in verdict.metrics.items()
                                                                     if k.startswith("gate/")}})
            reconcile(p.model_name, p.deploy_dir, p.keep_releases)
        log.info("%s version %s (Production before: %s): %s", decision, version, before or "none", reason_text)
        return PromoteResult(decision, version, before, verdict.reasons, run.info.run_id, verdict.metrics)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--candidate", required=True, help="a version number of promotion.model_name or a model URI")
    parser.add_argument("--dry-run", action="store_true", help="evaluate and decide, change nothing")
    parser.add_argument("--dry-run-flag", default="false", choices=("true", "false"),
                        help="the same as a value (how MLproject passes -P dry_run=true)")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, a: main(cfg, a.candidate, a.dry_run or a.dry_run_flag == "true"))
