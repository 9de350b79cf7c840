"""Bars per second of a full policy backtest (``mlproject.evaluation.backtest``) over 1M bars.

The policy is a PPO RLModule (64x64, as training builds it; weights random: speed does not
depend on them) acting greedily. Timed end to end: env construction and features over all
bars, the batched play of every window, trade reconstruction and every metric per window.
Contenders, alternated in blocks (one backtest each, order reversed every other round) after a
warm-up, median of the per-round ratios:

- reference: the same batched backtest with the policy called through RLlib's
  ``forward_inference`` (``greedy_actions``: what every backtest did before the fast path);
- ours: ``module_policy`` (the module's own torch layers under ``torch.inference_mode``);
- the MLflow pyfunc model (what ``pipelines.evaluate`` loads).

Before the loop, a phase breakdown of one backtest (env and features, policy calls, env steps,
per-window results) says where the time goes, and the sequential single env (one policy call
per bar) is timed once on a slice. Goal: >= 500,000 bars/s.

    python benchmarks/backtest_speed.py [--bars 1000000] [--windows 256] [--rounds 6]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks_support import interleave, print_rates  # noqa: E402

from mlproject.features import obs_size  # noqa: E402
from mlproject.policy import fresh_module  # noqa: E402


def log_pyfunc(module, example: np.ndarray) -> str:
    """Save the module as the same pyfunc policy training logs; returns a local model path."""
    import mlflow
    from mlflow.models import infer_signature

    from mlproject.policy import greedy_actions
    from mlproject.training import POLICY_MODEL_FILE, pip_requirements

    tmp = tempfile.mkdtemp(prefix="bt-speed-")
    module.save_to_path(f"{tmp}/module")
    mlflow.pyfunc.save_model(f"{tmp}/model", python_model=str(POLICY_MODEL_FILE),
                             artifacts={"rl_module": f"{tmp}/module"},
                             signature=infer_signature(example, greedy_actions(module, example)),
                             pip_requirements=pip_requirements())
    return f"{tmp}/model"


def phases(policy, bars, env: dict, windows: int) -> dict[str, float]:
    """Seconds of each part of one batched backtest (the loop of ``evaluation.backtest``)."""
    from envs.futures_vector_env import FuturesTradingVectorEnv
    from mlproject.evaluation import _window_result, window_starts
    from mlproject.metrics import periods_per_year

    out = {}
    start = time.perf_counter()
    cfg = {**env, "bars": bars, "random_start": False, "max_episode_steps": None}
    starts, length = window_starts(len(bars), 32, windows)
    vec = FuturesTradingVectorEnv(windows, {**cfg, "episode_bars": int(length)})
    out["env and features"] = time.perf_counter() - start
    obs, info = vec.reset(seed=0, options={"start": starts})
    equity, positions = np.empty((length + 1, windows)), np.zeros((length + 1, windows), np.int64)
    equity[0] = info["equity"]
    acting = stepping = 0.0
    for k in range(1, length + 1):
        a = time.perf_counter()
        actions = policy(obs)
        b = time.perf_counter()
        obs, _, _, _ = vec.step_arrays(actions)
        stepping += time.perf_counter() - b
        acting += b - a
        equity[k], positions[k] = vec.equity, vec.position
    out[f"policy ({length:,} calls of {windows})"] = acting
    out[f"env steps ({length:,})"] = stepping
    start = time.perf_counter()
    ppy = periods_per_year(bars.index)
    for i, s in enumerate(starts.tolist()):
        _window_result(i, s, equity[:, i], positions[:, i], vec.market, ppy)
    out["per-window trades and metrics"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sequential-bars", type=int, default=20_000, help="slice for the sequential single env")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)  # random policies hit the equity floor: one warning per window

    import torch

    from mlproject.backtest import play_episode
    from mlproject.data import synthetic_bars
    from mlproject.evaluation import backtest, load_policy
    from mlproject.policy import greedy_actions, module_policy

    torch.manual_seed(0)
    env = {"instrument": "ES", "window": 32}
    bars = synthetic_bars(args.bars, seed=0)
    module = fresh_module(obs_size(env["window"]), 3)
    ours = module_policy(module)
    pyfunc = load_policy(log_pyfunc(module, np.zeros((4, obs_size(env["window"])), np.float32)))
    contenders = {
        "batched, RLlib forward_inference (reference)": lambda obs: greedy_actions(module, obs),
        "batched, module_policy (ours)": ours,
        "batched, MLflow pyfunc (pipelines.evaluate)": pyfunc,
    }

    def timed(policy):
        def run() -> float:
            start = time.perf_counter()
            backtest(policy, bars, env, args.windows)
            return len(bars) / (time.perf_counter() - start)
        return run

    piece = bars.iloc[: args.sequential_bars]
    start = time.perf_counter()
    play_episode(ours, piece, env)
    sequential = len(piece) / (time.perf_counter() - start)
    report = backtest(ours, bars, env, args.windows)
    trades = int(sum(w.metrics["n_trades"] for w in report.windows))
    print(f"bars={len(bars):,} windows={args.windows} trades={trades:,} policy=PPO RLModule 64x64 (greedy) "
          f"torch_threads={torch.get_num_threads()}")
    print("where one backtest's time goes (ours):")
    for name, seconds in phases(ours, bars, env, args.windows).items():
        print(f"  {name:40s} {seconds:6.2f} s")
    print(f"sequential single env, one policy call per bar: {sequential:,.0f} bars/s (on {len(piece):,} bars)")
    rates = interleave({name: timed(policy) for name, policy in contenders.items()}, args.rounds)
    print_rates(rates, next(iter(contenders)), "bars/s")
    median = float(np.median(rates["batched, module_policy (ours)"]))
    print(f"batched backtest (ours): median {median:,.0f} bars/s (goal >= 500,000: "
          f"{'met' if median >= 500_000 else 'NOT met'})")


if __name__ == "__main__":
    main()
