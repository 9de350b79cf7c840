"""The bridge server: asyncio TCP, one JSON message per line (``nt8/PROTOCOL.md``).

One event loop serves every connection. A bar's inference is batched with the bars of other
sessions that arrived in the same loop iteration (one forward pass for all of them). Models
switch between two requests: a watcher loads a newly deployed release in a worker thread and
swaps it in with one assignment, so no request fails or waits for a load. Experiences are
written to the buffer in a worker thread (in batches, on disconnect, and at stop:
:mod:`mlproject.bridge.sink`); the kill switch is :mod:`mlproject.bridge.killswitch`, the
batched inference :mod:`mlproject.bridge.batching`. Each connection's state is one
:class:`Connection` record.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from mlproject.bridge.batching import InferenceBatcher
from mlproject.bridge.deployed import DeployedPolicy, NotDeployed, reload_sequence, stood_down
from mlproject.bridge.killswitch import KillSwitch, kill_file_of
from mlproject.bridge.listening import MIN_TOKEN_LENGTH, check_address, tls_context
from mlproject.bridge.observations import bars_needed, bars_needed_for
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
from mlproject.bridge.session import Session, same_period
from mlproject.bridge.shadow import ShadowLink
from mlproject.bridge.sink import ExperienceSink
from mlproject.bridge.thread import BridgeThread  # where its users import it from
from mlproject.config import Config
from mlproject.experience import ExperienceBuffer
from mlproject.instruments import resolve_instrument

log = logging.getLogger(__name__)
__all__ = ["Bridge", "BridgeThread", "tune_process"]


def tune_process() -> None:
    """Settings for a process that serves the bridge (``pipelines.bridge``, the benchmark): torch
    on one thread (small networks, one request at a time), and a 0.5 ms GIL switch interval
    instead of 5 ms, so the experience writer thread cannot hold a decision up for long."""
    import sys

    import torch

    torch.set_num_threads(1)
    sys.setswitchinterval(0.0005)


def _hello_fields(msg: dict[str, Any]) -> tuple[str, str, str, str]:
    """(instrument, account, bar_period, source) of a hello message, checked."""
    instrument, account = text(msg, "instrument", limit=40), text(msg, "account", limit=80)
    bar_period, source = text(msg, "bar_period", limit=20), text(msg, "source", default="live", limit=10)
    if source not in ("live", "paper"):
        raise ProtocolError("bad_value", "source: live or paper", "hello")
    return instrument, account, bar_period, source


def _check_model(policy: DeployedPolicy | None, instrument: str, bar_period: str, cfg: Config,
                 deploy_dir: Path) -> dict[str, Any]:
    """The instrument spec a session of ``instrument`` on ``bar_period`` bars trades with: the
    deployed policy's, if it trades them (else a ProtocolError); with nothing deployed, the
    configuration's (``env.instrument``) if it is that instrument: the session stays flat until a
    model is deployed."""
    if policy is None:
        spec = asdict(resolve_instrument(cfg.env.instrument))
        if instrument != str(spec["symbol"]):
            raise ProtocolError("no_model", f"nothing is deployed in {deploy_dir} yet, and this bridge's "
                                            f"configuration trades {spec['symbol']}, not {instrument}", "hello")
        return spec
    settings = policy.settings
    symbol = str(settings.instrument.get("symbol"))
    if instrument != symbol:
        raise ProtocolError("mismatch", f"{policy.label} trades {symbol}; this client sends {instrument}", "hello")
    if not same_period(bar_period, settings.bar_period):
        raise ProtocolError("mismatch", f"{policy.label} was trained on {settings.bar_period} bars; this client "
                                        f"sends {bar_period}", "hello")
    return settings.instrument


@dataclass(eq=False)
class Connection:
    """One client connection's state (one record: what the sweeper, the hello cap and the
    session bookkeeping read)."""

    writer: asyncio.StreamWriter
    seen: float
    """Loop time of the last line received (silence is the sweeper's business)."""
    session: Session | None = None
    """The session its hello opened; None until a hello is accepted."""
    dropped: bool = False
    """Closed by the bridge (silent too long, or the oldest of too many without hello)."""

    @property
    def waiting(self) -> bool:
        """Waiting for its hello: neither accepted nor dropped."""
        return self.session is None and not self.dropped

    @property
    def peer(self) -> Any:
        return self.writer.get_extra_info("peername")


class Bridge:
    """The server. ``await start()``, then ``await stop()`` (which flushes every experience)."""

    def __init__(self, cfg: Config, *, token: str, deploy_dir: str | Path | None = None,
                 buffer: ExperienceBuffer | None = None, host: str | None = None, port: int | None = None) -> None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"bridge token: at least {MIN_TOKEN_LENGTH} characters")
        self.cfg, self.bcfg = cfg, cfg.bridge
        self._token = token.encode()
        self.host = host or self.bcfg.host
        self.port = self.bcfg.port if port is None else port
        # Settings it cannot listen with are errors now, before anything loads (pipelines.bridge: exit 2).
        check_address(self.host, self.port)
        self._ssl_context = tls_context(self.bcfg.tls_cert, self.bcfg.tls_key)
        self.deploy_dir = Path(deploy_dir or cfg.promotion.deploy_dir)
        kill_file = kill_file_of(cfg) if cfg.bridge.kill_file or deploy_dir is None else self.deploy_dir / "KILL"
        self.kill_switch = KillSwitch(kill_file, self._push_kill)
        buffer = buffer if buffer is not None else ExperienceBuffer(cfg.continuous_learning.experience_storage)
        self.sink = ExperienceSink(buffer, self.bcfg)
        self.shadow = ShadowLink(self.deploy_dir, buffer.root, self.bcfg, cfg.env.initial_equity)
        self.zone = ZoneInfo(self.bcfg.timezone) if self.bcfg.timezone else None
        self._nothing_served()

    def _nothing_served(self) -> None:
        """The state before :meth:`start`: no model, sessions, connections or counts yet."""
        self.policy: DeployedPolicy | None = None
        self.sessions: dict[str, Session] = {}
        self.active: dict[str, Connection] = {}
        """The connection of every session in use, by session key."""
        self.connections: dict[asyncio.StreamWriter, Connection] = {}
        """Every open connection, oldest first (a dict keeps insertion order)."""
        self.stats: Counter[str] = Counter()
        self.started_at = time.time()
        self._batcher = InferenceBatcher(self.stats)
        self._handlers: set[asyncio.Task] = set()
        self._seq: Any = None
        self._failed_seq: Any = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        self._seq = reload_sequence(self.deploy_dir)
        await self._load_first()
        await self.shadow.start()
        # Everything loaded so far (torch, RLlib, the model) lives as long as the process: out of the
        # collector's sight, so a collection during trading does not walk it (a p99 of milliseconds).
        gc.freeze()
        self.kill_switch.load()
        self._server = await asyncio.start_server(self._client, self.host, self.port,
                                                  limit=self.bcfg.max_message_bytes, ssl=self._ssl_context)
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self.sink.run()),
                       asyncio.create_task(self._sweep()), asyncio.create_task(self.shadow.watch())]
        host, port = self.address
        log.info("bridge: listening on %s:%d%s", host, port, " (TLS)" if self.bcfg.tls_cert else "")
        return host, port

    async def _load_first(self) -> None:
        """Load the deployed model, if there is one (without: clients are refused until one is)."""
        try:
            self.policy = await self._loop.run_in_executor(None, DeployedPolicy.load, self.deploy_dir)
            log.info("bridge: trading with %s (%s)", self.policy.label, self.policy.path)
        except NotDeployed as exc:
            log.warning("bridge: %s; sessions of %s trade flat until a model is deployed", exc,
                        resolve_instrument(self.cfg.env.instrument).symbol)

    @property
    def address(self) -> tuple[str, int]:
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    @property
    def written(self) -> int:
        """Experiences written to the buffer so far."""
        return self.sink.written

    def pending(self) -> list[Connection]:
        """The connections waiting for their hello, oldest first."""
        return [conn for conn in self.connections.values() if conn.waiting]

    async def stop(self) -> None:
        """Stop listening, close every connection, write every experience."""
        if self._server is not None:
            self._server.close()
        for writer in list(self.connections):
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._end_handlers()
        await self.sink.close(list(self.sessions.values()))
        await self.shadow.close()
        log.info("bridge: stopped; %d decisions, %d experiences written", self.stats["decisions"], self.written)

    async def _end_handlers(self) -> None:
        """Let every connection's handler see its closed connection and hand in its session's
        rows (cancelled after 5 s)."""
        if not self._handlers:
            return
        _, late = await asyncio.wait(set(self._handlers), timeout=5.0)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def flush(self) -> None:
        """Write the collected experiences now (see :class:`~mlproject.bridge.sink.ExperienceSink`)."""
        await self.sink.flush()

    # -- deploys and the kill switch -----------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.bcfg.reload_poll_s)
            self.kill_switch.poll()
            seq = reload_sequence(self.deploy_dir)
            if seq is not None and seq != self._seq and seq != self._failed_seq:
                await self._reload(seq)

    async def _reload(self, seq: Any) -> None:
        """Load the newly deployed release and switch to it; a release that does not load is
        remembered (``seq``) and trading goes on with the loaded model. A stand-down (reconcile
        found nothing in Production: no ``current``, a notice without a version) switches to no
        model: every session trades flat."""
        try:
            new = await self._loop.run_in_executor(None, DeployedPolicy.load, self.deploy_dir)
        except Exception as exc:  # noqa: BLE001 - keep trading with the loaded model
            if isinstance(exc, NotDeployed) and stood_down(self.deploy_dir):
                new = None
            else:
                self._failed_seq = seq
                log.error("bridge: the newly deployed model does not load (%s); still trading with %s", exc,
                          self.policy.label if self.policy else "nothing")
                return
        old, self.policy, self._seq = self.policy, new, seq
        gc.freeze()
        self.stats["reloads"] += 1
        if new is None:
            log.warning("bridge: nothing is in Production any more (%s was deployed): every session trades flat",
                        old.label if old else "nothing")
        else:
            log.info("bridge: switched from %s to %s", old.label if old else "nothing", new.label)

    def _push_kill(self, reason: str) -> None:
        """Tell every connection that the kill switch is on."""
        message = encode({"type": "kill", "reason": reason, "model_version": self._version()})
        for writer in list(self.connections):
            if not writer.is_closing():
                writer.write(message)

    def _version(self) -> str | None:
        return self.policy.version if self.policy is not None else None

    # -- connections -----------------------------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader, conn: Connection) -> bytes | None:
        """One line (None at the end of the stream). A line over the limit is skipped whole and
        reported as ``too_large``. Silence is the sweeper's business (no timer per read: a timer
        per request cost more than the rest of the protocol handling)."""
        try:
            line = await reader.readuntil(b"\n")
            conn.seen = self._loop.time()
            return line
        except asyncio.IncompleteReadError as exc:
            return exc.partial if exc.partial.strip() else None
        except asyncio.LimitOverrunError as exc:
            await _skip_line(reader, exc.consumed)
        conn.seen = self._loop.time()
        raise ProtocolError("too_large", f"message longer than {self.bcfg.max_message_bytes} bytes (skipped)")

    async def _sweep(self) -> None:
        """Drop connections silent for longer than their limit: hello_timeout_s before the hello,
        heartbeat_timeout_s after it."""
        every = min(self.bcfg.hello_timeout_s, self.bcfg.heartbeat_timeout_s, 4.0) / 4
        while True:
            await asyncio.sleep(every)
            now = self._loop.time()
            for conn in list(self.connections.values()):
                limit = self.bcfg.heartbeat_timeout_s if conn.session is not None else self.bcfg.hello_timeout_s
                if not conn.dropped and now - conn.seen > limit:
                    self._time_out(conn, limit)

    def _time_out(self, conn: Connection, limit: float) -> None:
        conn.dropped = True
        self.stats["error_timeout"] += 1
        what = "nothing received" if conn.session is not None else "no hello"
        log.warning("bridge: %s: %s for %.1f s: dropped", conn.peer, what, limit)
        self._send(conn.writer, {"type": "error", "code": "timeout", "message": f"{what} for {limit} s"})
        conn.writer.close()

    def _drop_oldest_pending(self, oldest: Connection) -> None:
        """More than ``max_pending`` connections wait for their hello: close the oldest. Dropping the
        oldest rather than refusing the newest keeps the bridge open to a real client under a flood of
        idle connections: NinjaTrader sends hello as soon as it connects, so it is served unless
        ``max_pending`` more connections arrive within that round trip; refusing the newest would shut
        it out for as long as the flood holds the pending slots (an attacker reconnecting every
        ``hello_timeout_s`` holds them for good). Sessions never count here: they have their own
        ``max_sessions``."""
        oldest.dropped = True  # no longer pending; the sweeper leaves it alone
        self.stats["pending_dropped"] += 1
        if self.stats["pending_dropped"] % 1000 == 1:
            log.warning("bridge: more than %d connections without hello (%d dropped so far): dropping the oldest "
                        "(%s)", self.bcfg.max_pending, self.stats["pending_dropped"], oldest.peer)
        self._send(oldest.writer, {"type": "error", "code": "server_busy",
                                   "message": f"more than {self.bcfg.max_pending} connections without hello: "
                                              "the oldest is dropped"})
        oldest.writer.close()

    def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any], ident: Any = None) -> None:
        if ident is not None:
            message = {**message, "id": ident}
        if "model_version" not in message:
            message["model_version"] = self._version()
        writer.write(encode(message))

    def _error(self, writer: asyncio.StreamWriter, exc: ProtocolError, ident: Any = None) -> None:
        """Count the error and tell the client."""
        self.stats[f"error_{exc.code}"] += 1
        self._send(writer, {"type": "error", "code": exc.code, "message": exc.message, "ref": exc.ref}, ident)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self._connect(writer)
        try:
            if len(self.active) >= self.bcfg.max_sessions:  # nothing to wait for: say so now
                raise ProtocolError("server_busy", f"the bridge serves at most {self.bcfg.max_sessions} sessions")
            session = await self._hello(reader, conn)
            if session is not None:
                await self._serve(reader, conn, session)
        except ProtocolError as exc:  # in hello, or server_busy: refused, then closed
            log.warning("bridge: %s refused: %s", conn.peer, exc.message)
            self._error(writer, exc)
        except (ConnectionError, OSError, EOFError, asyncio.CancelledError):
            pass  # the peer went away (or the sweeper closed a silent one mid-line)
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the server; logged in full
            self.stats["error_internal"] += 1
            log.exception("bridge: %s: internal error; connection closed", conn.peer)
            self._send(writer, {"type": "error", "code": "internal", "message": "internal error (logged)"})
        finally:
            await self._disconnect(conn)

    def _connect(self, writer: asyncio.StreamWriter) -> Connection:
        """Record a new connection and its handler; past ``max_pending`` connections without hello,
        the oldest of them is dropped."""
        conn = self.connections[writer] = Connection(writer, self._loop.time())
        task = asyncio.current_task()
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        waiting = self.pending() if len(self.connections) > self.bcfg.max_pending else []
        if len(waiting) > self.bcfg.max_pending:
            self._drop_oldest_pending(waiting[0])
        return conn

    async def _disconnect(self, conn: Connection) -> None:
        """Forget the connection; its session's experiences are written now."""
        self.connections.pop(conn.writer, None)
        session = conn.session
        if session is not None and self.active.get(session.key) is conn:
            del self.active[session.key]
            self.sink.hand_in(session)  # a disconnect writes what it held
        try:
            await conn.writer.drain()
        except (ConnectionError, OSError):
            pass
        conn.writer.close()

    async def _serve(self, reader: asyncio.StreamReader, conn: Connection, session: Session) -> None:
        """Answer the session's messages until the peer leaves or says bye, or an error closes it."""
        while True:
            ident, reply = None, None
            try:
                line = await self._read(reader, conn)
                if line is None:
                    return
                msg = decode(line)
                ident = msg.get("id")
                reply = await self._handle(session, msg)
            except ProtocolError as exc:
                self._error(conn.writer, exc, ident)
                if exc.closes:
                    return
            if reply is not None:
                self._send(conn.writer, reply, ident)
                if reply["type"] == "bye":
                    return
            await conn.writer.drain()

    async def _hello(self, reader: asyncio.StreamReader, conn: Connection) -> Session | None:
        line = await self._read(reader, conn)
        if line is None:
            return None
        msg = decode(line)
        self._authenticate(msg)
        instrument, account, bar_period, source = _hello_fields(msg)
        policy = self.policy
        spec = _check_model(policy, instrument, bar_period, self.cfg, self.deploy_dir)
        session = self._open_session(conn, account, instrument, bar_period, source, spec)
        self._send(conn.writer, self._welcome(session, policy), msg.get("id"))
        await conn.writer.drain()
        self.stats["sessions"] += 1
        log.info("bridge: session %s (%s) opened by %s", session.key, source, conn.peer)
        return session

    def _authenticate(self, msg: dict[str, Any]) -> None:
        """A ProtocolError unless ``msg`` is a hello with the token, in this bridge's protocol."""
        if msg["type"] != "hello":
            raise ProtocolError("not_authenticated", "the first message must be hello (with the token)", msg["type"])
        token = msg.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(errors="surrogatepass"), self._token):
            raise ProtocolError("unauthorized", "wrong or missing token", "hello")
        if msg.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError("protocol", f"this bridge speaks protocol {PROTOCOL_VERSION}, the client "
                                            f"{shown(msg.get('protocol'))}", "hello")

    def _open_session(self, conn: Connection, account: str, instrument: str, bar_period: str, source: str,
                      spec: dict[str, Any]) -> Session:
        """The session ``account/instrument`` (resumed, or new) on ``conn``, unless it is in use
        elsewhere or the bridge is full."""
        key = f"{account}/{instrument}"
        if key in self.active:
            raise ProtocolError("session_busy", f"session {key} is in use by another connection", "hello")
        if len(self.active) >= self.bcfg.max_sessions:
            raise ProtocolError("server_busy", f"the bridge serves at most {self.bcfg.max_sessions} sessions", "hello")
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = Session(account, instrument, bar_period, source, spec, self.bcfg,
                                                   self.cfg.env.initial_equity)
        self.active[key] = conn
        conn.session = session
        return session

    def _welcome(self, session: Session, policy: DeployedPolicy | None) -> dict[str, Any]:
        """The answer to an accepted hello; with nothing deployed, ``model_version`` is null, the
        session trades flat and ``bars_needed`` is the configuration's (``env.window``)."""
        max_contracts = int(session.spec["max_contracts"])
        max_position = min(self.bcfg.max_position if self.bcfg.max_position is not None else max_contracts,
                           max_contracts)
        needed = bars_needed(policy.settings) if policy is not None else bars_needed_for(self.cfg.env.window,
                                                                                          self.cfg.env.vol_window)
        return {"type": "welcome", "protocol": PROTOCOL_VERSION, "session": session.key,
                "model_name": policy.name if policy is not None else self.cfg.promotion.model_name,
                "model_version": policy.version if policy is not None else None, "max_position": max_position,
                "shadow_version": self.shadow.version,
                "bars_needed": needed,
                "heartbeat_s": self.bcfg.heartbeat_timeout_s / 3, "max_message_bytes": self.bcfg.max_message_bytes,
                "position": session.book.position}

    # -- messages of a session -------------------------------------------------------------------

    async def _handle(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        kind = msg["type"]
        if kind == "bar":
            return await self._bar(session, msg)
        answer = {"fill": self._fill, "position": self._position, "heartbeat": _heartbeat, "kill": self._kill,
                  "resume": self._resume, "bye": _bye}.get(kind)
        if answer is None:  # a second hello
            raise ProtocolError("bad_value", "hello was already accepted on this connection", kind)
        return answer(session, msg)

    def _fill(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        quantity = integer(msg, "quantity", limit=10_000)
        price = number(msg, "price", positive=True)
        session.check_prices("fill", price=price)
        commission = number(msg, "commission", low=0.0) if msg.get("commission") is not None else None
        session.fill(quantity, price, commission)
        self.stats["fills"] += 1
        return _ack("fill", session)

    def _position(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        position = integer(msg, "position", limit=10_000)
        avg = number(msg, "avg_price", low=0.0, default=0.0)
        if position != 0:
            session.check_prices("position", avg_price=avg)
        session.sync_position(position, avg)
        return _ack("position", session)

    def _kill(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        reason = msg.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise ProtocolError("bad_value", f"reason: expected a string, got {shown(reason)}", "kill")
        self.kill_switch.engage(f"kill message from {session.key}" + (f": {str(reason)[:200]}" if reason else ""))
        return _ack("kill", session)

    def _resume(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        self.kill_switch.release()
        return _ack("resume", session)

    async def _bar(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        bar = parse_bar(msg, self.zone)
        session.check_prices("bar", open=bar.open, high=bar.high, low=bar.low, close=bar.close)
        last = session.last_bar
        if bar.historical and last is not None and bar.time < last.time:
            return _replayed(session, bar)
        if session.is_repeat(bar):
            return {**session.last_decision, "repeat": True}
        policy = self.policy  # None: nothing deployed (the decision is flat, guard no_model)
        obs, guard = session.prepare(bar, policy)
        action = await self._batcher.infer(policy, obs) if obs is not None else None
        # The kill file is looked at on every bar: `pipelines.bridge kill` takes effect at the next
        # decision, not at the watcher's next poll; the watcher pushes the kill to clients.
        killed, stale = self.kill_switch.is_on(), self._stale(session, bar)
        decision = session.decide(bar, obs, policy, action, guard, killed=killed, stale=stale)
        self.shadow.submit(session, bar, killed, stale)  # the Staging model's turn, in its own process
        self.stats["decisions"] += 1
        if decision["guard"]:
            self.stats[f"guard_{decision['guard']}"] += 1
        self.sink.collect(session)
        return decision

    def _stale(self, session: Session, bar: Any) -> bool:
        """A live bar older than ``bridge.max_bar_age_s`` (its decision is flat)."""
        return (session.source == "live" and self.bcfg.max_bar_age_s is not None and not bar.historical
                and (datetime.now(timezone.utc) - bar.utc).total_seconds() > self.bcfg.max_bar_age_s)


def _replayed(session: Session, bar: Any) -> dict[str, Any]:
    """The answer to a bar of the chart's history older than the session's last bar: NinjaTrader
    replays the history when the strategy is re-enabled; those bars are already in the session,
    acknowledged, nothing changes."""
    return {"type": "decision", "decision_id": None, "time": bar.time.isoformat(),
            "target_position": session.book.position, "action": None, "guard": "historical",
            "policy_target": None, "reference_price": bar.close, "repeat": True}


def _ack(ref: str, session: Session) -> dict[str, Any]:
    return {"type": "ack", "ref": ref, "position": session.book.position}


def _heartbeat(session: Session, msg: dict[str, Any]) -> dict[str, Any]:
    return {"type": "heartbeat", "time": datetime.now(timezone.utc).isoformat()}


def _bye(session: Session, msg: dict[str, Any]) -> dict[str, Any]:
    session.drop_pending()
    return {"type": "bye"}


async def _skip_line(reader: asyncio.StreamReader, consumed: int) -> None:
    """Discard the rest of a line over the reader's limit (``consumed`` bytes are buffered)."""
    while True:
        await reader.readexactly(consumed)
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
        except asyncio.IncompleteReadError:
            return
