"""Market data: loaders, validation, synthetic bars and time-ordered splits.

One module per job: :mod:`~mlproject.data.formats` (NT8, CSV and Parquet readers,
:func:`load_bars`), :mod:`~mlproject.data.validation` (the checks, :func:`validate_bars`, ticks to
bars), :mod:`~mlproject.data.synthetic` and :mod:`~mlproject.data.splits`. This package re-exports
the public names and adds :func:`load_source` (the bars a config names).

Every loader returns the same frame: a tz-naive (unless asked) ``DatetimeIndex`` named
``timestamp`` (nanosecond unit, strictly increasing, bar END times as NinjaTrader 8 stamps
them) and float64 columns exactly :data:`BAR_COLUMNS`. Nothing is silently dropped: every problem
is a :class:`DataError` naming the file and the first offending line (text, 1-based physical
line) or row (frames and Parquet, 0-based).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from mlproject.data.formats import detect_format, load_bars
from mlproject.data.splits import Splits, split_bars, walk_forward
from mlproject.data.synthetic import momentum_bars, synthetic_bars
from mlproject.data.validation import (BAR_COLUMNS, DataError, aggregate_ticks, infer_bar_period, period_text,
                                      validate_bars)

__all__ = ["BAR_COLUMNS", "DataError", "Splits", "aggregate_ticks", "detect_format", "infer_bar_period",
           "load_bars", "load_source", "momentum_bars", "period_text", "split_bars", "synthetic_bars", "validate_bars", "walk_forward"]


def load_source(cfg: Any) -> pd.DataFrame:
    """The bars named by ``cfg.data.source`` (a file or 'synthetic'), validated."""
    data = cfg.data
    if data.source == "synthetic" and data.synthetic.momentum is not None:
        s = data.synthetic
        bars = momentum_bars(s.n_bars, s.seed, s.momentum, s.momentum_flip_at)
        bars.attrs.update(source="synthetic-momentum", format="synthetic")
        return bars
    if data.source == "synthetic":
        s = data.synthetic
        bars = synthetic_bars(s.n_bars, seed=s.seed, bar_minutes=s.bar_minutes, tick_size=s.tick_size,
                              start_price=s.start_price, start=s.start, annual_vol=s.annual_vol)
        bars.attrs.update(source="synthetic", format="synthetic")
        return bars
    return load_bars(data.source, tick_period=data.tick_period, drop_duplicates=data.drop_duplicates, tz=data.tz)
