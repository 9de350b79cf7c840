"""sha256 digests of files: deploy's release checksum and intake's identity of a bar file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

BLOCK = 1 << 20
"""Bytes read at a time: a large file is hashed in constant memory."""


def update_from_file(digest: Any, path: Path) -> None:
    """Feed the bytes of the file ``path`` to ``digest`` (a ``hashlib`` object)."""
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digest.update(block)


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes (hex)."""
    digest = hashlib.sha256()
    update_from_file(digest, path)
    return digest.hexdigest()
