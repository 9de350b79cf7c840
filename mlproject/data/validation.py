"""Validation of market data: every bar frame passes through here.

A source is first parsed into a :class:`_Table` (timestamps and float64 values per column, each
row keeping its line or row number); checks record bad rows, and the problem on the smallest
line or row becomes a :class:`DataError` naming the file and that line, with a count of the other
bad ones. Frames given directly (:func:`validate_bars`) and Parquet files share the frame-to-table
conversion here; the text readers are in :mod:`mlproject.data.formats`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

BAR_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
"""Columns of every bar frame, in this order."""

_PRICES = BAR_COLUMNS[:4]
_TICK_COLUMNS = ("price", "volume")
_ALIASES = {"vol": "volume"}
_TIME_NAMES = ("timestamp", "datetime", "time", "date")


class DataError(ValueError):
    """Bad market data; the message always names the file (or '<frame>') and the line (text files,
    1-based, counting every physical line of the file) or row (Parquet/DataFrame, 0-based)."""


def _clean_name(name: Any) -> str:
    return str(name).strip().strip("\"'").strip().lower()


# --------------------------------------------------------------------------------------------
# Parsed rows and their checks
# --------------------------------------------------------------------------------------------

_Describe = Callable[[int], str]


@dataclass
class _Table:
    """Parsed rows of one source, before validation; every row keeps its line or row number."""

    source: str
    labels: np.ndarray
    """Line (1-based) or row (0-based) number of each row, for messages."""
    unit: str
    """'line' or 'row'."""
    timestamps: np.ndarray
    """datetime64[ns]; wall time, or UTC when `tz` is set; NaT where missing or unparsable."""
    values: dict[str, np.ndarray]
    """float64 per column; NaN where missing or unparsable."""
    tz: Any = None
    checks: list[tuple[np.ndarray, _Describe]] = field(default_factory=list)
    """(bad-row mask, message for a bad row), most specific first."""

    def add(self, mask: np.ndarray, describe: _Describe) -> None:
        self.checks.append((np.asarray(mask, dtype=bool), describe))

    def stamp(self, i: int) -> str:
        ts = pd.Timestamp(self.timestamps[i])
        return str(ts.tz_localize("UTC").tz_convert(self.tz) if self.tz is not None else ts)

    def where(self, i: int) -> str:
        return f"{self.unit} {self.labels[i]}"


def _num(value: float) -> str:
    """repr of a plain float (numpy 2 would print np.float64(...))."""
    return repr(float(value))


def _raise_first_problem(table: _Table, ignore: np.ndarray | None = None) -> None:
    """DataError for the problem on the smallest line/row, counting the other bad ones."""
    if not table.checks:
        return
    bad = np.logical_or.reduce([mask for mask, _ in table.checks])
    if ignore is not None:
        bad &= ~ignore
    rows = np.flatnonzero(bad)
    if len(rows) == 0:
        return
    first = rows[np.argmin(table.labels[rows])]
    message = next(describe(first) for mask, describe in table.checks if mask[first])
    more = len(rows) - 1
    suffix = f" (and {more} more bad {table.unit}{'s' if more > 1 else ''})" if more else ""
    raise DataError(f"{table.source} {table.where(first)}: {message}{suffix}")


def _add_missing_checks(table: _Table) -> None:
    table.add(np.isnat(table.timestamps), lambda i: "missing timestamp")
    for name, col in table.values.items():
        table.add(np.isnan(col), lambda i, name=name: f"missing {name}")
        table.add(np.isinf(col), lambda i, name=name, col=col: f"{name} {_num(col[i])} is not finite")


def _add_bar_checks(table: _Table) -> None:
    """Missing and non-finite values, prices > 0, low <= open, close <= high, volume >= 0."""
    _add_missing_checks(table)
    v = table.values
    for name in _PRICES:
        col = v[name]
        table.add(col <= 0, lambda i, name=name, col=col: f"{name} {_num(col[i])} is not positive")
    o, h, low, c = (v[name] for name in _PRICES)
    table.add(h < low, lambda i: f"high {_num(h[i])} < low {_num(low[i])}")
    for name, col in (("open", o), ("close", c)):
        table.add(
            (col < low) | (col > h),
            lambda i, name=name, col=col: f"{name} {_num(col[i])} outside [low {_num(low[i])}, high {_num(h[i])}]",
        )
    _add_volume_check(table)


def _add_tick_checks(table: _Table) -> None:
    """Missing and non-finite values, price > 0, volume >= 0."""
    _add_missing_checks(table)
    price = table.values["price"]
    table.add(price <= 0, lambda i: f"price {_num(price[i])} is not positive")
    _add_volume_check(table)


def _add_volume_check(table: _Table) -> None:
    volume = table.values["volume"]
    table.add(volume < 0, lambda i: f"volume {_num(volume[i])} is negative")


def _add_order_checks(table: _Table, active: np.ndarray, allow_equal: bool) -> None:
    """Out-of-order (and, for bars, duplicate) timestamps against the previous active row."""
    ts = table.timestamps.view(np.int64)
    rows = np.flatnonzero(active & ~np.isnat(table.timestamps))
    prev = np.full(len(ts), -1)
    prev[rows[1:]] = rows[:-1]
    backwards = np.zeros(len(ts), dtype=bool)
    backwards[rows[1:]] = ts[rows[1:]] < ts[rows[:-1]]
    if not allow_equal:
        equal = np.zeros(len(ts), dtype=bool)
        equal[rows[1:]] = ts[rows[1:]] == ts[rows[:-1]]
        table.add(equal, lambda i: _describe_duplicate(table, i, prev[i]))
    table.add(
        backwards,
        lambda i: f"timestamp {table.stamp(i)} is before {table.stamp(prev[i])} on {table.where(prev[i])}"
        " (out of order)",
    )


def _describe_duplicate(table: _Table, i: int, j: int) -> str:
    same = all(table.values[name][i] == table.values[name][j] for name in table.values)
    how = "an exact duplicate (drop_duplicates=True removes these)" if same else "with different values"
    return f"duplicate timestamp {table.stamp(i)}, also on {table.where(j)}, {how}"


def _exact_duplicates(table: _Table) -> np.ndarray:
    """Rows equal to the previous row in timestamp and every value."""
    ts = table.timestamps
    same = np.zeros(len(ts), dtype=bool)
    same[1:] = (ts[1:] == ts[:-1]) & ~np.isnat(ts[1:])
    for col in table.values.values():
        same[1:] &= col[1:] == col[:-1]
    return same


def _localize(table: _Table, tz: str | None) -> None:
    """Give the table the time zone load_bars asks for (naive UTC when the source was aware)."""
    if table.tz is not None:
        if tz is None:
            logger.info("%s: timestamps carry time zone %s; converted to naive UTC", table.source, table.tz)
        table.tz = tz
        return
    if tz is None:
        return
    local = pd.DatetimeIndex(table.timestamps).tz_localize(tz, ambiguous="NaT", nonexistent="NaT")
    lost = local.isna() & ~np.isnat(table.timestamps)
    wall = table.timestamps.copy()
    table.add(lost, lambda i: f"timestamp {pd.Timestamp(wall[i])} does not exist or is ambiguous in {tz}")
    table.timestamps = local.tz_convert("UTC").tz_localize(None).as_unit("ns").to_numpy()
    table.tz = tz


def _finish_bars(table: _Table, drop_duplicates: bool) -> pd.DataFrame:
    """Validate a bar table and build the normalised frame."""
    if len(table.labels) == 0:
        raise DataError(f"{table.source}: empty (no bars)")
    dropped = _exact_duplicates(table) if drop_duplicates else np.zeros(len(table.labels), dtype=bool)
    _add_bar_checks(table)
    _add_order_checks(table, ~dropped, allow_equal=False)
    _raise_first_problem(table, ignore=dropped)
    if dropped.any():
        first = int(np.flatnonzero(dropped)[0])
        logger.warning(
            "%s: dropped %d exact duplicate bar(s), the first on %s",
            table.source,
            int(dropped.sum()),
            table.where(first),
        )
    keep = ~dropped
    return _frame(table.timestamps[keep], {name: table.values[name][keep] for name in BAR_COLUMNS}, table.tz)


def _finish_ticks(table: _Table) -> pd.DataFrame:
    """Validate a tick table: equal stamps are normal for ticks, only going backwards is an error."""
    if len(table.labels) == 0:
        raise DataError(f"{table.source}: empty (no ticks)")
    _add_tick_checks(table)
    _add_order_checks(table, np.ones(len(table.labels), dtype=bool), allow_equal=True)
    _raise_first_problem(table)
    return _frame(table.timestamps, {name: table.values[name] for name in _TICK_COLUMNS}, table.tz)


def _frame(timestamps: np.ndarray, values: dict[str, np.ndarray], tz: Any) -> pd.DataFrame:
    index = pd.DatetimeIndex(timestamps, name="timestamp")
    if tz is not None:
        index = index.tz_localize("UTC").tz_convert(tz)
    return pd.DataFrame({name: np.asarray(col, dtype=np.float64) for name, col in values.items()}, index=index)


# --------------------------------------------------------------------------------------------
# Timestamps and columns of CSV, Parquet and frames
# --------------------------------------------------------------------------------------------


def _parse_free_timestamps(raw: pd.Series) -> tuple[np.ndarray, Any]:
    """Timestamps of a CSV/Parquet text column: (datetime64[ns], tz or None); NaT where unparsable.

    One format for the whole column, guessed from its first values (so a stray different
    format is an error, not silently re-interpreted); ISO-8601 variants are all accepted.
    """
    fmt = _guess_format(raw)
    if fmt is None:
        return np.full(len(raw), np.datetime64("NaT"), dtype="datetime64[ns]"), None
    if fmt.startswith("%Y-%m-%d"):
        fmt = "ISO8601"
    aware = "%z" in fmt or raw.str.strip().str.endswith("Z").any()
    parsed = pd.to_datetime(raw.str.strip(), format=fmt, errors="coerce", utc=bool(aware))
    return _naive_utc(pd.DatetimeIndex(parsed))


def _guess_format(raw: pd.Series) -> str | None:
    from pandas.tseries.api import guess_datetime_format

    for value in raw[raw.str.strip() != ""].head(20):
        fmt = guess_datetime_format(value.strip())
        if fmt is not None:
            return fmt
    return None


def _naive_utc(index: pd.DatetimeIndex) -> tuple[np.ndarray, Any]:
    """(datetime64[ns] values, tz): UTC wall time plus the zone for aware input, else (wall time, None)."""
    tz = index.tz
    if tz is not None:
        index = index.tz_convert("UTC").tz_localize(None)
    return index.as_unit("ns").to_numpy(), tz


def _time_columns(columns: pd.Index, source: str, unit: str, where: int | None = None) -> list[str]:
    """The column(s) holding the time: timestamp, datetime, date + time, time or date."""
    by_name = {_clean_name(col): col for col in columns}
    for names in (["timestamp"], ["datetime"], ["date", "time"], ["time"], ["date"]):
        if all(name in by_name for name in names):
            return [by_name[name] for name in names]
    at = f" {unit} {where}" if where is not None else ""
    raise DataError(f"{source}{at}: no time column (one of {', '.join(_TIME_NAMES)}); columns are {list(columns)}")


def _match_columns(
    columns: pd.Index, wanted: Sequence[str], source: str, unit: str = "row", where: int | None = None
) -> dict[str, Any]:
    """Map each wanted name to the frame's column, case-insensitively (and 'vol' for 'volume')."""
    at = f" {unit} {where}" if where is not None else ""
    found: dict[str, Any] = {}
    for col in columns:
        name = _clean_name(col)
        name = _ALIASES.get(name, name)
        if name in wanted:
            if name in found:
                raise DataError(f"{source}{at}: columns {found[name]!r} and {col!r} both name {name!r}")
            found[name] = col
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DataError(f"{source}{at}: missing column(s) {', '.join(missing)}; columns are {list(columns)}")
    return {name: found[name] for name in wanted}


def _combined_time_text(frame: pd.DataFrame, times: list[str]) -> pd.Series:
    """The time as text; separate date and time columns are joined with a space."""
    parts = [frame[col].astype("str").fillna("").str.strip() for col in times]
    if len(parts) == 1:
        return parts[0]
    joined = parts[0] + " " + parts[1]
    # A missing half must read as a missing timestamp, not as a date alone.
    return joined.where((parts[0] != "") & (parts[1] != ""), "")


def _table_from_frame(
    frame: pd.DataFrame,
    source: str,
    wanted: Sequence[str],
    labels: np.ndarray,
    unit: str,
    *,
    allow_time_column: bool = False,
) -> _Table:
    """A table from a frame with a DatetimeIndex (or, if allowed, a time column) and `wanted` columns."""
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{source}: expected a pandas DataFrame, got {type(frame).__name__}")
    columns = _match_columns(frame.columns, wanted, source)
    table = _Table(source, labels, unit, np.empty(0, dtype="datetime64[ns]"), {})
    _frame_times(table, frame, source, unit, allow_time_column)
    for name, col in columns.items():
        _frame_values(table, name, frame[col])
    return table


def _frame_times(table: _Table, frame: pd.DataFrame, source: str, unit: str, allow_time_column: bool) -> None:
    """The table's timestamps from the frame's DatetimeIndex, or (if allowed) its time column(s)."""
    if isinstance(frame.index, pd.DatetimeIndex):
        table.timestamps, table.tz = _naive_utc(frame.index)
    elif allow_time_column:
        _time_from_columns(table, frame, _time_columns(frame.columns, source, unit))
    else:
        raise DataError(
            f"{source}: the index must be a DatetimeIndex (got {type(frame.index).__name__}); "
            "set_index() the time column first"
        )


def _time_from_columns(table: _Table, frame: pd.DataFrame, times: list[str]) -> None:
    if len(times) == 1 and pd.api.types.is_datetime64_any_dtype(frame[times[0]]):
        table.timestamps, table.tz = _naive_utc(pd.DatetimeIndex(frame[times[0]]))
        return
    text = _combined_time_text(frame, times)
    table.timestamps, table.tz = _parse_free_timestamps(text)
    table.add((text != "").to_numpy() & np.isnat(table.timestamps), lambda i: f"bad timestamp {text.iloc[i]!r}")


def _frame_values(table: _Table, name: str, col: pd.Series) -> None:
    """float64 values of one column; text that is not a number is recorded as such."""
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        table.values[name] = col.to_numpy(dtype=np.float64, na_value=np.nan)
        return
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    given = (col.astype("str").fillna("").str.strip() != "").to_numpy()
    table.values[name] = values
    table.add(given & np.isnan(values), lambda i: f"{name} {col.iloc[i]!r} is not a number")


# --------------------------------------------------------------------------------------------
# Public validation
# --------------------------------------------------------------------------------------------


def validate_bars(
    df: pd.DataFrame,
    source: str = "<frame>",
    *,
    line_numbers: Sequence[int] | None = None,
    drop_duplicates: bool = False,
) -> pd.DataFrame:
    """Validate a bar frame (same shape as load_bars returns, or any frame with a DatetimeIndex and
    the 5 columns in any case); returns the normalised frame. Errors name `source` and, if
    line_numbers is given, the line of the offending row, else the row number.

    The normalised frame has a nanosecond DatetimeIndex named 'timestamp' (its time zone, if any,
    is kept), float64 columns exactly BAR_COLUMNS, and the input's attrs; extra columns are dropped.
    """
    if line_numbers is None:
        labels, unit = np.arange(len(df)), "row"
    else:
        labels, unit = np.asarray(line_numbers, dtype=np.int64), "line"
        if len(labels) != len(df):
            raise ValueError(f"line_numbers has {len(labels)} entries for {len(df)} rows")
    table = _table_from_frame(df, source, BAR_COLUMNS, labels, unit)
    bars = _finish_bars(table, drop_duplicates)
    bars.attrs.update(df.attrs)
    return bars


def aggregate_ticks(ticks: pd.DataFrame, period: str = "1min") -> pd.DataFrame:
    """ticks: DatetimeIndex, columns 'price', 'volume'. NT8 stamps a bar with its END time, so use
    closed='right', label='right'; periods without ticks produce no bar (never a NaN bar).

    The ticks are validated first (price > 0, volume >= 0, stamps never going backwards; equal
    stamps are fine) and a DataError names the first bad row.
    """
    table = _table_from_frame(ticks, "<frame>", _TICK_COLUMNS, np.arange(len(ticks)), "row")
    return _aggregate(_finish_ticks(table), period)


def _aggregate(ticks: pd.DataFrame, period: str) -> pd.DataFrame:
    # NT8 stamps a bar with its end: a trade at exactly 09:31:00 closes the 09:30-09:31 bar.
    price = ticks["price"].resample(period, closed="right", label="right")
    bars = price.ohlc()
    bars["volume"] = ticks["volume"].resample(period, closed="right", label="right").sum()
    bars = bars[price.count() > 0]
    bars.index = pd.DatetimeIndex(bars.index, name="timestamp", freq=None).as_unit("ns")
    return bars.astype(np.float64)


def infer_bar_period(df: pd.DataFrame) -> pd.Timedelta:
    """Median spacing of the index (daily bars -> 1 day). Needs >= 2 bars, else DataError.

    The lower median of an even count, so the result is always a spacing that occurs in the data.
    """
    if not isinstance(df.index, pd.DatetimeIndex):
        raise DataError(f"<frame>: the index must be a DatetimeIndex (got {type(df.index).__name__})")
    if len(df) < 2:
        raise DataError(f"<frame>: need at least 2 bars to infer the bar period, got {len(df)}")
    spacing = np.sort(np.diff(df.index.as_unit("ns").asi8))
    median = int(spacing[(len(spacing) - 1) // 2])
    if median <= 0:
        raise DataError("<frame>: timestamps are not increasing; cannot infer the bar period")
    return pd.Timedelta(median, unit="ns")


def period_text(period: pd.Timedelta) -> str:
    """``1min``, ``1h``, ``1D`` rather than ``0 days 00:01:00``."""
    from pandas.tseries.frequencies import to_offset

    if period >= pd.Timedelta(days=1) and period % pd.Timedelta(days=1) == pd.Timedelta(0):
        return f"{period.days}D"
    try:
        text = to_offset(period).freqstr
    except ValueError:
        return str(period)
    return text if text[:1].isdigit() else f"1{text}"
