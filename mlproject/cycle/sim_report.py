"""The walk-forward's report: the trader's sanity-check rule, promotion regret, the table and the
plot (dates on the x-axis, the period boundaries with the version that traded each period).

Kept apart from :mod:`mlproject.cycle.simulate` (the walk-forward proper) so that each reads in
one sitting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlproject.backtest import Policy

MA_FAST, MA_SLOW = 20, 100
"""The moving-average crossover rule's windows, in bars: long while the fast mean of closes is
above the slow one, short while below, flat before the slow one exists. Fixed on purpose (a plain
rule a trader knows, not a tuned one)."""


def ma_crossover_actions(close: pd.Series, max_contracts: int, fast: int = MA_FAST, slow: int = MA_SLOW) -> np.ndarray:
    """Per bar, the crossover rule's action from the closes up to and including that bar (no
    look-ahead): ``2 * max_contracts`` long, 0 short, ``max_contracts`` flat."""
    values = close.to_numpy(np.float64)
    fast_mean = pd.Series(values).rolling(fast).mean().to_numpy()
    slow_mean = pd.Series(values).rolling(slow).mean().to_numpy()
    actions = np.full(len(values), max_contracts, np.int64)
    known = np.isfinite(fast_mean) & np.isfinite(slow_mean)
    actions[known & (fast_mean > slow_mean)] = 2 * max_contracts
    actions[known & (fast_mean < slow_mean)] = 0
    return actions


def scripted_policy(actions: np.ndarray) -> Policy:
    """A one-window policy that answers ``actions`` in order, one per call (a rule computed from the
    bars beforehand); an error when asked for more than it has."""
    it = iter(np.asarray(actions, np.int64).tolist())

    def policy(obs: Any) -> np.ndarray:
        if len(obs) != 1:
            raise ValueError(f"a scripted policy plays one window, got {len(obs)} observations")
        try:
            return np.array([next(it)], np.int64)
        except StopIteration:
            raise ValueError("the scripted policy ran out of actions") from None

    return policy


@dataclass
class Promotion:
    """A change of the model that trades, judged on the period that followed it."""

    period: int
    """1-based period the promoted model traded first."""
    version: str
    replaced: str | None
    """The version it replaced; None: it replaced flat (no model)."""
    period_return: float
    replaced_return: float
    """What the replaced model (flat: 0) returned on the same period."""

    @property
    def regret(self) -> bool:
        """The replaced model would have done better on the next period."""
        return self.period_return < self.replaced_return

    def describe(self) -> str:
        was = f"v{self.replaced}" if self.replaced else "flat"
        gap = 100 * (self.replaced_return - self.period_return)
        return (f"period {self.period}: v{self.version} replaced {was}: {self.period_return:+.2%} vs "
                f"{self.replaced_return:+.2%}" + (f" (regret by {gap:.3g} points)" if self.regret else ""))


def regret_share(promotions: Sequence[Promotion]) -> float:
    """Share of promotions that were regrets; nan without promotions."""
    return sum(p.regret for p in promotions) / len(promotions) if promotions else math.nan


def periods_won(period_returns: dict[str, list[float]], agent: str, against: str) -> int:
    """Periods in which ``agent`` returned strictly more than ``against``."""
    return sum(a > b for a, b in zip(period_returns[agent], period_returns[against]))


def table(metrics: dict[str, dict[str, float]], period_returns: dict[str, list[float]]) -> str:
    """The agents as a Markdown table: total return, Sharpe, max drawdown, trades, costs paid (share
    of the initial equity), and periods won against the never-retrained agent and buy-and-hold."""
    n = len(next(iter(period_returns.values()), []))
    lines = ["| agent | total return | Sharpe | max drawdown | trades | costs | periods > never retrained | "
             "periods > buy-and-hold |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for agent, m in metrics.items():
        sharpe = f"{m['sharpe']:.2f}" if math.isfinite(m["sharpe"]) else "-"  # no variance (flat): undefined
        lines.append(f"| {agent.replace('_', ' ')} | {m['total_return']:+.2%} | {sharpe} | "
                     f"{m['max_drawdown']:.1%} | {m['n_trades']:.0f} | {m['costs']:.2%} | "
                     f"{periods_won(period_returns, agent, 'never_retrained')}/{n} | "
                     f"{periods_won(period_returns, agent, 'buy_hold')}/{n} |")
    return "\n".join(lines)


def regret_lines(promotions: Sequence[Promotion], paired: dict[str, float]) -> list[str]:
    """Promotion regret and the paired test, in words."""
    share = regret_share(promotions)
    lines = [f"promotion regret: {sum(p.regret for p in promotions)} of {len(promotions)} promotions"
             + (f" ({share:.0%})" if promotions else "") + (": " + "; ".join(p.describe() for p in promotions)
                                                             if promotions else "")]
    p_value = paired.get("p_value", math.nan)
    lines.append("paired test, learning vs never retrained on the same bars (one-sided, H1: learning better): "
                 + (f"p = {p_value:.3g}, mean per-bar return difference {paired['mean_return_diff']:+.3g}"
                    if math.isfinite(p_value) else "no difference to test (identical returns)"))
    return lines


def seed_table(seeds: Sequence[int], results: Sequence[Any]) -> str:
    """Walk-forwards of one setting under several seeds (``results``: SimulationResults): per agent
    the total return's mean, spread (sample std), lowest and highest and the mean Sharpe (over the
    seeds in which it traded: flat has none); then how often the learning agent beat or fell behind
    the never-retrained one, and the regret over all promotions. One seed is an anecdote: the
    training seed moves results by tens of points."""
    lines = [f"over {len(results)} seeds ({', '.join(map(str, seeds))}):",
             "| agent | mean total return | std | lowest | highest | mean Sharpe (seeds that traded) |",
             "|---|---:|---:|---:|---:|---:|"]
    for agent in results[0].metrics:
        returns = np.array([r.metrics[agent]["total_return"] for r in results])
        sharpes = np.array([r.metrics[agent]["sharpe"] for r in results], dtype=float)
        spread = returns.std(ddof=1) if len(returns) > 1 else 0.0
        sharpe = f"{np.nanmean(sharpes):.2f}" if np.isfinite(sharpes).any() else "-"
        lines.append(f"| {agent.replace('_', ' ')} | {returns.mean():+.2%} | {spread:.2%} | {returns.min():+.2%} | "
                     f"{returns.max():+.2%} | {sharpe} |")
    gaps = [r.metrics["learning"]["total_return"] - r.metrics["never_retrained"]["total_return"] for r in results]
    promotions = [p for r in results for p in r.promotions]
    lines += ["", f"learning vs never retrained: ahead in {sum(g > 1e-12 for g in gaps)}, behind in "
              f"{sum(g < -1e-12 for g in gaps)}, equal in {sum(abs(g) <= 1e-12 for g in gaps)} of {len(gaps)} seeds; "
              f"promotion regret {sum(p.regret for p in promotions)} of {len(promotions)} promotions"]
    return "\n".join(lines)


def oos_times(report: Any) -> pd.DatetimeIndex:
    """The timestamps of an agent's out-of-sample equity curve: the first window's start, then every
    window's bars after its start (the windows follow one another)."""
    parts = [report.windows[0].equity.index[:1]] + [w.equity.index[1:] for w in report.windows]
    return parts[0].append(parts[1:]) if len(parts) > 1 else parts[0]


def figure(equity: dict[str, np.ndarray], times: pd.DatetimeIndex, boundaries: Sequence[pd.Timestamp],
           labels: Sequence[str]) -> Any:
    """Every agent's equity over dates, a dashed line at each decision point labelled with the gate's
    decision and the version that traded the period."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    styles = {"learning": ("C0", 2.2, "-"), "never_retrained": ("C1", 1.6, "--"), "flat": ("0.4", 1.2, ":"),
              "buy_hold": ("C2", 1.4, "-"), "ma_crossover": ("C3", 1.2, "-.")}
    for agent, curve in equity.items():
        color, width, style = styles.get(agent, (None, 1.2, "-"))
        ax.plot(times[:len(curve)], curve, label=agent.replace("_", " "), color=color, linewidth=width, linestyle=style)
    top = ax.get_ylim()[1]
    for at, label in zip(boundaries, labels):
        ax.axvline(at, color="0.6", linestyle="--", linewidth=0.8)
        ax.text(at, top, f" {label}", rotation=90, va="top", ha="left", fontsize=7, color="0.3")
    ax.set_xlabel("date (out of sample)")
    ax.set_ylabel("equity")
    ax.set_title("walk-forward: continuously learning vs never retrained vs flat vs buy-and-hold vs MA crossover")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    plt.close(fig)
    return fig
