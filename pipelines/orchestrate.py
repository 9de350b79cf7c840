"""Run the learning cycle.

    python -m pipelines.orchestrate --mode all [--config conf/smoke.yaml]
    mlflow run . --env-manager local                       # the `main` entry point

What exists today (``--mode all``): ingest the configured bars (synthetic by default), train
the agent with RLlib PPO and register it as a new ``nt8-agent`` version, then backtest the
registered policy and a random baseline on the held-out test split, all under one parent
MLflow run with a child run per step. Evaluation with the full metric set, gated promotion,
experience collection and fine-tuning join this cycle as their pipelines land; until then the
run says so in its ``cycle.pending`` tag and in the log.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np
import pandas as pd

from mlproject.backtest import EpisodeResult, play_episode, random_policy
from mlproject.config import Config
from pipelines.cli import base_parser, run_cli

log = logging.getLogger(__name__)

MODES = ("all",)
PENDING_STEPS = ("evaluate", "promote", "collect", "annotate", "finetune")


def pyfunc_policy(model_uri: str):
    """A backtest policy from a logged/registered policy model (the artifact that deploys)."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    return lambda obs: int(model.predict(obs[None].astype(np.float32))[0])


def test_backtest_step(cfg: Config, bars: pd.DataFrame, model_uri: str) -> dict[str, EpisodeResult]:
    """Child run: the trained policy and a random policy on the held-out test split; the
    trained policy's metrics under ``eval/``, the baseline's under ``baseline/random/``."""
    import mlflow

    from mlproject.data import split_bars
    from mlproject.instruments import resolve_instrument
    from mlproject.tracking import pipeline_run
    from pipelines.ingest import log_dataset

    sp = cfg.data.splits
    test = split_bars(bars, sp.train, sp.validation, sp.test, gap=sp.gap).test
    env = cfg.env.model_dump()
    n_actions = 2 * resolve_instrument(cfg.env.instrument).max_contracts + 1
    with pipeline_run(cfg, "test-backtest", nested=True):
        mlflow.set_tag("model_uri", model_uri)
        log_dataset(test, "test-split", bars.attrs.get("path", str(bars.attrs.get("source", ""))), "test")
        results = {"trained": play_episode(pyfunc_policy(model_uri), test, env, cfg.seed),
                   "random": play_episode(random_policy(n_actions, cfg.seed), test, env, cfg.seed)}
        for prefix, result in (("eval", results["trained"]), ("baseline/random", results["random"])):
            mlflow.log_metrics({f"{prefix}/{k}": v for k, v in result.metrics.items() if np.isfinite(v)})
        trained = results["trained"]
        frame = pd.DataFrame({"equity": trained.equity, "position": trained.positions})
        mlflow.log_text(frame.to_csv(), "eval/equity_positions.csv")
        if len(trained.trades):
            mlflow.log_table(trained.trades.astype({"entry_time": str, "exit_time": str}), "eval/trades.json")
        for name, result in results.items():
            log.info("%s policy on %d test bars: %s", name, len(test),
                     ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
        return results


def main(cfg: Config, mode: str = "all") -> dict[str, Any]:
    """Run ``mode`` of the cycle; returns what each step produced."""
    import mlflow

    from mlproject.tracking import pipeline_run, setup_tracking
    from pipelines import ingest, train

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; available now: {', '.join(MODES)}")
    setup_tracking(cfg)
    with pipeline_run(cfg, f"cycle-{mode}") as run:
        mlflow.set_tag("cycle.pending", ",".join(PENDING_STEPS))
        ingested = ingest.main(cfg)
        trained = train.main(cfg, data=str(ingested.path))
        model_uri = (f"models:/{cfg.train.register_model}/{trained.registered_version}"
                     if trained.registered_version else trained.model_uri)
        backtests = test_backtest_step(cfg, ingested.bars, model_uri)
        log.info("cycle done (run %s): trained %s. Steps not built yet, so not run: %s", run.info.run_id,
                 model_uri, ", ".join(PENDING_STEPS))
        return {"run_id": run.info.run_id, "ingest": ingested, "train": trained, "model_uri": model_uri,
                "backtests": backtests}


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--mode", default="all", choices=MODES, help="which part of the cycle to run")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, args: main(cfg, args.mode))
