"""Messages of the bridge protocol (``nt8/PROTOCOL.md``): one JSON object per line.

Decoding never trusts the client: :func:`decode` takes only a JSON object with a string
``type`` (nesting too deep to parse is ``bad_json``), and the field readers reject missing
fields, wrong types, NaN/infinity, integers too large for a float, times outside
:data:`FIRST_YEAR`..:data:`LAST_YEAR` and out-of-range values with a :class:`ProtocolError` that
names the field (code ``bad_value``). :func:`check_price` says what a plausible price is.
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

FIRST_YEAR, LAST_YEAR = 1900, 2199
"""Times a message may carry (UTC and wall clock): pandas' datetimes end in 2262, and a bar from
year 1 or 9999 is a client's bug, not market data."""

MAX_TICKS = 1e12
"""A price is at most this many ticks (price / tick_size): beyond it the tick grid, the book's
sums and float32 observations lose their meaning."""

PRICE_RANGE_FACTOR = 1000.0
"""A price within this factor of the session's first accepted price (either way) is plausible; a
market that moves 1000x within one bridge session is not one the policy was trained on."""

MAX_VOLUME = 1e12
"""Largest bar volume (contracts): the volume feature's trailing variance overflows long before
1e300."""


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


def shown(value: Any) -> str:
    """A client's value in an error message: short, and never a walk of a nested container
    (``str`` of a list nested 900 deep recurses as deep)."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    return repr(str(value)[:40])


def decode(line: bytes) -> dict[str, Any]:
    """The message on one line (without or with its newline)."""
    try:
        msg = json.loads(line, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"not a JSON line: {str(exc)[:200]}") from None
    except RecursionError:  # 5,000 nested brackets: the parser's recursion limit, not the server's bug
        raise ProtocolError("bad_json", "not a JSON line: nested too deeply") from None
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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError("bad_value", f"{key}: expected a finite number, got {shown(value)}", msg.get("type"))
    try:
        value = float(value)  # an integer of 400 digits does not fit (OverflowError)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ProtocolError("bad_value", f"{key}: expected a finite number, got {shown(msg.get(key))}",
                            msg.get("type"))
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
        raise ProtocolError("bad_value", f"{key}: expected an integer, got {shown(value)}", msg.get("type"))
    if abs(value) > limit:
        raise ProtocolError("bad_value", f"{key}: {shown(value)} is out of range (|{key}| <= {limit})",
                            msg.get("type"))
    return value


def text(msg: dict[str, Any], key: str, *, default: str | None = None, limit: int = 200) -> str:
    value = msg.get(key, default)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ProtocolError("bad_value", f"{key}: expected a non-empty string of at most {limit} characters",
                            msg.get("type"))
    return value


def timestamp(msg: dict[str, Any], key: str, zone: tzinfo | None) -> tuple[datetime, datetime]:
    """(wall clock as sent, without zone; the same moment in UTC), both in years
    ``FIRST_YEAR..LAST_YEAR``. A stamp without an offset is in ``zone`` (None: this machine's zone)."""
    raw = msg.get(key)
    if not isinstance(raw, str) or len(raw) > 40:
        raise ProtocolError("bad_value", f"{key}: expected an ISO 8601 time string", msg.get("type"))
    try:
        stamp = datetime.fromisoformat(raw)
    except ValueError:
        raise ProtocolError("bad_value", f"{key}: {raw!r} is not an ISO 8601 time (2024-01-02T09:31:00)",
                            msg.get("type")) from None
    wall = stamp.replace(tzinfo=None)
    try:  # year 1 with an offset of -05:00 is before datetime.min in UTC (OverflowError)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=zone) if zone is not None else stamp.astimezone()
        utc = stamp.astimezone(timezone.utc)
    except (OverflowError, ValueError, OSError):
        utc = None
    if utc is None or not (FIRST_YEAR <= wall.year <= LAST_YEAR and FIRST_YEAR <= utc.year <= LAST_YEAR):
        raise ProtocolError("bad_value", f"{key}: {raw!r} is outside the years {FIRST_YEAR}-{LAST_YEAR}",
                            msg.get("type"))
    return wall, utc


def check_price(key: str, value: float, tick_size: float, anchor: float | None, ref: str) -> float:
    """``value`` if it is a plausible price: at least one tick, at most :data:`MAX_TICKS` ticks, and
    within :data:`PRICE_RANGE_FACTOR` of ``anchor`` (the session's first accepted price, when there
    is one); otherwise a ``bad_value`` naming ``key``. (1e300 or 1e-300 for MES is a client's bug.)"""
    ticks = value / tick_size
    if not 1.0 <= ticks < MAX_TICKS:
        raise ProtocolError("bad_value", f"{key}: {value!r} is not a price of this instrument (at least one tick, "
                                         f"{tick_size!r}, and under {MAX_TICKS:.0e} ticks)", ref)
    if anchor is not None and not anchor / PRICE_RANGE_FACTOR <= value <= anchor * PRICE_RANGE_FACTOR:
        raise ProtocolError("bad_value", f"{key}: {value!r} is more than {PRICE_RANGE_FACTOR:g}x away from this "
                                         f"session's first price {anchor!r}", ref)
    return value


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
    """A validated bar: prices > 0, low <= open, close <= high, 0 <= volume <= MAX_VOLUME. Whether
    the prices are plausible for the instrument is :func:`check_price`'s business."""
    wall, utc = timestamp(msg, "time", zone)
    o, h, low, c = (number(msg, k, positive=True) for k in ("open", "high", "low", "close"))
    volume = number(msg, "volume", low=0.0)
    if volume > MAX_VOLUME:
        raise ProtocolError("bad_value", f"volume: {volume!r} is out of range (<= {MAX_VOLUME:.0e})", "bar")
    if h < low:
        raise ProtocolError("bad_value", f"high {h!r} < low {low!r}", "bar")
    for name, value in (("open", o), ("close", c)):
        if not low <= value <= h:
            raise ProtocolError("bad_value", f"{name} {value!r} outside [low {low!r}, high {h!r}]", "bar")
    historical = msg.get("historical", False)
    if not isinstance(historical, bool):
        raise ProtocolError("bad_value", "historical: expected true or false", "bar")
    return Bar(wall, utc, o, h, low, c, volume, historical)
