"""Time-ordered splits of bars: train/validation/test with gaps, and walk-forward windows."""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd


class Splits(NamedTuple):
    """Contiguous, time-ordered parts of a bar frame."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


def split_bars(
    df: pd.DataFrame, train: float = 0.7, validation: float = 0.15, test: float = 0.15, *, gap: int = 0
) -> Splits:
    """Time-ordered contiguous splits, never overlapping; `gap` bars dropped between consecutive
    splits (embargo). Fractions must be >= 0 and sum to 1 (tolerance 1e-9) else ValueError naming
    them; any non-empty fraction that yields 0 bars -> ValueError.

    The gap sits between consecutive non-empty parts; the bars left over by rounding go to the
    last non-empty part.
    """
    fractions = {"train": train, "validation": validation, "test": test}
    _check_fractions(fractions)
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    sizes = _split_sizes(len(df), fractions, gap)
    parts: dict[str, pd.DataFrame] = {}
    start = 0
    for name, size in sizes.items():
        parts[name] = df.iloc[start : start + size]
        if size:
            start += size + gap
    return Splits(**parts)


def _check_fractions(fractions: dict[str, float]) -> None:
    shown = ", ".join(f"{name}={value!r}" for name, value in fractions.items())
    total = sum(fractions.values())
    if not all(math.isfinite(v) and v >= 0 for v in fractions.values()) or abs(total - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {shown} (sum {total!r})")


def _split_sizes(n: int, fractions: dict[str, float], gap: int) -> dict[str, int]:
    used = [name for name, value in fractions.items() if value > 0]
    available = n - gap * (len(used) - 1)
    # The epsilon keeps 0.7 * 100 = 70.00000000000001 and 0.29 * 100 = 28.999999999999996 exact.
    sizes = {name: (math.floor(value * available + 1e-9) if value > 0 else 0) for name, value in fractions.items()}
    sizes[used[-1]] += max(available, 0) - sum(sizes.values())
    for name in used:
        if sizes[name] <= 0:
            raise ValueError(
                f"{name}={fractions[name]!r} of {n} bars (after {len(used) - 1} gap(s) of {gap}) yields 0 bars"
            )
    return sizes


def walk_forward(
    df: pd.DataFrame,
    train_bars: int,
    test_bars: int,
    *,
    validation_bars: int = 0,
    step: int | None = None,
    gap: int = 0,
) -> list[Splits]:
    """Rolling windows: train, (gap), validation, (gap), test; the next window starts `step` bars later
    (default test_bars). Within a window the parts never overlap; test parts of consecutive windows
    never overlap when step >= test_bars. Too little data for one window -> ValueError.

    Without a validation part there is a single gap between train and test, and `validation` is an
    empty frame. Only whole windows are returned.
    """
    step = test_bars if step is None else step
    window = _window_bars(len(df), train_bars, test_bars, validation_bars, step, gap)
    return [
        _window(df, start, train_bars, validation_bars, test_bars, gap)
        for start in range(0, len(df) - window + 1, step)
    ]


def _window_bars(n_bars: int, train_bars: int, test_bars: int, validation_bars: int, step: int, gap: int) -> int:
    """Bars one :func:`walk_forward` window spans; ValueError for a size out of range or a
    window longer than the ``n_bars`` there are."""
    for name, value, least in (
        ("train_bars", train_bars, 1),
        ("test_bars", test_bars, 1),
        ("validation_bars", validation_bars, 0),
        ("step", step, 1),
        ("gap", gap, 0),
    ):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    window = train_bars + gap + (validation_bars + gap if validation_bars else 0) + test_bars
    if window > n_bars:
        raise ValueError(
            f"walk_forward needs {window} bars for one window (train, gaps, validation, test), got {n_bars}"
        )
    return window


def _window(df: pd.DataFrame, start: int, train: int, validation: int, test: int, gap: int) -> Splits:
    pos = start + train + gap
    val = df.iloc[pos : pos + validation]
    if validation:
        pos += validation + gap
    return Splits(df.iloc[start : start + train], val, df.iloc[pos : pos + test])
