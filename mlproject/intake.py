"""New market data dropped into a folder: validated, merged into the instrument's history, each
file once.

NinjaTrader users export fresh bars with the Historical Data Manager into a folder;
:func:`run_intake` (run by the orchestrator's maintenance) takes every file that has settled
(not modified for ``settle_seconds``) and is complete (a text file's last line ends with its
newline, a Parquet file ends with its footer): a file still being copied, even one whose copy
paused for longer than ``settle_seconds``, waits for the next pass:

- a file whose content digest (sha256 of its bytes) was taken before is only moved aside;
- otherwise it is read and validated like ``data.source`` (:func:`mlproject.data.load_bars`, same
  bar period, time zone and repair settings), oldest file first. Good bars are merged into the
  history by timestamp (a bar in both keeps the later file's values: an older export may have
  ended on a half-built bar), written atomically, the digest recorded, the file moved to
  ``ingested/``;
- a file that fails (bad line, another bar period than the history's, not a bar file) is moved
  to ``rejected/`` with ``<name>.error.txt`` beside it, and the other files go on;
- a file in ``rejected/`` or ``ingested/`` that changes afterwards (its size or modification time
  differs from when it was moved there: a copy that went on writing after it was moved, or the
  file written again) is taken again on the next pass, like a new file (``intake-aside.json`` in
  the state folder remembers what each moved file was).

Crash-safe in this order: the history is written (atomically) before the digest is recorded and
the digest before the file moves, so a crash anywhere at worst takes a file again, and merging
the same bars twice changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mlproject.atomic import atomic_write, atomic_write_text, read_json_state
from mlproject.data import DataError, infer_bar_period, load_bars, period_text
from mlproject.data.formats import looks_binary
from mlproject.digests import file_digest

log = logging.getLogger(__name__)

INGESTED, REJECTED = "ingested", "rejected"
STATE_FILE = "intake.json"
ASIDE_FILE = "intake-aside.json"
ERROR_SUFFIX = ".error.txt"
WAIT_WARNING_S = 3600.0
"""A file incomplete for longer than this (and ten times ``settle_seconds``) is warned about."""


@dataclass
class IntakeResult:
    """What one pass did: files taken (name, digest, bars, new bars, first and last bar), files
    rejected (name, error), files already taken before (names), and the history's size."""

    ingested: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    history_bars: int = 0

    @property
    def new_bars(self) -> int:
        return sum(item["new_bars"] for item in self.ingested)


def merge_bars(history: pd.DataFrame | None, new: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """``history`` and ``new`` as one frame ordered by time, one bar per timestamp (``new``'s
    values where both have it); returns it and how many of ``new``'s timestamps were not in
    ``history``."""
    if history is None or history.empty:
        return new.sort_index(), len(new)
    added = int((~new.index.isin(history.index)).sum())
    merged = pd.concat([history[~history.index.isin(new.index)], new]).sort_index()
    merged.index.name = history.index.name
    return merged, added


def read_history(path: str | Path) -> pd.DataFrame | None:
    """The merged history, or None before the first file was taken; a folder or a file that is not
    Parquet is a ValueError naming ``data.intake.history``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data.intake.history {path}: is a folder; it is the merged history's Parquet file, "
                         f"such as {path / 'bars.parquet'}")
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"data.intake.history {path}: not a Parquet bar history ({str(exc).splitlines()[0][:200]}); "
                         "point it at the history file the intake writes, or move this file aside") from None


def new_bars_since(history_path: str | Path, last_bar: str | None) -> tuple[int, pd.Timestamp | None]:
    """Bars in the history after ``last_bar`` (the newest bar the last training saw; None: no
    model has, so every bar is new) and the first of them."""
    history = read_history(history_path)
    if history is None:
        return 0, None
    if last_bar is None:
        newer = history.index
    else:
        mark, tz = pd.Timestamp(last_bar), history.index.tz
        if tz is not None and mark.tzinfo is None:  # naive times are taken as UTC
            mark = mark.tz_localize("UTC").tz_convert(tz)
        elif tz is None and mark.tzinfo is not None:
            mark = mark.tz_convert("UTC").tz_localize(None)
        newer = history.index[history.index > mark]
    return len(newer), (newer[0] if len(newer) else None)


def _settled(path: Path, settle_seconds: float, now: float) -> bool:
    return now - path.stat().st_mtime >= settle_seconds


def incomplete(path: Path) -> str | None:
    """Why ``path`` is still being written (None: it looks complete): a text file whose last line
    has no newline yet, a Parquet file without its closing footer. A copy that pauses mid-line for
    longer than ``settle_seconds`` must not be taken and rejected at its half line. Other binary
    files are left to the reader, which rejects them."""
    size = path.stat().st_size
    if size == 0:
        return None
    with path.open("rb") as fh:
        head = fh.read(8192)
        fh.seek(-min(size, 4), os.SEEK_END)
        tail = fh.read()
    if head.startswith(b"PAR1"):
        return None if size >= 8 and tail == b"PAR1" else "its Parquet footer is not written yet"
    if looks_binary(head):
        return None
    return None if tail.endswith((b"\n", b"\r")) else "its last line has no newline yet"


def _move_aside(path: Path, folder: Path, digest: str) -> Path:
    """Move ``path`` into ``folder`` (created); a name already there gets the digest added."""
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    if target.exists():
        target = folder / f"{path.stem}-{digest[:12]}{path.suffix}"
    path.replace(target)
    return target


def _stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _changed_aside(folder: Path, aside: dict[str, Any]) -> list[Path]:
    """The files in ``rejected/`` and ``ingested/`` that changed since they were moved there (see
    the module doc). One with no record (moved by an older version, or a crash before the record)
    is recorded as it is now, except a rejected file newer than its error note."""
    changed = []
    for sub in (REJECTED, INGESTED):
        if not (folder / sub).is_dir():
            continue
        for path in (folder / sub).iterdir():
            if not path.is_file() or path.name.startswith(".") or path.name.endswith(ERROR_SUFFIX):
                continue
            key, stamp = f"{sub}/{path.name}", _stamp(path)
            record = aside.get(key)
            if record is None:
                note = path.with_name(path.name + ERROR_SUFFIX)
                if sub == REJECTED and note.exists() and stamp["mtime_ns"] > note.stat().st_mtime_ns:
                    changed.append(path)
                else:
                    aside[key] = stamp
            elif (record.get("size"), record.get("mtime_ns")) != (stamp["size"], stamp["mtime_ns"]):
                changed.append(path)
    return changed


def _candidates(folder: Path, aside: dict[str, Any]) -> list[Path]:
    """The files to look at, oldest first (modification time, then name): a later export's bars
    win where two overlap. New files in ``folder`` and changed ones moved aside before."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(files + _changed_aside(folder, aside), key=lambda p: (p.stat().st_mtime, p.name))


def _label(path: Path, folder: Path) -> str:
    """``name`` for a file in the intake folder, ``rejected/name`` for one moved aside before."""
    return path.name if path.parent == folder else f"{path.parent.name}/{path.name}"


class _Aside:
    """Files moved into ``rejected/`` or ``ingested/`` with their size and modification time then,
    kept in ``intake-aside.json`` (see the module doc)."""

    def __init__(self, folder: Path, state_dir: Path) -> None:
        self.folder, self.path = folder, state_dir / ASIDE_FILE
        self.data: dict[str, Any] = read_json_state(self.path, "intake", "move it aside: the files moved aside "
                                                    "are then taken as they are now")

    def put(self, path: Path, sub: str, digest: str) -> Path:
        """Move ``path`` into ``sub`` (unless it is there) and record it as it is now."""
        if path.parent != self.folder / sub:
            self.data.pop(_label(path, self.folder), None)
            path = _move_aside(path, self.folder / sub, digest)
        self.data[f"{sub}/{path.name}"] = {**_stamp(path), "digest": digest}
        self.save()
        return path

    def save(self, prune: bool = False) -> None:
        """Write the records (``prune``: without those of files no longer there)."""
        if prune:
            self.data = {k: v for k, v in self.data.items() if (self.folder / k).is_file()}
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def run_intake(folder: str | Path, history_path: str | Path, state_dir: str | Path, *, tick_period: str = "1min",
               tz: str | None = None, drop_duplicates: bool = False, settle_seconds: float = 30.0,
               now: float | None = None) -> IntakeResult:
    """Take every settled, complete file in ``folder`` once (see the module doc); returns what it did."""
    folder, history_path, state_dir = Path(folder), Path(history_path), Path(state_dir)
    if not folder.is_dir():
        raise ValueError(f"data.intake.folder {folder}: no such folder")
    history = read_history(history_path)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / STATE_FILE
    taken: dict[str, Any] = read_json_state(state_path, "intake", "move it aside to take every file again "
                                            "(merging the same bars twice changes nothing)")
    aside = _Aside(folder, state_dir)
    now = time.time() if now is None else now
    result = IntakeResult()
    for path in _candidates(folder, aside.data):
        label = _label(path, folder)
        if not _settled(path, settle_seconds, now) or _waits(path, label, settle_seconds, now):
            result.waiting.append(label)
            continue
        digest = file_digest(path)
        # a rejected file taken now leaves its old error note behind
        note = path.with_name(path.name + ERROR_SUFFIX) if path.parent == folder / REJECTED else None
        if digest in taken:
            result.repeated.append(label)
            aside.put(path, INGESTED, digest)
            if note is not None:
                note.unlink(missing_ok=True)
            continue
        try:
            bars = _load_checked(path, history, history_path, tick_period, drop_duplicates, tz)
        except (DataError, ValueError, OSError) as exc:
            target = aside.put(path, REJECTED, digest)
            atomic_write_text(target.with_name(target.name + ERROR_SUFFIX), f"{exc}\n")
            result.rejected.append({"file": label, "error": str(exc)})
            log.warning("intake: %s rejected (moved to %s): %s", label, target, exc)
            continue
        history, added = merge_bars(history, bars)
        history_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(history_path, lambda tmp, frame=history: frame.to_parquet(tmp, engine="pyarrow"))
        item = {"file": label, "digest": digest, "bars": len(bars), "new_bars": added,
                "first": str(bars.index[0]), "last": str(bars.index[-1]),
                "at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")}
        taken[digest] = item
        atomic_write_text(state_path, json.dumps(taken, indent=1))
        aside.put(path, INGESTED, digest)
        if note is not None:
            note.unlink(missing_ok=True)
        result.ingested.append(item)
        log.info("intake: %s: %d bars (%d new) %s .. %s merged into %s", label, len(bars), added,
                 item["first"], item["last"], history_path)
    aside.save(prune=True)
    result.history_bars = 0 if history is None else len(history)
    return result


def _waits(path: Path, label: str, settle_seconds: float, now: float) -> bool:
    """True (and logged) when ``path`` is still being written (:func:`incomplete`)."""
    why = incomplete(path)
    if why is None:
        return False
    age = now - path.stat().st_mtime
    if age > max(WAIT_WARNING_S, 10 * settle_seconds):
        remedy = "end the file with a newline" if "newline" in why else "the file is cut short: copy it again"
        log.warning("intake: %s waits: %s (unchanged for %.0f s); if the copy has finished, %s", label, why, age,
                    remedy)
    else:
        log.info("intake: %s waits: %s (still being written)", label, why)
    return True


def _load_checked(path: Path, history: pd.DataFrame | None, history_path: Path, tick_period: str,
                  drop_duplicates: bool, tz: str | None) -> pd.DataFrame:
    """The file's bars (:func:`load_bars`), refused when their period or time zone differs from the history's."""
    bars = load_bars(path, tick_period=tick_period, drop_duplicates=drop_duplicates, tz=tz)
    if history is not None and len(history) > 1 and len(bars) > 1:
        mine, theirs = period_text(infer_bar_period(bars)), period_text(infer_bar_period(history))
        if mine != theirs:
            raise DataError(f"{path}: {mine} bars; the history ({history_path}) holds {theirs} bars")
    if history is not None and (bars.index.tz is None) != (history.index.tz is None):
        raise DataError(f"{path}: time stamps {'with' if bars.index.tz else 'without'} a time zone; the "
                        f"history's are {'with' if history.index.tz else 'without'} (data.tz)")
    return bars
