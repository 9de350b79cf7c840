"""Deterministic backtests: play a policy over bars in FuturesTradingEnv and measure it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from envs.futures_env import FuturesTradingEnv
from mlproject.metrics import periods_per_year, trading_metrics

Policy = Callable[[np.ndarray], np.ndarray]
"""Maps a float32 observation batch (n, obs_dim) to n int actions (one batch of one in
:func:`play_episode`, one row per window in ``mlproject.evaluation.backtest``)."""


@dataclass
class BacktestResult:
    """One played episode or evaluation window: per-bar equity and positions, closed trades,
    metrics; ``index`` numbers the window within an evaluation (0 for a single episode).

    A window whose account fell below the equity floor is *stopped out*: ``stopped_at`` is the
    bar it happened at, and from there on the account is out of the market (equity frozen,
    position 0), so every window keeps its full length and two models stay comparable bar by bar.
    """

    equity: pd.Series
    positions: pd.Series
    trades: pd.DataFrame
    metrics: dict[str, float]
    index: int = 0
    stopped_at: pd.Timestamp | None = None

    def stop_note(self) -> str | None:
        """``window 2 stopped out at 2024-01-05 10:31:00 (equity 48,912.50)``, or None."""
        if self.stopped_at is None:
            return None
        return f"window {self.index} stopped out at {self.stopped_at} (equity {self.equity.iloc[-1]:,.2f})"


def play_episode(policy: Policy, bars: pd.DataFrame, env_config: Mapping[str, Any], seed: int = 0) -> BacktestResult:
    """Play ``policy`` over the whole of ``bars`` (one episode from the first usable bar to the
    last; ``env_config`` holds the ``env.*`` settings) and measure it."""
    cfg = {**env_config, "bars": bars, "random_start": False, "episode_bars": None, "max_episode_steps": None}
    env = FuturesTradingEnv(cfg)
    obs, info = env.reset(seed=seed)
    stamps, equity, positions = [env.timestamp], [info["equity"]], [info["position"]]
    done = False
    while not done:
        obs, _, terminated, truncated, info = env.step(int(policy(obs[None])[0]))
        stamps.append(env.timestamp)
        equity.append(info["equity"])
        positions.append(info["position"])
        done = terminated or truncated
    index = pd.DatetimeIndex(stamps, name="timestamp")
    equity_s = pd.Series(equity, index=index, name="equity")
    trades = env.trades_frame()
    metrics = episode_metrics(equity_s.to_numpy(), np.asarray(positions), trades, periods_per_year(bars.index),
                              env.market.spec)
    return BacktestResult(equity_s, pd.Series(positions, index=index, name="position"), trades, metrics)


def episode_metrics(equity: np.ndarray, positions: np.ndarray, trades: pd.DataFrame | Mapping[str, np.ndarray],
                    periods_per_year: float, spec: Any, traded: np.ndarray | None = None) -> dict[str, float]:
    """Every trading metric of one episode that starts flat (``mlproject.metrics.trading_metrics``);
    ``trades``: its closed trades (a frame, or TRADE_COLUMNS arrays); commissions and slippage are
    counted from the position changes of ``traded`` (default: ``positions``; the positions up to a
    stop-out, when the account left the market without a fill)."""
    contracts = float(np.abs(np.diff(np.asarray(positions if traded is None else traded))).sum())
    return trading_metrics(np.asarray(equity, dtype=np.float64), positions, np.asarray(trades["pnl"], np.float64),
                           np.asarray(trades["bars_held"], np.float64), periods_per_year,
                           commissions=contracts * spec.commission_per_side,
                           slippage=contracts * spec.slippage_cost)


def random_policy(n_actions: int, seed: int) -> Policy:
    """Uniformly random target positions (a sanity baseline)."""
    rng = np.random.default_rng(seed)
    return lambda obs: rng.integers(n_actions, size=len(obs))


def constant_policy(action: int) -> Policy:
    """Always the same action: ``max_contracts`` is flat, ``2 * max_contracts`` is buy-and-hold."""
    return lambda obs: np.full(len(obs), action, np.int64)
