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
metadata); :data:`COLUMNS` documents each one (both in :mod:`mlproject.experience_schema`, with the
validation of added experiences). The RLlib export is :func:`mlproject.offline.export_rllib`; the
MLflow views are :func:`mlproject.tracking.experience_dataset` and
:func:`mlproject.tracking.log_buffer_stats`.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from mlproject.experience_schema import (
    ANNOTATION_COLUMNS,
    ANNOTATION_SCHEMA,
    COLUMNS,
    EXPERIENCE_SCHEMA,
    EXPERIENCE_SCHEMA_V1,
    REQUIRED,
    SCHEMA_VERSION,
    SOURCES,
    ExperienceError,
    Records,
    to_table,
)
from mlproject.faults import fault_point
from mlproject.locks import file_lock, temp_lock_path

__all__ = ["ANNOTATION_COLUMNS", "ANNOTATION_SCHEMA", "COLUMNS", "EXPERIENCE_SCHEMA", "EXPERIENCE_SCHEMA_V1",
           "REQUIRED", "SCHEMA_VERSION", "SOURCES", "ExperienceBuffer", "ExperienceError", "Query", "to_table"]
"""The schema's names are imported here too: every reader of the buffer imports this module."""

log = logging.getLogger(__name__)

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

PARTITIONING = pads.partitioning(pa.schema([("date", pa.string())]), flavor="hive")


WRITE_OPTIONS = {"use_dictionary": ["symbol", "bar_period", "model_name", "model_version", "source", "annotator",
                                    "annotator_version", "guard"],
                 "write_statistics": [name for name in COLUMNS if name not in ("observation", "next_observation")]}
"""Dictionary-encode the repetitive strings only: pyarrow's default also dictionary-encodes the
float observations, which made a 1,000-row file 4x slower to write and 50% larger
(benchmarks/buffer_speed.py). No min/max statistics for the observation vectors (no filter
uses them; computing them was a fifth of a bridge flush)."""


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

    def add(self, records: Records) -> int:
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
        folder = self._folder(f"date={day}" if day is not None else ANNOTATIONS_DIR)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        final = f"{folder}/{prefix}part-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        self._put(final, lambda sink: pq.write_table(table, sink, **WRITE_OPTIONS))
        return final

    def _folder(self, name: str) -> str:
        """The folder ``name`` of the buffer, created (durably, for a local buffer) if new."""
        folder = f"{self.path}/{name}"
        new_folder = isinstance(self.fs, pafs.LocalFileSystem) and not os.path.isdir(folder)
        self.fs.create_dir(folder, recursive=True)
        if new_folder:  # the new day folder's name must survive a power cut too
            fsync_dir(self.path)
        return folder

    def _put(self, final: str, write: Callable[[Any], Any]) -> None:
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

    def _rel(self, path: str) -> str:
        """``path`` relative to the buffer's root."""
        return path[len(self.path) + 1:]

    # -- compaction records --------------------------------------------------------------------

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
            live += [f"{self.path}/{hidden}" for hidden, final in record["add"]
                     if f"{self.path}/{final}" not in visible]
        return sorted(live)

    def _finish(self, path: str, record: dict[str, Any]) -> None:
        """Carry out a compaction record: new files to their visible names, replaced files
        deleted (annotations last), then the record. Every step can be repeated after a crash."""
        for hidden, final in record["add"]:
            if self._is_file(hidden):
                self.fs.move(f"{self.path}/{hidden}", f"{self.path}/{final}")
        fault_point("compact:renamed")
        for rel in sorted(record["remove"], key=lambda r: r.startswith(f"{ANNOTATIONS_DIR}/")):
            if self._is_file(rel):
                self.fs.delete_file(f"{self.path}/{rel}")
        fault_point("compact:deleted")
        self.fs.delete_file(path)

    def _finish_interrupted(self) -> None:
        """Carry out the compactions a crash interrupted (under the compaction lock)."""
        for path, record in self._records():
            log.warning("finishing the interrupted compaction %s", path)
            self._finish(path, record)

    def _is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{rel}").type == pafs.FileType.File

    def _sweep_temporaries(self) -> list[str]:
        """Remove hidden files no compaction record names: a killed compaction's new files (any
        age: this runs under the compaction lock) and temporary files older than
        :data:`STALE_TEMPORARY_S` (a killed writer's); returns them."""
        named = {f"{self.path}/{hidden}" for _, record in self._records() for hidden, _ in record["add"]}
        cutoff = time.time() - STALE_TEMPORARY_S
        gone = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True)):
            if info.type == pafs.FileType.File and info.path not in named and _left_behind(info, cutoff):
                self.fs.delete_file(info.path)
                gone.append(info.path)
        return gone

    # -- reading -------------------------------------------------------------------------------

    def _dataset(self, live: list[str] | None = None) -> pads.Dataset:
        """The rows' dataset over ``live`` (default: :meth:`_live`, listed now)."""
        live = self._live() if live is None else live
        rows = [p for p in live if not self._rel(p).startswith(f"{ANNOTATIONS_DIR}/")]
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
        wanted = _cols(columns)
        unknown = sorted(set(wanted) - set(COLUMNS))
        if unknown:
            raise ExperienceError(f"unknown column(s) {', '.join(unknown)}")
        by_annotation = q.min_quality is not None or q.annotated is not None
        needed = set(wanted) | {"time", "experience_id"} | ({"quality"} if by_annotation else set())
        frame, live = self._read_rows(sorted(needed), _filter(q))
        frame = _by_annotation(self._overlay(frame, live), q)
        return frame.sort_values("time", kind="stable").reset_index(drop=True)[wanted]

    def _read_rows(self, columns: list[str], where: pads.Expression | None) -> tuple[pd.DataFrame, list[str]]:
        """The rows (``columns``, filtered by ``where``, each experience once) and the live files
        they came from (listed once: the rows and the annotations overlaid on them)."""
        try:
            live = self._live()
            table = self._dataset(live).to_table(columns=columns, filter=where)
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._unreadable(f"a file cannot be read ({exc})") from None
        if table["experience_id"].null_count or table["time"].null_count:  # rows of a foreign file
            raise self._unreadable("rows without an experience id or time")
        # A compaction killed between writing its files and deleting the old ones leaves rows twice.
        return table.to_pandas().drop_duplicates("experience_id", keep="last"), live

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
        _check_annotations(frame)
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
        files = [p for p in live if self._rel(p).startswith(f"{ANNOTATIONS_DIR}/")]
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

    def stats(self) -> dict[str, float]:
        """Counts, PnL and annotation coverage (``buffer/...`` metrics, see
        :func:`mlproject.tracking.log_buffer_stats`)."""
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

    # -- upkeep ----------------------------------------------------------------------------------

    def files(self) -> list[str]:
        """Every buffer file (rows and annotations), hidden temporary files excluded."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(selector):
            rel = self._rel(info.path)
            name = rel.rsplit("/", 1)[-1]
            if info.type == pafs.FileType.File and not name.startswith(".") and \
                    not rel.startswith((f"{QUARANTINE_DIR}/", f"{COMPACTION_DIR}/")):
                out.append(info.path)
        return sorted(out)

    def check(self) -> list[tuple[str, str]]:
        """(file, problem) for every file that is not a readable buffer file of this schema."""
        found = ((path, self._problem(path)) for path in self.files())
        return [(path, problem) for path, problem in found if problem is not None]

    def _problem(self, path: str) -> str | None:
        """What is wrong with the buffer file ``path`` (None: nothing)."""
        expected = ANNOTATION_SCHEMA if f"/{ANNOTATIONS_DIR}/" in path else EXPERIENCE_SCHEMA
        try:
            with self.fs.open_input_file(path) as fh:
                schema = pq.read_schema(fh)
        except (pa.ArrowInvalid, OSError) as exc:
            return f"not a Parquet file: {exc}"
        plain = schema.remove_metadata()
        if plain.equals(expected.remove_metadata()) or (expected is EXPERIENCE_SCHEMA
                                                        and plain.equals(EXPERIENCE_SCHEMA_V1)):
            return None
        return "foreign columns: " + ", ".join(schema.names[:8])

    def quarantine(self, path: str) -> str:
        """Move a buffer file to ``<root>/_quarantine/`` (readers skip it); returns where."""
        path = str(path) if "://" in str(path) else str(Path(path).resolve())
        if path not in self.files():
            raise ExperienceError(f"{path}: not a file of the buffer {self.root}")
        target = f"{self.path}/{QUARANTINE_DIR}/{self._rel(path)}"
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
            self._finish_interrupted()
            self._sweep_temporaries()
            before = self.files()
            if not before:
                return {"kept": 0, "evicted": 0, "files_before": 0, "files_after": 0}
            rows = self.query()
            keep = rows.iloc[max(0, len(rows) - max_rows):]
            written = self._replace(before, keep)
        counts = {"kept": len(keep), "evicted": len(rows) - len(keep), "files_before": len(before),
                  "files_after": len(written)}
        log.info("compacted %s: kept %d, evicted %d, %d files -> %d", self.root, *counts.values())
        return counts

    def _replace(self, before: list[str], keep: pd.DataFrame) -> list[str]:
        """Switch the buffer from the files ``before`` to new files of the rows ``keep``: written
        under hidden names, switched by one record, then carried out; returns the new files."""
        written = []
        if len(keep):
            written = [self._write_file(part, day, prefix=".compact-") for day, part in _split_by_day(to_table(keep))]
        fault_point("compact:written")
        record = {"remove": [self._rel(p) for p in before],
                  "add": [[self._rel(p), self._rel(p).replace("/.compact-", "/")] for p in written]}
        path = self._write_record(record)
        fault_point("compact:recorded")
        self._finish(path, record)
        return written


def _left_behind(info: pafs.FileInfo, cutoff: float) -> bool:
    """Whether ``info`` is a hidden file a killed writer left: a compaction's new file (any age)
    or a temporary file last written before ``cutoff``."""
    name = info.path.rsplit("/", 1)[-1]
    old = info.mtime is not None and info.mtime.timestamp() < cutoff
    return name.startswith(".") and (name.startswith(".compact-") or old)


def _check_annotations(frame: pd.DataFrame) -> None:
    """``ExperienceError`` unless ``frame`` holds annotations: an experience id, known columns,
    qualities in [0, 1]."""
    if "experience_id" not in frame.columns:
        raise ExperienceError("annotations need an experience_id column")
    unknown = sorted(set(frame.columns) - {"experience_id", *ANNOTATION_COLUMNS})
    if unknown:
        raise ExperienceError(f"not annotation column(s): {', '.join(unknown)}")
    quality = pd.to_numeric(frame.get("quality"), errors="coerce") if "quality" in frame else None
    if quality is not None and ((quality < 0) | (quality > 1)).any():
        raise ExperienceError("quality must be in [0, 1]")


def _by_annotation(frame: pd.DataFrame, q: Query) -> pd.DataFrame:
    """The rows that meet ``q``'s annotation part (applied after the annotations are overlaid)."""
    if q.min_quality is not None:
        frame = frame[frame["quality"] >= q.min_quality]
    if q.annotated is not None:
        frame = frame[frame["quality"].notna() == q.annotated]
    return frame


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


def _time_range(q: Query) -> list[pads.Expression]:
    """The query's time range: days by partition, then times within them."""
    parts = []
    if q.start is not None:
        start = _utc(q.start)
        parts += [pads.field("date") >= start.strftime("%Y-%m-%d"),
                  pads.field("time") >= pa.scalar(start, pa.timestamp("ns", "UTC"))]
    if q.end is not None:
        end = _utc(q.end)
        parts += [pads.field("date") <= end.strftime("%Y-%m-%d"),
                  pads.field("time") <= pa.scalar(end, pa.timestamp("ns", "UTC"))]
    return parts


def _filter(q: Query) -> pads.Expression | None:
    """The row part of the query as a pyarrow expression: partition pruning by ``date`` plus the
    filters on columns that annotations never change."""
    parts = _time_range(q)
    if q.model_version is not None:
        parts.append(pads.field("model_version") == str(q.model_version))
    if q.source is not None:
        if q.source not in SOURCES:
            raise ExperienceError(f"source {q.source!r} is not one of {', '.join(SOURCES)}")
        parts.append(pads.field("source") == q.source)
    # min_quality and annotated are applied after the annotations are overlaid (Query docs).
    if not parts:
        return None
    expr = parts[0]
    for part in parts[1:]:
        expr = expr & part
    return expr
