"""Tests of mlproject.data: NT8/CSV/Parquet loaders, validation errors, synthetic bars, splits.

Every file is written under tmp_path; expected bars are hand-computed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlproject.data import (
    BAR_COLUMNS,
    DataError,
    Splits,
    aggregate_ticks,
    detect_format,
    infer_bar_period,
    load_bars,
    split_bars,
    synthetic_bars,
    validate_bars,
    walk_forward,
)

MINUTE_LINES = [
    "20240102 093100;4750.25;4751;4749.5;4750.75;1234",
    "20240102 093200;4750.75;4752;4750.5;4751.5;800",
    "20240102 093300;4751.5;4751.75;4748;4748.25;950",
    "20240102 093400;4748.25;4749;4747.75;4748.5;600",
    "20240102 093500;4748.5;4750;4748.5;4749.75;700",
]


def write(tmp_path: Path, name: str, lines: list[str], *, newline: str = "\n", bom: bool = False) -> Path:
    """A text file of `lines`, each ended by `newline` (so the file ends with one)."""
    data = "".join(line + newline for line in lines).encode("utf-8")
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def bars_frame(rows: list[tuple[str, float, float, float, float, float]]) -> pd.DataFrame:
    index = pd.DatetimeIndex([pd.Timestamp(r[0]) for r in rows], name="timestamp").as_unit("ns")
    return pd.DataFrame([r[1:] for r in rows], index=index, columns=list(BAR_COLUMNS), dtype=np.float64)


EXPECTED_MINUTE = bars_frame(
    [
        ("2024-01-02 09:31", 4750.25, 4751, 4749.5, 4750.75, 1234),
        ("2024-01-02 09:32", 4750.75, 4752, 4750.5, 4751.5, 800),
        ("2024-01-02 09:33", 4751.5, 4751.75, 4748, 4748.25, 950),
        ("2024-01-02 09:34", 4748.25, 4749, 4747.75, 4748.5, 600),
        ("2024-01-02 09:35", 4748.5, 4750, 4748.5, 4749.75, 700),
    ]
)


def error_at(path_or_name: str | Path, where: str) -> str:
    """Regex for a DataError message naming the file and the line/row."""
    return re.escape(f"{path_or_name} {where}:")


# ----------------------------------------------------------------------------------------------
# NT8 formats and detection
# ----------------------------------------------------------------------------------------------


def test_nt8_minute_parses_to_expected_bars(tmp_path):
    path = write(tmp_path, "ES.txt", MINUTE_LINES)
    bars = load_bars(path)
    pd.testing.assert_frame_equal(bars, EXPECTED_MINUTE)
    assert bars.attrs == {"source": str(path), "format": "nt8_minute"}
    assert bars.index.is_monotonic_increasing and bars.index.tz is None


def test_minute_file_with_crlf_bom_and_csv_extension_is_still_nt8_minute(tmp_path):
    path = write(tmp_path, "ES.csv", MINUTE_LINES, newline="\r\n", bom=True)
    assert detect_format(path) == "nt8_minute"
    pd.testing.assert_frame_equal(load_bars(path), EXPECTED_MINUTE)


def test_nt8_daily_parses(tmp_path):
    lines = ["20240102;4750;4790.5;4700.25;4760;1500000", "20240103;4760;4770;4720;4725.5;1400000"]
    path = write(tmp_path, "ES.Day.txt", lines)
    assert detect_format(path) == "nt8_daily"
    expected = bars_frame(
        [("2024-01-02", 4750, 4790.5, 4700.25, 4760, 1500000), ("2024-01-03", 4760, 4770, 4720, 4725.5, 1400000)]
    )
    pd.testing.assert_frame_equal(load_bars(path), expected)


TICKS = [
    # (stamp, price, volume)
    ("20240102 093000 0000000", 100.0, 1),  # exactly 09:30:00 -> closes the bar ending 09:30
    ("20240102 093000 0000001", 101.0, 2),  # 100 ns later -> first tick of the bar ending 09:31
    ("20240102 093030 5000000", 103.0, 3),
    ("20240102 093030 5000000", 102.0, 1),  # same stamp: normal for ticks
    ("20240102 093100 0000000", 99.0, 4),  # exactly 09:31:00 -> still the bar ending 09:31
    ("20240102 093300 0000000", 102.0, 5),  # nothing traded in the bar ending 09:32 -> no bar
]
EXPECTED_TICK_BARS = bars_frame(
    [
        ("2024-01-02 09:30", 100, 100, 100, 100, 1),
        ("2024-01-02 09:31", 101, 103, 99, 99, 10),
        ("2024-01-02 09:33", 102, 102, 102, 102, 5),
    ]
)


def test_nt8_tick_three_fields_aggregates_right_closed(tmp_path):
    path = write(tmp_path, "ES.Last.txt", [f"{t};{p};{v}" for t, p, v in TICKS])
    assert detect_format(path) == "nt8_tick"
    pd.testing.assert_frame_equal(load_bars(path), EXPECTED_TICK_BARS)


def test_nt8_tick_five_fields_uses_last_as_price(tmp_path):
    lines = [f"{t};{p};{p - 0.25};{p + 0.25};{v}" for t, p, v in TICKS]
    path = write(tmp_path, "ES.Last.txt", lines, newline="\r\n", bom=True)
    bars = load_bars(path)
    pd.testing.assert_frame_equal(bars, EXPECTED_TICK_BARS)
    assert bars.attrs["format"] == "nt8_tick"


def test_tick_period_and_fractional_stamps(tmp_path):
    path = write(tmp_path, "t.txt", [f"{t};{p};{v}" for t, p, v in TICKS])
    bars = load_bars(path, tick_period="5min")
    expected = bars_frame([("2024-01-02 09:30", 100, 100, 100, 100, 1), ("2024-01-02 09:35", 101, 103, 99, 102, 15)])
    pd.testing.assert_frame_equal(bars, expected)


def test_aggregate_ticks_never_makes_nan_bars():
    index = pd.DatetimeIndex(["2024-01-02 09:30:10", "2024-01-02 09:45:00", "2024-01-02 09:45:00.5"])
    ticks = pd.DataFrame({"Price": [10.0, 11.0, 9.5], "Volume": [1, 2, 3]}, index=index)
    bars = aggregate_ticks(ticks, "1min")
    assert list(bars.index) == [pd.Timestamp(f"2024-01-02 09:{m}") for m in (31, 45, 46)]
    assert bars.loc["2024-01-02 09:45"].tolist() == [11.0, 11.0, 11.0, 11.0, 2.0]
    assert bars.loc["2024-01-02 09:46"].tolist() == [9.5, 9.5, 9.5, 9.5, 3.0]
    assert not bars.isna().any().any()


def test_unknown_and_empty_files_are_data_errors(tmp_path):
    unknown = write(tmp_path, "notes.txt", ["", "hello world", "more"])
    with pytest.raises(DataError, match=error_at(unknown, "line 2") + ".*unknown format"):
        detect_format(unknown)
    empty = write(tmp_path, "empty.txt", ["", "  "])
    with pytest.raises(DataError, match=re.escape(f"{empty}: empty")):
        load_bars(empty)
    with pytest.raises(DataError, match=re.escape(f"{empty}: empty")):
        load_bars(empty, fmt="nt8_minute")


# ----------------------------------------------------------------------------------------------
# CSV and Parquet
# ----------------------------------------------------------------------------------------------


def test_csv_comma_with_extra_columns(tmp_path):
    lines = ["timestamp,open,high,low,close,volume,symbol"]
    lines += [f"{ts:%Y-%m-%d %H:%M:%S},{o},{h},{lo},{c},{v},ES" for ts, (o, h, lo, c, v) in EXPECTED_MINUTE.iterrows()]
    path = write(tmp_path, "bars.csv", lines)
    assert detect_format(path) == "csv"
    bars = load_bars(path)
    pd.testing.assert_frame_equal(bars, EXPECTED_MINUTE)
    assert bars.attrs["format"] == "csv"


def test_csv_semicolon_upper_case_separate_date_time_and_vol(tmp_path):
    lines = ["DATE;TIME;OPEN;HIGH;LOW;CLOSE;VOL"]
    rows = EXPECTED_MINUTE.iterrows()
    lines += [f"{ts:%Y-%m-%d};{ts:%H:%M:%S};{o};{h};{lo};{c};{v:.0f}" for ts, (o, h, lo, c, v) in rows]
    path = write(tmp_path, "bars.data", lines, newline="\r\n", bom=True)
    pd.testing.assert_frame_equal(load_bars(path), EXPECTED_MINUTE)


def test_csv_tab_separated(tmp_path):
    lines = ["Datetime\tOpen\tHigh\tLow\tClose\tVolume"]
    rows = EXPECTED_MINUTE.iterrows()
    lines += [f"{ts:%Y-%m-%dT%H:%M:%S}\t{o}\t{h}\t{lo}\t{c}\t{v}" for ts, (o, h, lo, c, v) in rows]
    pd.testing.assert_frame_equal(load_bars(write(tmp_path, "bars.tsv", lines)), EXPECTED_MINUTE)


def test_a_pandas_to_csv_file_with_an_unnamed_date_column_loads(tmp_path):
    """pandas writes a time index without a name as an empty first header field (the GOOG daily
    file that ships with backtesting.py looks like this): that column is the time."""
    frame = EXPECTED_MINUTE.rename(columns=str.title)
    frame.index.name = None
    path = tmp_path / "GOOG.csv"
    frame.to_csv(path)
    assert path.read_text().startswith(",Open,High,Low,Close,Volume\n")
    assert detect_format(path) == "csv"
    pd.testing.assert_frame_equal(load_bars(path), EXPECTED_MINUTE)
    # An empty first field beside a named time column is a spare column, not the time.
    lines = [",timestamp,open,high,low,close,volume"]
    lines += [f"{k},{ts:%Y-%m-%d %H:%M:%S},{o},{h},{lo},{c},{v}" for k, (ts, (o, h, lo, c, v))
              in enumerate(EXPECTED_MINUTE.iterrows())]
    pd.testing.assert_frame_equal(load_bars(write(tmp_path, "spare.csv", lines)), EXPECTED_MINUTE)


def test_parquet_with_time_column_and_with_datetime_index(tmp_path):
    with_column = EXPECTED_MINUTE.reset_index().rename(columns=str.upper)
    path = tmp_path / "bars.bin"  # content, not extension, says parquet
    with_column.to_parquet(path)
    assert detect_format(path) == "parquet"
    pd.testing.assert_frame_equal(load_bars(path), EXPECTED_MINUTE)
    indexed = tmp_path / "indexed.parquet"
    EXPECTED_MINUTE.to_parquet(indexed)
    bars = load_bars(indexed)
    pd.testing.assert_frame_equal(bars, EXPECTED_MINUTE)
    assert bars.attrs["format"] == "parquet"


def test_tz_localizes_the_index(tmp_path):
    bars = load_bars(write(tmp_path, "ES.txt", MINUTE_LINES), tz="America/New_York")
    assert str(bars.index.tz) == "America/New_York"
    assert bars.index[0] == pd.Timestamp("2024-01-02 09:31", tz="America/New_York")


def test_tz_aware_source_is_converted(tmp_path):
    path = write(tmp_path, "utc.csv", ["time,open,high,low,close,volume", "2024-01-02T14:31:00Z,1,2,1,2,3"])
    assert load_bars(path).index[0] == pd.Timestamp("2024-01-02 14:31")  # naive UTC
    assert load_bars(path, tz="America/New_York").index[0] == pd.Timestamp("2024-01-02 09:31", tz="America/New_York")


def test_wall_time_missing_in_tz_names_the_line(tmp_path):
    lines = ["20240310 013000;1;2;1;2;3", "20240310 023000;1;2;1;2;3", "20240310 033000;1;2;1;2;3"]
    path = write(tmp_path, "dst.txt", lines)
    with pytest.raises(DataError, match=error_at(path, "line 2") + " .* does not exist or is ambiguous"):
        load_bars(path, tz="America/New_York")


def test_garbled_first_line_is_reported_with_its_line_not_as_unknown_format(tmp_path):
    path = write(tmp_path, "bars.txt", ["#export", *MINUTE_LINES])
    assert detect_format(path) == "nt8_minute"
    with pytest.raises(DataError, match=error_at(path, "line 1") + " expected 6 ';'-separated fields, got 1$"):
        load_bars(path)


# ----------------------------------------------------------------------------------------------
# Validation errors: file name, line number, what is wrong
# ----------------------------------------------------------------------------------------------

BAD_THIRD_LINES = {
    "too few fields": ("20240102 093300;4751.5;4751.75;4748;4748.25", r"expected 6 ';'-separated fields, got 5"),
    "too many fields": ("20240102 093300;4751.5;4751.75;4748;4748.25;950;1", r"expected 6 ';'-separated fields, got 7"),
    "bad timestamp": ("20240102 0933;4751.5;4751.75;4748;4748.25;950", r"bad timestamp '20240102 0933'"),
    "impossible date": ("20240230 093300;4751.5;4751.75;4748;4748.25;950", r"bad timestamp '20240230 093300'"),
    "non-numeric": ("20240102 093300;4751.5;abc;4748;4748.25;950", r"high 'abc' is not a number"),
    "missing value": ("20240102 093300;4751.5;;4748;4748.25;950", r"missing high"),
    "non-finite": ("20240102 093300;4751.5;inf;4748;4748.25;950", r"high inf is not finite"),
    "non-positive": ("20240102 093300;4751.5;4751.75;-1;4748.25;950", r"low -1\.0 is not positive"),
    "high < low": ("20240102 093300;4751.5;4749;4750;4750;950", r"high 4749\.0 < low 4750\.0"),
    "open outside": (
        "20240102 093300;4760;4751.75;4748;4748.25;950",
        r"open 4760\.0 outside \[low 4748\.0, high 4751\.75\]",
    ),
    "close outside": ("20240102 093300;4751.5;4751.75;4748;4747;950", r"close 4747\.0 outside"),
    "negative volume": ("20240102 093300;4751.5;4751.75;4748;4748.25;-5", r"volume -5\.0 is negative"),
    "duplicate timestamp": (
        "20240102 093200;4751.5;4751.75;4748;4748.25;950",
        r"duplicate timestamp 2024-01-02 09:32:00, also on line 2, with different values",
    ),
    "out of order": (
        "20240102 093000;4751.5;4751.75;4748;4748.25;950",
        r"timestamp 2024-01-02 09:30:00 is before 2024-01-02 09:32:00 on line 2 \(out of order\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_THIRD_LINES))
def test_each_problem_names_file_and_line(tmp_path, case):
    bad_line, message = BAD_THIRD_LINES[case]
    path = write(tmp_path, "bars.txt", [MINUTE_LINES[0], MINUTE_LINES[1], bad_line, *MINUTE_LINES[3:]])
    with pytest.raises(DataError, match=error_at(path, "line 3") + " " + message):
        load_bars(path)


def test_first_bad_line_is_reported_and_the_rest_counted(tmp_path):
    lines = list(MINUTE_LINES)
    lines[4] = "20240102 093500;x;4750;4748.5;4749.75;700"  # unparsable, line 5
    lines[1] = "20240102 093200;4750.75;4752;4750.5;4751.5;-1"  # value problem, line 2
    lines[2] = "20240102 093300;4751.5;4751.75;4748"  # wrong field count, line 3
    path = write(tmp_path, "bars.txt", lines)
    message = r" volume -1\.0 is negative \(and 2 more bad lines\)$"
    with pytest.raises(DataError, match=error_at(path, "line 2") + message):
        load_bars(path)


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    lines = ["", MINUTE_LINES[0], "", "   ", MINUTE_LINES[1], "20240102 093300;4751.5;4749;4750;4750;950", ""]
    path = write(tmp_path, "gappy.txt", lines, newline="\r\n")
    with pytest.raises(DataError, match=error_at(path, "line 6") + r" high 4749\.0 < low 4750\.0$"):
        load_bars(path)
    good = write(tmp_path, "good.txt", ["", *MINUTE_LINES[:2], "", *MINUTE_LINES[2:], "", ""])
    pd.testing.assert_frame_equal(load_bars(good), EXPECTED_MINUTE)


def test_line_of_bare_separators_is_not_a_blank_line(tmp_path):
    path = write(tmp_path, "bars.txt", [*MINUTE_LINES[:2], ";;;;;", *MINUTE_LINES[2:]])
    with pytest.raises(DataError, match=error_at(path, "line 3") + " missing timestamp"):
        load_bars(path)


def test_drop_duplicates_repairs_exact_duplicates_and_logs(tmp_path, caplog):
    lines = [MINUTE_LINES[0], MINUTE_LINES[1], MINUTE_LINES[1], MINUTE_LINES[1], *MINUTE_LINES[2:]]
    path = write(tmp_path, "dups.txt", lines)
    message = r" duplicate timestamp .* exact duplicate .*\(and 1 more bad line\)"
    with pytest.raises(DataError, match=error_at(path, "line 3") + message):
        load_bars(path)
    with caplog.at_level(logging.WARNING, logger="mlproject.data"):
        bars = load_bars(path, drop_duplicates=True)
    pd.testing.assert_frame_equal(bars, EXPECTED_MINUTE)
    assert any("dropped 2 exact duplicate" in r.message and "line 3" in r.message for r in caplog.records)


def test_drop_duplicates_does_not_hide_conflicting_duplicates(tmp_path):
    conflicting = MINUTE_LINES[1].replace(";800", ";801")
    path = write(tmp_path, "dups.txt", [MINUTE_LINES[0], MINUTE_LINES[1], conflicting, *MINUTE_LINES[2:]])
    with pytest.raises(DataError, match=error_at(path, "line 3") + " duplicate timestamp .* with different values"):
        load_bars(path, drop_duplicates=True)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (
            "20240102 093029 0000000;100;1",
            r"timestamp 2024-01-02 09:30:29 is before 2024-01-02 09:30:30\.500000 on line 2 \(out of order\)",
        ),
        ("20240102 093031 0000000;0;1", r"price 0\.0 is not positive"),
        ("20240102 093031 0000000;100;-1", r"volume -1\.0 is negative"),
        (
            "20240102 093031 000000;100;1",
            r"bad timestamp '20240102 093031 000000' \(expected yyyyMMdd HHmmss fffffff\)",
        ),
    ],
)
def test_tick_problems_name_file_and_line(tmp_path, bad_line, message):
    lines = ["20240102 093030 0000000;100;1", "20240102 093030 5000000;100.25;2", bad_line]
    lines.append("20240102 093100 0000000;100;1")
    path = write(tmp_path, "ticks.txt", lines)
    with pytest.raises(DataError, match=error_at(path, "line 3") + " " + message):
        load_bars(path)


def test_csv_errors_count_the_header_line(tmp_path):
    lines = ["time,open,high,low,close,volume", "2024-01-02 09:31:00,1,2,1,2,5", "", "2024-01-02 09:32:00,1,2,1,3,5"]
    path = write(tmp_path, "bars.csv", lines)
    with pytest.raises(DataError, match=error_at(path, "line 4") + r" close 3\.0 outside"):
        load_bars(path)
    lines[3] = "2024-01-02 09:32:00,1,2,1,2,5,oops"
    path = write(tmp_path, "wide.csv", lines)
    with pytest.raises(DataError, match=error_at(path, "line 4") + " more than the 6 fields"):
        load_bars(path)
    lines[3] = "not a time,1,2,1,2,5"
    path = write(tmp_path, "badtime.csv", lines)
    with pytest.raises(DataError, match=error_at(path, "line 4") + " bad timestamp 'not a time'"):
        load_bars(path)
    path = write(tmp_path, "nohigh.csv", ["time,open,low,close,volume", "2024-01-02 09:31:00,1,1,2,5"])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*missing column.*high"):
        load_bars(path)


def test_parquet_errors_name_the_row(tmp_path):
    frame = EXPECTED_MINUTE.copy()
    frame.iloc[2, frame.columns.get_loc("volume")] = np.nan
    path = tmp_path / "bars.parquet"
    frame.to_parquet(path)
    with pytest.raises(DataError, match=error_at(path, "row 2") + " missing volume$"):
        load_bars(path)


def test_validate_bars_normalises_and_reports_rows_or_lines():
    frame = EXPECTED_MINUTE.rename(columns=str.title).assign(Extra=1)
    frame = frame[["Close", "Open", "Low", "High", "Volume", "Extra"]]
    frame.index = frame.index.as_unit("us")
    pd.testing.assert_frame_equal(validate_bars(frame), EXPECTED_MINUTE)
    broken = EXPECTED_MINUTE.copy()
    broken.iloc[3, 0] = 1.0
    with pytest.raises(DataError, match=re.escape("<frame> row 3: open 1.0 outside")):
        validate_bars(broken)
    with pytest.raises(DataError, match=re.escape("mine.txt line 40: open 1.0 outside")):
        validate_bars(broken, "mine.txt", line_numbers=[10, 20, 30, 40, 50])
    with pytest.raises(DataError, match=re.escape("<frame>: missing column(s) volume")):
        validate_bars(EXPECTED_MINUTE.drop(columns="volume"))
    with pytest.raises(DataError, match="DatetimeIndex"):
        validate_bars(EXPECTED_MINUTE.reset_index())


def test_infer_bar_period():
    assert infer_bar_period(EXPECTED_MINUTE) == pd.Timedelta("1min")
    days = pd.DatetimeIndex(pd.bdate_range("2024-01-01", periods=10), name="timestamp")
    daily = pd.DataFrame(1.0, index=days, columns=list(BAR_COLUMNS))
    assert infer_bar_period(daily) == pd.Timedelta("1D")
    with pytest.raises(DataError, match="at least 2 bars"):
        infer_bar_period(EXPECTED_MINUTE.iloc[:1])


def test_a_200k_line_minute_file_loads(tmp_path):
    n = 200_000
    stamps = pd.date_range("2020-01-01", periods=n, freq="min").strftime("%Y%m%d %H%M%S")
    close = 4500 + np.round(np.cumsum(np.random.default_rng(0).standard_normal(n))) * 0.25
    text = pd.DataFrame({"t": stamps, "o": close, "h": close + 1, "l": close - 1, "c": close, "v": 100})
    path = tmp_path / "big.txt"
    text.to_csv(path, sep=";", header=False, index=False, lineterminator="\r\n")
    bars = load_bars(path)
    assert len(bars) == n and bars.index.is_monotonic_increasing
    assert bars["close"].iloc[-1] == close[-1]


# ----------------------------------------------------------------------------------------------
# Synthetic bars
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic() -> pd.DataFrame:
    return synthetic_bars(5000, seed=7)


def test_synthetic_is_seeded_and_valid(synthetic):
    pd.testing.assert_frame_equal(synthetic, synthetic_bars(5000, seed=7))
    assert not synthetic_bars(5000, seed=8)["close"].equals(synthetic["close"])
    pd.testing.assert_frame_equal(validate_bars(synthetic), synthetic)
    assert list(synthetic.columns) == list(BAR_COLUMNS) and len(synthetic) == 5000
    for column in ("open", "high", "low", "close"):
        ticks = synthetic[column].to_numpy() / 0.25
        np.testing.assert_array_equal(ticks, np.round(ticks))


def test_synthetic_stamps_are_weekday_session_bar_ends(synthetic):
    index = synthetic.index
    assert (index.day_of_week < 5).all()
    minutes = index.hour * 60 + index.minute
    assert minutes.min() == 9 * 60 + 31 and minutes.max() == 16 * 60
    assert (index.second == 0).all()
    five = synthetic_bars(200, bar_minutes=5, tick_size=0.1, start="2024-01-06")  # a Saturday
    assert five.index[0] == pd.Timestamp("2024-01-08 09:35")
    ticks = five["close"].to_numpy() / 0.1
    np.testing.assert_allclose(ticks, np.round(ticks), atol=1e-6)


def test_synthetic_has_overnight_gaps_and_u_shaped_volume(synthetic):
    day = synthetic.index.normalize()
    first = ~day.duplicated()
    opens, prev_close = synthetic["open"].to_numpy()[first][1:], synthetic["close"].shift().to_numpy()[first][1:]
    assert (opens != prev_close).mean() > 0.8  # the session open jumps from yesterday's close
    minutes = synthetic.index.hour * 60 + synthetic.index.minute
    edge = synthetic["volume"][(minutes < 600) | (minutes > 930)].mean()
    midday = synthetic["volume"][(minutes > 720) & (minutes < 810)].mean()
    assert edge > 1.8 * midday


def test_synthetic_has_high_and_low_volatility_stretches(synthetic):
    intrabar = np.log(synthetic["close"] / synthetic["open"])
    rolling = intrabar.rolling(200).std().dropna()
    assert rolling.max() > 2 * rolling.min()


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def frame_of(n: int) -> pd.DataFrame:
    index = pd.date_range("2024-01-02 09:31", periods=n, freq="min", name="timestamp")
    return pd.DataFrame({"close": np.arange(n, dtype=float)}, index=index)


def test_split_bars_sizes_order_and_gap():
    df = frame_of(100)
    splits = split_bars(df)
    assert isinstance(splits, Splits)
    assert [len(p) for p in splits] == [70, 15, 15]
    assert pd.concat(splits).index.equals(df.index)
    gapped = split_bars(df, 0.6, 0.2, 0.2, gap=5)
    assert [len(p) for p in gapped] == [54, 18, 18]
    assert gapped.train.index[-1] + pd.Timedelta("6min") == gapped.validation.index[0]
    assert gapped.validation.index[-1] + pd.Timedelta("6min") == gapped.test.index[0]
    assert gapped.test.index[-1] == df.index[-1]
    no_validation = split_bars(df, 0.8, 0.0, 0.2, gap=2)
    assert [len(p) for p in no_validation] == [78, 0, 20]


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.7, 0.2, 0.2), "sum to 1, got train=0.7, validation=0.2, test=0.2"),
        ((1.2, -0.1, -0.1), "must be >= 0"),
        ((0.98, 0.01, 0.01), "validation=0.01 of 50 bars .* yields 0 bars"),
    ],
)
def test_split_bars_rejects_bad_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        split_bars(frame_of(50), *fractions)


def test_walk_forward_windows():
    df = frame_of(100)
    windows = walk_forward(df, 40, 10, validation_bars=5, gap=2)
    assert len(windows) == 5  # window = 40 + 2 + 5 + 2 + 10 = 59 bars; starts 0, 10, .., 40
    for k, w in enumerate(windows):
        assert [len(p) for p in w] == [40, 5, 10]
        assert w.train.index[0] == df.index[10 * k]
        assert w.train.index[-1] + pd.Timedelta("3min") == w.validation.index[0]
        assert w.validation.index[-1] + pd.Timedelta("3min") == w.test.index[0]
    tests = pd.concat([w.test for w in windows])
    assert tests.index.is_unique and tests.index.is_monotonic_increasing
    plain = walk_forward(df, 50, 20, step=30)
    assert [(len(w.train), len(w.validation), len(w.test)) for w in plain] == [(50, 0, 20), (50, 0, 20)]
    with pytest.raises(ValueError, match="needs 120 bars"):
        walk_forward(df, 100, 20)
