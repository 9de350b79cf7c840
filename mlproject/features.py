"""Causal per-bar features for the trading environment.

Every feature of bar t is computed from bars 0..t only (rolling windows that end at t), so an
observation built from rows <= t cannot see the future. ``tests/test_env.py`` proves it by
changing every bar after t.
"""

from __future__ import annotations

import math
import numpy as np
import pandas as pd

FEATURE_NAMES: tuple[str, ...] = ("ret_z", "range_z", "volume_z", "tod_sin", "tod_cos")
"""Columns of :func:`bar_features`, in order."""

FEATURE_SET_VERSION = 1
"""Version of what :func:`bar_features` computes. Bump it whenever a feature's formula changes
(not only its name): a logged policy records the version it was trained on, and evaluation
refuses a policy whose features this code no longer computes."""

CONTEXT_NAMES: tuple[str, ...] = ("ret5_z", "ret15_z", "vol_regime")
"""The newest bar's context features of the ``multi_timeframe`` set (:func:`context_features`),
placed once after the window's rows, before the account fields."""

STATE_NAMES: tuple[str, ...] = ("bars_in_trade",)
"""The agent's own state the ``trader`` set adds, before the account fields: how long the open
trade has lasted (:func:`bars_in_trade`; 0 while flat)."""

FEATURE_SETS: dict[str, tuple[int, tuple[str, ...]]] = {
    "base": (FEATURE_SET_VERSION, FEATURE_NAMES),
    "multi_timeframe": (2, FEATURE_NAMES + CONTEXT_NAMES),
    "trader": (3, FEATURE_NAMES + CONTEXT_NAMES + STATE_NAMES)}
"""``env.feature_set`` -> (the version a model records, the feature names it records)."""

HOLD_CAP = 100
"""Bars in the trade are counted up to this many (the observation is bars / HOLD_CAP, at most 1)."""


def context_names(feature_set: str = "base") -> tuple[str, ...]:
    """The context features ``feature_set`` adds after the window's rows (none for ``base``)."""
    return CONTEXT_NAMES if feature_set in ("multi_timeframe", "trader") else ()


def state_names(feature_set: str = "base") -> tuple[str, ...]:
    """The agent-state entries ``feature_set`` adds after the context (only ``trader`` has one)."""
    return STATE_NAMES if feature_set == "trader" else ()


def bars_in_trade(bars: int) -> float:
    """The ``bars_in_trade`` observation of a trade open for ``bars`` closes (the bar it was
    filled on is 1; 0 while flat): ``min(bars, HOLD_CAP) / HOLD_CAP``, one float64 division, as
    the vector env does it."""
    return (bars if bars < HOLD_CAP else HOLD_CAP) / HOLD_CAP


def feature_set_of(features: tuple[str, ...] | list[str], version: int) -> str | None:
    """The feature set a model recorded (its feature names and version), None if this code has none."""
    return next((name for name, (v, names) in FEATURE_SETS.items()
                 if v == version and tuple(features) == names), None)

FEATURE_CLIP = 10.0
"""Normalised features are clipped to [-FEATURE_CLIP, FEATURE_CLIP] (keeps outliers finite)."""

ACCOUNT_FIELDS: tuple[str, ...] = ("position", "open_pnl_pct")
"""The entries after the per-bar features of an observation, in order: the position over
max_contracts and the open trade's PnL in percent of its entry (``envs.futures_env``)."""


def obs_size(window: int, feature_set: str = "base") -> int:
    """Length of an observation over ``window`` bars: ``window`` rows of :data:`FEATURE_NAMES`,
    oldest first, the set's :func:`context_names` (the newest bar's), then the
    :data:`ACCOUNT_FIELDS` (the ``trader`` set: its :func:`state_names` before them). The one
    definition of the layout."""
    return window * len(FEATURE_NAMES) + len(context_names(feature_set)) + len(state_names(feature_set)) \
        + len(ACCOUNT_FIELDS)


def window_of(size: int) -> int:
    """The window of an observation of ``size`` entries, of either feature set (the inverse of
    :func:`obs_size`: the context features are fewer than a row, so rounding down finds it)."""
    return (size - len(ACCOUNT_FIELDS)) // len(FEATURE_NAMES)


def feature_rows(observation: np.ndarray) -> np.ndarray:
    """The per-bar features of one observation as (window, len(FEATURE_NAMES)) rows, oldest first
    (a view when it can be)."""
    window = window_of(observation.shape[-1])
    return observation[: window * len(FEATURE_NAMES)].reshape(window, len(FEATURE_NAMES))


def latest_features(observation: np.ndarray) -> np.ndarray:
    """The newest bar's :data:`FEATURE_NAMES` of an observation (of either feature set): the
    window's last row."""
    n, window = len(FEATURE_NAMES), window_of(observation.shape[-1])
    return observation[..., (window - 1) * n: window * n]


def log_returns(close: np.ndarray) -> np.ndarray:
    """log(c_t / c_{t-1}); 0 for the first bar."""
    out = np.zeros(len(close), dtype=np.float64)
    out[1:] = np.log(close[1:] / close[:-1])
    return out


_BLOCK = 1 << 14
"""Elements per block of :func:`trailing_mean_std` (128 KiB of float64: stays in L2)."""


def trailing_mean_std(values: np.ndarray, window: int, min_periods: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof 1) of the last ``window`` values ending at each index, over the
    values there are (fewer at the start); NaN where fewer than ``min_periods``. A window of equal
    values has std exactly 0.

    Each window is summed in a fixed order (oldest first, from 0.0), so a result depends only on
    the values in its window: :class:`FeatureStream` repeats the same operations one bar at a
    time and gets the same bits, whatever came before the window. (pandas' rolling std is an
    online update over the whole series, whose last bits depend on the history.)
    """
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    padded = np.concatenate([np.zeros(window - 1), x])
    count = np.minimum(np.arange(1, n + 1), window).astype(np.float64)
    mean, squares = np.empty(n), np.empty(n)
    # Block by block, so the window's passes run over cache-resident slices (3-5x faster over a
    # million bars than whole-array passes); every element sees the same operations in the same
    # order as the plain loops would, so the bits do not change.
    buffer = np.empty(min(n, _BLOCK))
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        total, d = np.zeros(hi - lo), buffer[: hi - lo]
        for k in range(window):
            total += padded[lo + k: hi + k]
        mu = mean[lo:hi]
        np.divide(total, count[lo:hi], out=mu)
        sq = squares[lo:hi]
        sq[:] = 0.0
        for k in range(window):
            np.subtract(padded[lo + k: hi + k], mu, out=d)
            np.multiply(d, d, out=d)
            d[: max(0, window - 1 - k - lo)] = 0.0  # padding (index < window - 1 - k): no value, adds nothing
            sq += d
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(squares / (count - 1.0))
    std[same_run(x) >= count] = 0.0
    std[count < max(min_periods, 2)] = np.nan
    mean[count < min_periods] = np.nan
    return mean, std


def same_run(x: np.ndarray) -> np.ndarray:
    """How many values in a row, ending at each index, equal it (1 where it differs from the one before)."""
    n = len(x)
    index = np.arange(n)
    starts = np.ones(n, dtype=bool)
    starts[1:] = x[1:] != x[:-1]
    return (index - np.maximum.accumulate(np.where(starts, index, 0)) + 1).astype(np.float64)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where den is finite and > 0, else 0 (a flat warm-up window carries no signal)."""
    ok = np.isfinite(den) & (den > 0)
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=ok)
    return out


def bar_features(bars: pd.DataFrame, *, vol_window: int = 20, norm_window: int = 100) -> np.ndarray:
    """Feature matrix (n_bars, len(FEATURE_NAMES)), float32.

    - ret_z: log return divided by the trailing std of log returns over ``norm_window`` bars.
    - range_z: log(high / low) divided by the same std (how wide the bar was, in typical moves).
    - volume_z: volume minus its trailing mean over ``vol_window`` bars, over the trailing std.
    - tod_sin, tod_cos: time of day of the bar's timestamp on the unit circle (0 at midnight).
    """
    close = bars["close"].to_numpy(np.float64)
    rets = log_returns(close)
    # Warm-up: a std needs a few points; fewer than that and the feature is 0 rather than noise.
    _, sigma = trailing_mean_std(rets, norm_window, min(20, norm_window))
    ret_z = _safe_ratio(rets, sigma)
    log_range = np.log(bars["high"].to_numpy(np.float64) / bars["low"].to_numpy(np.float64))
    range_z = _safe_ratio(log_range, sigma)
    volume = bars["volume"].to_numpy(np.float64)
    mean, std = trailing_mean_std(volume, vol_window, 2)
    volume_z = _safe_ratio(volume - mean, std)
    index = pd.DatetimeIndex(bars.index)
    minutes = index.hour.to_numpy() * 60.0 + index.minute.to_numpy() + index.second.to_numpy() / 60.0
    angle = 2.0 * np.pi * minutes / 1440.0
    # Each column clipped in float64, then rounded into the float32 matrix (what stacking,
    # clipping and casting the whole float64 matrix gives, without its 40 MB per million bars).
    feats = np.empty((len(close), len(FEATURE_NAMES)), np.float32)
    for j, column in enumerate((ret_z, range_z, volume_z, np.sin(angle), np.cos(angle))):
        feats[:, j] = np.clip(column, -FEATURE_CLIP, FEATURE_CLIP, out=column)
    return feats


def _horizon_return(close: np.ndarray, bars: int) -> np.ndarray:
    """log(c_t / c_{t-bars}): the return of the ``bars``-times-longer bar ending at t (0 before)."""
    out = np.zeros(len(close), dtype=np.float64)
    out[bars:] = np.log(close[bars:] / close[:-bars])
    return out


def context_features(bars: pd.DataFrame, *, vol_window: int = 20, norm_window: int = 100) -> np.ndarray:
    """The :data:`CONTEXT_NAMES` of every bar (n_bars, 3), float32, from bars 0..t only.

    - ret5_z, ret15_z: the log return over the last 5 and 15 bars (the bar at 5x and 15x the bar
      period ending at t), over the trailing std of one-bar log returns times sqrt(5), sqrt(15).
    - vol_regime: the trailing std of one-bar log returns over ``vol_window`` bars over that over
      ``norm_window`` bars, minus 1 (0 while either is undefined): above 0 in a stretch more
      volatile than usual, below 0 in a calmer one.
    """
    close = bars["close"].to_numpy(np.float64)
    rets = log_returns(close)
    _, sigma = trailing_mean_std(rets, norm_window, min(20, norm_window))
    _, short = trailing_mean_std(rets, vol_window, min(20, vol_window))
    ratio = _safe_ratio(short, sigma)
    columns = (_safe_ratio(_horizon_return(close, 5), sigma * SQRT5), _safe_ratio(_horizon_return(close, 15),
                                                                                 sigma * SQRT15),
               np.where(ratio > 0, ratio - 1.0, 0.0))
    feats = np.empty((len(close), len(CONTEXT_NAMES)), np.float32)
    for j, column in enumerate(columns):
        feats[:, j] = np.clip(column, -FEATURE_CLIP, FEATURE_CLIP, out=column)
    return feats


SQRT5, SQRT15 = math.sqrt(5.0), math.sqrt(15.0)


class _Trailing:
    """:func:`trailing_mean_std` for one new value at a time: the window's values in order in a
    ring, summed oldest first by ``np.add.accumulate`` (sequential by definition, the order of
    the vectorised loop), so the bits are the same."""

    def __init__(self, window: int, min_periods: int) -> None:
        self.ring = np.zeros(window)
        self.window = window
        self.count = 0
        self.next = 0
        self.min_periods = min_periods
        self.run = 0
        self.last: float | None = None

    def push(self, value: float) -> tuple[float, float]:
        self.run = self.run + 1 if value == self.last else 1
        self.last = value
        self.ring[self.next] = value
        self.next = (self.next + 1) % self.window
        self.count = min(self.count + 1, self.window)
        values = self.ring[:self.count] if self.count < self.window else np.concatenate(
            (self.ring[self.next:], self.ring[:self.next]))
        count = float(self.count)
        mean = float(np.add.accumulate(values)[-1]) / count
        if count < max(self.min_periods, 2):
            return (mean if count >= self.min_periods else math.nan), math.nan
        if self.run >= count:
            return mean, 0.0
        d = values - mean
        return mean, math.sqrt(float(np.add.accumulate(d * d)[-1]) / (count - 1.0))


def _ratio(num: float, den: float) -> float:
    return num / den if math.isfinite(den) and den > 0 else 0.0


class FeatureStream:
    """:func:`bar_features` one bar at a time, for a live feed: :meth:`push` returns the feature
    row of the new bar, equal bit for bit to the row ``bar_features`` gives that bar in a frame
    that starts with the same bars (or that starts earlier, once ``max(vol_window, norm_window)``
    bars have been pushed). About 20 us a bar for the default windows."""

    def __init__(self, *, vol_window: int = 20, norm_window: int = 100, context: bool = False) -> None:
        self._sigma = _Trailing(norm_window, min(20, norm_window))
        self._volume = _Trailing(vol_window, 2)
        self._close: float | None = None
        self.bars = 0
        self._short = _Trailing(vol_window, min(20, vol_window)) if context else None
        self._closes: list[float] = []
        self.context_row = np.zeros(len(CONTEXT_NAMES) if context else 0, np.float32)
        """With ``context``: the newest bar's :func:`context_features` row (bit for bit)."""

    def push(self, hour: int, minute: int, second: int, high: float, low: float, close: float,
             volume: float) -> np.ndarray:
        """Feature row (float32, FEATURE_NAMES order) of a bar stamped hh:mm:ss (its wall clock)."""
        ret = float(np.log(close / self._close)) if self._close is not None else 0.0
        self._close = close
        _, sigma = self._sigma.push(ret)
        log_range = float(np.log(high / low))
        mean, std = self._volume.push(volume)
        minutes = hour * 60.0 + minute + second / 60.0
        angle = 2.0 * np.pi * minutes / 1440.0
        row = np.array([_ratio(ret, sigma), _ratio(log_range, sigma), _ratio(volume - mean, std),
                        np.sin(angle), np.cos(angle)])
        np.clip(row, -FEATURE_CLIP, FEATURE_CLIP, out=row)
        if self._short is not None:
            self._push_context(ret, sigma, close)
        self.bars += 1
        return row.astype(np.float32)

    def _push_context(self, ret: float, sigma: float, close: float) -> None:
        """:func:`context_features`' operations for the newest bar."""
        _, short = self._short.push(ret)
        closes = self._closes
        closes.append(close)
        del closes[:-16]
        ret5 = float(np.log(close / closes[-6])) if len(closes) > 5 else 0.0
        ret15 = float(np.log(close / closes[-16])) if len(closes) > 15 else 0.0
        ratio = _ratio(short, sigma)
        row = np.array([_ratio(ret5, sigma * SQRT5), _ratio(ret15, sigma * SQRT15), ratio - 1.0 if ratio > 0 else 0.0])
        np.clip(row, -FEATURE_CLIP, FEATURE_CLIP, out=row)
        self.context_row = row.astype(np.float32)
