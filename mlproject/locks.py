"""Cross-process file locks (``filelock``), reentrant within a thread, with a clear timeout error.

The locks are ``flock`` locks: the kernel releases one when its process ends, however it ends, so
a lock file left behind never blocks anyone and never needs removing. A timeout names the
process that holds the lock where the system says (Linux ``/proc/locks``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
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
        raise error(busy_message(key, timeout, holder)) from None
    try:
        yield lock_path
    finally:
        lock.release()


def lock_holder(path: str | Path) -> int | None:
    """The id of the process holding the ``flock`` lock on ``path``, from Linux's ``/proc/locks``
    (None: not held, or the system does not say)."""
    try:
        stat = os.stat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    inode_only = None
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2203889 0 EOF" (a waiter's line has "->" after "1:")
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or not fields[4].isdigit():
            continue
        if fields[5] == device:
            return int(fields[4])
        if fields[5].rsplit(":", 1)[-1] == str(stat.st_ino):
            inode_only = int(fields[4])  # overlay file systems may report another device number
    return inode_only


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200]


def busy_message(path: str | Path, timeout: float, holder: str) -> str:
    """Why a lock could not be taken in ``timeout`` s and what to do: wait for the holding process
    or stop it. Never "remove the file": the lock goes with its process (see the module doc)."""
    pid = lock_holder(path)
    if pid is None or pid == os.getpid():
        who = f"{holder} is in progress (it holds {path})"
        todo = "wait for it to finish or stop it"
    else:
        command = _command_line(pid)
        who = f"{holder} is in progress: process {pid}{f' ({command})' if command else ''} holds {path}"
        todo = f"wait for it to finish or stop it (kill {pid})"
    return (f"{who}; waited {timeout:g} s. {todo[0].upper()}{todo[1:]}; the lock is released when that "
            "process ends, so there is no file to remove")
