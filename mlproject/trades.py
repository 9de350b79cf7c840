"""Trade accounting shared by the environment and the evaluation: fills -> closed trades.

Average-price accounting, the same as ``envs.FuturesTradingEnv``'s account: a trade runs from
leaving flat (or a flip) to the next flat (or flip); partial exits accumulate into it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TRADE_COLUMNS: tuple[str, ...] = (
    "entry_time", "exit_time", "side", "size", "entry_price", "exit_price",
    "pnl", "commission", "slippage", "bars_held",
)
"""Columns of ``FuturesTradingEnv.trades_frame`` and evaluation trades."""


def trades_from_fills(fills: list[tuple[int, int, float]], point_value: float, commission_per_side: float,
                      slippage_per_contract: float) -> list[tuple]:
    """Replay fills (bar, new position, price) from flat into closed trades (TRADE_COLUMNS order,
    times as bar indices). Uses the same average-price accounting as the env."""
    trades: list[tuple] = []
    pos, avg, cur = 0, 0.0, None
    for bar, q, price in fills:
        if pos != 0:
            side = 1 if pos > 0 else -1
            same = q != 0 and (q > 0) == (pos > 0)
            qty = 0 if same and abs(q) > abs(pos) else (abs(q - pos) if same else abs(pos))
            if qty:
                cur["exit_qty"] += qty
                cur["exit_value"] += price * qty
                cur["gross"] += (price - avg) * side * qty * point_value
                cur["costs"] += qty
            if not same:
                trades.append((cur["bar"], bar, side, cur["size"], avg, cur["exit_value"] / cur["exit_qty"],
                               cur["gross"] - cur["costs"] * commission_per_side,
                               cur["costs"] * commission_per_side, cur["costs"] * slippage_per_contract,
                               bar - cur["bar"]))
                cur = None
        if q != 0:
            added = abs(q) if cur is None else abs(q) - abs(pos)
            if cur is None:
                cur = {"bar": bar, "size": 0, "exit_qty": 0, "exit_value": 0.0, "gross": 0.0, "costs": 0}
                avg = price
            elif added > 0:
                avg = (avg * abs(pos) + price * added) / abs(q)
            if added > 0:
                cur["size"] = max(cur["size"], abs(q))
                cur["costs"] += added
        pos = q
    return trades


def fills_from_positions(positions: np.ndarray, start: int, market: Any) -> list[tuple[int, int, float]]:
    """(bar, new position, fill price) for every change in a per-bar position series that starts
    flat at bar ``start``: the env's fill rule (next open, slippage against the trader)."""
    positions = np.asarray(positions, dtype=np.int64)
    changed = np.flatnonzero(np.diff(positions)) + 1
    slip = market.spec.slippage_price
    opens = market.open_[start + changed]
    prices = np.where(np.diff(positions)[changed - 1] > 0, opens + slip, opens - slip)
    return list(zip((start + changed).tolist(), positions[changed].tolist(), prices.tolist()))
