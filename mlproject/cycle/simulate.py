"""The walk-forward simulation: the continuous-learning cycle replayed on history, out of sample.

At each of ``periods`` decision points the model is retrained (warm-started from the Production of
that time) on the bars before the point only and gated on the last held-out part of them
(:func:`mlproject.cycle.retrain.train_evaluate_promote`, the cycle's own pass); the period up to the
next point is traded by the Production of that time (the learning agent), by the first Production
(never retrained), flat, buy-and-hold and a plain moving-average crossover rule, each a
deterministic backtest through the env (the paper path gives the same bits: tests/test_bridge.py).
Every change of the trading model is judged on the period after it against the model it replaced
(promotion regret). Out-of-sample equity, metrics, costs, a paired test, the table and a plot go in
the active run (:mod:`mlproject.cycle.sim_report`). Versions are registered under their own name (``<model>-sim-<run>``),
deleted when the simulation ends (their models stay in the runs' artifacts), with their own deploy
folder, buffer and state: the simulation never touches the real Production.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from envs.market import Market
from mlproject.backtest import constant_policy
from mlproject.config import Config
from mlproject.cycle.retrain import train_evaluate_promote
from mlproject.cycle.sim_models import SIM_RUN_TAG, drop_sim_models
from mlproject.cycle.sim_report import (
    Promotion,
    figure,
    ma_crossover_actions,
    oos_times,
    periods_won,
    regret_lines,
    regret_share,
    scripted_policy,
    table,
)
from mlproject.data import load_source
from mlproject.evaluation import EvalReport, backtest, paired_comparison, policy_env_config
from mlproject.ingestion import IngestResult
from mlproject.instruments import resolve_instrument
from mlproject.metrics import max_drawdown, periods_per_year, sharpe_ratio, total_return
from mlproject.policy import load_policy_model
from mlproject.preflight import CHECKED, warn_if_instrument_misfits
from mlproject.registry import production_version, status
from mlproject.shadow_verdict import apply, from_returns
from mlproject.staging import staging_version
from mlproject.tracking import log_curves

log = logging.getLogger(__name__)

AGENTS = ("learning", "never_retrained", "flat", "buy_hold", "ma_crossover")
"""The agents every period is traded by; the learning and never-retrained ones trade flat while
no model has earned Production ("no model" is a state: no edge found, not an error)."""


@dataclass
class SimulationResult:
    """The walk-forward's out-of-sample outcome."""

    metrics: dict[str, dict[str, float]]
    """Per agent: total_return, sharpe, max_drawdown, n_trades, costs (commissions and slippage
    paid, a share of the initial equity), periods_won (periods it beat the never-retrained agent)."""
    paired: dict[str, float]
    """Learning vs never retrained on the same bars (:func:`mlproject.evaluation.paired_comparison`)."""
    decisions: list[str]
    """The gate's decision at each decision point."""
    points: list[int]
    """The decision points (bar positions), then the number of bars."""
    equity: dict[str, np.ndarray]
    reports: dict[str, EvalReport]
    model_name: str
    registry: str = ""
    """The simulation's versions, as they were before it deleted them."""
    flat_periods: list[str] = field(default_factory=list)
    """The periods the learning agent traded flat because no model was in Production, and why."""
    promotions: list[Promotion] = field(default_factory=list)
    """Every change of the learning agent's model, with the next period's return of both."""
    period_returns: dict[str, list[float]] = field(default_factory=dict)
    """Per agent, the return of each period."""
    shadow: list[str] = field(default_factory=list)
    """With ``promotion.shadow_bars``: the Staging version's verdict at each decision point after
    it shadowed a period (promoted, archived or waiting)."""

    @property
    def regret(self) -> float:
        """Share of promotions whose model did worse on the next period than the one it replaced."""
        return regret_share(self.promotions)

    def report(self) -> str:
        """The table and the regret and paired-test lines, as printed and logged (``sim/report.md``)."""
        shadow = [f"shadow evidence at {line}" for line in self.shadow]
        return "\n".join([table(self.metrics, self.period_returns), "", *regret_lines(self.promotions, self.paired),
                          *shadow])


def check_split(periods: int, start_fraction: float) -> None:
    """Refuse a split that no data could satisfy (before any data is read)."""
    if periods < 1 or not 0 < start_fraction < 1:
        raise ValueError(f"simulate: --periods >= 1 and 0 < --start-fraction < 1 (got {periods}, {start_fraction})")


def decision_points(n: int, periods: int, start_fraction: float, history_bars: int) -> list[int]:
    """The bar positions of the ``periods`` decision points, then ``n``; an error naming the fix
    when the split leaves too few bars before the first point or in a period."""
    check_split(periods, start_fraction)
    first = int(n * start_fraction)
    step = (n - first) // periods
    if first < history_bars + 2 or step < 2:
        raise ValueError(f"simulate: {n} bars split at {start_fraction:g} into {periods} periods leave {first} bars "
                         f"before the first decision point and {step} per period; need at least {history_bars + 2} "
                         "and 2: a larger --start-fraction, fewer --periods or more bars")
    return [first + k * step for k in range(periods)] + [n]


def simulate(cfg: Config, periods: int, start_fraction: float) -> SimulationResult:
    """Walk forward through ``data.source`` (see the module doc), inside the active MLflow run."""
    import mlflow

    bars = load_source(cfg)
    history_bars = Market.first_bar(cfg.env)
    points = decision_points(len(bars), periods, start_fraction, history_bars)
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
        out.registry = status(name)
    finally:  # the user's Models page lists their models, not every simulation's
        drop_sim_models(cfg.promotion.model_name, only=name, lock_file=cfg.promotion.lock_file)
    m = out.metrics
    log.info("simulate: learning %s vs never retrained %s vs buy-and-hold %s (total return); paired p=%.3g",
             f"{m['learning']['total_return']:.4f}", f"{m['never_retrained']['total_return']:.4f}",
             f"{m['buy_hold']['total_return']:.4f}", out.paired.get("p_value", math.nan))
    return out


def sim_config(cfg: Config, work: Path, name: str) -> Config:
    """The simulation's own registered model, deploy folder, buffer and state: it never touches the
    real Production."""
    return cfg.model_copy(update={
        "promotion": cfg.promotion.model_copy(update={"model_name": name, "deploy_dir": str(work / "deploy"),
                                                      "lock_file": str(work / "registry.lock")}),
        "train": cfg.train.model_copy(update={"register_model": name}),
        "data": cfg.data.model_copy(update={"output_dir": str(work / "bars")}),
        "continuous_learning": cfg.continuous_learning.model_copy(update={
            "experience_storage": str(work / "buffer"), "state_dir": str(work / "state"), "paper_bars": None})})


def _walk_forward(cfg: Config, bars: pd.DataFrame, points: list[int], history_bars: int,
                  name: str) -> SimulationResult:
    """The simulation proper (see :func:`simulate`), its versions registered as ``name``."""
    reports = {agent: EvalReport(agent) for agent in AGENTS}
    decisions: list[str] = []
    promotions: list[Promotion] = []
    shadow_verdicts: list[str] = []
    crossover = ma_crossover_actions(bars["close"], resolve_instrument(cfg.env.instrument).max_contracts)
    with tempfile.TemporaryDirectory(prefix="nt8-sim-") as tmp:
        sim = sim_config(cfg, Path(tmp), name)
        frozen, previous, flat, traded_by = None, None, [], []
        shadowing: Shadowing | None = None
        for k, point in enumerate(points[:-1]):
            if shadowing is not None:  # the Staging version's evidence so far: promoted, archived or waiting
                shadow_verdicts.append(f"point {k + 1}: {_judge_shadow(sim, shadowing)}")
            production, why = _decide(sim, bars, point, Path(tmp) / f"bars-until-{k}.parquet", decisions)
            frozen = frozen or production
            period = bars.iloc[point - history_bars:points[k + 1]]
            if production is None:
                flat.append(f"period {k + 1}: {why}")
                log.warning("simulate: period %d: %s: the learning agent stays flat", k + 1, why)
            staged = staging_version(name) if sim.promotion.shadow_bars else None
            versions = {"learning": production, "never_retrained": frozen, **({"shadow": staged} if staged else {})}
            if production != previous:  # a promotion: the replaced model (or flat) trades the period too
                versions["replaced"] = previous
            played = _trade_period(sim, period, versions, history_bars, crossover[point:points[k + 1] - 1])
            shadowing = _shadowed(shadowing, staged, played.pop("shadow", None), played["learning"])
            if production != previous:
                promotions.append(Promotion(k + 1, str(production), previous, _period_return(played["learning"]),
                                            _period_return(played.pop("replaced"))))
            for agent, report in played.items():
                reports[agent].windows.extend(report.windows)
            log.info("simulate: period %d/%d (%s .. %s) traded by %s (never retrained: %s)", k + 1,
                     len(points) - 1, period.index[history_bars], period.index[-1], _label(production),
                     _label(frozen))
            previous = production
            traded_by.append(production)
    return _report(cfg, bars, points, (decisions, flat, promotions, traded_by, shadow_verdicts), reports, name)


Shadowing = tuple[str, list[np.ndarray], list[np.ndarray], int]
"""The Staging version, its per-bar returns in the periods it shadowed, Production's on the same
bars, and its closed trades there."""


def _shadowed(before: Shadowing | None, staged: str | None, mine: EvalReport | None,
              theirs: EvalReport) -> Shadowing | None:
    """The shadow evidence after a period: the Staging version's backtest beside Production's on
    the same bars (added to what it shadowed before; a new Staging version starts anew)."""
    if staged is None or mine is None:
        return None
    kept = before if before is not None and before[0] == staged else (staged, [], [], 0)
    return (staged, [*kept[1], mine.returns()], [*kept[2], theirs.returns()],
            kept[3] + len(mine.windows[-1].trades))


def _judge_shadow(sim: Config, shadowing: Shadowing) -> str:
    """The live rule (``mlproject.shadow_verdict``) on the shadowed periods, acted on."""
    version, mine, theirs, trades = shadowing
    verdict = from_returns(sim, version, production_version(sim.promotion.model_name), np.concatenate(mine),
                           np.concatenate(theirs), trades)
    apply(sim, verdict, "shadow evidence (walk-forward)")
    log.info("simulate: shadow: %s", verdict.describe())
    return verdict.describe()


def _period_return(report: EvalReport) -> float:
    return float(report.windows[-1].metrics["total_return"])


def _label(version: str | None) -> str:
    return f"v{version}" if version else "flat (no model)"


def _decide(sim: Config, bars: pd.DataFrame, point: int, path: Path, decisions: list[str]) -> tuple[str | None, str]:
    """Retrain and gate on the bars before ``point`` only; the Production version after it (None
    while no model has passed the gate) and, when there is none, why."""
    seen = bars.iloc[:point].copy()  # nothing at or after the decision point
    seen.attrs.update(bars.attrs)
    seen.to_parquet(path)
    verdict = train_evaluate_promote(sim, IngestResult(path, seen, "", {})).promote
    decisions.append(verdict.decision if verdict else "not registered")
    production = production_version(sim.promotion.model_name)
    if production is None and verdict is not None and verdict.decision == "staged":
        return None, f"v{verdict.version} shadow-trades in Staging first"
    if production is None:
        return None, f"no model passed the gate ({'; '.join(verdict.reasons) if verdict else 'not registered'})"
    return str(production), ""


def _trade_period(sim: Config, period: pd.DataFrame, versions: dict[str, str | None], history_bars: int,
                  crossover: np.ndarray) -> dict[str, EvalReport]:
    """The period traded by each agent: the given versions (flat where None), flat, buy-and-hold and
    the crossover rule (its ``crossover`` actions, one per traded bar). Each version (flat included)
    is played once, however many agents trade it: the backtests are deterministic."""
    max_c = resolve_instrument(sim.env.instrument).max_contracts
    by_version: dict[str | None, EvalReport] = {}
    for version in {**versions, "flat": None}.values():
        if version in by_version:
            continue
        if version is None:  # max_contracts is flat
            by_version[None] = backtest(constant_policy(max_c), period, sim.env.model_dump(), 1, name="flat",
                                        first_bar=history_bars)
            continue
        policy = load_policy_model(f"models:/{sim.promotion.model_name}/{version}")
        by_version[version] = backtest(policy.predict, period, policy_env_config(policy, sim.env, period), 1,
                                       seed=sim.seed, name=f"v{version}", first_bar=history_bars)
    played = {agent: by_version[version] for agent, version in {**versions, "flat": None}.items()}
    for agent, rule in (("buy_hold", constant_policy(2 * max_c)), ("ma_crossover", scripted_policy(crossover))):
        played[agent] = backtest(rule, period, sim.env.model_dump(), 1, name=agent, first_bar=history_bars)
    return played


def _report(cfg: Config, bars: pd.DataFrame, points: list[int],
            gate: tuple[list[str], list[str], list[Promotion], list[str | None], list[str]],
            reports: dict[str, EvalReport], name: str) -> SimulationResult:
    """Out-of-sample equity and metrics per agent, the paired test, regret, the table and the plot,
    all logged to the active run."""
    import mlflow

    ppy = periods_per_year(bars.index)
    equity, out = {}, {}
    period_returns = {agent: [float(w.metrics["total_return"]) for w in r.windows] for agent, r in reports.items()}
    for agent, report in reports.items():
        returns = report.returns()
        equity[agent] = cfg.env.initial_equity * np.cumprod(np.r_[1.0, 1.0 + returns])
        out[agent] = {"total_return": total_return(equity[agent]), "sharpe": sharpe_ratio(returns, ppy),
                      "max_drawdown": max_drawdown(equity[agent]),
                      "n_trades": float(sum(len(w.trades) for w in report.windows)),
                      "costs": sum(w.metrics["commissions"] + w.metrics["slippage"] for w in report.windows)
                      / cfg.env.initial_equity,
                      "periods_won": float(periods_won(period_returns, agent, "never_retrained"))}
        for k, value in enumerate(period_returns[agent]):
            mlflow.log_metric(f"sim/{agent}/period_return", value, step=k)
    # The curves as step metrics (step = out-of-sample bar): "equity/" sorts before "sim/", so the
    # run's page opens on them, not on single-value bars.
    log_curves(mlflow.active_run().info.run_id, {f"equity/{agent}": curve for agent, curve in equity.items()})
    paired = paired_comparison(reports["learning"], reports["never_retrained"])
    mlflow.log_metrics({f"sim/{agent}/{k}": v for agent, m in out.items() for k, v in m.items() if math.isfinite(v)})
    mlflow.log_metrics({f"sim/paired/{k}": v for k, v in paired.items() if math.isfinite(v)})
    decisions, flat_periods, promotions, traded_by, shadow = gate
    if promotions:
        mlflow.log_metrics({"sim/regret/share": regret_share(promotions), "sim/regret/promotions": len(promotions),
                            "sim/regret/regrets": sum(p.regret for p in promotions)})
    mlflow.set_tags({"sim.points": ",".join(str(bars.index[p]) for p in points[:-1]),
                     "sim.flat_periods": "; ".join(flat_periods)[:5000] or "none",
                     "sim.promotions": "; ".join(p.describe() for p in promotions)[:5000] or "none",
                     "sim.decisions": ",".join(decisions), "sim.model_name": name,
                     "sim.shadow": "; ".join(shadow)[:5000] or "off"})
    result = SimulationResult(out, paired, decisions, points, equity, reports, name, flat_periods=flat_periods,
                              promotions=promotions, period_returns=period_returns, shadow=shadow)
    mlflow.log_text(result.report() + "\n", "sim/report.md")
    labels = [f"{d}: {_label(v)}" for d, v in zip(decisions, traded_by)]
    mlflow.log_figure(figure(equity, oos_times(reports["learning"]), [bars.index[p] for p in points[:-1]], labels),
                      "sim/equity.png")
    return result

