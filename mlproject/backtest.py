"""Deterministic backtests: play a policy over bars in FuturesTradingEnv and measure it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

Policy = Callable[[np.ndarray], int]
"""Maps one observation to one action."""


@dataclass
class EpisodeResult:
    """One played episode: per-bar equity and positions, closed trades, metrics."""

    equity: pd.Series
    positions: pd.Series
    trades: pd.DataFrame
    metrics: dict[str, float]


def play_episode(policy: Policy, bars: pd.DataFrame, env_config: Mapping[str, Any], seed: int = 0) -> EpisodeResult:
    """Play ``policy`` over the whole of ``bars`` (one episode from the first usable bar to the
    last; ``env_config`` holds the ``env.*`` settings) and measure it."""
    from envs.futures_env import FuturesTradingEnv

    cfg = {**env_config, "bars": bars, "random_start": False, "episode_bars": None, "max_episode_steps": None}
    env = FuturesTradingEnv(cfg)
    obs, info = env.reset(seed=seed)
    stamps, equity, positions = [env.timestamp], [info["equity"]], [info["position"]]
    done = False
    while not done:
        obs, _, terminated, truncated, info = env.step(policy(obs))
        stamps.append(env.timestamp)
        equity.append(info["equity"])
        positions.append(info["position"])
        done = terminated or truncated
    index = pd.DatetimeIndex(stamps, name="timestamp")
    equity_s = pd.Series(equity, index=index, name="equity")
    trades = env.trades_frame()
    return EpisodeResult(equity_s, pd.Series(positions, index=index, name="position"), trades,
                         episode_metrics(equity_s, trades))


def episode_metrics(equity: pd.Series, trades: pd.DataFrame) -> dict[str, float]:
    """The trading metrics of one episode (see mlproject.metrics)."""
    from mlproject import metrics as m

    values = equity.to_numpy()
    ppy = m.periods_per_year(equity.index)
    pnls = trades["pnl"].to_numpy() if len(trades) else np.zeros(0)
    return {
        "total_return": m.total_return(values),
        "max_drawdown": m.max_drawdown(values),
        "sharpe": m.sharpe_ratio(m.equity_returns(values), ppy),
        "calmar": m.calmar_ratio(values, ppy),
        "n_trades": float(len(trades)),
        "win_rate": m.win_rate(pnls),
        "profit_factor": m.profit_factor(pnls),
        "commission_paid": float(trades["commission"].sum()) if len(trades) else 0.0,
        "final_equity": float(values[-1]),
    }


def random_policy(n_actions: int, seed: int) -> Policy:
    """Uniformly random target positions (a sanity baseline)."""
    rng = np.random.default_rng(seed)
    return lambda obs: int(rng.integers(n_actions))


def constant_policy(action: int) -> Policy:
    """Always the same target (flat = max_contracts, long = 2 * max_contracts: buy and hold)."""
    return lambda obs: action
