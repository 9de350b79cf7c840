"""Value parsers the configuration shares: durations (``30s``, ``5m``, ``1w``), time zones, dotted keys."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*")
_UNITS = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | float | int) -> float:
    """'30s', '5m', '1h', '1d', '1w' or plain seconds -> seconds; ValueError naming the text."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = _DURATION.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30s, 5m, 1h, 1d or 1w")
    return float(match[1]) * _UNITS[match[2]]


def check_time_zone(value: str | None, key: str) -> str | None:
    """``value`` when it is None or an IANA time zone; ValueError naming ``key`` otherwise."""
    if value is not None:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{key} {value!r} is not an IANA time zone such as America/New_York") from None
    return value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
