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

from envs.futures_vector_env import FuturesTradingVectorEnv
from envs.market import Market
from mlproject.backtest import BacktestResult, Policy, constant_policy, episode_metrics
from mlproject.config import EnvConfig, load_config
from mlproject.data import infer_bar_period, load_source, period_text, split_bars
from mlproject.features import FEATURE_SETS, obs_size, window_of
from mlproject.instruments import resolve_instrument
from mlproject.metrics import equity_returns, periods_per_year, probabilistic_sharpe_ratio
from mlproject.policy import ModelMismatch, load_policy_model
from mlproject.trades import TRADE_COLUMNS, trade_columns

log = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"max_drawdown", "max_drawdown_duration", "annual_volatility", "commissions",
                             "slippage", "turnover"})
"""Metrics where a smaller value is the better model (everything else: larger is better)."""


@dataclass
class EvalReport:
    """A policy evaluated on a set of windows."""

    name: str
    windows: list[BacktestResult] = field(default_factory=list)

    def per_window(self) -> pd.DataFrame:
        """One row per window, one column per metric."""
        return pd.DataFrame([w.metrics for w in self.windows], index=pd.RangeIndex(len(self.windows), name="window"))

    def summary(self) -> dict[str, float]:
        """Mean over windows of every metric, and its spread (``<metric>_std``, ddof=0)."""
        frame = self.per_window().replace([np.inf, -np.inf], np.nan)
        out: dict[str, float] = {}
        # Annualising a short window that doubled gives returns like 1e199; their spread is inf
        # (not logged), and numpy's overflow warning about it says nothing more.
        with np.errstate(over="ignore", invalid="ignore"):
            for col in frame.columns:
                out[col] = float(frame[col].mean())
                out[f"{col}_std"] = float(frame[col].std(ddof=0))
        return out

    def returns(self) -> np.ndarray:
        """Per-bar simple returns of all windows, concatenated (window order)."""
        parts = [equity_returns(w.equity.to_numpy()) for w in self.windows]
        return np.concatenate(parts) if parts else np.zeros(0)

    def trades(self) -> pd.DataFrame:
        """All closed trades with their window number."""
        frames = [w.trades.assign(window=w.index) for w in self.windows if len(w.trades)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def stop_notes(self) -> list[str]:
        """One line per window that was stopped out at the equity floor."""
        return [note for w in self.windows if (note := w.stop_note())]


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


def backtest(policy: Policy, bars: pd.DataFrame, env_config: Mapping[str, Any], n_windows: int,
             seed: int = 0, name: str = "policy", first_bar: int | None = None) -> EvalReport:
    """Play ``policy`` deterministically over ``n_windows`` windows of ``bars`` at once.

    ``first_bar`` (default: the history ``env_config`` needs) is where the first window starts;
    policies with different windows are compared on the same trading windows by giving every
    backtest the largest one.
    """
    own_first = Market.first_bar(env_config)
    if first_bar is not None and first_bar < own_first:
        raise ValueError(f"{name}: first_bar {first_bar} is before the {own_first} bars of history it needs")
    cfg = {**env_config, "bars": bars, "random_start": False, "max_episode_steps": None}
    starts, length = window_starts(len(bars), own_first if first_bar is None else first_bar, n_windows)
    env = FuturesTradingVectorEnv(n_windows, {**cfg, "episode_bars": int(length)})
    n_actions = env.single_action_space.n
    obs, info = env.reset(seed=seed, options={"start": starts})
    equity = np.empty((length + 1, n_windows))
    positions = np.zeros((length + 1, n_windows), np.int64)
    equity[0] = info["equity"]
    stopped = np.full(n_windows, -1)
    alive = np.ones(n_windows, bool)
    everyone = True  # no window has ended yet: the masks below are no-ops, skip them
    flat = env.market.spec.max_contracts
    for k in range(1, length + 1):
        actions = _checked_actions(policy(obs), n_windows, n_actions, name)
        if everyone:
            obs, _, terminated, truncated = env.step_arrays(actions)
            equity[k], positions[k] = env.equity, env.position
            ended = terminated | truncated
            if ended.any():  # only the equity floor terminates
                stopped[terminated] = k
                alive &= ~ended
                everyone = False
            continue
        # A stopped-out window's env autoresets; it is out of the market, whatever the policy says.
        obs, _, terminated, truncated = env.step_arrays(np.where(alive, actions, flat))
        equity[k] = np.where(alive, env.equity, equity[k - 1])
        positions[k] = np.where(alive, env.position, 0)
        stopped[alive & terminated] = k
        alive &= ~(terminated | truncated)
    ppy = periods_per_year(bars.index)  # once: every window is annualised alike
    report = EvalReport(name)
    for i, start in enumerate(starts.tolist()):
        report.windows.append(_window_result(i, start, equity[:, i], positions[:, i], env.market, ppy,
                                             None if stopped[i] < 0 else int(stopped[i])))
        if stopped[i] >= 0:
            log.warning("%s: %s", name, report.windows[-1].stop_note())
    return report


def _checked_actions(actions: Any, n: int, n_actions: int, name: str) -> np.ndarray:
    """Actions as int64, or a clear error (NaN, out of range, wrong count) naming the policy."""
    raw = np.asarray(actions).reshape(-1)
    if raw.dtype == np.int64 and raw.shape[0] == n and raw.min() >= 0 and raw.max() < n_actions:
        return raw  # the hot path (every policy of ours): two reductions, no copies
    if raw.shape[0] != n:
        raise ValueError(f"{name}: returned {raw.shape[0]} actions for {n} observations")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise ValueError(f"{name}: returned NaN or infinite actions")
    out = raw.astype(np.int64)
    if (out < 0).any() or (out >= n_actions).any() or (raw.dtype.kind == "f" and (out != raw).any()):
        raise ValueError(f"{name}: returned actions outside 0..{n_actions - 1}: {raw[:5].tolist()}...")
    return out


def _window_result(index: int, start: int, equity: np.ndarray, positions: np.ndarray, market: Any,
                   ppy: float, stopped: int | None = None) -> BacktestResult:
    spec = market.spec
    stamps = market.bars.index[start: start + len(equity)]
    traded = positions if stopped is None else positions[: stopped + 1]  # the position held at the stop stays open
    columns = trade_columns(traded, start, market)
    if len(columns["pnl"]):
        for key in ("entry_time", "exit_time"):
            columns[key] = market.bars.index[columns[key].astype(np.int64)]
    metrics = episode_metrics(equity, positions, columns, ppy, spec, traded=traded)
    # Fresh arrays, in TRADE_COLUMNS order: the frame may own them (copy=False: 2x faster).
    trades = pd.DataFrame({name: columns[name] for name in TRADE_COLUMNS}, copy=False)
    metrics["stopped_out"] = float(stopped is not None)
    return BacktestResult(pd.Series(equity, index=stamps, name="equity"),
                          pd.Series(positions, index=stamps, name="position"), trades, metrics, index,
                          None if stopped is None else stamps[stopped])


# -- policies ----------------------------------------------------------------------------------


def load_policy(model_uri: str) -> Policy:
    """A batch policy from an MLflow policy model (registry URI, ``models:/m-...``, ``runs:/``).
    Its observations must be built with its own settings: see :func:`evaluate_policies`."""
    return load_policy_model(model_uri).predict


def policy_env_config(policy: Any, env: Any, bars: pd.DataFrame) -> dict[str, Any]:
    """The env settings ``policy`` (a ``LoadedPolicy``) is backtested with on ``bars``.

    The market and the account come from ``env`` (the configured ``EnvConfig``: what the bars
    are, their costs, the initial equity and floor, the same for every model compared); the
    observation and action settings come from the policy itself (window, vol_window,
    norm_window, max_contracts). ``ModelMismatch`` names the model and the setting when the policy
    cannot run on these bars: another instrument, another bar period, other features.
    """
    base = env.model_dump()
    s, who = policy.settings, policy.label
    if s is None:  # logged before models recorded their settings: only the input size is known
        size = obs_size(env.window)
        if policy.input_size is not None and policy.input_size != size:
            raise ModelMismatch(
                f"{who} records no settings (it was logged before models did) and takes {policy.input_size} "
                f"observation values; env.window={env.window} makes {size}: evaluate it with "
                f"--set env.window={window_of(policy.input_size)} and the rest of its training config")
        return base
    if s.feature_set is None:
        known = "; ".join(f"{name} v{v} ({', '.join(names)})" for name, (v, names) in FEATURE_SETS.items())
        raise ModelMismatch(f"{who} was trained on feature set v{s.feature_set_version} ({', '.join(s.features)}); "
                            f"this code computes {known}")
    spec, theirs = resolve_instrument(env.instrument), s.instrument
    for key in ("symbol", "tick_size", "point_value"):
        if theirs[key] != getattr(spec, key):
            raise ModelMismatch(
                f"{who} trades {theirs['symbol']} (tick_size {theirs['tick_size']:g}, point_value "
                f"{theirs['point_value']:g}); the bars are configured as {spec.symbol} (tick_size {spec.tick_size:g}, "
                f"point_value {spec.point_value:g}) by env.instrument: its {key} differs. Evaluate it on "
                f"{theirs['symbol']} bars with --set env.instrument={theirs['symbol']} (or its training config)")
    if s.bar_period is not None and len(bars) >= 2:
        period = infer_bar_period(bars)
        if period != pd.Timedelta(s.bar_period):
            raise ModelMismatch(f"{who} was trained on {period_text(pd.Timedelta(s.bar_period))} bars; the bars of "
                                f"{_bars_source(bars)} are {period_text(period)} bars (bar period)")
    base.update(window=s.window, vol_window=s.vol_window, norm_window=s.norm_window, feature_set=s.feature_set,
                instrument={"symbol": spec.symbol, "tick_size": spec.tick_size, "point_value": spec.point_value,
                            "commission_per_side": spec.commission_per_side, "slippage_ticks": spec.slippage_ticks,
                            "max_contracts": s.max_contracts})
    return base


def _bars_source(bars: pd.DataFrame) -> str:
    return str(bars.attrs.get("path") or bars.attrs.get("source") or "the evaluation bars")


def bars_needed(first_bar: int, n_windows: int) -> int:
    """Bars an evaluation of ``n_windows`` windows after ``first_bar`` bars of history needs."""
    return first_bar + 1 + 2 * n_windows


@dataclass
class Evaluation:
    """Policies and baselines backtested on the same bars and the same windows."""

    reports: dict[str, EvalReport]
    baselines: dict[str, EvalReport]
    first_bar: int
    """Bar the first window starts at: the longest history any of the policies needs (the
    configured ``env``'s when there are none; the baselines need none)."""
    periods_per_year: float


def evaluate_policies(policies: Sequence[Any], bars: pd.DataFrame, cfg: Any, *,
                      with_baselines: bool = True) -> Evaluation:
    """Backtest every ``LoadedPolicy`` with its own observation settings (``policy_env_config``)
    on the same bars and trading windows, with flat and buy-and-hold on those windows.

    Raises ``ModelMismatch`` naming the model and the setting when a policy cannot run on the
    bars, including too few bars for its window and ``continuous_learning.evaluation_episodes``.
    """
    n = cfg.continuous_learning.evaluation_episodes
    env_configs = {p.uri: policy_env_config(p, cfg.env, bars) for p in policies}
    firsts = {p.label: Market.first_bar(env_configs[p.uri]) for p in policies}
    first = max(firsts.values(), default=Market.first_bar(cfg.env))
    if len(bars) < bars_needed(first, n):
        who = max(firsts, key=firsts.get) if firsts else "the evaluation"
        settings = env_configs[next(p.uri for p in policies if p.label == who)] if firsts else cfg.env.model_dump()
        raise ModelMismatch(
            f"{who} needs at least {bars_needed(first, n)} bars: {first} bars of history (window="
            f"{settings['window']}, vol_window={settings['vol_window']}) and {n} evaluation windows of 2+ bars "
            f"(continuous_learning.evaluation_episodes); {_bars_source(bars)} has {len(bars)}")
    reports = {p.uri: backtest(p.predict, bars, env_configs[p.uri], n, seed=cfg.seed, name=p.label, first_bar=first)
               for p in policies}
    base = baselines(bars, cfg.env.model_dump(), n, first_bar=first) if with_baselines else {}
    return Evaluation(reports, base, first, periods_per_year(bars.index))


def baselines(bars: pd.DataFrame, env_config: Mapping[str, Any], n_windows: int,
              first_bar: int | None = None) -> dict[str, EvalReport]:
    """Flat and buy-and-hold on the same windows: from ``first_bar`` when given (the models'),
    else after the history ``env_config`` needs.

    They never read an observation, so they need no history of their own: a ``first_bar`` before
    ``env_config``'s window is played with the observation windows cut to fit (the account, costs
    and fills, all their results depend on, stay ``env_config``'s)."""
    env = EnvConfig.model_validate({k: v for k, v in env_config.items() if k != "bars"})
    max_contracts = resolve_instrument(env.instrument).max_contracts
    played = env_config if first_bar is None else baseline_env_config(env_config, first_bar)
    return {name: backtest(constant_policy(action), bars, played, n_windows, name=name, first_bar=first_bar)
            for name, action in (("flat", max_contracts), ("buy_hold", 2 * max_contracts))}


def baseline_env_config(env_config: Mapping[str, Any], first_bar: int) -> dict[str, Any]:
    """``env_config`` with its observation windows cut to at most ``first_bar`` bars, so that a
    policy that ignores its observations can trade from there."""
    env = EnvConfig.model_validate({k: v for k, v in env_config.items() if k != "bars"})
    return {**env_config, "window": min(env.window, first_bar), "vol_window": min(env.vol_window, max(first_bar, 2))}


# -- comparing ---------------------------------------------------------------------------------


def test_split(bars: pd.DataFrame, cfg: Any) -> pd.DataFrame:
    """The held-out test split of ``bars`` (``data.splits``), with the bars' attrs (source, format)."""
    sp = cfg.data.splits
    test = split_bars(bars, sp.train, sp.validation, sp.test, gap=sp.gap).test
    test.attrs.update(bars.attrs)
    return test


def default_bars(cfg: Any) -> pd.DataFrame:
    """The held-out test split of ``cfg.data.source``."""
    return test_split(load_source(cfg), cfg)


def evaluate_models(uris: Sequence[str], bars: pd.DataFrame | None = None, cfg: Any = None) -> dict[str, EvalReport]:
    """Each model backtested on identical bars and windows (default: the configured test split),
    each with its own observation settings."""
    cfg = cfg or load_config(None)
    bars = default_bars(cfg) if bars is None else bars
    return evaluate_policies([load_policy_model(u) for u in uris], bars, cfg, with_baselines=False).reports


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
    if isinstance(benchmark, EvalReport):
        benchmark = per_bar_sharpe(benchmark)
    return probabilistic_sharpe_ratio(challenger.returns(), benchmark)


def per_bar_sharpe(report: EvalReport) -> float:
    """Mean over standard deviation (ddof 1) of the report's per-bar returns, not annualised; 0
    without variance (flat)."""
    r = report.returns()
    sd = r.std(ddof=1) if r.size > 1 else 0.0
    return float(r.mean() / sd) if sd > 0 else 0.0
