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
        if pos != 0 and _book_exit(cur, pos, q, price, avg, point_value):
            trades.append(_closed_trade(cur, bar, pos, avg, commission_per_side, slippage_per_contract))
            cur = None
        if q != 0:
            cur, avg = _book_entry(cur, pos, q, bar, price, avg)
        pos = q
    return trades


def _book_exit(cur: dict[str, Any], pos: int, q: int, price: float, avg: float, point_value: float) -> bool:
    """Book the contracts a fill from ``pos`` to ``q`` takes off the open trade ``cur``; True when
    the trade ends there (flat, or a flip)."""
    side = 1 if pos > 0 else -1
    same = q != 0 and (q > 0) == (pos > 0)
    qty = 0 if same and abs(q) > abs(pos) else (abs(q - pos) if same else abs(pos))
    if qty:
        cur["exit_qty"] += qty
        cur["exit_value"] += price * qty
        cur["gross"] += (price - avg) * side * qty * point_value
        cur["costs"] += qty
    return not same


def _closed_trade(cur: dict[str, Any], bar: int, pos: int, avg: float, commission_per_side: float,
                  slippage_per_contract: float) -> tuple:
    """The row (TRADE_COLUMNS order) of the trade ``cur`` that the fill at ``bar`` ended."""
    side = 1 if pos > 0 else -1
    return (cur["bar"], bar, side, cur["size"], avg, cur["exit_value"] / cur["exit_qty"],
            cur["gross"] - cur["costs"] * commission_per_side,
            cur["costs"] * commission_per_side, cur["costs"] * slippage_per_contract,
            bar - cur["bar"])


def _book_entry(cur: dict[str, Any] | None, pos: int, q: int, bar: int, price: float,
                avg: float) -> tuple[dict[str, Any], float]:
    """Book the contracts a fill to ``q`` adds: a new trade from flat (``cur`` None), or an add to
    ``cur`` that moves the average entry. Returns the open trade and its average entry."""
    added = abs(q) if cur is None else abs(q) - abs(pos)
    if cur is None:
        cur = {"bar": bar, "size": 0, "exit_qty": 0, "exit_value": 0.0, "gross": 0.0, "costs": 0}
        avg = price
    elif added > 0:
        avg = (avg * abs(pos) + price * added) / abs(q)
    if added > 0:
        cur["size"] = max(cur["size"], abs(q))
        cur["costs"] += added
    return cur, avg


def fills_from_positions(positions: np.ndarray, start: int, market: Any) -> list[tuple[int, int, float]]:
    """(bar, new position, fill price) for every change in a per-bar position series that starts
    flat at bar ``start``: the env's fill rule (next open, slippage against the trader)."""
    positions = np.asarray(positions, dtype=np.int64)
    changed = np.flatnonzero(np.diff(positions)) + 1
    slip = market.spec.slippage_price
    opens = market.open_[start + changed]
    prices = np.where(np.diff(positions)[changed - 1] > 0, opens + slip, opens - slip)
    return list(zip((start + changed).tolist(), positions[changed].tolist(), prices.tolist()))


def trade_columns(positions: np.ndarray, start: int, market: Any) -> dict[str, np.ndarray]:
    """The closed trades of a per-bar position series that starts flat at bar ``start``, as
    TRADE_COLUMNS arrays (times as bar indices): ``trades_from_fills(fills_from_positions(...))``
    bit for bit, without the per-fill Python loop when no trade changes size on the way (entries,
    exits and flips only: always so with max_contracts 1). Then the k-th exit closes the k-th
    entry and every column is one array operation, in the loop's order of operations; a series
    with adds or partial exits goes through the loop."""
    spec = market.spec
    positions = np.asarray(positions, dtype=np.int64)
    steps = np.diff(positions)
    changed = np.flatnonzero(steps) + 1
    p, q = positions[changed - 1], positions[changed]
    if ((p != 0) & (q != 0) & (np.sign(p) == np.sign(q))).any():  # a size change inside a trade
        rows = trades_from_fills(fills_from_positions(positions, start, market), spec.point_value,
                                 spec.commission_per_side, spec.slippage_cost)
        return {name: np.array([row[k] for row in rows]) for k, name in enumerate(TRADE_COLUMNS)}
    return _round_trip_columns(start + changed, steps[changed - 1], p, q, market)


def _round_trip_columns(bars: np.ndarray, moves: np.ndarray, p: np.ndarray, q: np.ndarray,
                        market: Any) -> dict[str, np.ndarray]:
    """:func:`trade_columns` of a series with entries, exits and flips only: ``bars`` where the
    position changed, by ``moves`` contracts, from ``p`` to ``q``."""
    spec = market.spec
    opens = market.open_[bars]
    prices = np.where(moves > 0, opens + spec.slippage_price, opens - spec.slippage_price)
    exits = np.flatnonzero(p != 0)
    entries = np.flatnonzero(q != 0)[: len(exits)]  # entries after the last exit are still open
    avg, side, size = prices[entries], np.sign(q[entries]), np.abs(q[entries])
    price, qty = prices[exits], np.abs(p[exits])
    gross = 0.0 + (price - avg) * side * qty * spec.point_value
    costs = size + qty
    return {"entry_time": bars[entries], "exit_time": bars[exits], "side": side, "size": size, "entry_price": avg,
            "exit_price": (0.0 + price * qty) / qty, "pnl": gross - costs * spec.commission_per_side,
            "commission": costs * spec.commission_per_side, "slippage": costs * spec.slippage_cost,
            "bars_held": bars[exits] - bars[entries]}


class PositionBook:
    """The account of one instrument fed by fills (the bridge's book of a live or paper session).

    The env's average-price accounting operation for operation (``FuturesTradingEnv.step`` and
    ``_resize``), so the same fills give the same realised PnL and the same open-PnL observation.
    Commission is realised on every fill.
    """

    def __init__(self, point_value: float, commission_per_side: float) -> None:
        self.point_value = point_value
        self.commission_per_side = commission_per_side
        self.position = 0
        self.avg = 0.0
        self.realised = 0.0
        self.closed = 0
        self.bars_held = 0
        """Closes the open trade has lasted (:meth:`bar_closed`; 0 from its fill until the next close)."""

    def bar_closed(self) -> None:
        """A bar closed: one more for the open trade (the env's ``t - entry + 1``)."""
        if self.position:
            self.bars_held += 1

    def fill(self, quantity: int, price: float, commission: float | None = None) -> float:
        """Apply an execution of ``quantity`` contracts (+ bought, - sold) at ``price``; returns
        the PnL it realised (net of its commission)."""
        p, q = self.position, self.position + quantity
        if quantity == 0:
            return 0.0
        size = abs(quantity)
        commission = size * self.commission_per_side if commission is None else commission
        before = self.realised
        if p == 0:  # open from flat
            self.avg = price
            self.realised = self.realised - commission
            self.bars_held = 0
        elif q == 0 or (p > 0) != (q > 0):  # close, or flip: close all and open the rest
            side_p = 1 if p > 0 else -1
            self.realised = self.realised + (price - self.avg) * side_p * (p * side_p) * self.point_value - commission
            self.avg = price if q else 0.0
            self.closed += 1
            self.bars_held = 0
        elif abs(q) > abs(p):  # add
            self.avg = (self.avg * abs(p) + price * size) / abs(q)
            self.realised = self.realised - commission
        else:  # reduce
            self.realised = self.realised + (price - self.avg) * (1 if p > 0 else -1) * size * self.point_value - commission
        self.position = q
        return self.realised - before

    def open_pnl(self, price: float) -> float:
        """Money the open position makes at ``price``."""
        return (price - self.avg) * self.position * self.point_value if self.position else 0.0

    def open_pnl_pct(self, close: float, clip: float) -> float:
        """The env's open-PnL observation: move from the average entry in % of it, by side, clipped."""
        if not self.position:
            return 0.0
        pnl = (close - self.avg) / self.avg * 100.0 * (1.0 if self.position > 0 else -1.0)
        return clip if pnl > clip else (-clip if pnl < -clip else pnl)

    def adopt(self, position: int, avg_price: float) -> None:
        """Take the broker's position as the truth (a reconnect, a manual trade)."""
        if not (position and self.position and (position > 0) == (self.position > 0)):
            self.bars_held = 0  # not the book's trade (flat now, a new one, or the other side)
        self.position = int(position)
        self.avg = float(avg_price) if position else 0.0
