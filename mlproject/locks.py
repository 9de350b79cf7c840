"""Cross-process file locks (``filelock``), reentrant within a thread, with a clear timeout error."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class LockBusy(RuntimeError):
    """Another process held a lock for longer than the timeout."""


_LOCKS: dict[str, Any] = {}


def temp_lock_path(kind: str, key: str) -> Path:
    """A lock file in the temp folder named after ``key`` (a store URI, a buffer URI): every
    process on this machine that locks the same ``key`` shares it."""
    return Path(tempfile.gettempdir()) / f"nt8-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float, holder: str = "another process",
              error: type[LockBusy] = LockBusy) -> Iterator[Path]:
    """Hold the lock file ``path`` (created with its folder). One lock object per file and
    process: a second object on the same file would wait for the first (flock is per open file),
    so reentrancy needs the same object. ``error`` (naming ``holder``) after ``timeout`` seconds."""
    from filelock import FileLock, Timeout

    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock_path.resolve())
    lock = _LOCKS.get(key) or _LOCKS.setdefault(key, FileLock(key))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise error(f"{holder} has held {key} for over {timeout:.0f} s; if none is running, remove the file") from None
    try:
        yield lock_path
    finally:
        lock.release()
