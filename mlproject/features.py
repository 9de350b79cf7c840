"""Causal per-bar features for the trading environment.

Every feature of bar t is computed from bars 0..t only (rolling windows that end at t), so an
observation built from rows <= t cannot see the future. ``tests/test_env.py`` proves it by
changing every bar after t.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FEATURE_NAMES: tuple[str, ...] = ("ret_z", "range_z", "volume_z", "tod_sin", "tod_cos")
"""Columns of :func:`bar_features`, in order."""

FEATURE_SET_VERSION = 1
"""Version of what :func:`bar_features` computes. Bump it whenever a feature's formula changes
(not only its name): a logged policy records the version it was trained on, and evaluation
refuses a policy whose features this code no longer computes."""

FEATURE_CLIP = 10.0
"""Normalised features are clipped to [-FEATURE_CLIP, FEATURE_CLIP] (keeps outliers finite)."""


def log_returns(close: np.ndarray) -> np.ndarray:
    """log(c_t / c_{t-1}); 0 for the first bar."""
    out = np.zeros(len(close), dtype=np.float64)
    out[1:] = np.log(close[1:] / close[:-1])
    return out


def _trailing(values: np.ndarray, window: int, min_periods: int) -> pd.core.window.Rolling:
    return pd.Series(values).rolling(window, min_periods=min_periods)


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
    sigma = _trailing(rets, norm_window, min(20, norm_window)).std().to_numpy()
    ret_z = _safe_ratio(rets, sigma)
    log_range = np.log(bars["high"].to_numpy(np.float64) / bars["low"].to_numpy(np.float64))
    range_z = _safe_ratio(log_range, sigma)
    volume = bars["volume"].to_numpy(np.float64)
    roll = _trailing(volume, vol_window, 2)
    volume_z = _safe_ratio(volume - roll.mean().to_numpy(), roll.std().to_numpy())
    index = pd.DatetimeIndex(bars.index)
    minutes = index.hour.to_numpy() * 60.0 + index.minute.to_numpy() + index.second.to_numpy() / 60.0
    angle = 2.0 * np.pi * minutes / 1440.0
    feats = np.column_stack([ret_z, range_z, volume_z, np.sin(angle), np.cos(angle)])
    np.clip(feats, -FEATURE_CLIP, FEATURE_CLIP, out=feats)
    return feats.astype(np.float32)
