"""New market data dropped into a folder: validated, merged into the instrument's history, each
file once.

NinjaTrader users export fresh bars with the Historical Data Manager into a folder;
:func:`run_intake` (run by the orchestrator's maintenance) takes every file that has settled
(not modified for ``settle_seconds``: a file still being copied waits for the next pass):

- a file whose content digest (sha256 of its bytes) was taken before is only moved aside;
- otherwise it is read and validated like ``data.source`` (:func:`mlproject.data.load_bars`, same
  bar period, time zone and repair settings), oldest file first. Good bars are merged into the
  history by timestamp (a bar in both keeps the later file's values: an older export may have
  ended on a half-built bar), written atomically, the digest recorded, the file moved to
  ``ingested/``;
- a file that fails (bad line, another bar period than the history's, not a bar file) is moved
  to ``rejected/`` with ``<name>.error.txt`` beside it, and the other files go on.

Crash-safe in this order: the history is written (atomically) before the digest is recorded and
the digest before the file moves, so a crash anywhere at worst takes a file again, and merging
the same bars twice changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mlproject.atomic import atomic_write, atomic_write_text, read_json_state
from mlproject.data import DataError, infer_bar_period, load_bars, period_text

log = logging.getLogger(__name__)

INGESTED, REJECTED = "ingested", "rejected"
STATE_FILE = "intake.json"


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


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """The merged history, or None before the first file was taken."""
    path = Path(path)
    return pd.read_parquet(path) if path.exists() else None


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


def _move_aside(path: Path, folder: Path, digest: str) -> Path:
    """Move ``path`` into ``folder`` (created); a name already there gets the digest added."""
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    if target.exists():
        target = folder / f"{path.stem}-{digest[:12]}{path.suffix}"
    path.replace(target)
    return target


def _candidates(folder: Path) -> list[Path]:
    """The files to look at, oldest first (modification time, then name): a later export's bars
    win where two overlap."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))


def run_intake(folder: str | Path, history_path: str | Path, state_dir: str | Path, *, tick_period: str = "1min",
               tz: str | None = None, drop_duplicates: bool = False, settle_seconds: float = 30.0,
               now: float | None = None) -> IntakeResult:
    """Take every settled file in ``folder`` once (see the module doc); returns what it did."""
    folder, history_path, state_dir = Path(folder), Path(history_path), Path(state_dir)
    if not folder.is_dir():
        raise ValueError(f"data.intake.folder {folder}: no such folder")
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / STATE_FILE
    taken: dict[str, Any] = read_json_state(state_path, "intake", "move it aside to take every file again "
                                            "(merging the same bars twice changes nothing)")
    now = time.time() if now is None else now
    history = read_history(history_path)
    result = IntakeResult()
    for path in _candidates(folder):
        if not _settled(path, settle_seconds, now):
            result.waiting.append(path.name)
            continue
        digest = file_digest(path)
        if digest in taken:
            result.repeated.append(path.name)
            _move_aside(path, folder / INGESTED, digest)
            continue
        try:
            bars = load_bars(path, tick_period=tick_period, drop_duplicates=drop_duplicates, tz=tz)
            if history is not None and len(history) > 1 and len(bars) > 1:
                mine, theirs = period_text(infer_bar_period(bars)), period_text(infer_bar_period(history))
                if mine != theirs:
                    raise DataError(f"{path}: {mine} bars; the history ({history_path}) holds {theirs} bars")
            if history is not None and (bars.index.tz is None) != (history.index.tz is None):
                raise DataError(f"{path}: time stamps {'with' if bars.index.tz else 'without'} a time zone; the "
                                f"history's are {'with' if history.index.tz else 'without'} (data.tz)")
        except (DataError, ValueError, OSError) as exc:
            target = _move_aside(path, folder / REJECTED, digest)
            atomic_write_text(target.with_name(target.name + ".error.txt"), f"{exc}\n")
            result.rejected.append({"file": path.name, "error": str(exc)})
            log.warning("intake: %s rejected (moved to %s): %s", path.name, target, exc)
            continue
        history, added = merge_bars(history, bars)
        history_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(history_path, lambda tmp, frame=history: frame.to_parquet(tmp, engine="pyarrow"))
        item = {"file": path.name, "digest": digest, "bars": len(bars), "new_bars": added,
                "first": str(bars.index[0]), "last": str(bars.index[-1]),
                "at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")}
        taken[digest] = item
        atomic_write_text(state_path, json.dumps(taken, indent=1))
        _move_aside(path, folder / INGESTED, digest)
        result.ingested.append(item)
        log.info("intake: %s: %d bars (%d new) %s .. %s merged into %s", path.name, len(bars), added,
                 item["first"], item["last"], history_path)
    result.history_bars = 0 if history is None else len(history)
    return result
