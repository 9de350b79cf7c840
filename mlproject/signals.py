"""Stopping on SIGTERM / SIGINT: the exception a long run unwinds with, and the handler that raises it.

A service manager stops a process with SIGTERM, a person with Ctrl-C (SIGINT). Python's default
for SIGTERM ends the process on the spot: no ``finally``, no ``with`` block, so an open MLflow run
stays RUNNING for good. The CLI (``mlproject.cli.run_cli``) therefore installs :func:`raise_stopped`
for both signals: the pipeline's ``with`` blocks unwind, ``mlproject.tracking.pipeline_run`` ends
its run KILLED, and the process exits ``128 + signal`` (143, 130) with one line. Code that stops
differently (the loops, which stop between passes) installs its own handler for as long as it runs.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
T = TypeVar("T")


class Stopped(BaseException):
    """A stop signal arrived. A ``BaseException``, as ``KeyboardInterrupt`` is, so that a step's
    ``except Exception`` (a loop outliving a failed pass) does not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


def raise_stopped() -> Callable[[int, Any], None]:
    """A handler that raises :class:`Stopped` at the first signal and ignores (logs) the next
    ones, so that a second Ctrl-C does not break the cleanup the first one started."""
    state = {"stopping": False}

    def handler(signum: int, frame: Any) -> None:
        if state["stopping"]:
            log.warning("%s again: already stopping (ending the runs); SIGKILL ends the process at once",
                        signal.Signals(signum).name)
            return
        state["stopping"] = True
        raise Stopped(signum)

    return handler


def install(handler: Any, signals: tuple[int, ...] = STOP_SIGNALS) -> dict[int, Any]:
    """Install ``handler`` for ``signals``; returns the previous handlers (for :func:`restore`).
    Outside the main thread (where Python refuses signal handlers) it installs nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)


class StopRequest:
    """The handler a loop installs: a stop signal sets :attr:`now`, and the loop stops between
    turns (a turn is never cut in half)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.now = False

    def __call__(self, signum: int, frame: Any) -> None:
        log.info("stopping the %s after the current turn (signal %d)", self.name, signum)
        self.now = True

    def reinstall(self) -> None:
        """Ours again, after a library replaced it (``ray.init`` does)."""
        install(self)

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds`` in slices of at most 1 s, waking when a stop is requested."""
        end = time.monotonic() + seconds
        while not self.now and (left := end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))


def run_turns(name: str, wait_s: float, turn: Callable[[StopRequest], T], max_rounds: int | None = None) -> list[T]:
    """Call ``turn`` every ``wait_s`` seconds (from the start of one turn to the next) until
    SIGTERM/SIGINT, which stop the loop between turns, or ``max_rounds`` turns; the loop of the
    drift monitor and of the orchestrator. Returns what each turn returned."""
    results: list[T] = []
    stop = StopRequest(name)
    previous = install(stop)
    try:
        while not stop.now and (max_rounds is None or len(results) < max_rounds):
            started = time.monotonic()
            results.append(turn(stop))
            if max_rounds is not None and len(results) >= max_rounds:
                break
            stop.sleep(wait_s - (time.monotonic() - started))
    finally:
        restore(previous)
    return results
