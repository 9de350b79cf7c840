"""Annotate the experience buffer: a reflection, a lesson and a quality score per closed trade.

    python -m pipelines.annotate [--config conf/default.yaml]
    mlflow run . -e annotate --env-manager local

Reads the experiences of ``continuous_learning.experience_storage`` that are not annotated yet,
rebuilds their closed trades and appends one annotation per experience (the rule-based
annotator of ``mlproject.reflection``). An MLflow run with the counts (``annotate/...``), the
buffer's stats (``buffer/...``) and a sample of reflections as a table artifact.
``annotation.annotator: llm`` asks an OpenAI-compatible endpoint instead, ``reasoner`` the
Production ``nt8-reasoner`` in this process (the reasoning engine), each with the rules as the
fallback for every trade it cannot annotate (counted as ``annotate/llm_fallbacks``).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import pandas as pd

from mlproject.cli import base_parser, run_cli
from mlproject.config import Config
from mlproject.experience import ExperienceBuffer, Query
from mlproject.reasoner.engine import ReasonerAnnotator, ReasonerUnavailable, ReasoningEngine
from mlproject.reflection import TRADE_COLUMNS, LLMAnnotator, annotate_trades
from mlproject.tracking import log_buffer_stats, pipeline_run, setup_tracking

log = logging.getLogger(__name__)

SAMPLE_ROWS = 20
"""Reflections shown in the run's ``annotate/sample.json`` table."""


@dataclass
class AnnotateResult:
    """What one annotation pass did."""

    run_id: str
    trades: int
    experiences: int
    high_value: int
    failed: int
    notes: pd.DataFrame


def main(cfg: Config) -> AnnotateResult:
    """Annotate what is not annotated yet; an MLflow run with counts and a sample."""
    import mlflow

    cl = cfg.continuous_learning
    setup_tracking(cfg)
    buffer = ExperienceBuffer(cl.experience_storage)
    with pipeline_run(cfg, "annotate") as run:
        rows = buffer.query(Query(annotated=False), TRADE_COLUMNS)
        llm = annotator(cfg)
        notes = annotate_trades(rows, cl.high_value_min_quality, cl.failed_max_quality, llm,
                                cfg.annotation.quality_scale)
        buffer.annotate(notes)
        per_trade = notes.drop_duplicates("reflection") if len(notes) else notes
        counts = _counts(notes, per_trade, llm)
        mlflow.log_metrics({f"annotate/{k}": float(v) for k, v in counts.items()})
        log_buffer_stats(buffer)
        if len(per_trade):
            _log_sample(per_trade)
        log.info("annotated %d closed trades (%d experiences): %d high-value, %d failed", counts["trades"],
                 counts["experiences"], counts["high_value"], counts["failed"])
        return AnnotateResult(run.info.run_id, counts["trades"], counts["experiences"], counts["high_value"],
                              counts["failed"], notes)


def _counts(notes: pd.DataFrame, per_trade: pd.DataFrame, llm: LLMAnnotator | None) -> dict[str, int]:
    """Closed trades, experiences, high-value and failed trades annotated (and the model
    annotator's fallbacks to the rules)."""
    counts = {"trades": len(per_trade), "experiences": len(notes),
              "high_value": int(per_trade["tags"].map(lambda t: "high_value" in t).sum()) if len(notes) else 0,
              "failed": int(per_trade["tags"].map(lambda t: "failed" in t).sum()) if len(notes) else 0}
    if llm is not None:
        counts["llm_fallbacks"] = llm.failures
    return counts


def _log_sample(per_trade: pd.DataFrame) -> None:
    """The first :data:`SAMPLE_ROWS` reflections as the run's ``annotate/sample.json`` table."""
    import mlflow

    sample = per_trade.head(SAMPLE_ROWS).assign(tags=per_trade["tags"].head(SAMPLE_ROWS).map(",".join))
    mlflow.log_table(sample, "annotate/sample.json")


def annotator(cfg: Config) -> LLMAnnotator | None:
    """The model annotator ``annotation.annotator`` names (None: the rules alone). A reasoner
    that cannot be loaded (none in Production yet) falls back to the rules, said once."""
    if cfg.annotation.annotator == "llm":
        return LLMAnnotator.from_config(cfg.annotation)
    if cfg.annotation.annotator == "reasoner":
        engine = ReasoningEngine.from_config(cfg)
        try:
            engine.ensure_loaded()
        except ReasonerUnavailable as exc:
            log.warning("annotation.annotator is reasoner but %s: annotating with the rules", exc)
            return None
        return ReasonerAnnotator(engine, retries=0)
    return None


def build_parser() -> argparse.ArgumentParser:
    return base_parser(__doc__)


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, args: main(cfg))
