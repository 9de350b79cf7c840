"""What the single env and its vector twin share: config parsing, prepared bar arrays, spaces.

Both envs read the same :class:`Market`, draw episode starts the same way and so give the same
episodes for the same seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
from pydantic import ValidationError

from mlproject.config import ConfigError, EnvConfig, describe_validation_error
from mlproject.data import load_bars, validate_bars
from mlproject.features import (
    ACCOUNT_FIELDS,
    FEATURE_CLIP,
    FEATURE_NAMES,
    bar_features,
    context_features,
    context_names,
    obs_size,
    state_names,
)
from mlproject.instruments import InstrumentSpec, resolve_instrument

DSR_MIN_VARIANCE = 1e-18
"""The differential Sharpe reward is 0 while the moving variance of returns is not above this."""
OPEN_PNL_CLIP = 10.0
"""The open-PnL observation (percent of the entry price) is clipped to +-OPEN_PNL_CLIP."""


def parse_env_config(config: Mapping[str, Any]) -> tuple[EnvConfig, Any]:
    """Split an RLlib-style ``env_config`` dict into (validated EnvConfig, bars).

    ``bars`` is a DataFrame (``mlproject.data.load_bars`` shape) or a path to a bar file.
    """
    raw = dict(config)
    if "bars" not in raw:
        raise ConfigError("env_config: key 'bars' is required (a bar DataFrame or a path to a bar file)")
    bars = raw.pop("bars")
    try:
        cfg = EnvConfig.model_validate(raw)
    except ValidationError as exc:
        # Name keys as they appear in the env_config dict (no "env." prefix).
        message = describe_validation_error(exc, "env_config").replace("key 'env.", "key '")
        raise ConfigError(message) from None
    return cfg, bars


def _as_bars(bars: Any) -> pd.DataFrame:
    if isinstance(bars, (str, Path)):
        return load_bars(bars)
    if isinstance(bars, pd.DataFrame):
        return validate_bars(bars, bars.attrs.get("source", "env_config['bars']"))
    raise ConfigError(f"env_config: key 'bars' must be a DataFrame or a file path, got {type(bars).__name__}")


def _with_context(rows: np.ndarray, context: np.ndarray, state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(buffer, read-only view) of observations: each bar's window of feature ``rows``, its
    ``context`` row, then ``state`` agent-state slots and the account slots (zeros, the envs fill
    them), written out (n_bars x obs size float32)."""
    n_rows = rows.shape[1] - len(ACCOUNT_FIELDS)
    out = np.zeros((rows.shape[0], n_rows + context.shape[1] + state + len(ACCOUNT_FIELDS)), np.float32)
    out[:, :n_rows] = rows[:, :n_rows]
    out[:, n_rows:n_rows + context.shape[1]] = context
    view = out.view()
    view.flags.writeable = False
    return out.ravel(), view


@dataclass
class Market:
    """Bars, features and settings prepared once per env."""

    cfg: EnvConfig
    spec: InstrumentSpec
    bars: pd.DataFrame
    open_: np.ndarray
    close: np.ndarray
    windows: np.ndarray
    """Read-only strided view (n_bars, ``obs_size(window)``) over the feature rows: row t holds
    the features of bars t-window+1 .. t, oldest first, then a spare slot per ACCOUNT_FIELDS entry."""
    window_records: np.ndarray
    """``windows`` with each row as one opaque record: fancy-indexing it copies a row with one
    memcpy, about twice as fast as gathering float32 rows (the vector env's hot path)."""
    n_features: int
    t_min: int
    """First bar an episode may start at (a full window of history behind it)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Market:
        cfg, raw_bars = parse_env_config(config)
        spec = resolve_instrument(cfg.instrument)
        bars = _as_bars(raw_bars)
        feats = bar_features(bars, vol_window=cfg.vol_window, norm_window=cfg.norm_window)
        t_min = cls.first_bar(cfg)
        if len(bars) < t_min + 2:
            raise ConfigError(
                f"env_config: {len(bars)} bars are too few for window={cfg.window}, vol_window={cfg.vol_window}: "
                f"need at least {t_min + 2}"
            )
        # Each observation is one row of a strided view, indexed by bar: window * n_features
        # features plus the spare account slots (the next bar's first features, or padding) that
        # the env overwrites with position and open PnL. Copying a row is the cheapest way to a fresh
        # observation. The zero padding in front lets row t exist for every bar t.
        n_feat, width = len(FEATURE_NAMES), obs_size(cfg.window)
        flat = np.concatenate([np.zeros((cfg.window - 1) * n_feat, np.float32), feats.ravel(),
                               np.zeros(len(ACCOUNT_FIELDS), np.float32)])
        windows = np.lib.stride_tricks.as_strided(
            flat, shape=(len(feats), width), strides=(n_feat * flat.itemsize, flat.itemsize), writeable=False)
        if context_names(cfg.feature_set):  # the context columns sit after the rows: rows written out
            flat, windows = _with_context(windows, context_features(bars, vol_window=cfg.vol_window,
                                                                    norm_window=cfg.norm_window),
                                          len(state_names(cfg.feature_set)))
        records = np.ndarray(shape=(windows.shape[0],), dtype=np.dtype((np.void, windows.shape[1] * flat.itemsize)),
                             buffer=flat, strides=(windows.strides[0],))
        records.flags.writeable = False
        return cls(cfg, spec, bars, bars["open"].to_numpy(np.float64), bars["close"].to_numpy(np.float64),
                   windows, records, n_feat, t_min)

    def step_constants(self) -> dict[str, Any]:
        """Per-step constants both envs copy onto themselves as private attributes (an instance
        attribute is the fastest read in the single env's hot path); one place for the formulas."""
        spec, cfg = self.spec, self.cfg
        return {"_max": spec.max_contracts, "_pv": spec.point_value, "_slip_px": spec.slippage_price,
                "_slip_cost": spec.slippage_cost, "_commission": spec.commission_per_side,
                "_floor": cfg.equity_floor_fraction * cfg.initial_equity}

    @staticmethod
    def first_bar(cfg: EnvConfig | Mapping[str, Any]) -> int:
        """First bar an episode may start at: a full window (and volume window) of history."""
        if not isinstance(cfg, EnvConfig):
            cfg = EnvConfig.model_validate({k: v for k, v in cfg.items() if k != "bars"})
        return max(cfg.window, cfg.vol_window)

    @property
    def n_bars(self) -> int:
        return len(self.close)

    @property
    def obs_size(self) -> int:
        return obs_size(self.cfg.window, self.cfg.feature_set)

    def observation_space(self) -> gym.spaces.Box:
        low = np.full(self.obs_size, -FEATURE_CLIP, np.float32)
        high = np.full(self.obs_size, FEATURE_CLIP, np.float32)
        low[-2:], high[-2:] = (-1.0, -OPEN_PNL_CLIP), (1.0, OPEN_PNL_CLIP)
        if state_names(self.cfg.feature_set):  # bars_in_trade, just before the account
            low[-3], high[-3] = 0.0, 1.0
        return gym.spaces.Box(low, high, dtype=np.float32)

    def action_space(self) -> gym.spaces.Discrete:
        return gym.spaces.Discrete(2 * self.spec.max_contracts + 1)

    def episode_bounds(self, rng: np.random.Generator, options: Mapping[str, Any] | None) -> tuple[int, int]:
        """(start bar, last bar) of a new episode; the same draws for the single and vector env."""
        last = self.n_bars - 1
        length = self.cfg.episode_bars
        latest_start = last - length if length is not None else last - 1
        latest_start = max(self.t_min, latest_start)
        if options and "start" in options:
            start = int(options["start"])
            if not self.t_min <= start <= last - 1:
                raise ValueError(f"reset option start={start} outside [{self.t_min}, {last - 1}]")
        elif self.cfg.random_start:
            start = int(rng.integers(self.t_min, latest_start + 1))
        else:
            start = self.t_min
        end = min(start + length, last) if length is not None else last
        return start, end

    def feature_names(self) -> list[str]:
        """Names of the observation entries, oldest bar first."""
        names = [f"{f}[t-{lag}]" for lag in range(self.cfg.window - 1, -1, -1) for f in FEATURE_NAMES]
        return (names + list(context_names(self.cfg.feature_set)) + list(state_names(self.cfg.feature_set))
                + list(ACCOUNT_FIELDS))
