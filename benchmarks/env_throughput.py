"""Env steps per second: FuturesTradingEnv, its vector twin, and gym-anytrading's stocks-v0.

All three run in this one process, on the same synthetic bars, with random actions drawn up
front (so the generator is not timed). Reference: gym-anytrading ``stocks-v0``
(``StocksEnv``) with the same window. Targets on a 2-core machine: single env >= 2x
gym-anytrading; vector env >= 5 million env-steps/s in total at 1024 envs.

    python benchmarks/env_throughput.py [--steps 300000] [--bars 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def _best(fn, repeat: int) -> float:
    """Best of ``repeat`` timings in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _loop(env, actions: list[int]) -> None:
    env.reset(seed=0)
    step, reset = env.step, env.reset
    for action in actions:
        _, _, terminated, truncated, _ = step(action)
        if terminated or truncated:
            reset()


def single_rates(bars, window: int, n_steps: int, repeat: int) -> tuple[float, float]:
    """(ours, gym-anytrading) steps/s, timed in alternation so both see the same machine load."""
    from gym_anytrading.envs import StocksEnv

    from envs.futures_env import FuturesTradingEnv

    ours = FuturesTradingEnv({"bars": bars, "instrument": "ES", "window": window})
    frame = bars.rename(columns=str.capitalize)  # gym-anytrading reads Open/High/Low/Close/Volume
    ref = StocksEnv(df=frame, window_size=window, frame_bound=(window, len(frame)))
    rng = np.random.default_rng(1)
    ours_actions = rng.integers(0, ours.action_space.n, n_steps).tolist()
    ref_actions = rng.integers(0, ref.action_space.n, n_steps).tolist()
    best_ours = best_ref = float("inf")
    for _ in range(repeat):
        best_ref = min(best_ref, _best(lambda: _loop(ref, ref_actions), 1))
        best_ours = min(best_ours, _best(lambda: _loop(ours, ours_actions), 1))
    return n_steps / best_ours, n_steps / best_ref


def vector_rate(bars, window: int, num_envs: int, n_steps: int, repeat: int) -> float:
    from envs.futures_vector_env import FuturesTradingVectorEnv

    env = FuturesTradingVectorEnv(num_envs, {"bars": bars, "instrument": "ES", "window": window})
    n_batches = max(1, n_steps // num_envs)
    actions = np.random.default_rng(1).integers(0, env.single_action_space.n, (n_batches, num_envs))

    def run() -> None:
        env.reset(seed=0)
        for batch in actions:
            env.step(batch)

    return n_batches * num_envs / _best(run, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300_000, help="single-env steps per timing")
    parser.add_argument("--vector-steps", type=int, default=10_000_000, help="env-steps per vector timing")
    parser.add_argument("--bars", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # gym-anytrading's own deprecation noise

    from mlproject.data import synthetic_bars

    bars = synthetic_bars(args.bars, seed=0)
    ours, ref = single_rates(bars, args.window, args.steps, args.repeat)
    rows = [("gym-anytrading stocks-v0 (reference)", ref, 1.0), ("FuturesTradingEnv", ours, ours / ref)]
    for n in (256, 1024):
        rate = vector_rate(bars, args.window, n, args.vector_steps, args.repeat)
        rows.append((f"FuturesTradingVectorEnv x{n}", rate, rate / ref))
    print(f"bars={args.bars} window={args.window} steps={args.steps} repeat={args.repeat} (best of)")
    print(f"{'env':40s} {'env-steps/s':>14s} {'vs reference':>13s}")
    for name, rate, ratio in rows:
        print(f"{name:40s} {rate:14,.0f} {ratio:12.2f}x")
    print(f"single env vs gym-anytrading: {ours / ref:.2f}x (target >= 2x)")
    print(f"vector env x1024: {rows[-1][1] / 1e6:.2f} M env-steps/s (target >= 5 M)")


if __name__ == "__main__":
    main()
