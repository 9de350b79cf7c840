"""Evaluate policies on held-out bars: batched deterministic backtests, metrics, comparisons.

A backtest splits the bars into ``n_windows`` consecutive windows (the ``evaluation_episodes``
of the ``continuous_learning`` config) and plays them all at once in the numpy vector env, one
policy call per bar for every window together; each window starts flat. Trades are rebuilt from
the per-bar positions with the env's own fill rule, so every metric comes from the same
accounting that produced the rewards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlproject.backtest import Policy, constant_policy

log = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"max_drawdown", "max_drawdown_duration", "annual_volatility", "commissions",
                             "slippage", "turnover"})
"""Metrics where a smaller value is the better model (everything else: larger is better)."""


@dataclass
class WindowResult:
    """One evaluation window: per-bar equity and positions, closed trades, metrics."""

    index: int
    equity: pd.Series
    positions: pd.Series
    trades: pd.DataFrame
    metrics: dict[str, float]


@dataclass
class EvalReport:
    """A policy evaluated on a set of windows."""

    name: str
    windows: list[WindowResult] = field(default_factory=list)

    def per_window(self) -> pd.DataFrame:
        """One row per window, one column per metric."""
        return pd.DataFrame([w.metrics for w in self.windows], index=pd.RangeIndex(len(self.windows), name="window"))

    def summary(self) -> dict[str, float]:
        """Mean over windows of every metric, and its spread (``<metric>_std``, ddof=0)."""
        frame = self.per_window().replace([np.inf, -np.inf], np.nan)
        out: dict[str, float] = {}
        for col in frame.columns:
            out[col] = float(frame[col].mean())
            out[f"{col}_std"] = float(frame[col].std(ddof=0))
        return out

    def returns(self) -> np.ndarray:
        """Per-bar simple returns of all windows, concatenated (window order)."""
        from mlproject.metrics import equity_returns

        parts = [equity_returns(w.equity.to_numpy()) for w in self.windows]
        return np.concatenate(parts) if parts else np.zeros(0)

    def trades(self) -> pd.DataFrame:
        """All closed trades with their window number."""
        frames = [w.trades.assign(window=w.index) for w in self.windows if len(w.trades)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def window_starts(n_bars: int, t_min: int, n_windows: int) -> tuple[np.ndarray, int]:
    """Start bars of ``n_windows`` consecutive windows of equal length over bars t_min..n_bars-1,
    and the length in steps. Window i's last bar is window i+1's decision bar, so their returns
    never overlap."""
    if n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    length = (n_bars - 1 - t_min) // n_windows
    if length < 2:
        raise ValueError(f"{n_bars} bars are too few for {n_windows} evaluation windows "
                         f"(each needs 2+ steps after {t_min} bars of history)")
    return t_min + length * np.arange(n_windows), length


def fills_from_positions(positions: np.ndarray, start: int, market: Any) -> list[tuple[int, int, float]]:
    """(bar, new position, fill price) for every change in a per-bar position series that starts
    flat at bar ``start``: the env's fill rule (next open, slippage against the trader)."""
    positions = np.asarray(positions, dtype=np.int64)
    changed = np.flatnonzero(np.diff(positions)) + 1
    slip = market.spec.slippage_price
    opens = market.open_[start + changed]
    prices = np.where(np.diff(positions)[changed - 1] > 0, opens + slip, opens - slip)
    return list(zip((start + changed).tolist(), positions[changed].tolist(), prices.tolist()))


def backtest(policy: Policy, bars: pd.DataFrame, env_config: Mapping[str, Any], n_windows: int,
             seed: int = 0, name: str = "policy") -> EvalReport:
    """Play ``policy`` deterministically over ``n_windows`` windows of ``bars`` at once."""
    from envs.futures_vector_env import FuturesTradingVectorEnv

    from envs.market import Market

    cfg = {**env_config, "bars": bars, "random_start": False, "max_episode_steps": None}
    starts, length = window_starts(len(bars), Market.first_bar(env_config), n_windows)
    env = FuturesTradingVectorEnv(n_windows, {**cfg, "episode_bars": int(length)})
    n_actions = env.single_action_space.n
    obs, info = env.reset(seed=seed, options={"start": starts})
    equity = np.empty((length + 1, n_windows))
    positions = np.zeros((length + 1, n_windows), np.int64)
    equity[0] = info["equity"]
    ended_at = np.full(n_windows, length)
    alive = np.ones(n_windows, bool)
    for k in range(1, length + 1):
        actions = _checked_actions(policy(obs), n_windows, n_actions, name)
        obs, _, terminated, truncated, info = env.step(actions)
        # An env that ended early (equity floor) autoresets next step: freeze its record.
        equity[k] = np.where(alive, info["equity"], equity[k - 1])
        positions[k] = np.where(alive, info["position"], positions[k - 1])
        done = alive & (terminated | truncated)
        ended_at[done & (k < length)] = k
        alive &= ~(terminated | truncated)
    from mlproject.metrics import periods_per_year

    ppy = periods_per_year(bars.index)  # once: every window is annualised alike
    report = EvalReport(name)
    for i, start in enumerate(starts.tolist()):
        report.windows.append(_window_result(i, start, equity[: ended_at[i] + 1, i], positions[: ended_at[i] + 1, i],
                                             env.market, ppy))
    return report


def _checked_actions(actions: Any, n: int, n_actions: int, name: str) -> np.ndarray:
    """Actions as int64, or a clear error (NaN, out of range, wrong count) naming the policy."""
    raw = np.asarray(actions).reshape(-1)
    if raw.shape[0] != n:
        raise ValueError(f"{name}: returned {raw.shape[0]} actions for {n} observations")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise ValueError(f"{name}: returned NaN or infinite actions")
    out = raw.astype(np.int64)
    if (out < 0).any() or (out >= n_actions).any() or (raw.dtype.kind == "f" and (out != raw).any()):
        raise ValueError(f"{name}: returned actions outside 0..{n_actions - 1}: {raw[:5].tolist()}...")
    return out


def _window_result(index: int, start: int, equity: np.ndarray, positions: np.ndarray, market: Any,
                   ppy: float) -> WindowResult:
    from envs.futures_env import TRADE_COLUMNS, trades_from_fills
    from mlproject.backtest import episode_metrics

    spec = market.spec
    stamps = market.bars.index[start: start + len(equity)]
    trades = pd.DataFrame(trades_from_fills(fills_from_positions(positions, start, market), spec.point_value,
                                            spec.commission_per_side, spec.slippage_cost),
                          columns=list(TRADE_COLUMNS))
    if len(trades):
        trades["entry_time"] = market.bars.index[trades["entry_time"].to_numpy(np.int64)]
        trades["exit_time"] = market.bars.index[trades["exit_time"].to_numpy(np.int64)]
    metrics = episode_metrics(equity, positions, trades, ppy, spec)
    return WindowResult(index, pd.Series(equity, index=stamps, name="equity"),
                        pd.Series(positions, index=stamps, name="position"), trades, metrics)


# -- policies ----------------------------------------------------------------------------------


def load_policy(model_uri: str) -> Policy:
    """A batch policy from an MLflow policy model (registry URI, ``models:/m-...``, ``runs:/``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:  # unknown name/version/run: a bad input, said with the URI
        raise ValueError(f"{model_uri}: {exc.message}") from None
    return lambda obs: np.asarray(model.predict(np.ascontiguousarray(obs, dtype=np.float32)))


def baselines(bars: pd.DataFrame, env_config: Mapping[str, Any], n_windows: int) -> dict[str, EvalReport]:
    """Flat and buy-and-hold on the same windows."""
    from mlproject.config import EnvConfig
    from mlproject.instruments import resolve_instrument

    env = EnvConfig.model_validate({k: v for k, v in env_config.items() if k != "bars"})
    max_contracts = resolve_instrument(env.instrument).max_contracts
    return {name: backtest(constant_policy(action), bars, env_config, n_windows, name=name)
            for name, action in (("flat", max_contracts), ("buy_hold", 2 * max_contracts))}


# -- comparing ---------------------------------------------------------------------------------


def default_bars(cfg: Any) -> pd.DataFrame:
    """The held-out test split of ``cfg.data.source``."""
    from mlproject.data import load_source, split_bars

    sp = cfg.data.splits
    return split_bars(load_source(cfg), sp.train, sp.validation, sp.test, gap=sp.gap).test


def evaluate_models(uris: Sequence[str], bars: pd.DataFrame | None = None, cfg: Any = None) -> dict[str, EvalReport]:
    """Each model backtested on identical bars and windows (default: the configured test split)."""
    from mlproject.config import load_config

    cfg = cfg or load_config(None)
    bars = default_bars(cfg) if bars is None else bars
    n = cfg.continuous_learning.evaluation_episodes
    return {uri: backtest(load_policy(uri), bars, cfg.env.model_dump(), n, seed=cfg.seed, name=uri) for uri in uris}


def compare_models(uris: Sequence[str], bars: pd.DataFrame | None = None, cfg: Any = None) -> pd.DataFrame:
    """One row per model, the mean (and spread) of every metric over the evaluation windows."""
    reports = evaluate_models(uris, bars, cfg)
    return pd.DataFrame({uri: r.summary() for uri, r in reports.items()}).T.rename_axis("model")


def select_best(uris: Sequence[str], metric: str = "sharpe", bars: pd.DataFrame | None = None,
                cfg: Any = None) -> str:
    """The model with the best mean ``metric`` (NaN never wins; drawdown-like metrics: lowest)."""
    table = compare_models(uris, bars, cfg)
    if metric not in table.columns:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(c for c in table.columns if '_std' not in c)}")
    values = table[metric].astype(float)
    if values.isna().all():
        raise ValueError(f"{metric} is undefined (NaN) for every model")
    return str(values.idxmin() if metric in LOWER_IS_BETTER else values.idxmax())


def paired_comparison(challenger: EvalReport, incumbent: EvalReport) -> dict[str, float]:
    """Challenger vs incumbent on the same bars: per-bar return differences (paired t-test,
    one-sided: challenger better) and windows won. Both reports must cover the same windows."""
    from scipy import stats

    a, b = challenger.returns(), incumbent.returns()
    if a.shape != b.shape:
        raise ValueError("paired comparison needs both models evaluated on the same bars and windows")
    diff = a - b
    if diff.size < 2 or np.all(diff == diff[0]):
        t_stat, p_value = math.nan, math.nan
    else:
        t_stat, p_value = stats.ttest_rel(a, b, alternative="greater")
    wins = sum(ca.metrics["total_return"] > cb.metrics["total_return"]
               for ca, cb in zip(challenger.windows, incumbent.windows))
    return {"mean_return_diff": float(diff.mean()) if diff.size else math.nan, "t_stat": float(t_stat),
            "p_value": float(p_value), "windows_won": float(wins), "windows": float(len(challenger.windows))}


def psr_against(challenger: EvalReport, benchmark: EvalReport | float) -> float:
    """Probabilistic Sharpe Ratio of the challenger's per-bar returns against a benchmark's
    per-bar Sharpe (another report, or a per-bar Sharpe value)."""
    from mlproject.metrics import probabilistic_sharpe_ratio

    if isinstance(benchmark, EvalReport):
        r = benchmark.returns()
        sd = r.std(ddof=1) if r.size > 1 else 0.0
        benchmark = float(r.mean() / sd) if sd > 0 else 0.0
    return probabilistic_sharpe_ratio(challenger.returns(), benchmark)
