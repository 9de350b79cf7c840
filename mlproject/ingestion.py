"""Ingest market data: load, validate, write normalised Parquet, log the dataset to MLflow (the
step behind ``python -m pipelines.ingest`` and the cycle's ingest)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mlproject.atomic import atomic_write
from mlproject.config import Config
from mlproject.data import infer_bar_period, load_source, split_bars
from mlproject.preflight import warn_if_instrument_misfits
from mlproject.tracking import log_dataset, pipeline_run, setup_tracking

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    """What ingest produced: the Parquet path, the bars, and the MLflow run."""

    path: Path
    bars: pd.DataFrame
    run_id: str
    stats: dict[str, Any]


def bar_stats(bars: pd.DataFrame) -> dict[str, Any]:
    """Basic stats logged with the dataset."""
    close = bars["close"]
    return {
        "n_bars": int(len(bars)),
        "start": str(bars.index[0]),
        "end": str(bars.index[-1]),
        "bar_period": str(infer_bar_period(bars)),
        "trading_days": int(pd.DatetimeIndex(bars.index).normalize().nunique()),
        "price_min": float(bars["low"].min()),
        "price_max": float(bars["high"].max()),
        "close_first": float(close.iloc[0]),
        "close_last": float(close.iloc[-1]),
        "volume_total": float(bars["volume"].sum()),
    }


def dataset_name(cfg: Config) -> str:
    if cfg.data.source == "synthetic":
        return f"synthetic-seed{cfg.data.synthetic.seed}-n{cfg.data.synthetic.n_bars}"
    return Path(cfg.data.source).stem


def write_parquet(bars: pd.DataFrame, path: Path) -> None:
    """Write atomically (``mlproject.atomic``): a crash never leaves a half file."""
    atomic_write(path, lambda tmp: bars.to_parquet(tmp, engine="pyarrow"))


def content_digest(bars: pd.DataFrame) -> str:
    """sha256 (16 hex digits) of the bars' index and values: equal bars, equal digest."""
    import hashlib

    return hashlib.sha256(pd.util.hash_pandas_object(bars, index=True).to_numpy().tobytes()).hexdigest()[:16]


def _same_content(path: Path, digest: str) -> bool:
    try:
        return content_digest(pd.read_parquet(path)) == digest
    except Exception:  # noqa: BLE001 - unreadable or not Parquet: certainly not the same bars
        return False


def output_path(cfg: Config, bars: pd.DataFrame, output: str | None, overwrite: bool = False) -> tuple[Path, bool]:
    """Where ingest writes, and whether it must (False: that file already holds these bars).

    ``--output`` is never a folder nor the source file, and an existing file is replaced only with
    ``overwrite``. The default ``<output_dir>/<name>.parquet`` is reused when it holds the same
    bars; when it holds other bars (another source with the same file name) the new file gets
    the content digest in its name instead of overwriting it.
    """
    digest = content_digest(bars)
    source = None if cfg.data.source == "synthetic" else Path(cfg.data.source).resolve()
    if output:
        path = Path(output)
        if path.is_dir():
            raise ValueError(f"--output {output}: is a folder; give a file path such as {path / 'bars.parquet'}")
        if source is not None and path.resolve() == source:
            raise ValueError(f"--output {output}: is the source file itself; ingest never writes over its input")
        if path.exists() and not overwrite:
            raise ValueError(f"--output {output}: exists; pass --overwrite to replace it")
        return path, True
    path = Path(cfg.data.output_dir) / f"{dataset_name(cfg)}.parquet"
    if path.exists() and not _same_content(path, digest):
        path = path.with_name(f"{path.stem}-{digest[:8]}.parquet")
        log.info("%s holds other bars: writing %s", path.with_name(f"{dataset_name(cfg)}.parquet"), path.name)
    return path, not (path.exists() and _same_content(path, digest))


def ingest(cfg: Config, output: str | None = None, overwrite: bool = False) -> IngestResult:
    """Load and validate ``cfg.data.source``, write ``<output_dir>/<name>.parquet``, log to MLflow."""
    import mlflow

    setup_tracking(cfg)
    with pipeline_run(cfg, "ingest") as run:
        log.info("loading %s", cfg.data.source)
        bars = load_source(cfg)
        warn_if_instrument_misfits(bars, cfg)  # as early as possible: before anything trains on them
        name = dataset_name(cfg)
        path, write = output_path(cfg, bars, output, overwrite)
        if write:
            write_parquet(bars, path)
        stats = bar_stats(bars)
        splits = split_bars(bars, cfg.data.splits.train, cfg.data.splits.validation, cfg.data.splits.test,
                            gap=cfg.data.splits.gap)
        for part, frame in zip(("train", "validation", "test"), splits):
            stats[f"{part}_start"], stats[f"{part}_end"] = (str(frame.index[0]), str(frame.index[-1])) if len(
                frame) else ("", "")
        source = str(Path(cfg.data.source).resolve()) if cfg.data.source != "synthetic" else str(path.resolve())
        bars.attrs["path"] = str(path.resolve())
        dataset = log_dataset(bars, name, source, "ingest")
        mlflow.log_metrics({f"data/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
        mlflow.set_tags({"data.name": name, "data.digest": dataset.digest, "data.format": bars.attrs.get("format", ""),
                         "data.path": str(path.resolve())})
        mlflow.log_text(json.dumps(stats, indent=2), "data/stats.json")
        mlflow.log_artifact(str(path), "data")
        log.info("ingested %d bars %s .. %s (%s) -> %s [digest %s]", stats["n_bars"], stats["start"], stats["end"],
                 stats["bar_period"], path, dataset.digest)
        return IngestResult(path, bars, run.info.run_id, stats)
