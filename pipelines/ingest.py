"""Ingest market data: load, validate, write normalised Parquet, log the dataset to MLflow.

    python -m pipelines.ingest --source bars.txt [--config conf/default.yaml] [--set data.tick_period=5min]
    mlflow run . -e ingest -P source=bars.txt --env-manager local

``--source synthetic`` (the default from config) generates seeded synthetic bars. A bad file
exits with code 2 and a message naming the file and line.
"""

from __future__ import annotations

import argparse
from typing import Any

from mlproject.cli import base_parser, run_cli
from mlproject.config import Config
from mlproject.ingestion import IngestResult, ingest


def main(cfg: Config, output: str | None = None, overwrite: bool = False) -> IngestResult:
    """Load and validate ``cfg.data.source``, write ``<output_dir>/<name>.parquet``, log to MLflow
    (:func:`mlproject.ingestion.ingest`, the function the cycle calls)."""
    return ingest(cfg, output, overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--source", default="", help="bar file (NT8 export, CSV, Parquet) or 'synthetic'; "
                        "default: data.source from the config")
    parser.add_argument("--output", default="", help="Parquet path to write (default: <data.output_dir>/<name>.parquet)")
    parser.add_argument("--drop-duplicates", action="store_true", help="drop exact duplicate lines (logged)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--overwrite-flag", default="false", choices=("true", "false"),
                        help="the same as a value (how MLproject passes -P overwrite=true)")
    return parser


def _cli(cfg: Config, args: argparse.Namespace) -> None:
    updates: dict[str, Any] = {}
    if args.source:
        updates["source"] = args.source
    if args.drop_duplicates:
        updates["drop_duplicates"] = True
    if updates:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=updates)})
    main(cfg, args.output or None, args.overwrite or args.overwrite_flag == "true")


if __name__ == "__main__":
    run_cli(build_parser(), _cli)
