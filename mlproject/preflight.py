"""Checks that run before any long work, so that real data fails early and says why.

- :func:`check_splits`: every split has the bars its step needs (history for the window and the
  volume window, the evaluation windows); too few is an error naming the split and the count.
- :func:`instrument_fit_warnings`: the prices look like the configured contract (on its tick
  grid, a tick and a typical bar worth a sane share of the account); warnings, never errors.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from envs.market import Market
from mlproject.data import DataError
from mlproject.evaluation import bars_needed
from mlproject.instruments import resolve_instrument
from mlproject.metrics import periods_per_year

log = logging.getLogger(__name__)


def _source(bars: pd.DataFrame, cfg: Any) -> str:
    return str(bars.attrs.get("path") or bars.attrs.get("source") or cfg.data.source)


def split_needs(cfg: Any) -> dict[str, tuple[int, str]]:
    """Bars each split needs, and why, for ``cfg``."""
    env, n, v = cfg.env, cfg.continuous_learning.evaluation_episodes, cfg.train.val_windows
    history = f"{Market.first_bar(env)} bars of history (env.window={env.window}, env.vol_window={env.vol_window})"
    return {
        "train": (Market.first_bar(env) + 2, f"{history} and 2 bars to trade"),
        "validation": (bars_needed(Market.first_bar(env), v), f"{history} and {v} validation windows of 2+ bars "
                                                            f"(train.val_windows={v})"),
        "test": (bars_needed(Market.first_bar(env), n), f"{history} and {n} evaluation windows of 2+ bars "
                                                 f"(continuous_learning.evaluation_episodes={n})"),
    }


def check_splits(splits: Any, cfg: Any, source: str, *, used: tuple[str, ...] = ("train", "validation", "test"),
                 ) -> list[str]:
    """Raise ``DataError`` when a split in ``used`` has too few bars (the message names the split,
    its bars, what it needs and why); return warnings for splits shorter than ``env.norm_window``.

    A split whose fraction is 0 is skipped (it is not used)."""
    needs = split_needs(cfg)
    warnings = [text for text in (_check_split(splits, name, cfg, source, needs[name]) for name in used) if text]
    for text in warnings:
        log.warning(text)
    return warnings


def _check_split(splits: Any, name: str, cfg: Any, source: str, need_why: tuple[int, str]) -> str | None:
    """:func:`check_splits` for one split: DataError when too short for its step, a warning when
    shorter than ``env.norm_window``, else None (also for a split of fraction 0)."""
    part = getattr(splits, name)
    fraction = getattr(cfg.data.splits, name)
    if fraction == 0:
        return None
    need, why = need_why
    total = sum(len(getattr(splits, n)) for n in ("train", "validation", "test"))
    if len(part) < need:
        raise DataError(
            f"{source}: the {name} split has {len(part)} bars (data.splits.{name}={fraction:g} of {total}); "
            f"it needs at least {need}: {why}. Use a longer file, a larger data.splits.{name}, or a smaller "
            "window")
    if len(part) < cfg.env.norm_window:
        return (f"{source}: the {name} split has {len(part)} bars, fewer than env.norm_window="
                f"{cfg.env.norm_window}: its return normalisation never sees a full window")
    return None


def instrument_fit_warnings(bars: pd.DataFrame, spec: Any, initial_equity: float, checks: Any,
                            source: str) -> list[str]:
    """Reasons to doubt that ``bars`` are prices of ``spec`` (an ``InstrumentSpec``) traded from
    ``initial_equity`` (``checks``: a ``DataChecksConfig``). Empty when they look right."""
    found = (_off_grid_warning(bars, spec, checks, source),
             _tick_value_warning(spec, initial_equity, checks, source),
             _daily_move_warning(bars, spec, initial_equity, checks, source))
    return [text for text in found if text is not None]


def _off_grid_warning(bars: pd.DataFrame, spec: Any, checks: Any, source: str) -> str | None:
    """More prices off the contract's tick grid than ``checks.off_grid_fraction``: another contract's."""
    prices = bars[["open", "high", "low", "close"]].to_numpy(np.float64).ravel()
    if not prices.size:
        return None
    ticks = prices / spec.tick_size
    off = np.abs(ticks - np.round(ticks)) > 1e-6 * np.maximum(1.0, np.abs(ticks))
    if off.mean() > checks.off_grid_fraction:
        example = prices[np.flatnonzero(off)[0]]
        return (f"{source}: {off.mean():.0%} of the prices are off {spec.symbol}'s tick grid of "
                f"{spec.tick_size:g} (e.g. {example:g}): are these {spec.symbol} prices? (env.instrument)")
    return None


def _tick_value_warning(spec: Any, initial_equity: float, checks: Any, source: str) -> str | None:
    """One tick on the full position worth more than ``checks.max_tick_value_fraction`` of the account."""
    tick = spec.tick_value * spec.max_contracts
    if tick > checks.max_tick_value_fraction * initial_equity:
        return (f"{source}: one tick on {spec.max_contracts} {spec.symbol} is worth {tick:,.2f}, "
                f"{tick / initial_equity:.2%} of env.initial_equity={initial_equity:,.0f} (data.checks."
                f"max_tick_value_fraction={checks.max_tick_value_fraction:g})")
    return None


def _daily_move_warning(bars: pd.DataFrame, spec: Any, initial_equity: float, checks: Any, source: str) -> str | None:
    """A typical day's move on the full position worth more than ``checks.max_daily_move_fraction``
    of the account."""
    close = bars["close"].to_numpy(np.float64)
    if close.size <= 2:
        return None
    # A day's typical move from the bar's, by the square-root-of-time rule: comparable across
    # minute, daily and monthly bars (ES moves ~1.5% of a 100,000 account a day on any of them).
    per_day = periods_per_year(bars.index) / 252.0
    move = float(np.median(np.abs(np.diff(close)))) * np.sqrt(per_day) * spec.point_value * spec.max_contracts
    if move > checks.max_daily_move_fraction * initial_equity:
        return (f"{source}: a typical day moves {move:,.0f} on {spec.max_contracts} {spec.symbol}, "
                f"{move / initial_equity:.0%} of env.initial_equity={initial_equity:,.0f} (data.checks."
                f"max_daily_move_fraction={checks.max_daily_move_fraction:g}): are these {spec.symbol} "
                "prices (env.instrument)?")
    return None


CHECKED = "instrument_checked"
"""``bars.attrs`` key: these bars are part of a file already checked (its name), by a driver that
hands slices of it to several steps (the walk-forward: train, evaluate and promote at every
decision point); the steps do not warn again, each time naming a temporary slice file."""


def warn_if_instrument_misfits(bars: pd.DataFrame, cfg: Any) -> list[str]:
    """:func:`instrument_fit_warnings` for ``cfg``'s instrument, logged; tagged on the active
    MLflow run (``data.warnings``) when there is one. Nothing for bars marked :data:`CHECKED`."""
    if bars.attrs.get(CHECKED):
        log.debug("instrument fit: %s was checked as a whole already", bars.attrs[CHECKED])
        return []
    found = instrument_fit_warnings(bars, resolve_instrument(cfg.env.instrument), cfg.env.initial_equity,
                                    cfg.data.checks, _source(bars, cfg))
    for text in found:
        log.warning(text)
    if found:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.set_tag("data.warnings", " | ".join(found)[:5000])
    return found
