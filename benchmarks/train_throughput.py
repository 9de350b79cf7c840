"""Env steps trained per second: RLlib PPO (our settings) against Stable-Baselines3 PPO.

Both train on FuturesTradingEnv over the same synthetic bars, with the same network
(64x64 tanh, separate policy and value nets), batch (--batch env steps per update),
minibatch and epochs, on the CPU, side by side in this one process. Reference: SB3 PPO with
8 single envs in a DummyVecEnv (its usual set-up); SB3 with 32 envs is shown too. RLlib rows:
envs sampled through our numpy vector env (``gym_env_vectorize_mode="vector_entry_point"``) or
gymnasium's SyncVectorEnv, in the driver (0 runners) or in 1 and 2 remote env runners (the
scaling question). Ratios are against the SB3 reference.

    python benchmarks/train_throughput.py [--iterations 4] [--batch 2048]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def env_config(bars, window: int) -> dict:
    return {"bars": bars, "instrument": "ES", "window": window, "episode_bars": 1000, "reward_scale": 0.01}


def rllib_rate(bars, args, runners: int, envs: int, vectorize: str) -> float:
    """Env steps trained per second over ``args.iterations`` iterations after one warm-up."""
    from mlproject.config import load_config
    from pipelines.train import algorithm_config

    cfg = load_config(None, [f"train.train_batch_size={args.batch}", f"train.minibatch_size={args.minibatch}",
                             f"train.num_epochs={args.epochs}", f"train.num_env_runners={runners}",
                             f"train.num_envs_per_env_runner={max(1, envs // max(runners, 1))}"])
    config = algorithm_config(cfg, env_config(bars, args.window), seed=0)
    config.env_runners(gym_env_vectorize_mode=vectorize)
    algo = config.build_algo()
    try:
        algo.train()  # warm-up: first-iteration set-up is not throughput
        start = time.perf_counter()
        for _ in range(args.iterations):
            algo.train()
        return args.iterations * args.batch / (time.perf_counter() - start)
    finally:
        algo.stop()


def sb3_rate(bars, args, envs: int) -> float:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from envs.futures_env import FuturesTradingEnv

    vec = DummyVecEnv([lambda: FuturesTradingEnv(env_config(bars, args.window)) for _ in range(envs)])
    model = PPO("MlpPolicy", vec, n_steps=args.batch // envs, batch_size=args.minibatch, n_epochs=args.epochs,
                policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]}, "activation_fn": torch.nn.Tanh},
                device="cpu", seed=0, verbose=0)
    model.learn(args.batch)  # warm-up, as for RLlib
    start = time.perf_counter()
    model.learn(args.iterations * args.batch, reset_num_timesteps=False)
    return args.iterations * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4, help="timed updates per configuration")
    parser.add_argument("--batch", type=int, default=2048, help="env steps per update")
    parser.add_argument("--minibatch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both libraries (0: torch's default)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    import ray

    from mlproject.data import synthetic_bars

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # tiny networks: one thread is often faster, for both libraries
    bars = synthetic_bars(20_000, seed=0)
    reference = sb3_rate(bars, args, 8)
    rows = [("SB3 PPO, DummyVecEnv of 32 envs", sb3_rate(bars, args, 32))]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for runners, envs, mode in [(0, 8, "vector_entry_point"), (0, 32, "vector_entry_point"),
                                    (0, 64, "vector_entry_point"), (0, 32, "sync"),
                                    (1, 32, "vector_entry_point"), (2, 32, "vector_entry_point")]:
            where = "driver" if runners == 0 else f"{runners} runner{'s' * (runners > 1)}"
            kind = "numpy vector env" if mode == "vector_entry_point" else "SyncVectorEnv"
            rows.append((f"RLlib PPO, {envs} envs in {where}, {kind}", rllib_rate(bars, args, runners, envs, mode)))
    finally:
        ray.shutdown()
    print(f"batch={args.batch} minibatch={args.minibatch} epochs={args.epochs} window={args.window} "
          f"iterations={args.iterations} cpus={os.cpu_count()} torch_threads={torch.get_num_threads()}")
    print(f"{'configuration':58s} {'env-steps/s':>12s} {'vs SB3':>8s}")
    print(f"{'SB3 PPO, DummyVecEnv of 8 envs (reference)':58s} {reference:12,.0f} {1.0:7.2f}x")
    for name, rate in rows:
        print(f"{name:58s} {rate:12,.0f} {rate / reference:7.2f}x")


if __name__ == "__main__":
    main()
