"""Post-trade reflections: one per closed trade of the experience buffer.

The default annotator is rule based and deterministic (no network): from the trade's rows it
reads the context at entry (the last bar's normalised return and range, the trend over the
observation window), the side and size, the outcome (PnL, bars held, the best and worst open
PnL on the way), and writes what went right or wrong, a lesson, and a quality score in [0, 1]
(0.5 is break-even; a win or loss of one typical trade's size moves it about a quarter). Tags:
``high_value`` at ``continuous_learning.high_value_min_quality`` or above, ``failed`` at
``failed_max_quality`` or below. An LLM annotator (the reasoning engine, or an OpenAI-compatible
endpoint) will plug in beside it with this one as its fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlproject.features import FEATURE_NAMES

ANNOTATOR = "rules"
ANNOTATOR_VERSION = "1"

TRADE_COLUMNS = ("experience_id", "time", "trade_id", "observation", "action", "position", "equity",
                 "realised_pnl", "symbol", "model_version")
"""Buffer columns the annotator reads."""


@dataclass(frozen=True)
class Trade:
    """One closed trade rebuilt from its experience rows."""

    trade_id: str
    rows: pd.DataFrame
    side: int
    size: int
    pnl: float
    bars: int
    best: float
    worst: float

    @property
    def experience_ids(self) -> list[str]:
        return self.rows["experience_id"].tolist()


def closed_trades(rows: pd.DataFrame) -> list[Trade]:
    """The trades in ``rows`` (buffer rows with :data:`TRADE_COLUMNS`) that closed. Convention of
    the writers: the row whose step closes a trade carries that trade's id and its realised PnL
    (a flip's row too; the new trade starts on the next row). So a trade is closed when its last
    row is flat or realised PnL."""
    trades = []
    rows = rows[rows["trade_id"].notna()].sort_values("time", kind="stable")
    for trade_id, group in rows.groupby("trade_id", sort=False):
        positions = group["position"].to_numpy()
        if positions[-1] != 0 and float(group["realised_pnl"].fillna(0.0).iloc[-1]) == 0.0:
            continue  # still open
        held = positions[positions != 0]
        side = int(np.sign(held[0])) if held.size else 0
        equity = group["equity"].to_numpy(np.float64)
        path = equity - equity[0]
        trades.append(Trade(str(trade_id), group, side, int(np.abs(held).max()) if held.size else 0,
                            float(group["realised_pnl"].sum()), len(group), float(path.max()), float(path.min())))
    return trades


def entry_context(observation: np.ndarray) -> dict[str, float | str]:
    """The market at entry, from the observation (``window * 5`` features, then the account)."""
    obs = np.asarray(observation, np.float64)
    n = len(FEATURE_NAMES)
    window = (obs.size - 2) // n
    feats = obs[: window * n].reshape(window, n)
    ret_z, range_z = feats[-1, 0], feats[-1, 1]
    trend = float(feats[:, 0].sum() / math.sqrt(window)) if window else 0.0
    regime = "high" if abs(range_z) > 1.5 else "low" if abs(range_z) < 0.5 else "normal"
    direction = "up" if trend > 1.0 else "down" if trend < -1.0 else "flat"
    return {"ret_z": float(ret_z), "range_z": float(range_z), "trend": trend, "regime": regime, "direction": direction}


def reflect(trade: Trade, scale: float, high_value: float, failed: float) -> dict[str, object]:
    """The annotation of one trade (``scale``: a typical trade's absolute PnL, > 0)."""
    ctx = entry_context(trade.rows["observation"].iloc[0])
    side = "long" if trade.side > 0 else "short"
    with_trend = (trade.side > 0 and ctx["direction"] == "up") or (trade.side < 0 and ctx["direction"] == "down")
    outcome = "won" if trade.pnl > 0 else "lost" if trade.pnl < 0 else "broke even"
    text = (f"{side} {trade.size} {trade.rows['symbol'].iloc[0]} at {trade.rows['time'].iloc[0]} in {ctx['regime']} "
            f"volatility, window trend {ctx['direction']} ({ctx['trend']:+.2f}); held {trade.bars} bars and {outcome} "
            f"{trade.pnl:+,.2f}; best open {trade.best:+,.2f}, worst {trade.worst:+,.2f}.")
    if trade.pnl > 0:
        lesson = (f"{'with' if with_trend else 'against'} the trend in {ctx['regime']} volatility paid: "
                  + ("keep taking such entries" if with_trend else "a counter-trend win; size it carefully"))
    elif trade.best > abs(trade.pnl):
        lesson = "gave back an open profit larger than the loss: take profits or trail the stop sooner"
    elif not with_trend and ctx["direction"] != "flat":
        lesson = f"entered {side} against a {ctx['direction']} trend: wait for the trend or stand aside"
    else:
        lesson = f"{side} in {ctx['regime']} volatility never worked: cut such trades sooner"
    quality = float(np.clip(0.5 + 0.5 * math.tanh(trade.pnl / (2.0 * scale)), 0.0, 1.0))
    tags = (["high_value"] if quality >= high_value else []) + (["failed"] if quality <= failed else [])
    return {"reflection": text, "lesson": lesson, "quality": quality, "tags": tags, "annotator": ANNOTATOR,
            "annotator_version": ANNOTATOR_VERSION}


def annotate_trades(rows: pd.DataFrame, high_value: float = 0.7, failed: float = 0.3) -> pd.DataFrame:
    """Annotations (one row per experience of every closed trade in ``rows``), ready for
    ``ExperienceBuffer.annotate``; an empty frame when no trade closed."""
    trades = closed_trades(rows)
    if not trades:
        return pd.DataFrame(columns=["experience_id", "reflection", "lesson", "quality", "tags", "annotator",
                                     "annotator_version"])
    scale = float(np.median([abs(t.pnl) for t in trades])) or 1.0
    out = []
    for trade in trades:
        note = reflect(trade, scale, high_value, failed)
        out += [{"experience_id": eid, **note} for eid in trade.experience_ids]
    return pd.DataFrame(out)
