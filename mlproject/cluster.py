"""Ray for a run: the one already running, the cluster named by config, or a local one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from mlproject.config import Config


@contextlib.contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """Use a running Ray, join the cluster named by ``train.ray_address`` or RAY_ADDRESS, or start
    a local one; shut down only what was started here (training and the cycle share this)."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # address="local": a new Ray for this run. Without it ray.init joins any cluster already
        # running on this machine (someone's `ray start`) and then refuses num_cpus.
        ray.init(address="local", num_cpus=cfg.train.num_cpus, include_dashboard=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
