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

Annotations (reflection, lesson, quality, tags, annotator) arrive after the trade closes; they are
appended too, as files under ``<root>/_annotations/`` keyed by experience id (the newest wins), and
overlaid on the rows at read time. :meth:`ExperienceBuffer.compact` folds them into the rows,
keeps the newest ``experience_buffer_size`` experiences and merges small files, switching readers
from the old files to the new ones with one atomic record under ``<root>/_compaction/``. A file that is
not a buffer file is named by :meth:`ExperienceBuffer.check` and moved aside by
:meth:`ExperienceBuffer.quarantine` (``python -m pipelines.buffer check`` / ``quarantine FILE``).
"""

from __future__ import annotations

import json
import logging
import os
import time
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

from mlproject.atomic import atomic_write, fsync_dir
from mlproject.faults import fault_point
from mlproject.locks import file_lock, temp_lock_path
from mlproject.quiet import quiet_dataset_source

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""Layout version of :data:`EXPERIENCE_SCHEMA`; bump it with every column change. Version 2 added
``guard`` and ``policy_action`` (files of version 1 read with those columns null)."""

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
    "guard": (pa.string(), "risk guard that changed the policy's choice (max_position, daily_loss, kill_switch, "
                           "stale_bar, ...); null when the policy's action was taken"),
    "policy_action": (pa.int16(), "the action the policy chose, when a guard changed it (null otherwise)"),
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

_V1_NAMES = [name for name in COLUMNS if name not in ("guard", "policy_action")]
EXPERIENCE_SCHEMA_V1 = pa.schema([EXPERIENCE_SCHEMA.field(name) for name in _V1_NAMES])
"""Version 1 files (before guard and policy_action): still read, rewritten as version 2 by compaction."""

ANNOTATION_COLUMNS = ("reflection", "lesson", "quality", "tags", "annotator", "annotator_version")
"""Columns an annotation sets (appended later, overlaid at read, folded in by compaction)."""

ANNOTATION_SCHEMA = pa.schema([pa.field("experience_id", pa.string()),
                               pa.field("annotated_at", pa.timestamp("ns", "UTC")),
                               *(pa.field(c, COLUMNS[c][0]) for c in ANNOTATION_COLUMNS)],
                              metadata={b"nt8.experience_schema_version": str(SCHEMA_VERSION).encode()})
"""The schema of annotation files."""

COMPACT_LOCK_TIMEOUT_S = 3600.0
"""How long a compaction waits for another one of the same buffer."""

ANNOTATIONS_DIR = "_annotations"
QUARANTINE_DIR = "_quarantine"
COMPACTION_DIR = "_compaction"
"""Records of compactions under way (JSON): the files a compaction replaces and its new files
(written under hidden names first). Readers apply them, so a compaction switches the buffer
from the old files to the new ones with one atomic write; the next compaction finishes one a
crash interrupted."""
STALE_TEMPORARY_S = 3600.0
"""Hidden temporary files older than this (left by a killed writer) are removed by compaction."""

REQUIRED = ("time", "symbol", "model_name", "model_version", "observation", "action", "reward", "source")
"""Columns every added experience must give; the others default to null (or empty tags)."""

PARTITIONING = pads.partitioning(pa.schema([("date", pa.string())]), flavor="hive")


WRITE_OPTIONS = {"use_dictionary": ["symbol", "bar_period", "model_name", "model_version", "source", "annotator",
                                    "annotator_version", "guard"],
                 "write_statistics": [name for name in COLUMNS if name not in ("observation", "next_observation")]}
"""Dictionary-encode the repetitive strings only: pyarrow's default also dictionary-encodes the
float observations, which made a 1,000-row file 4x slower to write and 50% larger
(benchmarks/buffer_speed.py). No min/max statistics for the observation vectors (no filter
uses them; computing them was a fifth of a bridge flush)."""


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


def _columns(records: pd.DataFrame | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The experiences as columns (name -> sequence), whatever shape they came in."""
    if isinstance(records, pd.DataFrame):
        return {str(name): records[name] for name in records.columns}
    if isinstance(records, Mapping):  # already columns (the bridge hands them so: no DataFrame in between)
        return {str(name): list(values) for name, values in records.items()}
    rows = list(records)
    names = dict.fromkeys(rows[0]) if rows else {}
    for row in rows:  # the usual case, every row with the same keys, costs one comparison per row
        if row.keys() != names.keys():
            names.update(dict.fromkeys(row))
    return {str(name): [row.get(name) for row in rows] for name in names}


def to_table(records: pd.DataFrame | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> pa.Table:
    """Validated Arrow table of experiences in :data:`EXPERIENCE_SCHEMA` from a DataFrame, a
    list of row dicts or a dict of columns (missing optional columns filled; ids generated).
    ``ExperienceError`` names the column or row at fault."""
    columns = _columns(records)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ExperienceError(f"experiences lack required column(s) {', '.join(missing)}")
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ExperienceError(f"unknown experience column(s) {', '.join(unknown)}; columns: {', '.join(COLUMNS)}")
    n = len(columns["time"])
    short = [name for name, values in columns.items() if len(values) != n]
    if short:
        raise ExperienceError(f"column(s) {', '.join(short)} have another length than time ({n})")
    sources = list(columns["source"])
    for i, source in enumerate(sources):
        if source not in SOURCES:
            raise ExperienceError(f"row {i}: source {source!r} is not one of {', '.join(SOURCES)}")
    if "experience_id" not in columns:
        columns["experience_id"] = [uuid.uuid4().hex for _ in range(n)]
    if "tags" not in columns:
        columns["tags"] = [[] for _ in range(n)]
    try:
        columns["time"] = pd.to_datetime(columns["time"], utc=True)
    except (ValueError, TypeError) as exc:
        raise ExperienceError(f"column time: not timestamps ({exc})") from None
    arrays = []
    try:
        for name, (typ, _) in COLUMNS.items():
            if name not in columns:
                arrays.append(pa.nulls(n, typ))
            elif name in ("observation", "next_observation"):
                arrays.append(_vectors(columns[name], typ))
            else:
                arrays.append(pa.array(columns[name], type=typ, from_pandas=True))
        return pa.Table.from_arrays(arrays, schema=EXPERIENCE_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as exc:
        raise ExperienceError(f"experiences do not fit the schema (column {name}): {exc}") from None


def _vectors(column: Sequence[Any], typ: pa.DataType) -> pa.Array:
    """A column of observation vectors as list<float32>: one stacked copy when every row is a
    vector of the same length (the usual case, several times faster than row by row)."""
    values = list(column)
    try:  # the usual case: equal-length vectors (None, NaN or ragged rows raise and go the slow way)
        stacked = np.stack(values).astype(np.float32, copy=False) if values else None
    except (ValueError, TypeError):
        stacked = None
    if stacked is not None and stacked.ndim == 2:
        width = stacked.shape[1]
        offsets = np.arange(0, (len(values) + 1) * width, width, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(stacked.reshape(-1)), type=typ)
    return pa.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else np.asarray(v, np.float32)
                     for v in values], type=typ)


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

    def add(self, records: pd.DataFrame | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> int:
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
        written = [self._write_file(part, day) for day, part in _split_by_day(table)]
        self._pending, self._pending_rows = [], 0
        return written

    def _write_file(self, table: pa.Table, day: str | None, prefix: str = "") -> str:
        """Write ``table`` durably as a new file of ``day`` (None: an annotation file); returns its
        path. ``prefix`` ``.``: a hidden name readers skip (a compaction's new files)."""
        folder = f"{self.path}/date={day}" if day is not None else f"{self.path}/{ANNOTATIONS_DIR}"
        local = isinstance(self.fs, pafs.LocalFileSystem)
        new_folder = local and not os.path.isdir(folder)
        self.fs.create_dir(folder, recursive=True)
        if new_folder:  # the new day folder's name must survive a power cut too
            fsync_dir(self.path)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        final = f"{folder}/{prefix}part-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        self._put(final, lambda sink: pq.write_table(table, sink, **WRITE_OPTIONS))
        return final

    def _put(self, final: str, write: Any) -> None:
        """Create ``final`` whole or not at all: ``write(sink)`` fills a binary output under a
        hidden temporary name, which is then moved to ``final`` (locally :func:`atomic_write`:
        fsynced, renamed, folder fsynced; on object stores readers skip the temporary name)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            def to_file(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    write(fh)

            atomic_write(final, to_file)
            return
        folder, name = final.rsplit("/", 1)
        with self.fs.open_output_stream(f"{folder}/.tmp-{name}") as out:
            write(out)
        self.fs.move(f"{folder}/.tmp-{name}", final)

    def _write_record(self, record: dict[str, Any]) -> str:
        """One compaction record, atomically (see :data:`COMPACTION_DIR`); returns its path."""
        folder = f"{self.path}/{COMPACTION_DIR}"
        self.fs.create_dir(folder, recursive=True)
        path = f"{folder}/{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.json"
        data = json.dumps(record).encode()
        self._put(path, lambda sink: sink.write(data))
        return path

    def _records(self) -> list[tuple[str, dict[str, Any]]]:
        """(path, record) of every compaction under way, oldest first."""
        selector = pafs.FileSelector(f"{self.path}/{COMPACTION_DIR}", allow_not_found=True)
        out = []
        for info in sorted(self.fs.get_file_info(selector), key=lambda i: i.path):
            if info.type == pafs.FileType.File and info.path.endswith(".json") and \
                    not info.path.rsplit("/", 1)[-1].startswith("."):
                with self.fs.open_input_stream(info.path) as fh:
                    out.append((info.path, json.loads(fh.read())))
        return out

    def _live(self) -> list[str]:
        """The files readers read: the visible ones, with every compaction record applied (the
        files it replaces left out, its new files in, under their hidden name until renamed)."""
        files = self.files()
        records = self._records()
        if not records:
            return files
        visible = set(files)
        removed = {f"{self.path}/{rel}" for _, record in records for rel in record["remove"]}
        live = [p for p in files if p not in removed]
        for _, record in records:
            for hidden, final in record["add"]:
                if f"{self.path}/{final}" not in visible:
                    live.append(f"{self.path}/{hidden}")
        return sorted(live)

    def _finish(self, path: str, record: dict[str, Any]) -> None:
        """Carry out a compaction record: new files to their visible names, replaced files
        deleted (annotations last), then the record. Every step can be repeated after a crash."""
        for hidden, final in record["add"]:
            if self.fs.get_file_info(f"{self.path}/{hidden}").type == pafs.FileType.File:
                self.fs.move(f"{self.path}/{hidden}", f"{self.path}/{final}")
        fault_point("compact:renamed")
        for rel in sorted(record["remove"], key=lambda r: r.startswith(f"{ANNOTATIONS_DIR}/")):
            if self.fs.get_file_info(f"{self.path}/{rel}").type == pafs.FileType.File:
                self.fs.delete_file(f"{self.path}/{rel}")
        fault_point("compact:deleted")
        self.fs.delete_file(path)

    def _sweep_temporaries(self) -> list[str]:
        """Remove hidden files no compaction record names: a killed compaction's new files (any
        age: this runs under the compaction lock) and temporary files older than
        :data:`STALE_TEMPORARY_S` (a killed writer's); returns them."""
        named = {f"{self.path}/{hidden}" for _, record in self._records() for hidden, _ in record["add"]}
        cutoff = time.time() - STALE_TEMPORARY_S
        gone = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True)):
            name = info.path.rsplit("/", 1)[-1]
            old = info.mtime is not None and info.mtime.timestamp() < cutoff
            if (info.type == pafs.FileType.File and name.startswith(".") and info.path not in named
                    and (name.startswith(".compact-") or old)):
                self.fs.delete_file(info.path)
                gone.append(info.path)
        return gone

    # -- reading -------------------------------------------------------------------------------

    def _dataset(self, live: list[str] | None = None) -> pads.Dataset:
        """The rows' dataset over ``live`` (default: :meth:`_live`, listed now)."""
        live = self._live() if live is None else live
        rows = [p for p in live if not p[len(self.path) + 1:].startswith(f"{ANNOTATIONS_DIR}/")]
        try:
            return pads.dataset(rows, filesystem=self.fs, format="parquet", partitioning=PARTITIONING,
                                partition_base_dir=self.path,
                                schema=EXPERIENCE_SCHEMA.append(pa.field("date", pa.string())))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ExperienceError(f"{self.root}: cannot be read as an experience buffer: {exc}") from None

    def _unreadable(self, detail: str) -> ExperienceError:
        """The error for a buffer with a file that is not a buffer file, naming the file(s)."""
        found = self.check()
        named = "; ".join(f"{path}: {problem}" for path, problem in found[:3]) or detail
        return ExperienceError(f"{self.root}: {named}; move a file aside with `python -m pipelines.buffer "
                               "quarantine FILE` (`... check` lists them all)")

    def query(self, query: Query | None = None, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """Experiences matching ``query`` (all, without one), oldest first, with their newest
        annotations; only ``columns`` are read (observations are the bulk: leave them out when
        not needed)."""
        q = query or Query()
        wanted = list(columns) if columns is not None else list(COLUMNS)
        unknown = sorted(set(wanted) - set(COLUMNS))
        if unknown:
            raise ExperienceError(f"unknown column(s) {', '.join(unknown)}")
        by_annotation = q.min_quality is not None or q.annotated is not None
        needed = set(wanted) | {"time", "experience_id"} | ({"quality"} if by_annotation else set())
        try:
            live = self._live()  # listed once: the rows and the annotations overlaid on them
            table = self._dataset(live).to_table(columns=sorted(needed), filter=_filter(q))
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._unreadable(f"a file cannot be read ({exc})") from None
        if table["experience_id"].null_count or table["time"].null_count:  # rows of a foreign file
            raise self._unreadable("rows without an experience id or time")
        frame = table.to_pandas()
        # A compaction killed between writing its files and deleting the old ones leaves rows twice.
        frame = frame.drop_duplicates("experience_id", keep="last")
        frame = self._overlay(frame, live)
        if q.min_quality is not None:
            frame = frame[frame["quality"] >= q.min_quality]
        if q.annotated is not None:
            frame = frame[frame["quality"].notna() == q.annotated]
        return frame.sort_values("time", kind="stable").reset_index(drop=True)[wanted]

    def _overlay(self, frame: pd.DataFrame, live: list[str] | None = None) -> pd.DataFrame:
        """The newest annotation of each experience over its row's annotation columns."""
        notes = self.annotations(live)
        if notes.empty or frame.empty:
            return frame
        notes = notes[notes["experience_id"].isin(frame["experience_id"])]
        if notes.empty:
            return frame
        frame = frame.set_index("experience_id")
        notes = notes.set_index("experience_id")
        for col in ANNOTATION_COLUMNS:
            if col in frame.columns:
                frame[col] = frame[col].astype(object)
                frame.loc[notes.index, col] = notes[col].astype(object)
        if "quality" in frame.columns:
            frame["quality"] = pd.to_numeric(frame["quality"], errors="coerce")
        return frame.reset_index()

    # -- annotations ---------------------------------------------------------------------------

    def annotate(self, notes: pd.DataFrame | Sequence[Mapping[str, Any]]) -> str | None:
        """Append annotations (``experience_id`` plus any of :data:`ANNOTATION_COLUMNS`), durably;
        the newest annotation of an experience wins. Returns the file written."""
        frame = notes.copy() if isinstance(notes, pd.DataFrame) else pd.DataFrame(list(notes))
        if frame.empty:
            return None
        if "experience_id" not in frame.columns:
            raise ExperienceError("annotations need an experience_id column")
        unknown = sorted(set(frame.columns) - {"experience_id", *ANNOTATION_COLUMNS})
        if unknown:
            raise ExperienceError(f"not annotation column(s): {', '.join(unknown)}")
        quality = pd.to_numeric(frame.get("quality"), errors="coerce") if "quality" in frame else None
        if quality is not None and ((quality < 0) | (quality > 1)).any():
            raise ExperienceError("quality must be in [0, 1]")
        frame["annotated_at"] = pd.Timestamp.now(tz="UTC")
        if "tags" not in frame.columns:
            frame["tags"] = [[] for _ in range(len(frame))]
        for col in ANNOTATION_SCHEMA.names:
            if col not in frame.columns:
                frame[col] = None
        table = pa.Table.from_pandas(frame[ANNOTATION_SCHEMA.names], schema=ANNOTATION_SCHEMA, preserve_index=False)
        return self._write_file(table, None)

    def annotations(self, live: list[str] | None = None) -> pd.DataFrame:
        """The newest annotation of every annotated experience (empty frame: none)."""
        live = self._live() if live is None else live
        files = [p for p in live if p[len(self.path) + 1:].startswith(f"{ANNOTATIONS_DIR}/")]
        if not files:
            return pd.DataFrame(columns=ANNOTATION_SCHEMA.names)
        try:
            table = pads.dataset(files, filesystem=self.fs, format="parquet", schema=ANNOTATION_SCHEMA).to_table()
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._unreadable(f"an annotation file cannot be read ({exc})") from None
        frame = table.to_pandas().sort_values("annotated_at", kind="stable")
        return frame.drop_duplicates("experience_id", keep="last").reset_index(drop=True)

    def high_value(self, min_quality: float, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """Annotated experiences tagged ``high_value`` or of quality >= ``min_quality``."""
        frame = self.query(Query(annotated=True), _with(columns, "quality", "tags"))
        keep = (frame["quality"] >= min_quality) | frame["tags"].map(lambda t: _has_tag(t, "high_value"))
        return frame[keep.to_numpy()].reset_index(drop=True)[_cols(columns)]

    def failed(self, max_quality: float, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """Experiences tagged ``failed``, of quality <= ``max_quality``, or closing a losing trade."""
        frame = self.query(None, _with(columns, "quality", "tags", "realised_pnl"))
        keep = ((frame["quality"] <= max_quality) | frame["tags"].map(lambda t: _has_tag(t, "failed"))
                | (frame["realised_pnl"] < 0))
        return frame[keep.to_numpy()].reset_index(drop=True)[_cols(columns)]

    def __len__(self) -> int:
        try:
            dataset = self._dataset()
            total = dataset.count_rows()
            if total != dataset.count_rows(filter=pads.field("experience_id").is_valid()):
                raise self._unreadable("rows without an experience id")  # a foreign file's
            return total
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._unreadable(f"a file cannot be read ({exc})") from None

    def sample(self, n: int, seed: int = 0, query: Query | None = None,
               columns: Iterable[str] | None = None) -> pd.DataFrame:
        """``n`` experiences drawn uniformly without replacement (all when there are fewer)."""
        frame = self.query(query, columns)
        if len(frame) <= n:
            return frame
        rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=n, replace=False))
        return frame.iloc[rows].reset_index(drop=True)

    def export_rllib(self, path: str | os.PathLike[str], query: Query | None = None, *,
                     obs_size: int | None = None, repeat: Mapping[str, int] | None = None) -> Path:
        """The experiences as a Parquet file in the column layout RLlib's offline API reads
        (``eps_id, obs, actions, rewards, new_obs, terminateds, truncateds, t``: one single-step
        episode per experience), for offline BC/MARWIL; returns the file. ``obs_size``: only
        experiences whose observation has this length (a model with another window recorded the
        others). ``repeat``: experience id -> times it is written (weighting, e.g. high-value ones;
        the copies get ids ``<id>#2``, ``<id>#3``, ...)."""
        frame = self.query(query, ["experience_id", "observation", "action", "reward", "next_observation",
                                   "terminated", "truncated"])
        if obs_size is not None and not frame.empty:
            sizes = frame["observation"].map(lambda v: -1 if v is None else len(v)).to_numpy()
            if (sizes != obs_size).any():
                log.info("export: %d of %d experiences have observations of another size than %d: left out",
                         int((sizes != obs_size).sum()), len(frame), obs_size)
            frame = frame[sizes == obs_size]
        if frame.empty:
            raise ExperienceError(f"{self.root}: no experiences to export" + (f" for {query}" if query else "")
                                  + (f" with observations of size {obs_size}" if obs_size is not None else ""))
        ids = frame["experience_id"].tolist()
        if repeat:
            times = np.array([max(1, int(repeat.get(i, 1))) for i in ids])
            ids = [i if k == 0 else f"{i}#{k + 1}" for i, n in zip(ids, times) for k in range(n)]
            frame = frame.iloc[np.repeat(np.arange(len(frame)), times)]
        table = pa.table({
            "eps_id": pa.array(ids, pa.string()),
            "obs": _vectors(frame["observation"], pa.list_(pa.float32())),
            "actions": pa.array(frame["action"].astype(np.int64)),
            "rewards": pa.array(frame["reward"].astype(np.float64)),
            "new_obs": _vectors(frame["next_observation"].where(frame["next_observation"].notna(),
                                                                frame["observation"]), pa.list_(pa.float32())),
            "terminateds": pa.array(frame["terminated"].fillna(False).astype(bool)),
            "truncateds": pa.array(frame["truncated"].fillna(True).astype(bool)),
            "t": pa.array(np.zeros(len(frame), np.int64)),
        })
        target = Path(path)
        return atomic_write(target, lambda p: pq.write_table(table, p))

    # -- upkeep ----------------------------------------------------------------------------------

    def files(self) -> list[str]:
        """Every buffer file (rows and annotations), hidden temporary files excluded."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(selector):
            rel = info.path[len(self.path) + 1:]
            name = rel.rsplit("/", 1)[-1]
            if info.type == pafs.FileType.File and not name.startswith(".") and \
                    not rel.startswith((f"{QUARANTINE_DIR}/", f"{COMPACTION_DIR}/")):
                out.append(info.path)
        return sorted(out)

    def check(self) -> list[tuple[str, str]]:
        """(file, problem) for every file that is not a readable buffer file of this schema."""
        problems = []
        for path in self.files():
            expected = ANNOTATION_SCHEMA if f"/{ANNOTATIONS_DIR}/" in path else EXPERIENCE_SCHEMA
            try:
                with self.fs.open_input_file(path) as fh:
                    schema = pq.read_schema(fh)
            except (pa.ArrowInvalid, OSError) as exc:
                problems.append((path, f"not a Parquet file: {exc}"))
                continue
            plain = schema.remove_metadata()
            if not (plain.equals(expected.remove_metadata())
                    or (expected is EXPERIENCE_SCHEMA and plain.equals(EXPERIENCE_SCHEMA_V1))):
                problems.append((path, "foreign columns: " + ", ".join(schema.names[:8])))
        return problems

    def quarantine(self, path: str) -> str:
        """Move a buffer file to ``<root>/_quarantine/`` (readers skip it); returns where."""
        path = str(path) if "://" in str(path) else str(Path(path).resolve())
        if path not in self.files():
            raise ExperienceError(f"{path}: not a file of the buffer {self.root}")
        target = f"{self.path}/{QUARANTINE_DIR}/{path[len(self.path) + 1:]}"
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        self.fs.move(path, target)
        log.warning("quarantined %s -> %s", path, target)
        return target

    def compact(self, max_rows: int) -> dict[str, int]:
        """Fold annotations into the rows, keep the newest ``max_rows`` experiences and rewrite
        them as one file per day; then remove the files it read. Atomic for readers: the new files
        are written under hidden names, then one record (:data:`COMPACTION_DIR`) switches the
        buffer from the old files to them, then they are renamed and the old files deleted; a
        crash anywhere leaves the old buffer or the new one, and the next compaction finishes the
        job. Writers may go on meanwhile: files that appear during the compaction are left
        alone. Also removes temporary files of killed writers. Returns counts."""
        if max_rows < 1:
            raise ExperienceError(f"compaction keeps at least 1 experience, got max_rows={max_rows}")
        with file_lock(_lock_path(self.root), COMPACT_LOCK_TIMEOUT_S, "another compaction of this buffer"):
            for path, record in self._records():  # one a crash interrupted
                log.warning("finishing the interrupted compaction %s", path)
                self._finish(path, record)
            self._sweep_temporaries()
            before = self.files()
            if not before:
                return {"kept": 0, "evicted": 0, "files_before": 0, "files_after": 0}
            rows = self.query()
            keep = rows.iloc[max(0, len(rows) - max_rows):]
            written = []
            if len(keep):
                written = [self._write_file(part, day, prefix=".compact-")
                           for day, part in _split_by_day(to_table(keep))]
            fault_point("compact:written")
            rel = lambda p: p[len(self.path) + 1:]  # noqa: E731
            record = {"remove": [rel(p) for p in before],
                      "add": [[rel(p), rel(p).replace("/.compact-", "/")] for p in written]}
            path = self._write_record(record)
            fault_point("compact:recorded")
            self._finish(path, record)
        log.info("compacted %s: kept %d, evicted %d, %d files -> %d", self.root, len(keep), len(rows) - len(keep),
                 len(before), len(written))
        return {"kept": len(keep), "evicted": len(rows) - len(keep), "files_before": len(before),
                "files_after": len(written)}

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
        with quiet_dataset_source():
            return mlflow.data.from_pandas(frame, source=self.root, name=name)


def _has_tag(tags: Any, tag: str) -> bool:
    """Whether a row's tags (a list, a numpy array from Parquet, or null) hold ``tag``."""
    return tags is not None and not (isinstance(tags, float) and np.isnan(tags)) and tag in list(tags)


def _cols(columns: Iterable[str] | None) -> list[str]:
    return list(columns) if columns is not None else list(COLUMNS)


def _with(columns: Iterable[str] | None, *extra: str) -> list[str]:
    wanted = _cols(columns)
    return wanted + [c for c in extra if c not in wanted]


def _lock_path(root: str) -> Path:
    """Compaction lock: in the folder for a local buffer, in the temp folder for a remote one."""
    if "://" not in root:
        return Path(root).resolve() / ".compact.lock"
    return temp_lock_path("buffer", root)


NS_PER_DAY = 86_400_000_000_000


def _split_by_day(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """(UTC date ``YYYY-MM-DD``, its rows) for every day in ``table``: the partitions to write."""
    days = table.column("time").combine_chunks().cast(pa.int64()).to_numpy() // NS_PER_DAY
    out = []
    for day in np.unique(days):
        name = str(np.datetime64(int(day), "D"))
        out.append((name, table.filter(pa.array(days == day))))
    return out


def _filter(q: Query) -> pads.Expression | None:
    """The row part of the query as a pyarrow expression: partition pruning by ``date`` plus the
    filters on columns that annotations never change."""
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
    # min_quality and annotated are applied after the annotations are overlaid (Query docs).
    if not parts:
        return None
    expr = parts[0]
    for part in parts[1:]:
        expr = expr & part
    return expr
