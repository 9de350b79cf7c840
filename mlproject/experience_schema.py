"""The experience buffer's schema: every column, the Arrow schemas of row and annotation files,
and the validation that turns experiences (a DataFrame, row dicts or columns) into a table of
that schema. :mod:`mlproject.experience` stores and reads such tables.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

SCHEMA_VERSION = 2
"""Layout version of :data:`EXPERIENCE_SCHEMA`; bump it with every column change. Version 2 added
``guard`` and ``policy_action`` (files of version 1 read with those columns null)."""

SOURCES = ("live", "paper", "backtest", "shadow")
"""Where an experience came from."""

VECTOR = pa.list_(pa.float32())
"""The type of an observation column."""

COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "experience_id": (pa.string(), "unique id (uuid4 hex unless the writer gives one)"),
    "time": (pa.timestamp("ns", tz="UTC"), "bar end time of the decision, UTC"),
    "symbol": (pa.string(), "instrument symbol (ES, MES, ...)"),
    "bar_period": (pa.string(), "bar period, e.g. 1min"),
    "model_name": (pa.string(), "registered model that acted (nt8-agent)"),
    "model_version": (pa.string(), "its version"),
    "observation": (VECTOR, "the observation the policy saw"),
    "action": (pa.int16(), "the action taken (target position + max_contracts)"),
    "reward": (pa.float64(), "reward of the step, money"),
    "next_observation": (VECTOR, "the observation after the step"),
    "terminated": (pa.bool_(), "the account ended (equity floor)"),
    "truncated": (pa.bool_(), "the episode was cut (end of data, session, step limit)"),
    "position": (pa.int16(), "position after the step, contracts"),
    "equity": (pa.float64(), "account equity after the step, money"),
    "trade_id": (pa.string(), "the trade this step belongs to (null when flat)"),
    "realised_pnl": (pa.float64(), "PnL realised on this step (a close), money; 0 otherwise"),
    "fill_price": (pa.float64(), "fill price when the step traded (null otherwise)"),
    "slippage": (pa.float64(), "slippage of that fill, money (null otherwise)"),
    "source": (pa.string(), "live, paper, backtest or shadow (a Staging model beside Production)"),
    "guard": (pa.string(), "risk guard that changed the policy's choice (max_position, daily_loss, kill_switch, "
                           "stale_bar, ood, ...); null when the policy's action was taken"),
    "policy_action": (pa.int16(), "the action the policy chose, when a guard changed it (null otherwise)"),
    "reflection": (pa.string(), "post-trade reflection text (null until annotated)"),
    "lesson": (pa.string(), "the lesson drawn (null until annotated)"),
    "quality": (pa.float32(), "quality score in [0, 1] (null until annotated)"),
    "tags": (pa.list_(pa.string()), "high_value, failed, ... (empty until annotated)"),
    "annotator": (pa.string(), "who annotated (rules, an LLM endpoint, ...)"),
    "annotator_version": (pa.string(), "its version"),
}
"""Every column: its type and what it means (the one place the schema is documented)."""

EXPERIENCE_SCHEMA = pa.schema([pa.field(name, typ) for name, (typ, _) in COLUMNS.items()],
                              metadata={b"nt8.experience_schema_version": str(SCHEMA_VERSION).encode()})
"""The Arrow schema of every buffer file (the partition column ``date`` is added by the layout)."""

_V1_NAMES = [name for name in COLUMNS if name not in ("guard", "policy_action")]
EXPERIENCE_SCHEMA_V1 = pa.schema([EXPERIENCE_SCHEMA.field(name) for name in _V1_NAMES])
"""Version 1 files (before guard and policy_action): still read, rewritten as version 2 by compaction."""

ANNOTATION_COLUMNS = ("reflection", "lesson", "quality", "tags", "annotator", "annotator_version")
"""Columns an annotation sets (appended later, overlaid at read, folded in by compaction)."""

ANNOTATION_SCHEMA = pa.schema([pa.field("experience_id", pa.string()),
                               pa.field("annotated_at", pa.timestamp("ns", "UTC")),
                               *(pa.field(c, COLUMNS[c][0]) for c in ANNOTATION_COLUMNS)],
                              metadata={b"nt8.experience_schema_version": str(SCHEMA_VERSION).encode()})
"""The schema of annotation files."""

REQUIRED = ("time", "symbol", "model_name", "model_version", "observation", "action", "reward", "source")
"""Columns every added experience must give; the others default to null (or empty tags)."""


class ExperienceError(ValueError):
    """Bad experiences or a bad buffer file; the message names the column, row or file."""


Records = pd.DataFrame | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]
"""Experiences as they are handed in: a DataFrame, a dict of columns or a list of row dicts."""


def _columns(records: Records) -> dict[str, Any]:
    """The experiences as columns (name -> sequence), whatever shape they came in."""
    if isinstance(records, pd.DataFrame):
        return {str(name): records[name] for name in records.columns}
    if isinstance(records, Mapping):  # already columns (the bridge hands them so: no DataFrame in between)
        return {str(name): list(values) for name, values in records.items()}
    rows = list(records)
    names = dict.fromkeys(rows[0]) if rows else {}
    for row in rows:  # the usual case, every row with the same keys, costs one comparison per row
        if row.keys() != names.keys():
            names.update(dict.fromkeys(row))
    return {str(name): [row.get(name) for row in rows] for name in names}


def to_table(records: Records) -> pa.Table:
    """Validated Arrow table of experiences in :data:`EXPERIENCE_SCHEMA` from a DataFrame, a
    list of row dicts or a dict of columns (missing optional columns filled; ids generated).
    ``ExperienceError`` names the column or row at fault."""
    columns = _columns(records)
    _check_columns(columns)
    _fill_defaults(columns)
    return _arrow_table(columns)


def _check_columns(columns: dict[str, Any]) -> None:
    """``ExperienceError`` unless every required column is there, none is unknown, all have the
    length of ``time`` and every source is one of :data:`SOURCES`."""
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ExperienceError(f"experiences lack required column(s) {', '.join(missing)}")
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ExperienceError(f"unknown experience column(s) {', '.join(unknown)}; columns: {', '.join(COLUMNS)}")
    n = len(columns["time"])
    short = [name for name, values in columns.items() if len(values) != n]
    if short:
        raise ExperienceError(f"column(s) {', '.join(short)} have another length than time ({n})")
    for i, source in enumerate(list(columns["source"])):
        if source not in SOURCES:
            raise ExperienceError(f"row {i}: source {source!r} is not one of {', '.join(SOURCES)}")


def _fill_defaults(columns: dict[str, Any]) -> None:
    """New ids and empty tags where the writer gave none; times as UTC timestamps."""
    n = len(columns["time"])
    if "experience_id" not in columns:
        columns["experience_id"] = [uuid.uuid4().hex for _ in range(n)]
    if "tags" not in columns:
        columns["tags"] = [[] for _ in range(n)]
    try:
        columns["time"] = pd.to_datetime(columns["time"], utc=True)
    except (ValueError, TypeError) as exc:
        raise ExperienceError(f"column time: not timestamps ({exc})") from None


def _arrow_table(columns: dict[str, Any]) -> pa.Table:
    """The checked columns as a table of :data:`EXPERIENCE_SCHEMA` (absent ones null)."""
    n = len(columns["time"])
    arrays = []
    try:
        for name, (typ, _) in COLUMNS.items():
            if name not in columns:
                arrays.append(pa.nulls(n, typ))
            elif name in ("observation", "next_observation"):
                arrays.append(vector_array(columns[name]))
            else:
                arrays.append(pa.array(columns[name], type=typ, from_pandas=True))
        return pa.Table.from_arrays(arrays, schema=EXPERIENCE_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as exc:
        raise ExperienceError(f"experiences do not fit the schema (column {name}): {exc}") from None


def vector_array(column: Sequence[Any]) -> pa.Array:
    """A column of observation vectors as list<float32>: one stacked copy when every row is a
    vector of the same length (the usual case, several times faster than row by row)."""
    values = list(column)
    try:  # the usual case: equal-length vectors (None, NaN or ragged rows raise and go the slow way)
        stacked = np.stack(values).astype(np.float32, copy=False) if values else None
    except (ValueError, TypeError):
        stacked = None
    if stacked is not None and stacked.ndim == 2:
        width = stacked.shape[1]
        offsets = np.arange(0, (len(values) + 1) * width, width, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(stacked.reshape(-1)), type=VECTOR)
    return pa.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else np.asarray(v, np.float32)
                     for v in values], type=VECTOR)
