"""Trading metrics: small pure numpy functions, explicit about degenerate input.

Conventions (the same in every function):

- ``equity`` is the account value per bar (money); ``returns`` are simple per-bar returns, as
  :func:`equity_returns` makes them; ``positions`` are contracts held per bar (signed);
  ``trade_pnls`` and ``bars_held`` hold one value per closed trade.
- A value that is undefined is ``nan`` (Sharpe of a constant series), one that is infinite by
  definition is ``inf`` (profit factor with wins and no losses), and a true zero is ``0.0``.
- Return-based ratios follow empyrical's definitions (risk-free rate 0, sample std with
  ddof=1, per-period ``required_return``) so that they can be checked against it; where
  empyrical returns ``inf`` for a zero denominator we return ``nan`` (said per function).
- Every function is vectorised numpy: no Python loop over elements, no pandas (except
  :func:`periods_per_year`, which reads timestamps). Inputs are assumed finite.
"""

from __future__ import annotations

import math

import numpy as np

_NAN = float("nan")


def _floats(values) -> np.ndarray:
    """A 1-d float64 view of ``values`` (no copy when it already is one)."""
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _sample_std(returns: np.ndarray) -> float:
    """std(ddof=1) with an exact 0.0 for a constant series (needs >= 2 values).

    numpy's two-pass std of identical values is not always 0: the mean can differ from them in
    the last bit, leaving a residue near 1e-17 that turns an undefined ratio into ~1e15. The
    exact min == max check runs only when the std is that small, so it costs nothing usually.
    Same fix as empyrical's ``_zero_dispersion_std``."""
    std = float(returns.std(ddof=1))
    if std <= 1e-12 * abs(float(returns.mean())) and returns.min() == returns.max():
        return 0.0
    return std


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
    or there are fewer than two returns (the ratio is undefined, not zero).

    empyrical returns inf (or nan for a zero mean) on a constant series; nan here."""
    returns = _floats(returns)
    if returns.size < 2:
        return _NAN
    std = _sample_std(returns)
    if std == 0:
        return _NAN
    return float(returns.mean() / std * np.sqrt(periods_per_year))


def win_rate(trade_pnls: np.ndarray) -> float:
    """Share of trades with pnl > 0; nan with no trades. Breakeven trades (pnl == 0) count as
    trades but not as wins: all wins -> 1.0, all losses -> 0.0."""
    pnls = np.asarray(trade_pnls, dtype=np.float64)
    return float(np.mean(pnls > 0)) if pnls.size else _NAN


def profit_factor(trade_pnls: np.ndarray) -> float:
    """Gross profit / gross loss; inf when there are wins and no losses, nan with no trades or
    neither wins nor losses; 0.0 with losses and no wins."""
    pnls = np.asarray(trade_pnls, dtype=np.float64)
    gains, losses = pnls[pnls > 0].sum(), -pnls[pnls < 0].sum()
    if losses == 0:
        return float("inf") if gains > 0 else _NAN
    return float(gains / losses)


def periods_per_year(index) -> float:
    """Bars per year for annualisation, from the timestamps: 252 trading days times the median
    number of bars per trading day (session-aware: an RTH minute series gives 390 * 252; the
    first and last day, often cut by a split, are left out when there are days between).
    Daily bars (median spacing under two days, weekends included): 252. Slower bars: calendar
    time, 365.25 days / median spacing (weekly 52.2, monthly about 12)."""
    import pandas as pd

    index = pd.DatetimeIndex(index)
    if len(index) < 2:
        return 252.0
    step = pd.Series(index).diff().median()
    if step >= pd.Timedelta(days=2):
        return float(pd.Timedelta(days=365.25) / step)
    if step >= pd.Timedelta(days=1):
        return 252.0
    per_day = pd.Series(1, index=index).groupby(index.normalize()).size().to_numpy()
    # The first and last day of a split are usually cut (a 450-bar validation split from
    # 12:01 to 13:00 the next day has days of 240 and 210 bars): only the days in between
    # count; with none in between, the session is the distinct times of day seen on either.
    if len(per_day) > 2:
        return float(252.0 * np.median(per_day[1:-1]))
    return float(252.0 * len(np.unique(index - index.normalize())))


def annualized_return(equity: np.ndarray, periods_per_year: float) -> float:
    """Compound growth per year: (1 + total_return) ** (periods_per_year / periods) - 1; 0.0 for
    fewer than two points; -1.0 once the equity reaches 0 or below (empyrical gives nan for a
    negative end value, a fractional power of a negative number)."""
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
    return float(annualized_return(equity, periods_per_year) / mdd) if mdd > 0 else _NAN


def annualized_volatility(returns: np.ndarray, periods_per_year: float) -> float:
    """std(ddof=1) * sqrt(periods_per_year); nan for fewer than two returns; 0.0 for a constant
    series (a true zero, not a float residue)."""
    returns = _floats(returns)
    if returns.size < 2:
        return _NAN
    return float(_sample_std(returns) * np.sqrt(periods_per_year))


def _downside_deviation(excess: np.ndarray) -> float:
    """sqrt(mean(min(excess, 0) ** 2)), per period (the mean runs over all periods)."""
    below = np.minimum(excess, 0.0)
    return math.sqrt(float(np.dot(below, below)) / excess.size)


def _excess(returns: np.ndarray, required_return: float) -> np.ndarray:
    """returns - required_return, without the copy when the threshold is 0 (the usual case)."""
    return returns - required_return if required_return != 0 else returns


def downside_risk(returns: np.ndarray, periods_per_year: float, required_return: float = 0.0) -> float:
    """Annualised downside deviation below ``required_return`` (a per-period threshold), as in
    empyrical: sqrt(mean(min(r - required, 0) ** 2)) * sqrt(periods_per_year). The mean is over
    all periods, not just the losing ones (see Sortino & Forsey / Red Rock Capital). nan with no
    returns; 0.0 when no period is below the threshold."""
    returns = _floats(returns)
    if returns.size == 0:
        return _NAN
    return _downside_deviation(_excess(returns, required_return)) * math.sqrt(periods_per_year)


def sortino_ratio(returns: np.ndarray, periods_per_year: float, required_return: float = 0.0) -> float:
    """mean(r - required) * periods_per_year / downside_risk, as in empyrical (``required_return``
    per period). nan for fewer than two returns or when the downside risk is 0 (no period below
    the threshold: all wins or a flat series); empyrical gives inf there, quantstats nan."""
    returns = _floats(returns)
    if returns.size < 2:
        return _NAN
    excess = _excess(returns, required_return)
    risk = _downside_deviation(excess) * math.sqrt(periods_per_year)
    if risk == 0:
        return _NAN
    return float(excess.mean() * periods_per_year / risk)


def max_drawdown_duration(equity: np.ndarray) -> int:
    """Longest run of consecutive points strictly below the running peak, in bars; 0 if the
    equity is never below its peak (including empty and single-point input). Returning to the
    peak exactly ends the run. Example: [1, 2, 1.5, 1.8, 2, 1] -> 2 (the 1.5 and 1.8 bars;
    the final bar is a run of 1)."""
    equity = _floats(equity)
    under = equity < np.maximum.accumulate(equity)
    if not under.any():
        return 0
    # Runs of True as (start, end) from the edges of the padded mask.
    flat = np.zeros(1, dtype=np.int8)
    edges = np.diff(np.concatenate((flat, under.view(np.int8), flat)))
    return int((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max())


def average_win(trade_pnls: np.ndarray) -> float:
    """Mean pnl of the trades with pnl > 0; nan if there is no winning trade (incl. no trades)."""
    pnls = _floats(trade_pnls)
    wins = pnls[pnls > 0]
    return float(wins.mean()) if wins.size else _NAN


def average_loss(trade_pnls: np.ndarray) -> float:
    """Mean pnl of the trades with pnl < 0 (a negative number); nan if there is no losing trade
    (incl. no trades)."""
    pnls = _floats(trade_pnls)
    losses = pnls[pnls < 0]
    return float(losses.mean()) if losses.size else _NAN


def payoff_ratio(trade_pnls: np.ndarray) -> float:
    """average_win / |average_loss|; inf with wins and no losses; nan with no wins (no trades,
    all losses, or only breakeven trades), because the average win is then undefined."""
    win, loss = average_win(trade_pnls), average_loss(trade_pnls)
    if math.isnan(win):
        return _NAN
    return float("inf") if math.isnan(loss) else win / -loss


def expectancy(trade_pnls: np.ndarray) -> float:
    """Mean pnl per trade (breakeven trades included); nan with no trades."""
    pnls = _floats(trade_pnls)
    return float(pnls.mean()) if pnls.size else _NAN


def average_bars_held(bars_held: np.ndarray) -> float:
    """Mean number of bars a trade was held; nan with no trades."""
    bars = _floats(bars_held)
    return float(bars.mean()) if bars.size else _NAN


def exposure(positions: np.ndarray) -> float:
    """Share of bars with a non-zero position (long or short); 0.0 for no bars."""
    positions = np.asarray(positions).reshape(-1)
    return float(np.count_nonzero(positions) / positions.size) if positions.size else 0.0


def turnover(positions: np.ndarray) -> float:
    """Contracts traded per bar: sum |diff(positions)| divided by the number of bars, where the
    first bar's position counts as a change from flat ([2, 2, -1] -> (2 + 0 + 3) / 3). 0.0 for
    no bars or never trading. A position still open at the end is not closed out here."""
    positions = _floats(positions)
    if positions.size == 0:
        return 0.0
    return float(np.abs(np.diff(positions, prepend=0.0)).sum() / positions.size)


def probabilistic_sharpe_ratio(returns: np.ndarray, benchmark_sharpe: float = 0.0) -> float:
    """Probability that the true Sharpe ratio exceeds ``benchmark_sharpe`` (Bailey & Lopez de
    Prado, 2012, "The Sharpe Ratio Efficient Frontier", https://ssrn.com/abstract=1821643):

        PSR = Phi((SR - SR*) * sqrt(n - 1) / sqrt(1 - g3 * SR + (g4 - 1) / 4 * SR^2))

    SR and SR* are per period (not annualised; SR = mean / std(ddof=1), i.e.
    ``sharpe_ratio(returns, 1)``), g3 the skewness and g4 the kurtosis (not excess: 3 for a
    normal), both from population moments as in the paper's code (scipy's default bias=True).
    With population moments g4 >= 1 + g3^2, so the root is real; nan if it is 0 anyway
    (two-point series), for fewer than 3 returns, or for zero variance."""
    returns = _floats(returns)
    n = returns.size
    if n < 3:
        return _NAN
    std = _sample_std(returns)
    if std == 0:
        return _NAN
    mean = float(returns.mean())
    g3, g4 = _skewness_kurtosis(returns, mean)
    sr = mean / std
    var_term = 1.0 - g3 * sr + (g4 - 1.0) / 4.0 * sr**2
    if not var_term > 0:
        return _NAN
    z = (sr - benchmark_sharpe) * math.sqrt(n - 1) / math.sqrt(var_term)
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


EULER_GAMMA = 0.5772156649015329


def expected_max_sharpe(trials: int, sharpe_std: float) -> float:
    """Expected maximum of ``trials`` independent Sharpe estimates whose true value is 0 and whose
    spread is ``sharpe_std`` (Bailey & Lopez de Prado, 2014, "The Deflated Sharpe Ratio",
    https://ssrn.com/abstract=2460551, eq. for SR0):

        SR0 = sd * ((1 - g) * Z^-1(1 - 1/N) + g * Z^-1(1 - 1/(N e)))

    with g the Euler-Mascheroni constant. 0 for one trial: nothing was selected."""
    if trials <= 1 or not sharpe_std > 0:
        return 0.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf
    return sharpe_std * ((1 - EULER_GAMMA) * z(1 - 1 / trials) + EULER_GAMMA * z(1 - 1 / (trials * math.e)))


def deflated_sharpe_ratio(returns: np.ndarray, benchmark_sharpe: float, trials: int) -> float:
    """Deflated Sharpe Ratio: the :func:`probabilistic_sharpe_ratio` of ``returns`` against
    ``benchmark_sharpe`` raised by :func:`expected_max_sharpe` of ``trials`` candidates, so that
    the best of many tries must beat what the luckiest of that many no-skill tries would show.

    Per-period units. The trials' Sharpe spread is the estimator's own under the null,
    ``1 / sqrt(n - 1)`` for ``n`` returns (the trials' realised Sharpe ratios are not all kept);
    ``trials`` <= 1 gives the PSR."""
    returns = _floats(returns)
    if returns.size < 3:
        return _NAN
    sr0 = expected_max_sharpe(int(trials), 1.0 / math.sqrt(returns.size - 1))
    return probabilistic_sharpe_ratio(returns, benchmark_sharpe + sr0)


def _skewness_kurtosis(returns: np.ndarray, mean: float) -> tuple[float, float]:
    """Skewness and (non-excess) kurtosis from population moments, as the PSR paper's code
    computes them; the caller rules out zero variance."""
    n = returns.size
    dev = returns - mean
    dev2 = dev * dev
    m2 = float(dev2.sum()) / n
    return float(np.dot(dev2, dev)) / n / m2**1.5, float(np.dot(dev2, dev2)) / n / m2**2


def trading_metrics(equity: np.ndarray, positions: np.ndarray, trade_pnls: np.ndarray,
                    bars_held: np.ndarray, periods_per_year: float,
                    commissions: float = 0.0, slippage: float = 0.0) -> dict[str, float]:
    """Every metric of one backtest in one flat dict of Python floats (degenerate cases as in
    the single functions; ``final_equity`` is nan with no equity points). Returns are
    ``equity_returns(equity)``; ``psr`` is against a Sharpe of 0; ``commissions`` and
    ``slippage`` (money, already summed by the caller) are passed through."""
    equity = _floats(equity)
    pnls = _floats(trade_pnls)
    returns = equity_returns(equity)
    values = {
        **_return_metrics(equity, returns, periods_per_year),
        **_trade_metrics(pnls, bars_held),
        "exposure": exposure(positions),
        "turnover": turnover(positions),
        "commissions": commissions,
        "slippage": slippage,
        "psr": probabilistic_sharpe_ratio(returns),
        "final_equity": equity[-1] if equity.size else _NAN,
    }
    return {key: float(value) for key, value in values.items()}


def _return_metrics(equity: np.ndarray, returns: np.ndarray, ppy: float) -> dict[str, float]:
    """The equity curve's part of :func:`trading_metrics` (returns, risk, drawdowns)."""
    return {
        "total_return": total_return(equity),
        "annual_return": annualized_return(equity, ppy),
        "annual_volatility": annualized_volatility(returns, ppy),
        "sharpe": sharpe_ratio(returns, ppy),
        "sortino": sortino_ratio(returns, ppy),
        "calmar": calmar_ratio(equity, ppy),
        "max_drawdown": max_drawdown(equity),
        "max_drawdown_duration": max_drawdown_duration(equity),
    }


def _trade_metrics(pnls: np.ndarray, bars_held: np.ndarray) -> dict[str, float]:
    """The closed trades' part of :func:`trading_metrics`."""
    return {
        "win_rate": win_rate(pnls),
        "profit_factor": profit_factor(pnls),
        "average_win": average_win(pnls),
        "average_loss": average_loss(pnls),
        "payoff_ratio": payoff_ratio(pnls),
        "expectancy": expectancy(pnls),
        "n_trades": pnls.size,
        "average_bars_held": average_bars_held(bars_held),
    }
