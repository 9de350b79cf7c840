"""The bridge server: asyncio TCP, one JSON message per line (``nt8/PROTOCOL.md``).

One event loop serves every connection. A bar's inference is batched with the bars of other
sessions that arrived in the same loop iteration (one forward pass for all of them). Models
switch between two requests: a watcher loads a newly deployed release in a worker thread and
swaps it in with one assignment, so no request fails or waits for a load. Experiences are
written to the buffer in a worker thread (in batches, on disconnect, and at stop).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import ipaddress
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from mlproject.atomic import atomic_write_text
from mlproject.bridge.deployed import DeployedPolicy, NotDeployed, reload_sequence
from mlproject.bridge.observations import bars_needed
from mlproject.bridge.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    decode,
    encode,
    integer,
    number,
    parse_bar,
    shown,
    text,
)
from mlproject.bridge.session import Session
from mlproject.config import Config
from mlproject.experience import ExperienceBuffer

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16


def token_from_env(cfg: Config) -> str:
    """The shared secret from ``bridge.token_env``; a clear error when it is missing or short."""
    name = cfg.bridge.token_env
    token = os.environ.get(name, "")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"bridge: set the environment variable {name} (bridge.token_env) to a shared secret of at "
                         f"least {MIN_TOKEN_LENGTH} characters, e.g. `export {name}=$(python -c \"import secrets; "
                         "print(secrets.token_urlsafe(24))\")`; the NinjaTrader strategy sends the same token")
    return token


def tune_process() -> None:
    """Settings for a process that serves the bridge (``pipelines.bridge``, the benchmark): torch
    on one thread (small networks, one request at a time), and a 0.5 ms GIL switch interval
    instead of 5 ms, so the experience writer thread cannot hold a decision up for long."""
    import sys

    import torch

    torch.set_num_threads(1)
    sys.setswitchinterval(0.0005)


def check_address(host: str, port: int) -> None:
    """A ValueError naming the setting unless ``host:port`` is something the bridge can listen on
    (checked before the model loads; binding itself may still find the port taken)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"bridge.port (--port): {port!r} is not a TCP port; use 0-65535 (0: any free port)")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host) or ":" in host:  # 256.1.1.1 is no host name to look up
        raise ValueError(f"bridge.host (--host): {host!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1)")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"bridge.host (--host): {host!r} is not an address of this machine ({exc})") from None


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server's TLS context (None without a certificate); a ValueError naming ``bridge.tls_cert``
    or ``bridge.tls_key`` when the file is missing or is not PEM."""
    if not cert:
        return None
    for name, path in (("bridge.tls_cert", cert), ("bridge.tls_key", key)):
        if not Path(path).is_file():
            what = "certificate" if name.endswith("cert") else "private key"
            raise ValueError(f"{name}: {path} is not a file (a PEM {what})")
    try:
        ssl.create_default_context(cafile=cert)  # the certificate alone: a binary file fails here
    except (ssl.SSLError, ValueError, UnicodeError) as exc:
        raise ValueError(f"bridge.tls_cert: {cert} is not a PEM certificate ({exc})") from None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:  # a key with a passphrase fails too (no prompt on a server)
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"bridge.tls_key: {key} is not the unencrypted PEM private key of bridge.tls_cert {cert} "
                         f"({exc})") from None
    return ctx


def kill_file_of(cfg: Config) -> Path:
    return Path(cfg.bridge.kill_file) if cfg.bridge.kill_file else Path(cfg.promotion.deploy_dir) / "KILL"


def _same_period(a: str, b: str | None) -> bool:
    if b is None:
        return True
    try:
        return pd.Timedelta(a) == pd.Timedelta(b)
    except ValueError:
        return False


class Bridge:
    """The server. ``await start()``, then ``await stop()`` (which flushes every experience)."""

    def __init__(self, cfg: Config, *, token: str, deploy_dir: str | Path | None = None,
                 buffer: ExperienceBuffer | None = None, host: str | None = None, port: int | None = None) -> None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"bridge token: at least {MIN_TOKEN_LENGTH} characters")
        self.cfg = cfg
        self.bcfg = cfg.bridge
        self._token = token.encode()
        # Settings it cannot listen with are errors now, before anything loads (pipelines.bridge: exit 2).
        check_address(host or self.bcfg.host, self.bcfg.port if port is None else port)
        self._ssl_context = tls_context(self.bcfg.tls_cert, self.bcfg.tls_key)
        self.deploy_dir = Path(deploy_dir or cfg.promotion.deploy_dir)
        self.kill_file = kill_file_of(cfg) if cfg.bridge.kill_file or deploy_dir is None else self.deploy_dir / "KILL"
        self.buffer = buffer if buffer is not None else ExperienceBuffer(cfg.continuous_learning.experience_storage)
        self.host = host or self.bcfg.host
        self.port = self.bcfg.port if port is None else port
        self.zone = ZoneInfo(self.bcfg.timezone) if self.bcfg.timezone else None
        self.policy: DeployedPolicy | None = None
        self.sessions: dict[str, Session] = {}
        self.active: dict[str, asyncio.StreamWriter] = {}
        self.connections: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()
        self._seen: dict[asyncio.StreamWriter, float] = {}
        self._authenticated: set[asyncio.StreamWriter] = set()
        self._pending: dict[asyncio.StreamWriter, None] = {}
        """Connections waiting for their hello, oldest first (a dict keeps insertion order)."""
        self._timed_out: set[asyncio.StreamWriter] = set()
        self.rows: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter()
        self.written = 0
        self.started_at = time.time()
        self._seq: Any = None
        self._failed_seq: Any = None
        self._killed = False
        self._queue: list[tuple[DeployedPolicy, np.ndarray, asyncio.Future]] = []
        self._batch_scheduled = False
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._io = ThreadPoolExecutor(1, thread_name_prefix="bridge-io")
        self._flush_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        loop = self._loop = asyncio.get_running_loop()
        self._flush_lock = asyncio.Lock()
        self._seq = reload_sequence(self.deploy_dir)
        try:
            self.policy = await loop.run_in_executor(None, DeployedPolicy.load, self.deploy_dir)
            log.info("bridge: trading with %s (%s)", self.policy.label, self.policy.path)
        except NotDeployed as exc:
            log.warning("bridge: %s; clients are refused until a model is deployed", exc)
        # Everything loaded so far (torch, RLlib, the model) lives as long as the process: out of the
        # collector's sight, so a collection during trading does not walk it (a p99 of milliseconds).
        gc.freeze()
        self._killed = self.kill_file.exists()
        if self._killed:
            log.warning("bridge: kill switch is on (%s exists): every decision is flat", self.kill_file)
        self._server = await asyncio.start_server(self._client, self.host, self.port,
                                                  limit=self.bcfg.max_message_bytes, ssl=self._ssl_context)
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._flusher()),
                       asyncio.create_task(self._sweep())]
        host, port = self.address
        log.info("bridge: listening on %s:%d%s", host, port, " (TLS)" if self.bcfg.tls_cert else "")
        return host, port

    @property
    def address(self) -> tuple[str, int]:
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    async def stop(self) -> None:
        """Stop listening, close every connection, write every experience."""
        if self._server is not None:
            self._server.close()
        for writer in list(self.connections):
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._handlers:  # each sees its closed connection and hands in its session's rows
            _, late = await asyncio.wait(set(self._handlers), timeout=5.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for session in self.sessions.values():
            session.drop_pending()
            self.rows.extend(session.take_rows())
        await self.flush()
        self._io.shutdown(wait=True)
        log.info("bridge: stopped; %d decisions, %d experiences written", self.stats["decisions"], self.written)

    # -- experiences -----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write the collected experiences (in the I/O thread); on failure they are kept for the next try."""
        async with self._flush_lock:
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

    def _collect(self, session: Session) -> None:
        if session.rows:
            self.rows.extend(session.take_rows())
            if len(self.rows) >= self.bcfg.flush_every and (self._flush_task is None or self._flush_task.done()):
                self._flush_task = asyncio.create_task(self.flush())

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.bcfg.flush_interval_s)
            if self.rows:
                await self.flush()

    # -- deploys and the kill switch -----------------------------------------------------------------

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.bcfg.reload_poll_s)
            self._check_kill_file()
            seq = reload_sequence(self.deploy_dir)
            if seq is None or seq == self._seq or seq == self._failed_seq:
                continue
            try:
                new = await loop.run_in_executor(None, DeployedPolicy.load, self.deploy_dir)
            except Exception as exc:  # noqa: BLE001 - keep trading with the loaded model
                self._failed_seq = seq
                log.error("bridge: the newly deployed model does not load (%s); still trading with %s", exc,
                          self.policy.label if self.policy else "nothing")
                continue
            old, self.policy, self._seq = self.policy, new, seq
            gc.freeze()
            self.stats["reloads"] += 1
            log.info("bridge: switched from %s to %s", old.label if old else "nothing", new.label)

    def _check_kill_file(self) -> bool:
        on = self.kill_file.exists()
        if on and not self._killed:
            self._push_kill("kill file " + str(self.kill_file))
        elif not on and self._killed:
            log.warning("bridge: kill switch off (%s removed): trading resumes", self.kill_file)
        self._killed = on
        return on

    def _push_kill(self, reason: str) -> None:
        log.warning("bridge: KILL SWITCH ON (%s): flattening every session", reason)
        message = encode({"type": "kill", "reason": reason, "model_version": self._version()})
        for writer in list(self.connections):
            if not writer.is_closing():
                writer.write(message)

    def kill(self, reason: str = "") -> None:
        self.kill_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.kill_file, f"{datetime.now(timezone.utc).isoformat()} {reason}\n")
        self._push_kill(reason or "kill message")
        self._killed = True

    def resume(self) -> None:
        self.kill_file.unlink(missing_ok=True)
        self._check_kill_file()

    def _version(self) -> str | None:
        return self.policy.version if self.policy is not None else None

    # -- inference, batched across sessions ----------------------------------------------------------

    def _infer(self, policy: DeployedPolicy, obs: np.ndarray) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((policy, obs, future))
        if not self._batch_scheduled:
            self._batch_scheduled = True
            asyncio.get_running_loop().call_soon(self._run_batch)
        return future

    def _run_batch(self) -> None:
        self._batch_scheduled = False
        queue, self._queue = self._queue, []
        by_policy: dict[int, list[tuple[DeployedPolicy, np.ndarray, asyncio.Future]]] = {}
        for item in queue:
            by_policy.setdefault(id(item[0]), []).append(item)
        for items in by_policy.values():
            try:
                actions = items[0][0].act(np.stack([obs for _, obs, _ in items]))
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                for _, _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.stats["batches"] += 1
            for (_, _, future), action in zip(items, actions.tolist()):
                if not future.done():
                    future.set_result(action)

    # -- connections -----------------------------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        """One line (None at the end of the stream). A line over the limit is skipped whole and
        reported as ``too_large``. Silence is the sweeper's business (no timer per read: a timer
        per request cost more than the rest of the protocol handling)."""
        try:
            line = await reader.readuntil(b"\n")
            self._seen[writer] = self._loop.time()
            return line
        except asyncio.IncompleteReadError as exc:
            return exc.partial if exc.partial.strip() else None
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
        while True:  # discard the rest of the long line
            await reader.readexactly(consumed)
            try:
                await reader.readuntil(b"\n")
                break
            except asyncio.LimitOverrunError as exc:
                consumed = exc.consumed
            except asyncio.IncompleteReadError:
                break
        self._seen[writer] = self._loop.time()
        raise ProtocolError("too_large", f"message longer than {self.bcfg.max_message_bytes} bytes (skipped)")

    async def _sweep(self) -> None:
        """Drop connections silent for longer than their limit: hello_timeout_s before the hello,
        heartbeat_timeout_s after it."""
        every = min(self.bcfg.hello_timeout_s, self.bcfg.heartbeat_timeout_s, 4.0) / 4
        while True:
            await asyncio.sleep(every)
            now = self._loop.time()
            for writer in list(self.connections):
                authenticated = writer in self._authenticated
                limit = self.bcfg.heartbeat_timeout_s if authenticated else self.bcfg.hello_timeout_s
                if writer not in self._timed_out and now - self._seen.get(writer, now) > limit:
                    self._timed_out.add(writer)
                    self.stats["error_timeout"] += 1
                    what = "nothing received" if authenticated else "no hello"
                    log.warning("bridge: %s: %s for %.1f s: dropped", writer.get_extra_info("peername"), what, limit)
                    self._send(writer, {"type": "error", "code": "timeout", "message": f"{what} for {limit} s"})
                    writer.close()

    def _drop_oldest_pending(self) -> None:
        """More than ``max_pending`` connections wait for their hello: close the oldest. Dropping the
        oldest rather than refusing the newest keeps the bridge open to a real client under a flood of
        idle connections: NinjaTrader sends hello as soon as it connects, so it is served unless
        ``max_pending`` more connections arrive within that round trip; refusing the newest would shut
        it out for as long as the flood holds the pending slots (an attacker reconnecting every
        ``hello_timeout_s`` holds them for good). Sessions never count here: they have their own
        ``max_sessions``."""
        oldest = next(iter(self._pending))
        del self._pending[oldest]
        self._timed_out.add(oldest)  # the sweeper leaves it alone
        self.stats["pending_dropped"] += 1
        if self.stats["pending_dropped"] % 1000 == 1:
            log.warning("bridge: more than %d connections without hello (%d dropped so far): dropping the oldest "
                        "(%s)", self.bcfg.max_pending, self.stats["pending_dropped"], oldest.get_extra_info("peername"))
        self._send(oldest, {"type": "error", "code": "server_busy",
                            "message": f"more than {self.bcfg.max_pending} connections without hello: the oldest is "
                                       "dropped"})
        oldest.close()

    def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any], ident: Any = None) -> None:
        if ident is not None:
            message = {**message, "id": ident}
        if "model_version" not in message:
            message["model_version"] = self._version()
        writer.write(encode(message))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.connections.add(writer)
        self._seen[writer] = self._loop.time()
        task = asyncio.current_task()
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        session: Session | None = None
        self._pending[writer] = None
        if len(self._pending) > self.bcfg.max_pending:
            self._drop_oldest_pending()
        try:
            if len(self.active) >= self.bcfg.max_sessions:  # nothing to wait for: say so now
                raise ProtocolError("server_busy", f"the bridge serves at most {self.bcfg.max_sessions} sessions")
            session = await self._hello(reader, writer)
            while session is not None:
                ident = None
                try:
                    line = await self._read(reader, writer)
                    if line is None:
                        break
                    msg = decode(line)
                    ident = msg.get("id")
                    reply = await self._handle(session, msg)
                except ProtocolError as exc:
                    self.stats[f"error_{exc.code}"] += 1
                    self._send(writer, {"type": "error", "code": exc.code, "message": exc.message, "ref": exc.ref}, ident)
                    if exc.closes:
                        break
                    await writer.drain()
                    continue
                self._send(writer, reply, ident)
                if reply["type"] == "bye":
                    break
                await writer.drain()
        except ProtocolError as exc:  # in hello, or server_busy: refused, then closed
            self.stats[f"error_{exc.code}"] += 1
            log.warning("bridge: %s refused: %s", peer, exc.message)
            self._send(writer, {"type": "error", "code": exc.code, "message": exc.message, "ref": exc.ref})
        except (ConnectionError, OSError, EOFError, asyncio.CancelledError):
            pass  # the peer went away (or the sweeper closed a silent one mid-line)
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the server; logged in full
            self.stats["error_internal"] += 1
            log.exception("bridge: %s: internal error; connection closed", peer)
            self._send(writer, {"type": "error", "code": "internal", "message": "internal error (logged)"})
        finally:
            self.connections.discard(writer)
            self._seen.pop(writer, None)
            self._authenticated.discard(writer)
            self._pending.pop(writer, None)
            self._timed_out.discard(writer)
            if session is not None and self.active.get(session.key) is writer:
                del self.active[session.key]
                self._collect(session)
                if self.rows and self._flush_lock is not None:
                    self._flush_task = asyncio.create_task(self.flush())  # a disconnect writes what it held
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                pass
            writer.close()

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Session | None:
        line = await self._read(reader, writer)
        if line is None:
            return None
        msg = decode(line)
        if msg["type"] != "hello":
            raise ProtocolError("not_authenticated", "the first message must be hello (with the token)", msg["type"])
        token = msg.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(errors="surrogatepass"), self._token):
            raise ProtocolError("unauthorized", "wrong or missing token", "hello")
        if msg.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError("protocol", f"this bridge speaks protocol {PROTOCOL_VERSION}, the client "
                                            f"{shown(msg.get('protocol'))}", "hello")
        instrument, account = text(msg, "instrument", limit=40), text(msg, "account", limit=80)
        bar_period, source = text(msg, "bar_period", limit=20), text(msg, "source", default="live", limit=10)
        if source not in ("live", "paper"):
            raise ProtocolError("bad_value", "source: live or paper", "hello")
        policy = self.policy
        if policy is None:
            raise ProtocolError("no_model", f"nothing is deployed in {self.deploy_dir} yet", "hello")
        settings = policy.settings
        symbol = str(settings.instrument.get("symbol"))
        if instrument != symbol:
            raise ProtocolError("mismatch", f"{policy.label} trades {symbol}; this client sends {instrument}", "hello")
        if not _same_period(bar_period, settings.bar_period):
            raise ProtocolError("mismatch", f"{policy.label} was trained on {settings.bar_period} bars; this client "
                                            f"sends {bar_period}", "hello")
        key = f"{account}/{instrument}"
        if key in self.active:
            raise ProtocolError("session_busy", f"session {key} is in use by another connection", "hello")
        if len(self.active) >= self.bcfg.max_sessions:
            raise ProtocolError("server_busy", f"the bridge serves at most {self.bcfg.max_sessions} sessions", "hello")
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = Session(account, instrument, bar_period, source, policy, self.bcfg,
                                                   self.cfg.env.initial_equity)
        self.active[key] = writer
        self._authenticated.add(writer)
        self._pending.pop(writer, None)
        max_position = min(self.bcfg.max_position if self.bcfg.max_position is not None else settings.max_contracts,
                           settings.max_contracts)
        self._send(writer, {"type": "welcome", "protocol": PROTOCOL_VERSION, "session": key, "model_name": policy.name,
                            "model_version": policy.version, "max_position": max_position,
                            "bars_needed": bars_needed(settings),
                            "heartbeat_s": self.bcfg.heartbeat_timeout_s / 3,
                            "max_message_bytes": self.bcfg.max_message_bytes, "position": session.book.position},
                   msg.get("id"))
        await writer.drain()
        self.stats["sessions"] += 1
        log.info("bridge: session %s (%s) opened by %s", key, source, writer.get_extra_info("peername"))
        return session

    async def _handle(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        kind = msg["type"]
        if kind == "bar":
            return await self._bar(session, msg)
        if kind == "fill":
            quantity = integer(msg, "quantity", limit=10_000)
            price = number(msg, "price", positive=True)
            session.check_prices("fill", price=price)
            commission = number(msg, "commission", low=0.0) if msg.get("commission") is not None else None
            session.fill(quantity, price, commission)
            self.stats["fills"] += 1
            return {"type": "ack", "ref": "fill", "position": session.book.position}
        if kind == "position":
            position = integer(msg, "position", limit=10_000)
            avg = number(msg, "avg_price", low=0.0, default=0.0)
            if position != 0:
                session.check_prices("position", avg_price=avg)
            session.sync_position(position, avg)
            return {"type": "ack", "ref": "position", "position": session.book.position}
        if kind == "heartbeat":
            return {"type": "heartbeat", "time": datetime.now(timezone.utc).isoformat()}
        if kind == "kill":
            reason = msg.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise ProtocolError("bad_value", f"reason: expected a string, got {shown(reason)}", "kill")
            self.kill(f"kill message from {session.key}" + (f": {str(reason)[:200]}" if reason else ""))
            return {"type": "ack", "ref": "kill", "position": session.book.position}
        if kind == "resume":
            self.resume()
            return {"type": "ack", "ref": "resume", "position": session.book.position}
        if kind == "bye":
            session.drop_pending()
            return {"type": "bye"}
        raise ProtocolError("bad_value", "hello was already accepted on this connection", kind)  # a second hello

    async def _bar(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        bar = parse_bar(msg, self.zone)
        session.check_prices("bar", open=bar.open, high=bar.high, low=bar.low, close=bar.close)
        last = session.last_bar
        if bar.historical and last is not None and bar.time < last.time:
            # NinjaTrader replays the chart's history when the strategy is re-enabled: those bars
            # are already in the session; acknowledged, nothing changes.
            return {"type": "decision", "decision_id": None, "time": bar.time.isoformat(),
                    "target_position": session.book.position, "action": None, "guard": "historical",
                    "policy_target": None, "reference_price": bar.close, "repeat": True}
        if session.is_repeat(bar):
            return {**session.last_decision, "repeat": True}
        policy = self.policy
        if policy is None:
            raise ProtocolError("no_model", "no model is deployed", "bar")
        obs, guard = session.prepare(bar, policy)
        action = None
        if obs is not None:
            action = await self._infer(policy, obs)
        # The kill file is looked at on every bar (a stat, ~2 us): `pipelines.bridge kill` takes effect
        # at the next decision, not at the watcher's next poll; the watcher pushes the kill to clients.
        killed = self._killed or self.kill_file.exists()
        if killed != self._killed:
            self._check_kill_file()
        stale = (session.source == "live" and self.bcfg.max_bar_age_s is not None and not bar.historical
                 and (datetime.now(timezone.utc) - bar.utc).total_seconds() > self.bcfg.max_bar_age_s)
        decision = session.decide(bar, obs, policy, action, guard, killed=killed, stale=stale)
        self.stats["decisions"] += 1
        if decision["guard"]:
            self.stats[f"guard_{decision['guard']}"] += 1
        self._collect(session)
        return decision


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

