"""The bridge's kill switch: a file whose presence makes every decision flat.

Anyone can turn it on: ``pipelines.bridge kill`` (or the monitor) creates the file, a client's
``kill`` message makes the bridge create it, ``resume`` removes it. The bridge looks at it on
every bar (a stat, ~2 us), so a kill takes effect at the next decision, and its watcher polls it
to push the kill to every client (``nt8/PROTOCOL.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from mlproject.atomic import atomic_write_text
from mlproject.config import Config

log = logging.getLogger(__name__)


def kill_file_of(cfg: Config) -> Path:
    """The kill file of ``cfg``: ``bridge.kill_file``, by default ``promotion.deploy_dir/KILL``."""
    return Path(cfg.bridge.kill_file) if cfg.bridge.kill_file else Path(cfg.promotion.deploy_dir) / "KILL"


class KillSwitch:
    """On while its file exists. ``on_engage(reason)`` is called whenever it turns on (the bridge
    pushes a kill message to every connection)."""

    def __init__(self, path: Path, on_engage: Callable[[str], None]) -> None:
        self.path = path
        self.on = False
        """Its state as last seen (read at :meth:`load`, followed by :meth:`poll`)."""
        self._on_engage = on_engage

    def load(self) -> None:
        """Read the switch when the bridge starts (no client to tell yet)."""
        self.on = self.path.exists()
        if self.on:
            log.warning("bridge: kill switch is on (%s exists): every decision is flat", self.path)

    def poll(self) -> bool:
        """Follow the file (turned on: ``on_engage``; turned off: logged); returns whether it is on."""
        on = self.path.exists()
        if on and not self.on:
            self._engaged("kill file " + str(self.path))
        elif not on and self.on:
            log.warning("bridge: kill switch off (%s removed): trading resumes", self.path)
        self.on = on
        return on

    def is_on(self) -> bool:
        """Whether it is on now, for a decision: the file is looked at unless the switch is known
        to be on (a change is followed as by :meth:`poll`)."""
        on = self.on or self.path.exists()
        if on != self.on:
            self.poll()
        return on

    def engage(self, reason: str = "") -> None:
        """Turn it on: the file written (with the time and ``reason``), every client told."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, f"{datetime.now(timezone.utc).isoformat()} {reason}\n")
        self._engaged(reason or "kill message")
        self.on = True

    def release(self) -> None:
        """Turn it off (the file removed)."""
        self.path.unlink(missing_ok=True)
        self.poll()

    def _engaged(self, reason: str) -> None:
        log.warning("bridge: KILL SWITCH ON (%s): flattening every session", reason)
        self._on_engage(reason)
