"""The cycle's durable state and what is due.

Watermarks under ``continuous_learning.state_dir`` (:class:`CycleState`): ``state.json`` (when and
what the last retrain and fine-tune did, the newest bar a model was trained on, when each loop mode
last ran) and the experience ids each step had seen (Parquet). Experience ids, not times: paper
replays record old bar times, and compaction rewrites files. :func:`due` compares the buffer with
them (:class:`Due`); :func:`retrain_window` picks the bars a retrain learns from.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlproject.atomic import atomic_write, atomic_write_text, read_json_state
from mlproject.config import Config
from mlproject.experience import ExperienceBuffer
from mlproject.intake import IntakeResult, new_bars_since, run_intake

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
RETRAIN_IDS = "retrain_ids.parquet"
FINETUNE_IDS = "finetune_ids.parquet"


class CycleState:
    """The watermarks under ``folder`` (see the module doc). Every write goes through a method
    here, atomically: the JSON is replaced whole, never edited in place."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = read_json_state(self.folder / STATE_FILE, "orchestrator",
                                                    "move it aside to start the watermarks afresh")

    def seen(self, name: str) -> set[str]:
        path = self.folder / name
        return set(pq.read_table(path).column("experience_id").to_pylist()) if path.exists() else set()

    def _save(self) -> None:
        atomic_write_text(self.folder / STATE_FILE, json.dumps(self.data, indent=2))

    def mark_bars(self, last_bar: Any) -> None:
        """The newest bar a model was trained on (the intake's new bars count from there)."""
        self.data["bars_trained_to"] = str(last_bar)
        self._save()

    def advance(self, key: str, ids_file: str, ids: set[str], record: dict[str, Any]) -> None:
        """The ids first, then the JSON that points at them (a crash between keeps the old watermark)."""
        table = pa.table({"experience_id": pa.array(sorted(ids), pa.string())})
        atomic_write(self.folder / ids_file, lambda p: pq.write_table(table, p))
        self.data[key] = {**record, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "experiences_seen": len(ids)}
        self._save()

    def loop_ran(self, mode: str) -> float | None:
        """When the loop last ran ``mode`` (seconds since the epoch), None if never."""
        return self.data.get("loop", {}).get(mode)

    def mark_loop(self, mode: str, when: float | None = None) -> None:
        """The loop ran ``mode`` now (or at ``when``): a restarted loop does not run it again early."""
        self.data.setdefault("loop", {})[mode] = time.time() if when is None else when
        self._save()


@dataclass
class Due:
    """What the buffer holds against the watermarks, and what is due."""

    experiences: int
    new_since_retrain: int
    annotated: int
    new_annotated_since_finetune: int
    new_bars_since_retrain: int
    retrain_due: bool
    finetune_due: bool
    first_new_time: Any
    """The time of the first new experience or new bar (what a retrain learns from), or None."""
    ids: set[str] = field(default_factory=set, repr=False)
    annotated_ids: set[str] = field(default_factory=set, repr=False)
    shadow: int = 0
    """Shadow experiences in the buffer (counted apart: they are not new bars)."""

    def counts(self) -> dict[str, float]:
        """The numbers, for ``cycle/<name>`` metrics."""
        return {k: float(getattr(self, k)) for k in ("experiences", "new_since_retrain", "annotated",
                                                       "new_annotated_since_finetune", "new_bars_since_retrain",
                                                       "retrain_due", "finetune_due")}


def due(cfg: Config, buffer: ExperienceBuffer, state: CycleState) -> Due:
    """What the buffer holds against the watermarks, and what is due. A shadow's experiences
    (source ``shadow``: a Staging model on bars Production traded) are not new bars: they do not
    count towards a retrain (with a shadow, retrains would come twice as often and keep replacing
    the Staging version before its live verdict)."""
    cl = cfg.continuous_learning
    rows = buffer.query(columns=["experience_id", "time", "quality", "source"])
    shadow = rows["source"] == "shadow"
    rows = rows[~shadow]
    ids = set(rows["experience_id"])
    annotated = set(rows.loc[rows["quality"].notna(), "experience_id"])
    fresh = ~rows["experience_id"].isin(state.seen(RETRAIN_IDS))
    new = len(set(rows.loc[fresh, "experience_id"]))
    new_annotated = len(annotated - state.seen(FINETUNE_IDS))
    new_bars, first_bar = (new_bars_since(cfg.data.intake.history, state.data.get("bars_trained_to"))
                           if cfg.data.intake.folder else (0, None))
    bars_due = cl.retrain_new_bars is not None and new_bars >= cl.retrain_new_bars
    firsts = [t for t in (rows.loc[fresh, "time"].min() if new else None, first_bar if bars_due else None)
              if t is not None]
    return Due(len(ids), new, len(annotated), new_annotated, new_bars,
               (new >= cl.retrain_frequency and len(ids) >= cl.min_experiences) or bars_due,
               new_annotated >= cl.min_annotated_for_finetune, min(firsts, key=_utc) if firsts else None,
               ids, annotated, int(shadow.sum()))


def describe_due(cfg: Config, d: Due) -> str:
    """The thresholds in one line, for the log."""
    cl = cfg.continuous_learning
    bars = f"retrain_new_bars {cl.retrain_new_bars}" if cl.retrain_new_bars else "not a trigger"
    return (f"{d.experiences} experiences ({d.new_since_retrain} new since the last retrain; retrain needs "
            f"{cl.retrain_frequency} new and {cl.min_experiences} in all), {d.new_bars_since_retrain} new bars "
            f"({bars}): retrain {'DUE' if d.retrain_due else 'not due'}; {d.annotated} annotated "
            f"({d.new_annotated_since_finetune} new; fine-tuning needs {cl.min_annotated_for_finetune}): "
            f"fine-tune {'DUE' if d.finetune_due else 'not due'}")


def _utc(t: Any) -> pd.Timestamp:
    """A time comparable with any other: naive times are taken as UTC."""
    t = pd.Timestamp(t)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def retrain_window(bars: pd.DataFrame, history: int | None, since: pd.Timestamp | None) -> tuple[pd.DataFrame, str]:
    """The bars a retrain learns from: from ``history`` bars before the bar of ``since`` (the
    first new experience; at least the newest ``history`` bars) to the newest bar; all bars when
    ``history`` is None. Returns the slice and a note for when the experiences are not in the
    market data (newer than its last bar: export the bars they traded and ingest them)."""
    note = ""
    if since is not None and len(bars):
        index = bars.index
        since = pd.Timestamp(since)
        if index.tz is not None:
            since = since.tz_localize(index.tz) if since.tz is None else since.tz_convert(index.tz)
        elif since.tz is not None:
            since = since.tz_convert("UTC").tz_localize(None)
        if since > index[-1]:
            note = (f"the new experiences start at {since}, after the market data ends ({index[-1]}): the retrain "
                    "learns from the market data it has; export and ingest the bars they traded to learn from them")
    if history is None:
        return bars, note
    start = len(bars) - history
    if since is not None and not note:
        start = min(start, int(bars.index.searchsorted(since)) - history)
    return bars.iloc[max(0, start):], note


def with_history(cfg: Config) -> Config:
    """``cfg`` reading the intake's merged history instead of ``data.source`` once it exists."""
    intake = cfg.data.intake
    if intake.folder and Path(intake.history).exists() and cfg.data.source != intake.history:
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": intake.history})})
    return cfg


def take_intake(cfg: Config) -> IntakeResult:
    """Take the new files of ``data.intake.folder`` into the history; log what happened."""
    import mlflow

    d = cfg.data
    result = run_intake(d.intake.folder, d.intake.history, cfg.continuous_learning.state_dir,
                        tick_period=d.tick_period, tz=d.tz, drop_duplicates=d.drop_duplicates,
                        settle_seconds=d.intake.settle_seconds)
    mlflow.log_metrics({"intake/files_ingested": len(result.ingested), "intake/files_rejected": len(result.rejected),
                        "intake/new_bars": result.new_bars, "intake/history_bars": result.history_bars})
    if result.rejected:
        mlflow.set_tag("intake.rejected", "; ".join(f"{r['file']}: {r['error']}" for r in result.rejected)[:5000])
    if result.ingested:
        mlflow.set_tag("intake.ingested", ", ".join(i["file"] for i in result.ingested)[:5000])
    return result


