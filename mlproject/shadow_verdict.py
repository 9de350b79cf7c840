"""The live verdict on a Staging model: its shadow against Production on the same live bars.

Run by the orchestrator's maintenance (:func:`decide`). The evidence is the experience buffer:
the Staging version's experiences with source ``shadow`` and Production's live and paper
experiences on the same bars (same instrument and bar time; with nothing in Production the
comparison is against flat, 0 per bar). Each side's per-bar return is its reward over its equity
before the bar. Once there are at least ``promotion.shadow_bars`` paired bars and
``promotion.shadow_min_trades`` closed shadow trades, the Staging version goes to Production
when, on those bars, it

- made more money than Production (``live/total_return``),
- beats Production bar by bar: the Probabilistic Sharpe Ratio of the paired per-bar differences
  against 0 is at least ``min_psr`` (``live/paired_psr``),
- keeps the Deflated Sharpe over the candidates tried of at least ``shadow_min_dsr`` (default
  ``min_dsr``) against Production's per-bar Sharpe (``live/dsr``; off with 0),
- and stays within ``max_drawdown`` (``live/shadow_max_drawdown``);

otherwise it is archived with the live evidence as its reasons. Both are registry decisions
(:mod:`mlproject.staging`) with history events, and an MLflow run ``shadow``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlproject.config import Config
from mlproject.experience import ExperienceBuffer, Query
from mlproject.metrics import deflated_sharpe_ratio, max_drawdown, probabilistic_sharpe_ratio
from mlproject.registry import production_version, trials_of
from mlproject.staging import archive_staged, promote_staged, staging_version
from mlproject.tracking import pipeline_run

log = logging.getLogger(__name__)

COLUMNS = ["time", "symbol", "model_name", "model_version", "source", "reward", "equity", "realised_pnl", "trade_id"]


@dataclass
class ShadowVerdict:
    """Where a Staging version stands: ``waiting`` (evidence so far), ``promoted`` or ``archived``."""

    version: str
    production: str | None
    decision: str
    bars: int = 0
    trades: int = 0
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        against = f"Production v{self.production}" if self.production else "flat (nothing in Production)"
        figures = ", ".join(f"{k.removeprefix('live/')} {v:.4g}" for k, v in self.metrics.items()
                            if k in ("live/shadow_return", "live/production_return", "live/paired_psr"))
        return (f"Staging v{self.version} shadowing {against}: {self.bars} same bars, {self.trades} trades"
                f"{f' ({figures})' if figures else ''}: {self.decision}"
                f"{': ' + '; '.join(self.reasons) if self.reasons else ''}")


def _returns(rows: pd.DataFrame) -> pd.Series:
    """Per-bar return (reward over the equity before the bar), one per (symbol, time)."""
    before = (rows["equity"] - rows["reward"]).where(lambda e: e > 0)
    frame = rows.assign(r=(rows["reward"] / before).fillna(0.0))
    return frame.groupby(["symbol", "time"])["r"].mean()


def evidence(cfg: Config, buffer: ExperienceBuffer) -> ShadowVerdict | None:
    """The Staging version's live comparison so far (``waiting``), or None when nothing is in Staging."""
    p = cfg.promotion
    version = staging_version(p.model_name)
    if version is None:
        return None
    production = production_version(p.model_name)
    rows = buffer.query(Query(model_version=version, source="shadow"), COLUMNS)
    rows = rows[rows["model_name"] == p.model_name]
    verdict = ShadowVerdict(version, production, "waiting")
    if rows.empty:
        return verdict
    shadow = _returns(rows)
    if production is None:
        theirs = pd.Series(0.0, index=shadow.index)
    else:
        live = buffer.query(Query(start=rows["time"].min()), COLUMNS)
        live = live[live["source"].isin(["live", "paper"]) & (live["model_name"] == p.model_name)]
        theirs = _returns(live) if len(live) else pd.Series(dtype=float)
    paired = pd.concat([shadow.rename("shadow"), theirs.rename("production")], axis=1, join="inner").sort_index()
    closed = rows.loc[rows["realised_pnl"].fillna(0) != 0, "realised_pnl"]
    verdict.bars, verdict.trades = len(paired), int(closed.size)
    verdict.metrics = _metrics(paired, trials_of(p.model_name, version))
    return verdict


def _metrics(paired: pd.DataFrame, trials: int) -> dict[str, float]:
    if paired.empty:
        return {}
    s, t = paired["shadow"].to_numpy(float), paired["production"].to_numpy(float)
    sd = t.std(ddof=1) if t.size > 1 else 0.0
    their_sharpe = float(t.mean() / sd) if sd > 0 else 0.0
    return {"live/bars": float(len(paired)), "live/shadow_return": float(np.prod(1 + s) - 1),
            "live/production_return": float(np.prod(1 + t) - 1),
            "live/paired_psr": probabilistic_sharpe_ratio(s - t, 0.0),
            "live/dsr": deflated_sharpe_ratio(s, their_sharpe, max(1, trials)),
            "live/shadow_max_drawdown": max_drawdown(np.cumprod(np.r_[1.0, 1 + s])), "live/trials": float(trials)}


def judge(cfg: Config, verdict: ShadowVerdict) -> ShadowVerdict:
    """The decision once the evidence is enough (``waiting`` until then): promote or archive."""
    p, m = cfg.promotion, verdict.metrics
    if not m or verdict.bars < p.shadow_bars or verdict.trades < p.shadow_min_trades:
        verdict.reasons = [f"needs {p.shadow_bars} same bars and {p.shadow_min_trades} trades"]
        return verdict
    reasons = []
    if not m["live/shadow_return"] > m["live/production_return"]:
        reasons.append(f"return {m['live/shadow_return']:.4g} not above Production's {m['live/production_return']:.4g}")
    if not m["live/paired_psr"] >= p.min_psr:
        reasons.append(f"paired PSR {m['live/paired_psr']:.3f} < {p.min_psr:g}")
    min_dsr = p.min_dsr if p.shadow_min_dsr is None else p.shadow_min_dsr
    if min_dsr > 0 and not m["live/dsr"] >= min_dsr:
        reasons.append(f"Deflated Sharpe {m['live/dsr']:.3f} < {min_dsr:g} ({int(m['live/trials'])} tries)")
    if m["live/shadow_max_drawdown"] > p.max_drawdown:
        reasons.append(f"max drawdown {m['live/shadow_max_drawdown']:.3f} > {p.max_drawdown:g}")
    verdict.decision = "archived" if reasons else "promoted"
    rules = f"return, paired PSR{', Deflated Sharpe' if min_dsr > 0 else ''}, drawdown"
    verdict.reasons = reasons or [f"better than {'Production v' + verdict.production if verdict.production else 'flat'}"
                                  f" on {verdict.bars} same live bars ({rules})"]
    return verdict


def decide(cfg: Config, buffer: ExperienceBuffer) -> ShadowVerdict | None:
    """The Staging version's live verdict, acted on (an MLflow run ``shadow`` when there is one)."""
    import mlflow

    verdict = evidence(cfg, buffer)
    if verdict is None:
        return None
    verdict = judge(cfg, verdict)
    with pipeline_run(cfg, "shadow"):
        mlflow.log_metrics({k: v for k, v in verdict.metrics.items() if np.isfinite(v)})
        mlflow.set_tags({"decision": verdict.decision, "reasons": "; ".join(verdict.reasons)[:5000],
                         "staging_version": verdict.version, "production": verdict.production or "none"})
        if not apply(cfg, verdict):
            mlflow.set_tag("decision", verdict.decision[:5000])
    log.info("shadow: %s", verdict.describe())
    return verdict


def apply(cfg: Config, verdict: ShadowVerdict, evidence_name: str = "live shadow evidence") -> bool:
    """Act on a decided verdict (promote or archive the Staging version; nothing while waiting).
    False when Staging moved meanwhile (a newer challenger): the verdict says so, decided next time."""
    p = cfg.promotion
    reason = f"{evidence_name}: {'; '.join(verdict.reasons)}"
    try:
        if verdict.decision == "promoted":
            promote_staged(p.model_name, verdict.version, reason, verdict.metrics, lock_file=p.lock_file)
        elif verdict.decision == "archived":
            archive_staged(p.model_name, verdict.version, reason, verdict.metrics, lock_file=p.lock_file)
    except ValueError as exc:
        log.warning("shadow verdict not applied: %s", exc)
        verdict.decision = f"not applied: {exc}"
        return False
    return True


def from_returns(cfg: Config, version: str, production: str | None, shadow: np.ndarray, theirs: np.ndarray,
                 trades: int) -> ShadowVerdict:
    """A verdict on per-bar returns of the same bars (the walk-forward simulation's shadow: the
    Staging version backtested on the period Production traded), judged by :func:`judge`."""
    paired = pd.DataFrame({"shadow": np.asarray(shadow, float), "production": np.asarray(theirs, float)})
    verdict = ShadowVerdict(version, production, "waiting", len(paired), trades)
    verdict.metrics = _metrics(paired, trials_of(cfg.promotion.model_name, version))
    return judge(cfg, verdict)
