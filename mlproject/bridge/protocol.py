"""Messages of the bridge protocol (``nt8/PROTOCOL.md``): one JSON object per line.

Decoding never trusts the client: :func:`decode` takes only a JSON object with a string
``type``, and the field readers reject missing fields, wrong types, NaN/infinity and out-of-range
values with a :class:`ProtocolError` that names the field (code ``bad_value``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Any

PROTOCOL_VERSION = 1

CLIENT_TYPES = ("hello", "bar", "fill", "position", "heartbeat", "kill", "resume", "bye")

CLOSING_CODES = frozenset({"unauthorized", "protocol", "mismatch", "session_busy", "server_busy", "timeout"})
"""Errors after which the bridge closes the connection."""


class ProtocolError(Exception):
    """A message the bridge answers with an ``error`` (see the protocol's error codes)."""

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.ref = code, message, ref

    @property
    def closes(self) -> bool:
        return self.code in CLOSING_CODES


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def decode(line: bytes) -> dict[str, Any]:
    """The message on one line (without or with its newline)."""
    try:
        msg = json.loads(line, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"not a JSON line: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", f"a message is a JSON object, got {type(msg).__name__}")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_json", "a message needs a string field 'type'")
    if kind not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {kind[:40]!r}; known: {', '.join(CLIENT_TYPES)}",
                            kind[:40])
    ident = msg.get("id")
    if ident is not None and not (isinstance(ident, (str, int)) and not isinstance(ident, bool)
                                  and len(str(ident)) <= 64):
        raise ProtocolError("bad_value", "id: a string or integer of at most 64 characters", kind)
    return msg


def encode(msg: dict[str, Any]) -> bytes:
    return (json.dumps(msg, separators=(",", ":"), allow_nan=False) + "\n").encode()


def number(msg: dict[str, Any], key: str, *, low: float | None = None, positive: bool = False,
           default: float | None = None) -> float:
    """A finite number field (``low``: the smallest allowed; ``positive``: > 0)."""
    value = msg.get(key, default)
    if value is None:
        raise ProtocolError("bad_value", f"{key}: missing", msg.get("type"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError("bad_value", f"{key}: expected a finite number, got {str(value)[:40]!r}", msg.get("type"))
    value = float(value)
    if positive and value <= 0:
        raise ProtocolError("bad_value", f"{key}: must be > 0, got {value!r}", msg.get("type"))
    if low is not None and value < low:
        raise ProtocolError("bad_value", f"{key}: must be >= {low!r}, got {value!r}", msg.get("type"))
    return value


def integer(msg: dict[str, Any], key: str, *, limit: int = 1_000_000) -> int:
    """An integer field (a float holding an integer, 2.0, is taken) of magnitude <= ``limit``."""
    value = msg.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad_value", f"{key}: expected an integer, got {str(value)[:40]!r}", msg.get("type"))
    if abs(value) > limit:
        raise ProtocolError("bad_value", f"{key}: {value} is out of range (|{key}| <= {limit})", msg.get("type"))
    return value


def text(msg: dict[str, Any], key: str, *, default: str | None = None, limit: int = 200) -> str:
    value = msg.get(key, default)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ProtocolError("bad_value", f"{key}: expected a non-empty string of at most {limit} characters",
                            msg.get("type"))
    return value


def timestamp(msg: dict[str, Any], key: str, zone: tzinfo | None) -> tuple[datetime, datetime]:
    """(wall clock as sent, without zone; the same moment in UTC). A stamp without an offset is
    in ``zone`` (None: this machine's zone)."""
    raw = msg.get(key)
    if not isinstance(raw, str) or len(raw) > 40:
        raise ProtocolError("bad_value", f"{key}: expected an ISO 8601 time string", msg.get("type"))
    try:
        stamp = datetime.fromisoformat(raw)
    except ValueError:
        raise ProtocolError("bad_value", f"{key}: {raw!r} is not an ISO 8601 time (2024-01-02T09:31:00)",
                            msg.get("type")) from None
    wall = stamp.replace(tzinfo=None)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=zone) if zone is not None else stamp.astimezone()
    return wall, stamp.astimezone(timezone.utc)


@dataclass(frozen=True)
class Bar:
    """One closed bar as a client sent it."""

    time: datetime
    """Wall clock of the bar's end (what the features see)."""
    utc: datetime
    open: float
    high: float
    low: float
    close: float
    volume: float
    historical: bool


def parse_bar(msg: dict[str, Any], zone: tzinfo | None) -> Bar:
    """A validated bar: prices > 0, low <= open, close <= high, volume >= 0."""
    wall, utc = timestamp(msg, "time", zone)
    o, h, low, c = (number(msg, k, positive=True) for k in ("open", "high", "low", "close"))
    volume = number(msg, "volume", low=0.0)
    if h < low:
        raise ProtocolError("bad_value", f"high {h!r} < low {low!r}", "bar")
    for name, value in (("open", o), ("close", c)):
        if not low <= value <= h:
            raise ProtocolError("bad_value", f"{name} {value!r} outside [low {low!r}, high {h!r}]", "bar")
    historical = msg.get("historical", False)
    if not isinstance(historical, bool):
        raise ProtocolError("bad_value", "historical: expected true or false", "bar")
    return Bar(wall, utc, o, h, low, c, volume, historical)
