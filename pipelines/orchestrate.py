"""Run the learning cycle.

    python -m pipelines.orchestrate --mode all [--config conf/smoke.yaml]
    mlflow run . --env-manager local                       # the `main` entry point

What exists today (``--mode all``): ingest the configured bars (synthetic by default), then
play one seeded random-policy episode on the held-out test split and log its trading metrics,
all under one parent MLflow run with a child run per step. Training, evaluation, promotion,
experience collection and fine-tuning join this cycle as their pipelines land; until then the
run says so in its ``cycle.pending`` tag and in the log.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlproject.config import Config
from pipelines.cli import base_parser, run_cli

log = logging.getLogger(__name__)

MODES = ("all",)
PENDING_STEPS = ("train", "evaluate", "promote", "collect", "annotate", "finetune")


@dataclass
class EpisodeResult:
    """One played episode: per-bar equity and positions, closed trades, metrics."""

    equity: pd.Series
    positions: pd.Series
    trades: pd.DataFrame
    metrics: dict[str, float]


def play_random_episode(bars: pd.DataFrame, cfg: Config, seed: int) -> EpisodeResult:
    """Play the whole of ``bars`` with uniformly random target positions (a sanity baseline)."""
    from envs.futures_env import FuturesTradingEnv

    env_cfg = {**cfg.env.model_dump(), "bars": bars, "random_start": False, "episode_bars": None,
               "max_episode_steps": None}
    env = FuturesTradingEnv(env_cfg)
    rng = np.random.default_rng(seed)
    _, info = env.reset(seed=seed)
    stamps, equity, positions = [env.timestamp], [info["equity"]], [info["position"]]
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        stamps.append(env.timestamp)
        equity.append(info["equity"])
        positions.append(info["position"])
        done = terminated or truncated
    trades = env.trades_frame()
    equity_s = pd.Series(equity, index=pd.DatetimeIndex(stamps, name="timestamp"), name="equity")
    return EpisodeResult(equity_s, pd.Series(positions, index=equity_s.index, name="position"), trades,
                         episode_metrics(equity_s, trades))


def episode_metrics(equity: pd.Series, trades: pd.DataFrame) -> dict[str, float]:
    from mlproject import metrics as m

    returns = m.equity_returns(equity.to_numpy())
    pnls = trades["pnl"].to_numpy() if len(trades) else np.zeros(0)
    return {
        "total_return": m.total_return(equity.to_numpy()),
        "max_drawdown": m.max_drawdown(equity.to_numpy()),
        "sharpe": m.sharpe_ratio(returns, m.periods_per_year(equity.index)),
        "n_trades": float(len(trades)),
        "win_rate": m.win_rate(pnls),
        "profit_factor": m.profit_factor(pnls),
        "commission_paid": float(trades["commission"].sum()) if len(trades) else 0.0,
    }


def random_policy_step(cfg: Config, bars: pd.DataFrame) -> EpisodeResult:
    """Child run: a random-policy episode on the test split, metrics under ``eval/``."""
    import mlflow

    from mlproject.data import split_bars
    from mlproject.tracking import pipeline_run
    from pipelines.ingest import log_dataset

    sp = cfg.data.splits
    test = split_bars(bars, sp.train, sp.validation, sp.test, gap=sp.gap).test
    with pipeline_run(cfg, "random-policy-episode", nested=True):
        mlflow.set_tag("policy", "random")
        log_dataset(test, "test-split", bars.attrs.get("path", str(bars.attrs.get("source", ""))), "test")
        result = play_random_episode(test, cfg, cfg.seed)
        mlflow.log_metrics({f"eval/{k}": v for k, v in result.metrics.items() if np.isfinite(v)})
        frame = pd.DataFrame({"equity": result.equity, "position": result.positions})
        mlflow.log_text(frame.to_csv(), "eval/equity_positions.csv")
        if len(result.trades):
            mlflow.log_table(result.trades.astype({"entry_time": str, "exit_time": str}), "eval/trades.json")
        log.info("random policy on %d test bars: %s", len(test),
                 ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
        return result


def main(cfg: Config, mode: str = "all") -> dict[str, Any]:
    """Run ``mode`` of the cycle; returns what each step produced."""
    import mlflow

    from mlproject.tracking import pipeline_run, setup_tracking
    from pipelines import ingest

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; available now: {', '.join(MODES)}")
    setup_tracking(cfg)
    with pipeline_run(cfg, f"cycle-{mode}") as run:
        mlflow.set_tag("cycle.pending", ",".join(PENDING_STEPS))
        ingested = ingest.main(cfg)
        episode = random_policy_step(cfg, ingested.bars)
        log.info("cycle done (run %s). Steps not built yet, so not run: %s", run.info.run_id,
                 ", ".join(PENDING_STEPS))
        return {"run_id": run.info.run_id, "ingest": ingested, "random_policy": episode}


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--mode", default="all", choices=MODES, help="which part of the cycle to run")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, args: main(cfg, args.mode))
