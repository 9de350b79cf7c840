"""The experience buffer: every bar the agent traded (live, paper or backtest) as an append-only
Parquet dataset, the system of record that retraining and the LLM's training data read from.

Layout (``continuous_learning.experience_storage``, a local folder or any pyarrow filesystem URI)::

    <root>/date=2024-01-02/part-<utc time>-<pid>-<random>.parquet    one file per flushed batch and day

Hive partitioning by the experience's UTC date, so a time-range read opens only the days it asks
for. Files are written under a hidden temporary name (``.tmp-...``; pyarrow readers skip names
starting with ``.`` or ``_``), flushed, fsynced and renamed, so a reader sees whole files only and
a writer killed at any moment loses nothing it flushed before. File names are unique per process
and call, so two writers (the bridge and a paper trader) never clobber each other.

The columns are :data:`EXPERIENCE_SCHEMA` (version :data:`SCHEMA_VERSION`, stored in each file's
metadata); :data:`COLUMNS` documents each one.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlproject.atomic import atomic_write

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Layout version of :data:`EXPERIENCE_SCHEMA`; bump it with every column change."""

SOURCES = ("live", "paper", "backtest")
"""Where an experience came from."""

COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "experience_id": (pa.string(), "unique id (uuid4 hex unless the writer gives one)"),
    "time": (pa.timestamp("ns", tz="UTC"), "bar end time of the decision, UTC"),
    "symbol": (pa.string(), "instrument symbol (ES, MES, ...)"),
    "bar_period": (pa.string(), "bar period, e.g. 1min"),
    "model_name": (pa.string(), "registered model that acted (nt8-agent)"),
    "model_version": (pa.string(), "its version"),
    "observation": (pa.list_(pa.float32()), "the observation the policy saw"),
    "action": (pa.int16(), "the action taken (target position + max_contracts)"),
    "reward": (pa.float64(), "reward of the step, money"),
    "next_observation": (pa.list_(pa.float32()), "the observation after the step"),
    "terminated": (pa.bool_(), "the account ended (equity floor)"),
    "truncated": (pa.bool_(), "the episode was cut (end of data, session, step limit)"),
    "position": (pa.int16(), "position after the step, contracts"),
    "equity": (pa.float64(), "account equity after the step, money"),
    "trade_id": (pa.string(), "the trade this step belongs to (null when flat)"),
    "realised_pnl": (pa.float64(), "PnL realised on this step (a close), money; 0 otherwise"),
    "fill_price": (pa.float64(), "fill price when the step traded (null otherwise)"),
    "slippage": (pa.float64(), "slippage of that fill, money (null otherwise)"),
    "source": (pa.string(), "live, paper or backtest"),
    "reflection": (pa.string(), "post-trade reflection text (null until annotated)"),
    "lesson": (pa.string(), "the lesson drawn (null until annotated)"),
    "quality": (pa.float32(), "quality score in [0, 1] (null until annotated)"),
    "tags": (pa.list_(pa.string()), "high_value, failed, ... (empty until annotated)"),
    "annotator": (pa.string(), "who annotated (rules, an LLM endpoint, ...)"),
    "annotator_version": (pa.string(), "its version"),
}
"""Every column: its type and what it means (the one place the schema is documented)."""

EXPERIENCE_SCHEMA = pa.schema([pa.field(name, typ) for name, (typ, _) in COLUMNS.items()],
                              metadata={b"nt8.experience_schema_version": str(SCHEMA_VERSION).encode()})
"""The Arrow schema of every buffer file (the partition column ``date`` is added by the layout)."""

REQUIRED = ("time", "symbol", "model_name", "model_version", "observation", "action", "reward", "source")
"""Columns every added experience must give; the others default to null (or empty tags)."""

PARTITIONING = pads.partitioning(pa.schema([("date", pa.string())]), flavor="hive")


class ExperienceError(ValueError):
    """Bad experiences or a bad buffer file; the message names the column, row or file."""


@dataclass(frozen=True)
class Query:
    """A filter on the buffer (every field optional; all given ones must hold)."""

    start: str | pd.Timestamp | None = None
    end: str | pd.Timestamp | None = None
    model_version: str | None = None
    source: str | None = None
    min_quality: float | None = None
    annotated: bool | None = None


def _utc(value: str | pd.Timestamp) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _filesystem(root: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local folder or a filesystem URI."""
    text = str(root)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def to_table(records: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pa.Table:
    """Validated Arrow table of experiences in :data:`EXPERIENCE_SCHEMA` (missing optional
    columns filled; ids generated). ``ExperienceError`` names the column or row at fault."""
    frame = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ExperienceError(f"experiences lack required column(s) {', '.join(missing)}")
    unknown = sorted(set(frame.columns) - set(COLUMNS))
    if unknown:
        raise ExperienceError(f"unknown experience column(s) {', '.join(unknown)}; columns: {', '.join(COLUMNS)}")
    bad = ~frame["source"].isin(SOURCES)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ExperienceError(f"row {i}: source {frame['source'].iloc[i]!r} is not one of {', '.join(SOURCES)}")
    if "experience_id" not in frame.columns:
        frame["experience_id"] = [uuid.uuid4().hex for _ in range(len(frame))]
    if "tags" not in frame.columns:
        frame["tags"] = [[] for _ in range(len(frame))]
    try:
        frame["time"] = pd.to_datetime(frame["time"], utc=True)
    except (ValueError, TypeError) as exc:
        raise ExperienceError(f"column time: not timestamps ({exc})") from None
    for name in COLUMNS:
        if name not in frame.columns:
            frame[name] = None
    try:
        return pa.Table.from_pandas(frame[list(COLUMNS)], schema=EXPERIENCE_SCHEMA, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ExperienceError(f"experiences do not fit the schema: {exc}") from None


class ExperienceBuffer:
    """Append-only Parquet experience store (see the module docstring for the layout).

    ``add`` collects experiences in memory; ``flush`` makes them durable (one file per day);
    ``query`` reads whole files only, filtered by partition and column statistics.
    """

    def __init__(self, root: str | os.PathLike[str], *, flush_every: int | None = None) -> None:
        self.root = str(root)
        self.fs, self.path = _filesystem(root)
        self.fs.create_dir(self.path, recursive=True)
        self.flush_every = flush_every
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    # -- writing -------------------------------------------------------------------------------

    def add(self, records: pd.DataFrame | Sequence[Mapping[str, Any]]) -> int:
        """Validate and queue experiences; returns how many. Flushes by itself every
        ``flush_every`` rows when that is set."""
        table = to_table(records)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self.flush_every is not None and self._pending_rows >= self.flush_every:
            self.flush()
        return table.num_rows

    def flush(self) -> list[str]:
        """Write what was added, one file per UTC day, atomically; returns the files written."""
        if not self._pending:
            return []
        table = pa.concat_tables(self._pending)
        days = _days(table)
        written = []
        for day in sorted(set(days)):
            part = table.filter(pa.array([d == day for d in days]))
            written.append(self._write_file(part, day))
        self._pending, self._pending_rows = [], 0
        return written

    def _write_file(self, table: pa.Table, day: str) -> str:
        folder = f"{self.path}/date={day}"
        self.fs.create_dir(folder, recursive=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"part-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        tmp, final = f"{folder}/.tmp-{name}", f"{folder}/{name}"
        if isinstance(self.fs, pafs.LocalFileSystem):
            atomic_write(final, lambda p: pq.write_table(table, p))
        else:  # object stores: readers skip the hidden temporary name until the move
            with self.fs.open_output_stream(tmp) as out:
                pq.write_table(table, out)
            self.fs.move(tmp, final)
        return final

    # -- reading -------------------------------------------------------------------------------

    def _dataset(self) -> pads.Dataset:
        try:
            return pads.dataset(self.path, filesystem=self.fs, format="parquet", partitioning=PARTITIONING,
                                schema=EXPERIENCE_SCHEMA.append(pa.field("date", pa.string())))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ExperienceError(f"{self.root}: cannot be read as an experience buffer: {exc}") from None

    def query(self, query: Query | None = None, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """Experiences matching ``query`` (all, without one), oldest first; only ``columns`` are
        read (observations are the bulk: leave them out when not needed)."""
        q = query or Query()
        wanted = list(columns) if columns is not None else list(COLUMNS)
        unknown = sorted(set(wanted) - set(COLUMNS))
        if unknown:
            raise ExperienceError(f"unknown column(s) {', '.join(unknown)}")
        expr = _filter(q)
        needed = sorted(set(wanted) | {"time"})
        try:
            table = self._dataset().to_table(columns=needed, filter=expr)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ExperienceError(f"{self.root}: a file cannot be read: {exc}") from None
        frame = table.to_pandas()
        frame = frame.sort_values("time", kind="stable").reset_index(drop=True)
        return frame[wanted]

    def __len__(self) -> int:
        return self._dataset().count_rows()

    def sample(self, n: int, seed: int = 0, query: Query | None = None,
               columns: Iterable[str] | None = None) -> pd.DataFrame:
        """``n`` experiences drawn uniformly without replacement (all when there are fewer)."""
        frame = self.query(query, columns)
        if len(frame) <= n:
            return frame
        rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=n, replace=False))
        return frame.iloc[rows].reset_index(drop=True)

    def stats(self) -> dict[str, float]:
        """Counts, PnL and annotation coverage (``buffer/...`` metrics, see :meth:`log_stats`)."""
        frame = self.query(columns=["source", "realised_pnl", "reward", "quality", "model_version"])
        out = {"experiences": float(len(frame)),
               "realised_pnl": float(frame["realised_pnl"].fillna(0).sum()) if len(frame) else 0.0,
               "reward_sum": float(frame["reward"].sum()) if len(frame) else 0.0,
               "annotated": float(frame["quality"].notna().sum()),
               "model_versions": float(frame["model_version"].nunique())}
        out["annotation_coverage"] = out["annotated"] / out["experiences"] if len(frame) else 0.0
        for source in SOURCES:
            out[f"source_{source}"] = float((frame["source"] == source).sum())
        return out

    def log_stats(self) -> dict[str, float]:
        """:meth:`stats` as ``buffer/...`` metrics of the active MLflow run."""
        import mlflow

        metrics = {f"buffer/{k}": v for k, v in self.stats().items()}
        mlflow.log_metrics(metrics)
        return metrics

    def snapshot(self, query: Query | None = None, name: str = "experience-buffer") -> Any:
        """The experiences (without observations) as an MLflow dataset with a digest, to log as
        a run input: every retrain run shows which experiences it learned from."""
        import mlflow

        columns = [c for c in COLUMNS if c not in ("observation", "next_observation")]
        frame = self.query(query, columns)
        frame["time"] = frame["time"].astype(str)
        frame["tags"] = frame["tags"].map(lambda t: ",".join(t) if t is not None else "")
        return mlflow.data.from_pandas(frame, source=self.root, name=name)


def _days(table: pa.Table) -> list[str]:
    """UTC date (``YYYY-MM-DD``) of every row's ``time``: its partition."""
    stamps = table.column("time").to_pandas()
    return list(pd.DatetimeIndex(stamps).tz_convert("UTC").strftime("%Y-%m-%d"))


def _filter(q: Query) -> pads.Expression | None:
    """The query as a pyarrow expression: partition pruning by ``date`` plus row filters."""
    parts: list[pads.Expression] = []
    field = pads.field
    if q.start is not None:
        start = _utc(q.start)
        parts += [field("date") >= start.strftime("%Y-%m-%d"),
                  field("time") >= pa.scalar(start, pa.timestamp("ns", "UTC"))]
    if q.end is not None:
        end = _utc(q.end)
        parts += [field("date") <= end.strftime("%Y-%m-%d"), field("time") <= pa.scalar(end, pa.timestamp("ns", "UTC"))]
    if q.model_version is not None:
        parts.append(field("model_version") == str(q.model_version))
    if q.source is not None:
        if q.source not in SOURCES:
            raise ExperienceError(f"source {q.source!r} is not one of {', '.join(SOURCES)}")
        parts.append(field("source") == q.source)
    if q.min_quality is not None:
        parts.append(field("quality") >= q.min_quality)
    if q.annotated is not None:
        parts.append(field("quality").is_valid() if q.annotated else field("quality").is_null())
    if not parts:
        return None
    expr = parts[0]
    for part in parts[1:]:
        expr = expr & part
    return expr
