"""Fine-tuning data from annotated experiences: one prompt/completion pair per closed trade.

Prompt: the annotator's request (:data:`mlproject.reflection.PROMPT`) filled with the trade's facts
(market context at entry, side and size, outcome), recomputed from the experience rows, so the
fine-tuned model answers exactly what the LLM annotator and the engine ask. Completion: the
reflection's reasoning, then ``</think>``, then the answer lines (``LESSON:``, ``QUALITY:``).
For an LLM annotation the reasoning is its think block; for a rule-based one, the rules' account
of the trade. Quality-filtered (``finetune.min_quality``), deduplicated on the pair, and split by
time: the newest ``finetune.validation_fraction`` of the trades validate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mlproject.atomic import atomic_write_text
from mlproject.experience import ExperienceBuffer, Query
from mlproject.reasoner.chat import completion_text, r1_prompt
from mlproject.reflection import PROMPT, TRADE_COLUMNS, closed_trades, reflect

log = logging.getLogger(__name__)

COLUMNS = ["time", "trade_id", "facts", "reasoning", "answer", "quality", "annotator"]


@dataclass
class Prepared:
    """The two JSONL files and their rows (``prompt``, ``completion`` and where they came from)."""

    train_path: Path
    validation_path: Path
    train: pd.DataFrame
    validation: pd.DataFrame
    dropped: dict[str, int]
    """Why examples were left out: ``below_quality``, ``duplicates``."""


def answer_text(lesson: str, quality: float) -> str:
    return f"LESSON: {lesson.strip()}\nQUALITY: {quality:.2f}"


def trade_examples(buffer: ExperienceBuffer) -> pd.DataFrame:
    """One row per annotated closed trade: its facts, the annotation's reasoning and answer."""
    rows = buffer.query(Query(annotated=True), [*TRADE_COLUMNS, "reflection", "lesson", "quality", "annotator"])
    out = []
    for trade in closed_trades(rows):
        note = trade.rows.iloc[-1]  # the closing row carries the trade's annotation like every other
        facts = str(reflect(trade, 1.0, 1.0, 0.0)["reflection"])
        reflection = str(note["reflection"] or "")
        # An LLM note is "<facts>\n<think block>": the think block is the reasoning. A rule note
        # is the facts alone: they are its reasoning.
        reasoning = reflection[len(facts):].strip() if reflection.startswith(facts) else reflection
        out.append({"time": trade.rows["time"].iloc[0], "trade_id": trade.trade_id, "facts": facts,
                    "reasoning": reasoning or reflection, "answer": answer_text(str(note["lesson"]), float(note["quality"])),
                    "quality": float(note["quality"]), "annotator": str(note["annotator"])})
    return pd.DataFrame(out, columns=COLUMNS).sort_values("time", kind="stable").reset_index(drop=True)


def build_pairs(examples: pd.DataFrame, min_quality: float) -> tuple[pd.DataFrame, dict[str, int]]:
    """Prompt/completion pairs, quality-filtered and deduplicated (oldest kept), oldest first; the
    prompt rendered in the R1-Distill chat format with no tokenizer (:func:`r1_prompt`)."""
    keep = examples[examples["quality"] >= min_quality]
    pairs = keep.assign(
        prompt=[r1_prompt(PROMPT.format(facts=f)) for f in keep["facts"]],
        completion=[completion_text(r, a) for r, a in zip(keep["reasoning"], keep["answer"])])
    unique = pairs.drop_duplicates(["prompt", "completion"], keep="first")
    return unique.reset_index(drop=True), {"below_quality": len(examples) - len(keep),
                                           "duplicates": len(pairs) - len(unique)}


def split_by_time(pairs: pd.DataFrame, validation_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The oldest pairs train, the newest ``validation_fraction`` validate (at least one each)."""
    n_val = min(max(1, round(len(pairs) * validation_fraction)), len(pairs) - 1)
    return pairs.iloc[: len(pairs) - n_val].reset_index(drop=True), pairs.iloc[len(pairs) - n_val:].reset_index(drop=True)


def write_jsonl(frame: pd.DataFrame, path: Path) -> Path:
    """Atomically write ``prompt``, ``completion`` and the provenance columns, one JSON per line."""
    lines = [json.dumps({"prompt": r.prompt, "completion": r.completion, "time": str(r.time), "trade_id": r.trade_id,
                         "quality": r.quality, "annotator": r.annotator}, ensure_ascii=False)
             for r in frame.itertuples()]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return path


def read_jsonl(path: str | Path) -> pd.DataFrame:
    """A prepared file back as rows; a malformed line (bad JSON, not UTF-8 text, not a
    prompt/completion record) is an error naming the file and the line."""
    rows = []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                             f"{exc.start + 1}); the fine-tuning data (--data) is JSON lines in UTF-8, as "
                             "`python -m pipelines.finetune --prepare-only` writes it") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
                raise ValueError("needs string fields prompt and completion")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{path}, line {number}: not a prompt/completion record ({exc})") from None
        rows.append(row)
    return pd.DataFrame(rows)


def prepare(buffer: ExperienceBuffer, out_dir: str | Path, min_quality: float, validation_fraction: float,
            min_examples: int) -> Prepared:
    """Build, filter, dedup, split and write the fine-tuning data (no model needed)."""
    pairs, dropped = build_pairs(trade_examples(buffer), min_quality)
    if len(pairs) < min_examples:
        raise ValueError(f"{buffer.root}: {len(pairs)} distinct annotated trades at quality >= {min_quality} "
                         f"({dropped['below_quality']} below it, {dropped['duplicates']} duplicates); fine-tuning "
                         f"needs finetune.min_examples = {min_examples}")
    train, validation = split_by_time(pairs, validation_fraction)
    out = Path(out_dir)
    log.info("fine-tuning data: %d train and %d validation pairs (%d below quality %.2f, %d duplicates) in %s",
             len(train), len(validation), dropped["below_quality"], min_quality, dropped["duplicates"], out)
    return Prepared(write_jsonl(train, out / "train.jsonl"), write_jsonl(validation, out / "validation.jsonl"),
                    train, validation, dropped)
