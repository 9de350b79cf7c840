"""A bridge on its own event loop in a background thread (the paper trader, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlproject.bridge.server import Bridge


class BridgeThread:
    """A bridge on its own event loop in a background thread (the paper trader, tests, benchmarks)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nt8-bridge", daemon=True)

    def start(self) -> tuple[str, int]:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.bridge.start(), self.loop).result(timeout=120)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the bridge's loop (a coroutine function is awaited) and return its result."""
        async def run() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=120)

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.bridge.stop(), self.loop).result(timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
            self.loop.close()

    def __enter__(self) -> BridgeThread:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

