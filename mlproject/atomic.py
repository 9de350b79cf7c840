"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

Write to a temporary name in the same folder, flush and fsync it, rename it over the target
(atomic on POSIX), then fsync the folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(folder: str | Path) -> None:
    """Make the names in ``folder`` (a rename, a new file or subfolder) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# fdatasync: the data and the size, without the access times fsync also writes (Linux); the
# folder's fsync after the rename makes the new name durable.
_sync_data = getattr(os, "fdatasync", os.fsync)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with tmp.open("rb+") as fh:
            _sync_data(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) at ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json_state(path: str | Path, owner: str, remedy: str) -> dict:
    """The JSON object a component keeps at ``path`` ({} before it wrote one); a file that is not
    JSON is a ValueError naming the file, its ``owner`` and the ``remedy``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not the {owner}'s state file; {remedy}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as exc:  # a ValueError, but not a JSONDecodeError: binary junk, a wrong encoding
        raise ValueError(f"{path}: not the {owner}'s state (not UTF-8 text: byte {exc.object[exc.start]:#04x} at "
                         f"offset {exc.start}); {remedy}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not the {owner}'s state ({exc}); {remedy}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not the {owner}'s state (a JSON {type(data).__name__}, not an object); {remedy}")
    return data
