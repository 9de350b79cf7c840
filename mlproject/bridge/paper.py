"""The paper trader: a client of the bridge protocol that replays bars and fills the bridge's
decisions the way NinjaTrader's simulator fills market orders (the next bar's open, slippage
against the trader, commission per contract and side), reporting the fills back, so experiences
flow exactly as they do live.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mlproject.bridge.protocol import PROTOCOL_VERSION
from mlproject.data import infer_bar_period
from mlproject.instruments import InstrumentSpec
from mlproject.trades import TRADE_COLUMNS, PositionBook, trades_from_fills

log = logging.getLogger(__name__)


class PaperError(RuntimeError):
    """The bridge refused the session or answered with an error: ``code`` and ``detail`` are the
    protocol error's ``code`` and ``message`` (None and the text when the bridge sent none)."""

    def __init__(self, message: str, code: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = message if detail is None else detail


def period_text(bars: pd.DataFrame) -> str:
    """The bar period as the protocol writes it: 1min, 5min, 30s, 1D."""
    seconds = int(infer_bar_period(bars).total_seconds())
    if seconds % 86400 == 0:
        return f"{seconds // 86400}D"
    return f"{seconds // 60}min" if seconds % 60 == 0 else f"{seconds}s"


@dataclass
class PaperResult:
    """What a paper session did (the bridge's own record is the experience buffer)."""

    decisions: int = 0
    seconds: float = 0.0
    fills: list[tuple[int, int, float]] = field(default_factory=list)
    """(bar index, new position, fill price)."""
    realised_pnl: float = 0.0
    equity: float = 0.0
    commission: float = 0.0
    model_versions: Counter[str] = field(default_factory=Counter)
    versions: list[str] = field(default_factory=list)
    """The model version of each decision, in order."""
    guards: Counter[str] = field(default_factory=Counter)
    trades: pd.DataFrame | None = None
    kills: int = 0

    @property
    def decisions_per_s(self) -> float:
        return self.decisions / self.seconds if self.seconds > 0 else 0.0


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.kills = 0

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.writer.write((json.dumps(message, separators=(",", ":")) + "\n").encode())
        while True:
            line = await self.reader.readline()
            if not line:
                raise PaperError("the bridge closed the connection")
            reply = json.loads(line)
            if reply.get("type") == "kill":  # pushed: the next decisions are flat anyway
                self.kills += 1
                log.warning("paper: kill switch: %s", reply.get("reason"))
                continue
            if reply.get("type") == "error":
                code, detail = str(reply.get("code")), str(reply.get("message"))
                raise PaperError(f"bridge error {code}: {detail}", code, detail)
            return reply


async def paper_trade(host: str, port: int, token: str, bars: pd.DataFrame, spec: InstrumentSpec, *,
                      account: str = "paper", initial_equity: float = 100_000.0, ssl_context: ssl.SSLContext | None = None,
                      progress: Callable[[int, int], None] | None = None) -> PaperResult:
    """Replay ``bars`` through the bridge at ``host:port`` and fill its decisions."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context, limit=1 << 20)
    conn = _Connection(reader, writer)
    result = PaperResult()
    try:
        welcome = await conn.request({"type": "hello", "protocol": PROTOCOL_VERSION, "token": token,
                                      "instrument": spec.symbol, "bar_period": period_text(bars),
                                      "account": account, "source": "paper"})
        if welcome.get("model_version") is None and welcome.get("shadow_version") is None:
            # nothing deployed: every decision would be flat, nothing recorded (with a Staging model the
            # session is its shadow's live evidence against flat)
            detail = "nothing is deployed yet: the session would trade flat and record nothing"
            raise PaperError(f"bridge error no_model: {detail}", "no_model", detail)
        position = int(welcome.get("position", 0))
        book = PositionBook(spec.point_value, spec.commission_per_side)
        if position:
            raise PaperError(f"session {welcome.get('session')} holds {position} contracts from before; "
                             "use another account name for a new paper session")
        slip = spec.slippage_price
        pending: tuple[str, int] | None = None
        started = time.perf_counter()
        opens, highs, lows = bars["open"].tolist(), bars["high"].tolist(), bars["low"].tolist()
        closes, volumes = bars["close"].tolist(), bars["volume"].tolist()
        stamps = [t.isoformat() for t in bars.index]
        for i in range(len(bars)):
            if pending is not None and pending[1] != position:
                quantity = pending[1] - position
                price = opens[i] + slip if quantity > 0 else opens[i] - slip
                commission = abs(quantity) * spec.commission_per_side
                await conn.request({"type": "fill", "decision_id": pending[0], "time": stamps[i], "price": price,
                                    "quantity": quantity, "commission": commission})
                book.fill(quantity, price, commission)
                result.commission += commission
                position = pending[1]
                result.fills.append((i, position, price))
            decision = await conn.request({"type": "bar", "time": stamps[i], "open": opens[i], "high": highs[i],
                                           "low": lows[i], "close": closes[i], "volume": volumes[i]})
            pending = (decision["decision_id"], int(decision["target_position"]))
            result.decisions += 1
            result.model_versions[str(decision.get("model_version"))] += 1
            result.versions.append(str(decision.get("model_version")))
            if decision.get("guard"):
                result.guards[decision["guard"]] += 1
            if progress is not None:
                progress(i + 1, len(bars))
        result.seconds = time.perf_counter() - started
        await conn.request({"type": "bye"})
        result.realised_pnl = book.realised
        result.equity = initial_equity + book.realised + book.open_pnl(closes[-1]) if len(bars) else initial_equity
        rows = trades_from_fills(result.fills, spec.point_value, spec.commission_per_side, spec.slippage_cost)
        trades = pd.DataFrame(rows, columns=list(TRADE_COLUMNS))
        for col in ("entry_time", "exit_time"):
            trades[col] = bars.index[trades[col].to_numpy(int)] if len(trades) else pd.Series(dtype="datetime64[ns]")
        result.trades = trades
        result.kills = conn.kills
        return result
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
