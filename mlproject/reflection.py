"""Post-trade reflections: one per closed trade of the experience buffer.

The default annotator is rule based and deterministic (no network): from the trade's rows it
reads the context at entry (the last bar's normalised return and range, the trend over the
observation window), the side and size, the outcome (PnL, bars held, the best and worst open
PnL on the way), and writes what went right or wrong, a lesson, and a quality score in [0, 1]
(0.5 is break-even; a win or loss of one typical trade's size moves it about a quarter). Tags:
``high_value`` at ``continuous_learning.high_value_min_quality`` or above, ``failed`` at
``failed_max_quality`` or below. :class:`LLMAnnotator` asks an OpenAI-compatible endpoint instead
(``annotation.annotator: llm``), with this one as its fallback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlproject.features import feature_rows
from mlproject.reasoner.chat import parse_reply

log = logging.getLogger(__name__)

ANNOTATOR = "rules"
ANNOTATOR_VERSION = "2"
"""2: quality scaled by the account at entry (1: by the median trade of the pass)."""

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
    """The market at entry, from the observation (``window`` rows of features, then the account)."""
    feats = feature_rows(np.asarray(observation, np.float64))
    window = len(feats)
    ret_z, range_z = feats[-1, 0], feats[-1, 1]
    trend = float(feats[:, 0].sum() / math.sqrt(window)) if window else 0.0
    regime = "high" if abs(range_z) > 1.5 else "low" if abs(range_z) < 0.5 else "normal"
    direction = "up" if trend > 1.0 else "down" if trend < -1.0 else "flat"
    return {"ret_z": float(ret_z), "range_z": float(range_z), "trend": trend, "regime": regime, "direction": direction}


def reflect(trade: Trade, quality_scale: float, high_value: float, failed: float) -> dict[str, object]:
    """The annotation of one trade. Quality 0.5 + 0.5 tanh(PnL / (2 x scale)), the scale being
    ``quality_scale`` of the account's equity at entry: a property of the trade alone, so the
    same trade scores the same whichever trades are annotated with it."""
    scale = quality_scale * abs(float(trade.rows["equity"].iloc[0])) or 1.0
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


def annotate_trades(rows: pd.DataFrame, high_value: float = 0.7, failed: float = 0.3,
                    llm: LLMAnnotator | None = None, quality_scale: float = 0.001) -> pd.DataFrame:
    """Annotations (one row per experience of every closed trade in ``rows``), ready for
    ``ExperienceBuffer.annotate``; an empty frame when no trade closed. With ``llm``, each trade
    is reflected on by the model, and by the rules when the model fails."""
    trades = closed_trades(rows)
    if not trades:
        return pd.DataFrame(columns=["experience_id", "reflection", "lesson", "quality", "tags", "annotator",
                                     "annotator_version"])
    out = []
    for trade in trades:
        note = reflect(trade, quality_scale, high_value, failed)
        if llm is not None:
            note = llm.reflect(trade, note, high_value, failed)
        out += [{"experience_id": eid, **note} for eid in trade.experience_ids]
    return pd.DataFrame(out)


PROMPT = """You review one closed futures trade of a trading agent.
{facts}
Think it through, then answer with exactly two lines:
LESSON: <one sentence the agent should learn>
QUALITY: <a number from 0 (a bad decision) to 1 (an excellent one)>"""



class LLMAnnotator:
    """Reflections from an OpenAI-compatible chat endpoint (``POST {endpoint}/chat/completions``),
    such as a local Ollama serving ``deepseek-r1:8b``. The model's think block becomes the
    reflection, its answer the lesson and quality. A request that times out or fails is retried
    ``retries`` times; a trade the model cannot annotate keeps the rule-based note (annotator
    ``rules (fallback: <why>)``), so annotation never stops on the network."""

    def __init__(self, endpoint: str, model: str, timeout_s: float = 60.0, retries: int = 2,
                 api_key: str | None = None) -> None:
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s, self.retries, self.api_key = model, timeout_s, retries, api_key
        self.failures = 0

    @classmethod
    def from_config(cls, annotation: Any) -> LLMAnnotator:
        return cls(annotation.endpoint, annotation.model, annotation.timeout_s, annotation.retries,
                   os.environ.get(annotation.api_key_env))

    def ask(self, prompt: str) -> str:
        """The model's answer text (raises on timeout, HTTP errors and malformed replies)."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            reply = json.loads(response.read().decode("utf-8"))
        return str(reply["choices"][0]["message"]["content"])

    def reflect(self, trade: Trade, rules_note: dict[str, Any], high_value: float, failed: float) -> dict[str, Any]:
        """The model's note on ``trade``, or ``rules_note`` marked as a fallback."""
        facts = rules_note["reflection"]
        problem = "no attempt"
        for attempt in range(self.retries + 1):
            try:
                return self._parse(self.ask(PROMPT.format(facts=facts)), facts, high_value, failed)
            except (OSError, urllib.error.URLError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
                problem = f"{type(exc).__name__}: {exc}"[:200]
                log.warning("LLM annotator, trade %s, attempt %d: %s", trade.trade_id, attempt + 1, problem)
                if attempt < self.retries:
                    time.sleep(min(0.5 * 2 ** attempt, 5.0))
        self.failures += 1
        return {**rules_note, "annotator": f"{ANNOTATOR} (fallback: {problem})"}

    def _parse(self, answer: str, facts: str, high_value: float, failed: float) -> dict[str, Any]:
        # parse_reply: R1's chat template opens the think block in the prompt, so many answers
        # carry only its closing tag; the LESSON/QUALITY lines are read from the answer alone.
        reply = parse_reply(answer)
        reasoning, rest = reply.reasoning, reply.answer
        lesson = re.search(r"LESSON:\s*(.+)", rest)
        quality = re.search(r"QUALITY:\s*([0-9]*\.?[0-9]+)", rest)
        if not lesson or not quality:
            raise ValueError(f"answer without LESSON/QUALITY lines: {rest.strip()[:120]!r}")
        score = float(np.clip(float(quality.group(1)), 0.0, 1.0))
        tags = (["high_value"] if score >= high_value else []) + (["failed"] if score <= failed else [])
        return {"reflection": f"{facts}\n{reasoning}".strip(), "lesson": lesson.group(1).strip(), "quality": score,
                "tags": tags, "annotator": f"llm:{self.model}", "annotator_version": "1"}
