"""Ray for a run: the one already running, the cluster named by config, or a local one."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from mlproject.config import Config


@contextlib.contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """Use a running Ray, join the cluster named by ``train.ray_address`` or RAY_ADDRESS, or start
    a local one; shut down only what was started here (training and the cycle share this)."""
    import ray

    if ray.is_initialized():
        yield
        return
    previous = _start_ray(cfg)
    try:
        yield
    finally:
        ray.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _start_ray(cfg: Config) -> Any:
    """``ray.init`` for this run: the cluster named by config, else a local Ray. Returns the
    SIGTERM handler from before (None off the main thread), for the session to put back."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    # ray.init replaces the SIGTERM handler with its own (sys.exit) and leaves it after shutdown:
    # the orchestrator's --loop then died on SIGTERM instead of stopping between modes, and the
    # CLI's handler (runs ended KILLED) was gone. A handler the caller installed is put back.
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        ray.init(address=address)
    else:
        # address="local": a new Ray for this run. Without it ray.init joins any cluster already
        # running on this machine (someone's `ray start`) and then refuses num_cpus.
        ray.init(address="local", num_cpus=cfg.train.num_cpus, include_dashboard=False, configure_logging=False)
    if callable(previous):  # none (the default): Ray's own exits, and its atexit shuts Ray down
        signal.signal(signal.SIGTERM, previous)
    return previous
