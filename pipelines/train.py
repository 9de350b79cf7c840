"""Train the agent with Ray RLlib (PPO, new API stack) and track it in MLflow.

    python -m pipelines.train [--config conf/default.yaml] [--data bars.parquet] [--iterations 50]
                              [--init-from models:/nt8-agent/Production] [--seed 1]
    mlflow run . -e train -P data=bars.parquet -P iterations=50 --env-manager local

Trains on the training split, runs a deterministic validation backtest every
``train.eval_every`` iterations (``val/<metric>``: each metric's median over
``train.val_windows`` windows), keeps the checkpoint with the best ``val/<train.val_metric>`` and
stops early after ``train.patience`` iterations without improvement. The selected checkpoint's
values are the run's ``val_best/<metric>`` and its ``sharpe``, ``total_return``, ... (the names
evaluate and promote runs use). The best policy is logged as an
MLflow pyfunc model (no Ray needed to load it) and registered as a new version of
``train.register_model`` (``nt8-agent``).
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
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="bar file or 'synthetic' (default: data.source)")
    parser.add_argument("--iterations", type=optional_int, default=None,
                        help="training iterations (default: train.iterations)")
    parser.add_argument("--init-from", default="", help="warm start: models:/nt8-agent/Production, a version, "
                        "models:/nt8-agent@alias, runs:/<id>/policy or a checkpoint directory")
    parser.add_argument("--seed", type=optional_int, default=None, help="seed (default: seed from the config)")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, a: main(cfg, a.data or None, a.iterations, a.init_from or None, a.seed))
