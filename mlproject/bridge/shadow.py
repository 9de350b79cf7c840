"""The shadow: the Staging model trading beside Production on the same bars, on paper.

``registry_hooks.reconcile`` deploys the Staging version to ``<deploy_dir>/shadow``
(:data:`mlproject.deploy.SHADOW_DIR`). While one is deployed, the bridge runs a shadow process
(:class:`ShadowLink` starts it): after each Production decision the bar is sent to it over a
local socket without waiting. There a :class:`ShadowTrader` keeps one shadow
:class:`~mlproject.bridge.session.Session` per session, with the Staging model's own observation
settings and instrument, decides with it (reloaded on every switch of the shadow deployment),
applies the same risk guard (kill switch, daily loss, max position, stale bar, out of
distribution), and fills its target by the paper trader's rules (the next bar's open, the
instrument's slippage against it, commission per contract and side). Its experiences (source
``shadow``) go to the same buffer, by the same accounting as live ones.

A shadow never changes an order and never holds Production up: it runs in its own process (its
Python work never takes the bridge's interpreter lock), at a lower CPU priority; a full socket
(a shadow lagging far behind) drops the shadow's bar and counts it; a model that fails to load
leaves the shadow idle, logged; an error while deciding is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import select
import socket
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np

from mlproject.bridge.deployed import DeployedPolicy, NotDeployed, deployed_version, reload_sequence
from mlproject.bridge.protocol import Bar
from mlproject.bridge.session import Session
from mlproject.config import BridgeConfig
from mlproject.deploy import SHADOW_DIR
from mlproject.experience import ExperienceBuffer
from mlproject.faults import fault_delay

log = logging.getLogger(__name__)

SOURCE = "shadow"
BATCH = 256
"""Bars the shadow decides in one forward pass at most."""
BACKLOG_BARS = 20_000
"""Bars waiting to be sent to a lagging shadow at most; beyond, it skips bars (``shadow_dropped``)."""
STOP = b"stop"

Item = tuple[str, str, str, dict[str, Any], Bar, bool, bool]
"""(session key, instrument, bar period, spec, bar, kill switch on, stale bar)."""


class ShadowLink:
    """The bridge's side: ``start()``, ``submit()`` per decided bar, ``close()`` (on its event loop)."""

    def __init__(self, deploy_dir: Path, buffer_root: str, cfg: BridgeConfig, initial_equity: float) -> None:
        self.dir = deploy_dir / SHADOW_DIR
        self.buffer_root, self.cfg, self.initial_equity = buffer_root, cfg, initial_equity
        self.version: str | None = None
        """The Staging version deployed for the shadow (what ``welcome`` names)."""
        self.loaded: str | None = None
        """The version the shadow process has loaded and trades (None: not yet, none, or it failed)."""
        self.stats: Counter[str] = Counter(shadow_dropped=0)
        """``shadow_dropped`` here; the shadow process's own counts when it ended."""
        self._sock: socket.socket | None = None
        self._process: Any = None
        self._backlog: deque[bytes] = deque()
        """Bars the socket had no room for yet (sent as it drains, by the event loop)."""

    async def start(self) -> None:
        self._look()

    async def watch(self) -> None:
        """Follow the shadow deployment (a task of the bridge): the process starts with the first
        Staging model; it loads and switches models itself."""
        while True:
            await asyncio.sleep(self.cfg.reload_poll_s)
            self._look()

    def _look(self) -> None:
        version = deployed_version(self.dir)
        if version != self.version:
            log.info("bridge: shadow %s", f"trading Staging v{version} beside Production" if version else "off")
        self.version = version
        if version is not None and self._process is None:
            self._spawn()

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        context = multiprocessing.get_context("spawn")  # a clean interpreter: no copy of the bridge's threads
        self._process = context.Process(target=serve, name="nt8-shadow", daemon=True, args=(
            theirs, str(self.dir), self.buffer_root, self.cfg.model_dump(), self.initial_equity,
            logging.getLogger().getEffectiveLevel()))
        self._process.start()
        theirs.close()
        self._sock = ours
        asyncio.get_running_loop().add_reader(ours, self._hear)

    def _hear(self) -> None:
        """The shadow process's reports (what it loaded, its counts), read by the event loop."""
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the shadow process is gone: its bars are counted as dropped from now on
                asyncio.get_running_loop().remove_reader(self._sock)
                log.error("bridge: the shadow process ended (exit code %s); no shadow trading until the bridge "
                          "restarts", self._process.exitcode if self._process is not None else None)
                return
            self._take(pickle.loads(data))

    def _take(self, report: dict[str, Any]) -> None:
        self.loaded = report.pop("loaded", self.loaded)
        for key, value in report.items():  # the process's counts so far (set, not added)
            if key != "final":
                self.stats[key] = value

    def submit(self, session: Session, bar: Bar, killed: bool, stale: bool) -> None:
        """Send the bar Production just decided on to the shadow (never waits)."""
        if self.version is None or self._sock is None:
            return
        item: Item = (session.key, session.instrument, session.bar_period, session.spec, bar, killed, stale)
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        if self._backlog:
            self._queue(data)
            return
        try:
            self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            self._queue(data)
            asyncio.get_running_loop().add_writer(self._sock, self._drain)
        except OSError:  # the shadow process is gone (logged there)
            self.stats["shadow_dropped"] += 1

    def _queue(self, data: bytes) -> None:
        if len(self._backlog) >= BACKLOG_BARS:
            self.stats["shadow_dropped"] += 1
        else:
            self._backlog.append(data)

    def _drain(self) -> None:
        """The socket has room: send what waits (called by the event loop)."""
        try:
            while self._backlog:
                self._sock.send(self._backlog[0])
                self._backlog.popleft()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.stats["shadow_dropped"] += len(self._backlog)
            self._backlog.clear()
        asyncio.get_running_loop().remove_writer(self._sock)

    async def close(self) -> None:
        """Let the shadow decide what it was sent and write every shadow experience, then end it."""
        if self._process is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock)
        if self._backlog:
            loop.remove_writer(self._sock)
        await loop.run_in_executor(None, self._stop)

    def _stop(self) -> None:
        sock, process = self._sock, self._process
        sock.setblocking(True)
        sock.settimeout(120)
        try:
            while self._backlog:
                sock.send(self._backlog.popleft())
            sock.send(STOP)
            while True:
                report = pickle.loads(sock.recv(1 << 16))
                final = report.get("final")
                self._take(report)
                if final:
                    break
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            log.error("bridge: the shadow process did not report at its end (%s)", exc)
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
        sock.close()
        self._process = self._sock = None


def serve(sock: socket.socket, shadow_dir: str, buffer_root: str, cfg: dict[str, Any], initial_equity: float,
          level: int) -> None:
    """The shadow process: decide every bar received, until the bridge says stop or goes away."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s [shadow]: %(message)s")
    os.nice(5)  # Production's bridge first when the cores are busy
    import sys

    import torch

    torch.set_num_threads(1)
    sys.setswitchinterval(0.0005)
    trader = ShadowTrader(Path(shadow_dir), ExperienceBuffer(buffer_root), BridgeConfig.model_validate(cfg),
                          initial_equity)
    trader.run(sock)


class ShadowTrader:
    """The shadow process's side: the shadow sessions, the Staging model and its experiences."""

    def __init__(self, shadow_dir: Path, buffer: ExperienceBuffer, cfg: BridgeConfig, initial_equity: float) -> None:
        self.dir = shadow_dir
        self.buffer, self.cfg, self.initial_equity = buffer, cfg, initial_equity
        self.policy: DeployedPolicy | None = None
        self.sessions: dict[str, Session] = {}
        self.rows: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter(shadow_decisions=0, shadow_errors=0, shadow_load_errors=0,
                                           shadow_written=0)
        self.sock: socket.socket | None = None
        """Towards the bridge (None outside a shadow process)."""
        self._seq: Any = ...
        self._decided_by: DeployedPolicy | None = None
        self._flushed_at = self._looked_at = time.monotonic()

    def run(self, sock: socket.socket) -> None:
        """Receive bars and decide them in batches; reload on a switch; write every flush interval."""
        sock.setblocking(False)
        self.sock = sock
        self.reload()
        wait = min(self.cfg.flush_interval_s, self.cfg.reload_poll_s)
        while True:
            batch, stop = _receive(sock, wait)
            if batch:
                self._decide_safely(batch)
            now = time.monotonic()
            if stop or len(self.rows) >= self.cfg.flush_every or now - self._flushed_at >= self.cfg.flush_interval_s:
                self.flush(final=stop is not None)
            if now - self._looked_at >= self.cfg.reload_poll_s:
                self._looked_at = now
                self.reload()
            if stop is not None:
                if stop:  # asked: report; else the bridge is gone
                    sock.setblocking(True)
                    sock.send(pickle.dumps({**self.stats, "final": True}))
                return

    def reload(self) -> None:
        """Load the shadow deployment when its notice changed (none: the shadow idles)."""
        seq = reload_sequence(self.dir)
        if seq == self._seq:
            return
        self._seq = seq
        try:
            self.policy = DeployedPolicy.load(self.dir)
            log.info("shadow: trading %s (Staging)", self.policy.label)
        except NotDeployed:
            self.policy = None
        except Exception as exc:  # noqa: BLE001 - a broken Staging model idles the shadow, nothing else
            self.stats["shadow_load_errors"] += 1
            self.policy = None
            log.error("shadow: the Staging model does not load (%s): no shadow trading until the next deploy", exc)
        self._report({"loaded": self.policy.version if self.policy else None, **self.stats})

    def _report(self, report: dict[str, Any]) -> None:
        """Tell the bridge (best effort: a full socket skips a report)."""
        if self.sock is not None:
            try:
                self.sock.send(pickle.dumps(report))
            except OSError:
                pass

    def _decide_safely(self, batch: list[Item]) -> None:
        try:
            self.decide(batch)
        except Exception:  # noqa: BLE001 - the shadow's failure is logged, never Production's
            self.stats["shadow_errors"] += 1
            log.exception("shadow: failed on %d bar(s); they have no shadow decision", len(batch))

    def decide(self, batch: list[Item]) -> None:
        """The shadow's decisions on ``batch``, in order: fills of the previous targets at these
        bars' opens, one forward pass per round (each session at most once: a lagging shadow has
        several bars of a session queued), the risk guard; the finished experiences collected."""
        policy = self.policy
        if policy is None:
            return
        if policy is not self._decided_by:  # a new Staging model starts flat, on the bars seen so far
            self.sessions = {key: self._fresh(s, policy) for key, s in self.sessions.items()}
            self._decided_by = policy
        round_: list[Item] = []
        keys: set[str] = set()
        for item in batch:
            if item[0] in keys or len(round_) >= BATCH:
                self._decide_round(policy, round_)
                round_, keys = [], set()
            round_.append(item)
            keys.add(item[0])
        if round_:
            self._decide_round(policy, round_)

    def _decide_round(self, policy: DeployedPolicy, batch: list[Item]) -> None:
        fault_delay("shadow:decide")
        steps = []
        for key, instrument, bar_period, spec, bar, killed, stale in batch:
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

    def flush(self, final: bool = False) -> None:
        """Write the finished experiences (``final``: the sessions' last ones are dropped: no next bar)."""
        self._flushed_at = time.monotonic()
        if final:
            for session in self.sessions.values():
                session.drop_pending()
                self.rows.extend(session.take_rows())
        rows, self.rows = self.rows, []
        if rows:
            try:
                self.buffer.add(rows)
                self.buffer.flush()
                self.stats["shadow_written"] += len(rows)
            except Exception:  # noqa: BLE001 - a full disk must not stop anything; retried next time
                log.exception("shadow: writing %d experiences failed; retrying later", len(rows))
                self.rows[:0] = rows
        self._report(dict(self.stats))  # the bridge's view of the shadow, every flush interval


def _receive(sock: socket.socket, wait: float) -> tuple[list[Item], bool | None]:
    """The bars waiting (after up to ``wait`` seconds for the first), and whether to stop: True
    when the bridge asked, False when it is gone, None to go on."""
    batch: list[Item] = []
    if not select.select([sock], [], [], wait)[0]:
        return batch, None
    try:
        while len(batch) < 4 * BATCH:
            data = sock.recv(1 << 16)
            if not data:
                return batch, False
            if data == STOP:
                return batch, True
            batch.append(pickle.loads(data))
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        return batch, False
    return batch, None


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
