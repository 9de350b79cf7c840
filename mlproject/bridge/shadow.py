"""The shadow: the Staging model trading beside Production on the same bars, on paper.

``registry_hooks.reconcile`` deploys the Staging version to ``<deploy_dir>/shadow``
(:data:`mlproject.deploy.SHADOW_DIR`); the bridge loads it (and reloads it on every switch, as it
does Production). After each Production decision the bar goes to the shadow's own thread: one
shadow :class:`~mlproject.bridge.session.Session` per session, with its own book and observation
settings, decides with the Staging model, applies the same risk guard (kill switch, daily loss,
max position, stale bar, out of distribution), and fills its target by the paper trader's rules
(the next bar's open, the instrument's slippage against it, commission per contract and side).
Its experiences (source ``shadow``) go to the same buffer, by the same accounting as live ones.

A shadow never changes an order and never holds Production up: the bar is handed over without
waiting (a full queue drops the shadow's bar and counts it), a model that fails to load leaves
the bridge without a shadow, and an error while deciding is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mlproject.bridge.deployed import DeployedPolicy, NotDeployed, reload_sequence
from mlproject.bridge.protocol import Bar
from mlproject.bridge.session import Session
from mlproject.config import BridgeConfig
from mlproject.deploy import SHADOW_DIR
from mlproject.experience import ExperienceBuffer

log = logging.getLogger(__name__)

SOURCE = "shadow"
QUEUE_BARS = 20_000
"""Bars waiting for the shadow at most; beyond, the shadow skips bars (``shadow_dropped``)."""
BATCH = 256
"""Bars the shadow decides in one forward pass at most."""

Item = tuple[DeployedPolicy, str, str, str, dict[str, Any], Bar, bool, bool]
"""(the shadow model when the bar came, session key, instrument, bar period, spec, bar, kill switch
on, stale bar)."""


class ShadowTrader:
    """The shadow of one bridge: ``start()``, ``submit()`` per decided bar, ``close()``."""

    def __init__(self, deploy_dir: Path, buffer: ExperienceBuffer, cfg: BridgeConfig, initial_equity: float) -> None:
        self.dir = deploy_dir / SHADOW_DIR
        self.buffer, self.cfg, self.initial_equity = buffer, cfg, initial_equity
        self.stats: Counter[str] = Counter({key: 0 for key in ("shadow_decisions", "shadow_dropped", "shadow_errors",
                                                                "shadow_load_errors")})
        """Its own counts (written by two threads, each key by one of them)."""
        self.policy: DeployedPolicy | None = None
        self.sessions: dict[str, Session] = {}
        self.rows: list[dict[str, Any]] = []
        self.written = 0
        self._queue: queue.Queue[Item | None] = queue.Queue(QUEUE_BARS)
        self._thread = threading.Thread(target=self._work, name="nt8-shadow", daemon=True)
        self._seq: Any = None
        self._decided_by: DeployedPolicy | None = None
        self._flushed_at = time.monotonic()

    @property
    def version(self) -> str | None:
        return self.policy.version if self.policy is not None else None

    # -- the event loop's side ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load the shadow model (if one is deployed) and start the shadow's thread."""
        self._seq = reload_sequence(self.dir)
        await self._load()
        self._thread.start()

    async def watch(self) -> None:
        """Reload the shadow model on every switch of ``<deploy>/shadow`` (a task of the bridge)."""
        while True:
            await asyncio.sleep(self.cfg.reload_poll_s)
            seq = reload_sequence(self.dir)
            if seq != self._seq:
                self._seq = seq
                await self._load()

    async def _load(self) -> None:
        """The deployed shadow, or none (nothing in Staging, or a release that does not load)."""
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, DeployedPolicy.load, self.dir)
        except NotDeployed:
            new = None
        except Exception as exc:  # noqa: BLE001 - a broken shadow never touches Production
            self.stats["shadow_load_errors"] += 1
            log.error("bridge: the Staging model does not load (%s): no shadow trading", exc)
            new = None
        if (new and new.label) != (self.policy and self.policy.label):
            log.info("bridge: shadow %s", f"trading {new.label} (Staging) beside Production" if new else "off")
        self.policy = new

    def submit(self, session: Session, bar: Bar, killed: bool, stale: bool) -> None:
        """Hand the bar Production just decided on to the shadow (never waits)."""
        policy = self.policy
        if policy is None:
            return
        try:
            self._queue.put_nowait((policy, session.key, session.instrument, session.bar_period, session.spec, bar,
                                    killed, stale))
        except queue.Full:
            self.stats["shadow_dropped"] += 1

    async def close(self) -> None:
        """Decide what is queued, then write every shadow experience (the unfinished last ones dropped)."""
        if self._thread.is_alive():
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 60)
        for session in self.sessions.values():
            session.drop_pending()
            self.rows.extend(session.take_rows())
        self._flush()

    # -- the shadow's thread -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.cfg.flush_interval_s)
            except queue.Empty:
                item = ...
            if item is None:
                return
            batch = [item] if item is not ... else []
            while batch and len(batch) < BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            if batch:
                self._decide_safely(batch)
            if len(self.rows) >= self.cfg.flush_every or time.monotonic() - self._flushed_at >= self.cfg.flush_interval_s:
                self._flush()

    def _decide_safely(self, batch: list[Item]) -> None:
        try:
            self.decide(batch)
        except Exception:  # noqa: BLE001 - the shadow's failure is logged, never Production's
            self.stats["shadow_errors"] += 1
            log.exception("bridge: the shadow failed on %d bar(s); they have no shadow decision", len(batch))

    def decide(self, batch: list[Item]) -> None:
        """The shadow's decisions on ``batch``, in order, each bar by the model loaded when it came:
        fills of the previous targets at these bars' opens, one forward pass per round (a model,
        each session at most once: a lagging shadow has several bars of a session queued), the
        risk guard; the finished experiences collected."""
        round_: list[Item] = []
        keys: set[str] = set()
        for item in batch:
            if round_ and (item[0] is not round_[0][0] or item[1] in keys):
                self._decide_round(round_)
                round_, keys = [], set()
            round_.append(item)
            keys.add(item[1])
        if round_:
            self._decide_round(round_)

    def _decide_round(self, batch: list[Item]) -> None:
        policy = batch[0][0]
        if policy is not self._decided_by:  # a new Staging model starts flat, on the bars seen so far
            self.sessions = {key: self._fresh(s, policy) for key, s in self.sessions.items()}
            self._decided_by = policy
        steps = []
        for _, key, instrument, bar_period, spec, bar, killed, stale in batch:
            session = self.sessions.get(key)
            if session is None:
                account = key[: -len(instrument) - 1]
                session = self.sessions[key] = Session(account, instrument, bar_period, SOURCE,
                                                       _spec(policy, instrument, spec), self.cfg, self.initial_equity)
            _fill_at_open(session, bar)
            obs, guard = session.prepare(bar, policy)
            steps.append((session, bar, obs, guard, killed, stale))
        ready = [obs for _, _, obs, _, _, _ in steps if obs is not None]
        actions = iter(policy.act(np.stack(ready)).tolist() if ready else [])
        for session, bar, obs, guard, killed, stale in steps:
            session.decide(bar, obs, policy, next(actions) if obs is not None else None, guard, killed=killed,
                           stale=stale)
            self.rows.extend(session.take_rows())
        self.stats["shadow_decisions"] += len(steps)

    def _fresh(self, old: Session, policy: DeployedPolicy) -> Session:
        """A flat shadow session for a new Staging model, keeping the bars seen (its warm-up)."""
        new = Session(old.account, old.instrument, old.bar_period, SOURCE, _spec(policy, old.instrument, old.spec),
                      self.cfg, self.initial_equity)
        new.history.extend(old.history)
        new.anchor_price = old.anchor_price
        return new

    def _flush(self) -> None:
        self._flushed_at = time.monotonic()
        rows, self.rows = self.rows, []
        if not rows:
            return
        try:
            self.buffer.add(rows)
            self.buffer.flush()
            self.written += len(rows)
        except Exception:  # noqa: BLE001 - a full disk must not stop anything; retried next time
            log.exception("bridge: writing %d shadow experiences failed; retrying later", len(rows))
            self.rows[:0] = rows


def _spec(policy: DeployedPolicy, instrument: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The instrument the shadow prices with: its model's, when it trades this instrument."""
    mine = policy.settings.instrument
    return dict(mine) if str(mine.get("symbol")) == instrument else spec


def _fill_at_open(session: Session, bar: Bar) -> None:
    """The paper trader's fill of the previous decision's target: at this bar's open, slippage
    against the order, commission per contract and side (``mlproject.bridge.paper``)."""
    decided = session.last_decision
    if decided is None or bar.historical:
        return
    quantity = int(decided["target_position"]) - session.book.position
    if quantity == 0:
        return
    spec = session.spec
    slip = float(spec.get("slippage_ticks", 0.0)) * float(spec["tick_size"])
    price = bar.open + slip if quantity > 0 else bar.open - slip
    session.fill(quantity, price, abs(quantity) * float(spec["commission_per_side"]))
