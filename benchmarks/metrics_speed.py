"""Metric speed on per-minute returns: mlproject.metrics vs quantstats vs empyrical-reloaded.

One seeded series of simple per-minute returns (ppy = 390 * 252 = 98280), the same metric set
from each library: Sharpe, Sortino, annual volatility, max drawdown, Calmar, annual return
(CAGR). All three are timed in alternation in this one process (best of ``--repeat``), so they
see the same machine load, and their values are compared with ours.

What each is given, as its documentation asks:
- ours: the ndarray of returns; the equity curve [1, cumprod(1 + r)] that max drawdown, Calmar
  and annual return read is built inside the timed call.
- empyrical-reloaded: the ndarray (its fastest input; a pd.Series gives the same values).
- quantstats: a pd.Series with a minute DatetimeIndex (it rejects anything else). quantstats
  caches its ``_prepare_returns`` result per series hash; the cache is cleared before each
  timed call so every repeat is a first look at the series, as in a real evaluation. The
  warm-cache time is printed too.

Target: ours >= 10x faster than quantstats.

    python benchmarks/metrics_speed.py [--n 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable

import numpy as np

PPY = 390 * 252  # RTH minute bars per year
METRICS = ("sharpe", "sortino", "annual_volatility", "max_drawdown", "calmar", "annual_return")
Values = dict[str, float]
AGREE = 1e-9  # relative difference below which two values count as the same
NOTES = (
    "quantstats 0.0.86 cagr() counts years as returns.count() / periods (trading periods), not "
    "calendar days as older quantstats did, so it matches empyrical and ours here; calmar() is "
    "that cagr over |max drawdown|.",
    "quantstats and empyrical report max drawdown as a negative number; negated above.",
    "quantstats and empyrical anchor the drawdown at equity 1.0 before the first return, as "
    "ours does on [1, cumprod(1 + r)].",
    "zero denominators are not exercised by this series: empyrical returns inf for a zero std "
    "or no downside, quantstats nan for Sortino, ours nan for both.",
)


def ours_set(returns: np.ndarray) -> Values:
    from mlproject import metrics as m

    equity = np.empty(returns.size + 1)
    equity[0] = 1.0
    np.cumprod(1.0 + returns, out=equity[1:])
    return {
        "sharpe": m.sharpe_ratio(returns, PPY),
        "sortino": m.sortino_ratio(returns, PPY),
        "annual_volatility": m.annualized_volatility(returns, PPY),
        "max_drawdown": m.max_drawdown(equity),
        "calmar": m.calmar_ratio(equity, PPY),
        "annual_return": m.annualized_return(equity, PPY),
    }


def empyrical_set(returns: np.ndarray) -> Values:
    import empyrical as ep

    return {
        "sharpe": ep.sharpe_ratio(returns, annualization=PPY),
        "sortino": ep.sortino_ratio(returns, annualization=PPY),
        "annual_volatility": ep.annual_volatility(returns, annualization=PPY),
        "max_drawdown": -ep.max_drawdown(returns),  # empyrical: negative fraction
        "calmar": ep.calmar_ratio(returns, annualization=PPY),
        "annual_return": ep.annual_return(returns, annualization=PPY),
    }


def quantstats_set(series) -> Values:
    from quantstats import stats as qs

    return {
        "sharpe": qs.sharpe(series, periods=PPY),
        "sortino": qs.sortino(series, periods=PPY),
        "annual_volatility": qs.volatility(series, periods=PPY),
        "max_drawdown": -qs.max_drawdown(series),  # quantstats: negative fraction
        "calmar": qs.calmar(series, periods=PPY),
        "annual_return": qs.cagr(series, periods=PPY),
    }


def _clear_quantstats_cache() -> None:
    from quantstats import utils

    with utils._cache_lock:
        utils._PREPARE_RETURNS_CACHE.clear()


def _timed(fn: Callable[[], Values], before: Callable[[], None] = lambda: None) -> tuple[float, Values]:
    before()
    start = time.perf_counter()
    values = fn()
    return time.perf_counter() - start, values


def _rel_diff(ours: Values, theirs: Values) -> Values:
    return {k: abs(float(theirs[k]) - ours[k]) / abs(ours[k]) for k in METRICS}


def main(n: int, repeat: int) -> dict[str, float]:
    """Time the three libraries on ``n`` returns, print the table, return the best times (s)."""
    import pandas as pd

    returns = np.random.default_rng(0).normal(2e-6, 5e-4, n)  # ~0.8%/day vol, slight drift
    series = pd.Series(returns, index=pd.date_range("2020-01-01 09:30", periods=n, freq="min"))
    runs = {
        "ours": (lambda: ours_set(returns), lambda: None),
        "quantstats": (lambda: quantstats_set(series), _clear_quantstats_cache),
        "quantstats (warm cache)": (lambda: quantstats_set(series), lambda: None),
        "empyrical": (lambda: empyrical_set(returns), lambda: None),
    }
    best = {name: float("inf") for name in runs}
    values: dict[str, Values] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantstats/pandas deprecation noise
        for name, (fn, before) in runs.items():  # warm-up: imports, first-call allocations
            _timed(fn, before)
        for _ in range(repeat):
            for name, (fn, before) in runs.items():
                seconds, values[name] = _timed(fn, before)
                best[name] = min(best[name], seconds)

    print(f"n={n:,} per-minute returns, ppy={PPY}, best of {repeat}, libraries timed in alternation")
    print(f"metrics: {', '.join(METRICS)}")
    print(f"{'library':26s} {'total s':>10s} {'time / ours':>12s}")
    for name, seconds in best.items():
        print(f"{name:26s} {seconds:10.4f} {seconds / best['ours']:11.1f}x")
    print(f"max relative difference vs ours (agree: < {AGREE:g}):")
    diffs = {lib: _rel_diff(values["ours"], values[lib]) for lib in ("quantstats", "empyrical")}
    print(f"  {'metric':20s} {'quantstats':>12s} {'empyrical':>12s} {'ours':>14s}")
    for k in METRICS:
        flags = ["" if diffs[lib][k] < AGREE else " DIFFERS" for lib in diffs]
        print(f"  {k:20s} {diffs['quantstats'][k]:12.2e}{flags[0]} {diffs['empyrical'][k]:12.2e}{flags[1]}"
              f" {values['ours'][k]:14.6g}")
    for note in NOTES:
        print(f"note: {note}")
    ratio = best["quantstats"] / best["ours"]
    print(f"ours vs quantstats: {ratio:.1f}x faster (target >= 10x: {'met' if ratio >= 10 else 'NOT met'}); "
          f"vs empyrical: {best['empyrical'] / best['ours']:.1f}x")
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of per-minute returns")
    parser.add_argument("--repeat", type=int, default=3, help="timings per library (best is kept)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    main(args.n, args.repeat)
