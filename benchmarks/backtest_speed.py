"""Bars per second of a full policy backtest (``mlproject.evaluation.backtest``) over 1M+ bars.

The policy is a PPO RLModule (64x64, as training builds it; weights random: speed does not
depend on them) acting greedily. Timed end to end: env construction and features over all
bars, the batched play of every window, trade reconstruction and every metric per window.
Reference, in the same run: the sequential single-env backtest (``mlproject.backtest.play_episode``,
one policy call per bar) on a slice, and the same batched backtest through the MLflow pyfunc
model (what ``pipelines.evaluate`` loads). Goal: >= 200,000 bars/s on this machine.

    python benchmarks/backtest_speed.py [--bars 1000000] [--windows 256]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings

import numpy as np

from mlproject.policy import fresh_module


def log_pyfunc(module, example: np.ndarray) -> str:
    """Save the module as the same pyfunc policy training logs; returns a local model path."""
    import mlflow
    from mlflow.models import infer_signature

    from mlproject.policy import greedy_actions
    from pipelines.train import POLICY_MODEL_FILE, pip_requirements

    tmp = tempfile.mkdtemp(prefix="bt-speed-")
    module.save_to_path(f"{tmp}/module")
    mlflow.pyfunc.save_model(f"{tmp}/model", python_model=str(POLICY_MODEL_FILE),
                             artifacts={"rl_module": f"{tmp}/module"},
                             signature=infer_signature(example, greedy_actions(module, example)),
                             pip_requirements=pip_requirements())
    return f"{tmp}/model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--sequential-bars", type=int, default=20_000, help="slice for the sequential reference")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    import torch

    from mlproject.backtest import play_episode
    from mlproject.data import synthetic_bars
    from mlproject.evaluation import backtest, load_policy
    from mlproject.policy import module_policy

    torch.manual_seed(0)
    env = {"instrument": "ES", "window": 32}
    bars = synthetic_bars(args.bars, seed=0)
    module = fresh_module(32 * 5 + 2, 3)

    start = time.perf_counter()
    report = backtest(module_policy(module), bars, env, args.windows, name="rlmodule")
    batched = len(bars) / (time.perf_counter() - start)

    piece = bars.iloc[: args.sequential_bars]
    start = time.perf_counter()
    play_episode(module_policy(module), piece, env)
    sequential = len(piece) / (time.perf_counter() - start)

    policy = load_policy(log_pyfunc(module, np.zeros((4, 32 * 5 + 2), np.float32)))
    start = time.perf_counter()
    backtest(policy, bars, env, args.windows, name="pyfunc")
    pyfunc = len(bars) / (time.perf_counter() - start)

    trades = int(sum(w.metrics["n_trades"] for w in report.windows))
    print(f"bars={len(bars):,} windows={args.windows} trades={trades:,} policy=PPO RLModule 64x64 (greedy)")
    print(f"{'backtest':58s} {'bars/s':>12s} {'vs reference':>13s}")
    print(f"{'sequential single env, one call per bar (reference)':58s} {sequential:12,.0f} {1.0:12.2f}x")
    print(f"{'batched windows, RLModule':58s} {batched:12,.0f} {batched / sequential:12.2f}x")
    print(f"{'batched windows, MLflow pyfunc (pipelines.evaluate)':58s} {pyfunc:12,.0f} {pyfunc / sequential:12.2f}x")
    print(f"batched RLModule backtest: {batched:,.0f} bars/s (target >= 200,000)")


if __name__ == "__main__":
    main()
