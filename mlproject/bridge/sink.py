"""Where the bridge's experiences go: collected from the sessions, written to the experience
buffer in batches by one I/O thread, so a write never holds a decision up.

A batch is written when ``bridge.flush_every`` rows are waiting, every ``bridge.flush_interval_s``,
when a session disconnects and when the bridge stops. A failed write (a full disk) keeps its rows
for the next try: trading goes on.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mlproject.bridge.session import Session
from mlproject.config import BridgeConfig
from mlproject.experience import ExperienceBuffer

log = logging.getLogger(__name__)


class ExperienceSink:
    """The experiences on their way from the sessions to ``buffer``."""

    def __init__(self, buffer: ExperienceBuffer, cfg: BridgeConfig) -> None:
        self.buffer = buffer
        self.cfg = cfg
        self.rows: list[dict[str, Any]] = []
        """Collected, not yet written."""
        self.written = 0
        self._io = ThreadPoolExecutor(1, thread_name_prefix="bridge-io")
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    def collect(self, session: Session) -> None:
        """Take the session's finished experiences; a write starts once ``flush_every`` wait."""
        if session.rows:
            self.rows.extend(session.take_rows())
            if len(self.rows) >= self.cfg.flush_every and (self._task is None or self._task.done()):
                self._task = asyncio.create_task(self.flush())

    def hand_in(self, session: Session) -> None:
        """A session's connection ended: its experiences are written now."""
        self.collect(session)
        if self.rows:
            self._task = asyncio.create_task(self.flush())

    async def flush(self) -> None:
        """Write the collected experiences (in the I/O thread); on failure they are kept for the next try."""
        async with self._lock:
            rows, self.rows = self.rows, []
            if not rows:
                return
            try:
                await asyncio.get_running_loop().run_in_executor(self._io, self._write, rows)
                self.written += len(rows)
            except Exception:  # noqa: BLE001 - a full disk must not stop trading; retried next time
                log.exception("bridge: writing %d experiences to %s failed; retrying later", len(rows),
                              self.buffer.root)
                self.rows[:0] = rows

    def _write(self, rows: list[dict[str, Any]]) -> None:
        self.buffer.add(rows)
        self.buffer.flush()

    async def run(self) -> None:
        """Write what was collected every ``flush_interval_s`` (a task of the bridge)."""
        while True:
            await asyncio.sleep(self.cfg.flush_interval_s)
            if self.rows:
                await self.flush()

    async def close(self, sessions: list[Session]) -> None:
        """Write every experience the ``sessions`` hold (the unfinished last ones dropped) and
        what was collected; then end the I/O thread."""
        for session in sessions:
            session.drop_pending()
            self.rows.extend(session.take_rows())
        await self.flush()
        self._io.shutdown(wait=True)
