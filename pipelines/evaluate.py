"""Backtest registered models on held-out bars and log comparable trading metrics.

    python -m pipelines.evaluate --model-uri models:/nt8-agent/3
    python -m pipelines.evaluate --model-uri models:/nt8-agent@production --data ES.parquet --start 2025-01-01
    python -m pipelines.evaluate --model-uri models:/nt8-agent/3 --model-uri models:/nt8-agent/4   # compare
    mlflow run . -e evaluate -P model_uri=models:/nt8-agent/Production --env-manager local

Default bars: the test split of ``data.source``. What is played and logged (``eval/...``,
``baseline/...``, ``backtest/...`` curves, trades, the figure, a comparison table for several
models): :mod:`mlproject.reporting`, whose :func:`~mlproject.reporting.evaluate_models` the cycle
calls too.
"""

from __future__ import annotations

import argparse

import pandas as pd

from mlproject.cli import base_parser, run_cli
from mlproject.config import Config
from mlproject.data import load_source
from mlproject.evaluation import default_bars
from mlproject.reporting import EvaluateResult, evaluate_models


def select_bars(cfg: Config, data: str | None, start: str | None, end: str | None) -> pd.DataFrame:
    """A given file (whole, or the [start, end] window), else the configured test split."""
    if data:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": data})})
        bars = load_source(cfg)
    else:
        bars = default_bars(cfg)
    window = bars.loc[start:end] if (start or end) else bars
    if len(window) == 0:
        raise ValueError(f"no bars between {start or 'the start'} and {end or 'the end'} in {data or cfg.data.source}")
    window.attrs.update(bars.attrs)
    return window


def main(cfg: Config, model_uris: list[str], data: str | None = None, start: str | None = None,
         end: str | None = None, metric: str = "sharpe") -> EvaluateResult:
    """Evaluate each model (and the baselines) on the same bars (``data`` or the test split, within
    [start, end]) and windows; log to MLflow (:func:`mlproject.reporting.evaluate_models`, the
    function the cycle calls)."""
    if not model_uris:
        raise ValueError("give at least one --model-uri")
    return evaluate_models(cfg, model_uris, select_bars(cfg, data, start, end), metric=metric)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--model-uri", action="append", default=[], required=True,
                        help="models:/nt8-agent/3, models:/nt8-agent/Production, models:/nt8-agent@production, "
                             "runs:/<id>/policy; repeat (or comma-separate) to compare models")
    parser.add_argument("--data", default="", help="bar file to evaluate on (default: the test split of data.source)")
    parser.add_argument("--start", default="", help="first timestamp of the window (inclusive)")
    parser.add_argument("--end", default="", help="last timestamp of the window (inclusive)")
    parser.add_argument("--metric", default="sharpe", help="metric that names the best model when comparing")
    return parser


def _cli(cfg: Config, args: argparse.Namespace) -> None:
    uris = [u.strip() for chunk in args.model_uri for u in chunk.split(",") if u.strip()]
    main(cfg, uris, args.data or None, args.start or None, args.end or None, args.metric)


if __name__ == "__main__":
    run_cli(build_parser(), _cli)
