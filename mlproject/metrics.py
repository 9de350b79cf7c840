"""Trading metrics: small pure numpy functions, explicit about degenerate input.

This is the first set (what the demo reports); the evaluation issue extends it.
"""

from __future__ import annotations

import numpy as np


def equity_returns(equity: np.ndarray) -> np.ndarray:
    """Simple returns between consecutive equity values (length n-1); empty for n < 2."""
    equity = np.asarray(equity, dtype=np.float64)
    if equity.size < 2:
        return np.zeros(0)
    return np.diff(equity) / equity[:-1]


def total_return(equity: np.ndarray) -> float:
    """equity[-1] / equity[0] - 1; 0.0 for fewer than two points."""
    equity = np.asarray(equity, dtype=np.float64)
    return float(equity[-1] / equity[0] - 1.0) if equity.size >= 2 else 0.0


def max_drawdown(equity: np.ndarray) -> float:
    """Largest peak-to-trough fall as a fraction of the peak (>= 0); 0.0 if it never falls."""
    equity = np.asarray(equity, dtype=np.float64)
    if equity.size == 0:
        return 0.0
    peaks = np.maximum.accumulate(equity)
    return float(np.max((peaks - equity) / peaks))


def sharpe_ratio(returns: np.ndarray, periods_per_year: float) -> float:
    """Annualised mean / std of per-period returns (risk-free 0, ddof=1); nan when the std is 0
    or there are fewer than two returns (the ratio is undefined, not zero)."""
    returns = np.asarray(returns, dtype=np.float64)
    if returns.size < 2:
        return float("nan")
    std = returns.std(ddof=1)
    if std == 0:
        return float("nan")
    return float(returns.mean() / std * np.sqrt(periods_per_year))


def win_rate(trade_pnls: np.ndarray) -> float:
    """Share of trades with pnl > 0; nan with no trades."""
    pnls = np.asarray(trade_pnls, dtype=np.float64)
    return float(np.mean(pnls > 0)) if pnls.size else float("nan")


def profit_factor(trade_pnls: np.ndarray) -> float:
    """Gross profit / gross loss; inf when there are wins and no losses, nan with no trades or
    neither wins nor losses."""
    pnls = np.asarray(trade_pnls, dtype=np.float64)
    gains, losses = pnls[pnls > 0].sum(), -pnls[pnls < 0].sum()
    if losses == 0:
        return float("inf") if gains > 0 else float("nan")
    return float(gains / losses)


def periods_per_year(index) -> float:
    """Bars per year for annualisation, from the timestamps: 252 trading days times the median
    number of bars per trading day (session-aware: an RTH minute series gives 390 * 252).
    Daily or slower bars: 252 / days per bar."""
    import pandas as pd

    index = pd.DatetimeIndex(index)
    if len(index) < 2:
        return 252.0
    step = pd.Series(index).diff().median()
    if step >= pd.Timedelta(days=1):
        return 252.0 / max(1.0, step / pd.Timedelta(days=1))
    per_day = pd.Series(1, index=index).groupby(index.normalize()).size().median()
    return float(252.0 * per_day)


def annualized_return(equity: np.ndarray, periods_per_year: float) -> float:
    """Compound growth per year: (1 + total_return) ** (periods_per_year / periods) - 1; 0.0 for
    fewer than two points."""
    equity = np.asarray(equity, dtype=np.float64)
    if equity.size < 2:
        return 0.0
    growth = equity[-1] / equity[0]
    if growth <= 0:
        return -1.0
    return float(growth ** (periods_per_year / (equity.size - 1)) - 1.0)


def calmar_ratio(equity: np.ndarray, periods_per_year: float) -> float:
    """Annualised return / maximum drawdown; nan when there is no drawdown (undefined)."""
    mdd = max_drawdown(equity)
    return float(annualized_return(equity, periods_per_year) / mdd) if mdd > 0 else float("nan")
