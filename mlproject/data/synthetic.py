"""Seeded synthetic futures bars for demos and tests (:func:`synthetic_bars`)."""

from __future__ import annotations

import math
from datetime import time as clock_time

import numpy as np
import pandas as pd

from mlproject.data.validation import BAR_COLUMNS


def synthetic_bars(
    n_bars: int = 5000,
    *,
    seed: int = 0,
    bar_minutes: int = 1,
    tick_size: float = 0.25,
    start_price: float = 4500.0,
    start: str = "2024-01-02",
    session: tuple[str, str] = ("09:30", "16:00"),
    annual_vol: float = 0.18,
    regime_switch_prob: float = 0.002,
) -> pd.DataFrame:
    """Seeded synthetic futures bars for demos and tests: same seed -> identical frame; timestamps only
    inside the session on weekdays (bar END times like NT8, e.g. 09:31..16:00 for 1-minute bars); prices
    rounded to tick_size; volatility regimes (Markov switching low/high vol), trending stretches and
    mean-reverting stretches (a regime chain over {trend-up, trend-down, mean-revert, random-walk}), an
    overnight gap at each session open, intraday U-shaped lognormal volume; always valid (passes
    validate_bars: low <= open,close <= high, all prices > 0).

    `annual_vol` is the average annualised volatility of the bar returns (252 sessions a year);
    the low- and high-volatility regimes run at 0.6x and 1.6x of it. Both regime chains switch
    with probability `regime_switch_prob` per bar. The session must not cross midnight.
    """
    _check_synthetic_args(n_bars, bar_minutes, tick_size, start_price, annual_vol, regime_switch_prob)
    rng = np.random.default_rng(seed)
    index, slot, per_day = _session_bar_ends(n_bars, start, session, bar_minutes)
    day_open, position = slot == 0, (slot + 0.5) / per_day
    sigma = annual_vol / math.sqrt(252 * per_day)
    vol_state = _markov_chain(rng, n_bars, 2, regime_switch_prob)
    sigmas = sigma * np.array([0.6, 1.6])[vol_state]
    trend_state = _markov_chain(rng, n_bars, 4, regime_switch_prob)
    # Overnight news moves the open: a gap of ~0.4 daily standard deviations at every session open.
    gaps = np.where(day_open, rng.normal(0.0, 0.4 * annual_vol / math.sqrt(252), n_bars), 0.0)
    gaps[0] = 0.0
    shocks = rng.standard_normal(n_bars) * sigmas
    log_close = _simulate_log_closes(np.log(start_price), shocks, sigmas, trend_state, gaps)
    log_open = np.concatenate([[np.log(start_price)], log_close[:-1]]) + gaps
    bars = _ohlc_on_ticks(rng, np.exp(log_open), np.exp(log_close), sigmas, tick_size)
    bars["volume"] = _intraday_volume(rng, position, vol_state, bar_minutes)
    frame = pd.DataFrame(bars, index=index)[list(BAR_COLUMNS)]
    frame.attrs["source"] = f"synthetic(seed={seed})"
    frame.attrs["format"] = "synthetic"
    return frame


def _check_synthetic_args(
    n_bars: int, bar_minutes: int, tick_size: float, start_price: float, annual_vol: float, switch_prob: float
) -> None:
    if n_bars < 1:
        raise ValueError(f"n_bars must be >= 1, got {n_bars}")
    if bar_minutes < 1:
        raise ValueError(f"bar_minutes must be >= 1, got {bar_minutes}")
    if not tick_size > 0 or not start_price > 0:
        raise ValueError(f"tick_size and start_price must be > 0, got {tick_size} and {start_price}")
    if not annual_vol >= 0:
        raise ValueError(f"annual_vol must be >= 0, got {annual_vol}")
    if not 0 <= switch_prob <= 1:
        raise ValueError(f"regime_switch_prob must be in [0, 1], got {switch_prob}")


def _session_bar_ends(
    n_bars: int, start: str, session: tuple[str, str], bar_minutes: int
) -> tuple[pd.DatetimeIndex, np.ndarray, int]:
    """(bar end stamps on weekdays, slot of each bar within its session, bars per session)."""
    opens, closes = (_minutes_of_day(text) for text in session)
    per_day = (closes - opens) // bar_minutes
    if per_day < 1:
        raise ValueError(
            f"session {session} must run forward within one day and hold at least one {bar_minutes}-minute bar"
        )
    n_days = -(-n_bars // per_day)
    days = pd.bdate_range(pd.Timestamp(start).normalize(), periods=n_days)  # Monday..Friday
    ends = opens + bar_minutes * np.arange(1, per_day + 1)
    stamps = (days.to_numpy()[:, None] + (ends * 60 * 10**9).astype("timedelta64[ns]")[None, :]).ravel()[:n_bars]
    return pd.DatetimeIndex(stamps, name="timestamp").as_unit("ns"), np.arange(n_bars) % per_day, int(per_day)


def _minutes_of_day(text: str) -> int:
    moment = clock_time.fromisoformat(text)
    return moment.hour * 60 + moment.minute


def _markov_chain(rng: np.random.Generator, n: int, n_states: int, switch_prob: float) -> np.ndarray:
    """State per step: stay with probability 1 - switch_prob, else jump to one of the other states."""
    switches = rng.random(n) < switch_prob
    switches[0] = False
    jumps = rng.integers(1, n_states, size=n)  # 1..n_states-1: never jumps to the same state
    start = rng.integers(n_states)
    return (start + np.cumsum(np.where(switches, jumps, 0))) % n_states


def _simulate_log_closes(
    log_start: float, shocks: np.ndarray, sigmas: np.ndarray, regime: np.ndarray, gaps: np.ndarray
) -> np.ndarray:
    """Log closes under the regimes 0 trend-up, 1 trend-down, 2 mean-revert, 3 random walk.

    Trends drift 0.08 sigma a bar; mean reversion is an AR(1) pull of 5% a bar (half-life ~14
    bars) toward the price where the regime began, so it also fades overnight gaps.
    """
    steps = (np.select([regime == 0, regime == 1], [0.08 * sigmas, -0.08 * sigmas], 0.0) + shocks + gaps).tolist()
    reverting = (regime == 2).tolist()
    out = np.empty(len(steps))
    level, anchor, was_reverting = log_start, log_start, False
    for t, step in enumerate(steps):
        if reverting[t]:
            anchor = anchor if was_reverting else level
            step -= 0.05 * (level - anchor)
        level += step
        was_reverting = reverting[t]
        out[t] = level
    return out


def _ohlc_on_ticks(
    rng: np.random.Generator, opens: np.ndarray, closes: np.ndarray, sigmas: np.ndarray, tick: float
) -> dict[str, np.ndarray]:
    """OHLC on the tick grid: open and close rounded, high/low a half-normal excursion beyond them."""
    o, c = np.round(opens / tick), np.round(closes / tick)
    up = np.maximum(opens, closes) * np.exp(np.abs(rng.standard_normal(len(o))) * sigmas * 0.5)
    down = np.minimum(opens, closes) * np.exp(-np.abs(rng.standard_normal(len(o))) * sigmas * 0.5)
    h = np.maximum(np.ceil(up / tick), np.maximum(o, c))
    low = np.minimum(np.floor(down / tick), np.minimum(o, c))
    # In ticks, so every price is an exact multiple of tick_size; >= 1 tick keeps prices positive.
    return {name: np.maximum(x, 1.0) * tick for name, x in (("open", o), ("high", h), ("low", low), ("close", c))}


def _intraday_volume(
    rng: np.random.Generator, position: np.ndarray, vol_state: np.ndarray, bar_minutes: int
) -> np.ndarray:
    """Lognormal volume with the intraday U shape (3x at the open and close) and more in high volatility."""
    u_shape = 1.0 + 2.0 * (2.0 * position - 1.0) ** 2
    regime = np.array([1.0, 1.5])[vol_state]
    volume = 500.0 * bar_minutes * u_shape * regime * rng.lognormal(0.0, 0.4, len(position))
    return np.maximum(np.round(volume), 1.0)


def momentum_bars(n: int, seed: int = 0, persist: float = 0.85, flip_at: float | None = None) -> pd.DataFrame:
    """Bars with a planted, learnable signal: each 1-minute bar moves in the direction of the
    previous one with probability ``persist`` (the next open is this close). ``flip_at`` (a fraction
    of the bars) makes the signal drift: from there on it is ``1 - persist`` (mean reversion), the
    case where a model that keeps learning must beat one that does not."""
    rng = np.random.default_rng(seed)
    keep = np.full(n, persist)
    if flip_at is not None:
        keep[int(n * flip_at):] = 1.0 - persist
    flips = rng.random(n) > keep
    sign = np.cumprod(np.where(flips, -1.0, 1.0))
    close = 4000.0 + np.cumsum(sign * (1 + rng.poisson(1.5, n))) * 0.25
    open_ = np.r_[4000.0, close[:-1]]
    index = pd.date_range("2024-01-02 09:31", periods=n, freq="1min", name="timestamp")
    return pd.DataFrame({"open": open_, "high": np.maximum(open_, close) + 0.25,
                         "low": np.minimum(open_, close) - 0.25, "close": close, "volume": 100.0}, index=index)
