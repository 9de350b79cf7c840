"""The bridge's inference, batched across sessions: the bars that arrive in one iteration of the
event loop are decided in one forward pass per model."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np

from mlproject.bridge.deployed import DeployedPolicy

Request = tuple[DeployedPolicy, np.ndarray, asyncio.Future]
"""A policy, one observation, and the future its action is handed to."""


class InferenceBatcher:
    """``await batcher.infer(policy, obs)``: the action, computed with the other requests of the
    same loop iteration. Counts ``batches`` in ``stats``."""

    def __init__(self, stats: Counter[str]) -> None:
        self.stats = stats
        self._queue: list[Request] = []
        self._scheduled = False

    def infer(self, policy: DeployedPolicy, obs: np.ndarray) -> asyncio.Future:
        """A future of the policy's action for ``obs`` (decided at the end of this loop iteration)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((policy, obs, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._run)
        return future

    def _run(self) -> None:
        """One forward pass per policy over the queued requests."""
        self._scheduled = False
        queue, self._queue = self._queue, []
        by_policy: dict[int, list[Request]] = {}
        for item in queue:
            by_policy.setdefault(id(item[0]), []).append(item)
        for items in by_policy.values():
            self._decide(items)

    def _decide(self, items: list[Request]) -> None:
        """The actions of ``items`` (one policy) handed to their futures; an error to each of them."""
        try:
            actions = items[0][0].act(np.stack([obs for _, obs, _ in items]))
        except Exception as exc:  # noqa: BLE001 - handed to each waiting request
            for _, _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        self.stats["batches"] += 1
        for (_, _, future), action in zip(items, actions.tolist()):
            if not future.done():
                future.set_result(action)
