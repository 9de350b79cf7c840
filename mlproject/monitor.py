"""Watching the deployed model: the computations of the drift monitor.

- :func:`live_stats`: a model version's live or paper results (experience-buffer rows) as the
  quantities its evaluation also has: win rate, Sharpe, profit factor, max drawdown, plus
  consecutive losses at the end and the average slippage per contract filled.
- :func:`psi`: the population-stability index of one feature, live against a reference (the
  training split): ``sum((live% - ref%) * ln(live% / ref%))`` over ``bins`` bins cut at the
  reference's quantiles, each share floored at 1e-4 so an empty bin stays finite. Rule of thumb:
  under 0.1 stable, 0.1-0.25 a moderate shift, over 0.25 a large one.
- :class:`Hysteresis`: a breach acts only after it was seen on ``confirm`` passes in a row, and a
  deployment that acted is clear again only after ``clear`` good passes in a row, so one bad day
  neither triggers an action nor flaps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlproject.metrics import max_drawdown, profit_factor, sharpe_ratio, win_rate
from mlproject.registry import production_version

PSI_FLOOR = 1e-4
ALERT_TAG = "monitor.alert"
"""Version tag the drift monitor sets when it acts; ``pipelines.status`` exits 1 while the
Production version carries it (remove the tag, or move Production, to clear it)."""
STALE_ALERT_TAG = "monitor.alert_stale"
"""Where an alert goes when its rollback was skipped because Production had moved meanwhile: the
version keeps the record, but no alert that ``pipelines.status`` would report were it deployed again."""


def monitor_alert(name: str) -> str | None:
    """The drift monitor's alert on the Production version of ``name``, or None."""
    from mlflow import MlflowClient

    version = production_version(name)
    if version is None:
        return None
    return MlflowClient().get_model_version(name, version).tags.get(ALERT_TAG)


def trade_pnls(rows: pd.DataFrame) -> pd.Series:
    """Realised PnL per closed trade (steps with a ``trade_id``, summed per trade), in the order
    the trades ended. The trade of the last step is left out while it holds a position (still
    open)."""
    rows = rows.sort_values("time", kind="stable")
    traded = rows[rows["trade_id"].notna()]
    if traded.empty:
        return pd.Series(dtype=float)
    pnl = traded.groupby("trade_id", sort=False)["realised_pnl"].sum()
    ended = traded.drop_duplicates("trade_id", keep="last")["trade_id"].tolist()
    last = rows.iloc[-1]
    if last["position"] != 0 and last["trade_id"] in ended:
        ended.remove(last["trade_id"])
    return pnl.loc[ended]


def consecutive_losses(pnls: np.ndarray) -> int:
    """Losing trades in a row at the end of ``pnls`` (a breakeven trade ends the run)."""
    count = 0
    for pnl in np.asarray(pnls, dtype=float)[::-1]:
        if pnl >= 0:
            break
        count += 1
    return count


def live_stats(rows: pd.DataFrame, periods_per_year: float) -> dict[str, float]:
    """The monitored quantities of experience-buffer ``rows`` (one model version, time order):
    ``n_bars``, ``n_trades``, ``win_rate``, ``sharpe`` (of per-bar equity returns, annualised),
    ``profit_factor``, ``max_drawdown`` (fraction of the peak), ``consecutive_losses`` and
    ``avg_slippage`` (money per contract filled: each fill's slippage over the change of position
    it made, a reversal counting both legs; nan without fills)."""
    rows = rows.sort_values("time", kind="stable")
    equity = rows["equity"].to_numpy(dtype=float)
    returns = np.diff(equity) / equity[:-1] if len(equity) > 1 else np.zeros(0)
    pnls = trade_pnls(rows).to_numpy(dtype=float)
    contracts = rows["position"].astype(float).diff().abs().to_numpy()
    filled = rows["slippage"].notna().to_numpy() & (contracts > 0)
    slippage = rows["slippage"].to_numpy(dtype=float)[filled] / contracts[filled]
    return {"n_bars": float(len(rows)), "n_trades": float(len(pnls)), "win_rate": win_rate(pnls),
            "sharpe": sharpe_ratio(returns, periods_per_year), "profit_factor": profit_factor(pnls),
            "max_drawdown": max_drawdown(equity), "consecutive_losses": float(consecutive_losses(pnls)),
            "avg_slippage": float(slippage.mean()) if slippage.size else float("nan")}


def psi(reference: np.ndarray, live: np.ndarray, bins: int = 10) -> float:
    """Population-stability index of ``live`` against ``reference`` (see the module doc); nan
    when either side has no finite value. A constant reference splits at its value (live values
    away from it are drift)."""
    reference = np.asarray(reference, dtype=float)
    live = np.asarray(live, dtype=float)
    reference, live = reference[np.isfinite(reference)], live[np.isfinite(live)]
    if reference.size == 0 or live.size == 0:
        return float("nan")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1))[1:-1])
    if edges.size == 0:
        return float("nan")
    ref_share = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1) / reference.size
    live_share = np.bincount(np.searchsorted(edges, live, side="right"), minlength=edges.size + 1) / live.size
    ref_share, live_share = np.maximum(ref_share, PSI_FLOOR), np.maximum(live_share, PSI_FLOOR)
    return float(np.sum((live_share - ref_share) * np.log(live_share / ref_share)))


def feature_psi(reference: np.ndarray, live: np.ndarray, names: list[str], bins: int = 10) -> dict[str, float]:
    """:func:`psi` per column of two feature matrices (rows = bars, columns = ``names``)."""
    reference, live = np.asarray(reference, dtype=float), np.asarray(live, dtype=float)
    if reference.shape[1:] != (len(names),) or live.shape[1:] != (len(names),):
        raise ValueError(f"feature matrices must have {len(names)} columns ({', '.join(names)}); got "
                         f"{reference.shape} and {live.shape}")
    return {name: psi(reference[:, k], live[:, k], bins) for k, name in enumerate(names)}


@dataclass
class Hysteresis:
    """Per deployed version: how many passes in a row breached (``bad``) or did not (``good``),
    and whether the monitor acted (``acted``). :meth:`update` says when to act."""

    confirm: int = 3
    clear: int = 3
    bad: int = 0
    good: int = 0
    acted: bool = False

    def update(self, breached: bool) -> bool:
        """Record one pass; True exactly when the action is due now (``confirm`` bad passes in a
        row, not acted yet). After acting, ``clear`` good passes in a row re-arm it."""
        if breached:
            self.bad, self.good = self.bad + 1, 0
        else:
            self.bad, self.good = 0, self.good + 1
            if self.acted and self.good >= self.clear:
                self.acted = False
        if breached and not self.acted and self.bad >= self.confirm:
            self.acted = True
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"bad": self.bad, "good": self.good, "acted": self.acted}

    @classmethod
    def from_dict(cls, data: dict[str, Any], confirm: int, clear: int) -> Hysteresis:
        return cls(confirm, clear, int(data.get("bad", 0)), int(data.get("good", 0)), bool(data.get("acted", False)))
