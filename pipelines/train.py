"""Train the agent with Ray RLlib (PPO, new API stack) and track it in MLflow.

    python -m pipelines.train [--config conf/default.yaml] [--data bars.parquet] [--iterations 50]
                              [--init-from models:/nt8-agent/Production] [--seed 1]
    mlflow run . -e train -P data=bars.parquet -P iterations=50 --env-manager local

Trains on the training split with validation backtests that select the best checkpoint, logs it
as an MLflow pyfunc model and registers it as a new version of ``train.register_model``: see
:mod:`mlproject.training`, whose :func:`~mlproject.training.train_policy` the cycle calls too.
"""

from __future__ import annotations

import argparse

from mlproject.cli import base_parser, optional_int, run_cli
from mlproject.config import Config
from mlproject.training import TrainResult, train_policy


def main(cfg: Config, data: str | None = None, iterations: int | None = None, init_from: str | None = None,
         seed: int | None = None) -> TrainResult:
    """Train on ``data`` (default ``cfg.data.source``) with ``seed`` and register the best policy
    (:func:`mlproject.training.train_policy`, the function the cycle calls)."""
    if data:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": data})})
    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    return train_policy(cfg, init_from=init_from, iterations=iterations)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--data", default="", help="bar file or 'synthetic' (default: data.source)")
    parser.add_argument("--iterations", type=optional_int, default=None,
                        help="training iterations (default: train.iterations)")
    parser.add_argument("--init-from", default="", help="warm start: models:/nt8-agent/Production, a version, "
                        "models:/nt8-agent@alias, runs:/<id>/policy or a checkpoint directory")
    parser.add_argument("--seed", type=optional_int, default=None, help="seed (default: seed from the config)")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, a: main(cfg, a.data or None, a.iterations, a.init_from or None, a.seed))
