"""Env steps trained per second: RLlib PPO (our settings) against Stable-Baselines3 PPO.

Both train on FuturesTradingEnv over the same synthetic bars, with the same network (64x64
tanh, separate policy and value nets), batch (--batch env steps per update), minibatch and
epochs, on the CPU, in this one process. The contenders alternate in short blocks (--block
updates each, order reversed every other round) after a warm-up, and the table gives the median
of the per-round ratios to the reference with their range: this machine's speed swings by ~25%
within seconds, so one ratio from two separate runs misleads.

Reference: SB3 PPO with 8 single envs in a DummyVecEnv (its usual set-up). Ours: what
``mlproject.training.algorithm_config`` builds (numpy vector env, ``torch_skip_nan_gradients``) with
64 envs sampled in the driver. More contenders with --contenders (see CONTENDERS). SGD steps per
update are printed beside the rates: RLlib's learner connector adds one masked row per episode
chunk, so it runs a few more minibatches than SB3 for the same batch.

    python benchmarks/train_throughput.py [--rounds 7] [--block 2] [--batch 2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks_support import interleave, print_rates  # noqa: E402

CONTENDERS = {
    "sb3-8": "SB3 PPO, DummyVecEnv of 8 envs",
    "sb3-32": "SB3 PPO, DummyVecEnv of 32 envs",
    "rllib-64": "RLlib PPO, 64 envs in driver (ours)",
    "rllib-64-checks": "RLlib PPO, 64 envs, RLlib's NaN-gradient checks",
    "rllib-8": "RLlib PPO, 8 envs in driver",
    "rllib-32": "RLlib PPO, 32 envs in driver",
    "rllib-32-sync": "RLlib PPO, 32 envs in driver, SyncVectorEnv",
    "rllib-32-1runner": "RLlib PPO, 32 envs in 1 remote runner",
    "rllib-32-2runners": "RLlib PPO, 32 envs in 2 remote runners",
}
DEFAULT = "sb3-8,rllib-64,rllib-64-checks"


def env_config(bars, window: int) -> dict:
    return {"bars": bars, "instrument": "ES", "window": window, "episode_bars": 1000, "reward_scale": 0.01}


class RLlib:
    """One RLlib PPO algorithm; a block is ``block`` ``train()`` calls."""

    def __init__(self, bars, args, key: str) -> None:
        from mlproject.config import load_config
        from mlproject.training import algorithm_config

        parts = key.split("-")
        envs = int(parts[1])
        runners = 1 if "1runner" in parts else 2 if "2runners" in parts else 0
        cfg = load_config(None, [f"train.train_batch_size={args.batch}", f"train.minibatch_size={args.minibatch}",
                                 f"train.num_epochs={args.epochs}", f"train.num_env_runners={runners}",
                                 f"train.num_envs_per_env_runner={max(1, envs // max(runners, 1))}"])
        config = algorithm_config(cfg, env_config(bars, args.window), seed=0)
        if "sync" in parts:
            config.env_runners(gym_env_vectorize_mode="sync")
        if "checks" in parts:
            config.framework(torch_skip_nan_gradients=False)  # RLlib's default
        self.algo, self.args, self.sgd_steps = config.build_algo(), args, math.nan

    def __call__(self) -> float:
        from mlproject.training import sgd_steps

        start = time.perf_counter()
        for _ in range(self.args.block):
            result = self.algo.train()
        seconds = time.perf_counter() - start
        self.sgd_steps = sgd_steps(result) or math.nan
        return self.args.block * self.args.batch / seconds


class SB3:
    """One SB3 PPO model; a block is ``block`` updates (``learn`` of block * batch steps)."""

    def __init__(self, bars, args, key: str) -> None:
        import torch
        from stable_baselines3 import PPO
        from stable_baselines3.common.vec_env import DummyVecEnv

        from envs.futures_env import FuturesTradingEnv

        envs = int(key.split("-")[1])
        vec = DummyVecEnv([lambda: FuturesTradingEnv(env_config(bars, args.window)) for _ in range(envs)])
        self.model = PPO("MlpPolicy", vec, n_steps=args.batch // envs, batch_size=args.minibatch,
                         n_epochs=args.epochs, device="cpu", seed=0, verbose=0,
                         policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]},
                                        "activation_fn": torch.nn.Tanh})
        self.args = args
        # SB3 shuffles the rollout buffer and cuts it into minibatches, every epoch.
        self.sgd_steps = args.epochs * math.ceil(args.batch / args.minibatch)

    def __call__(self) -> float:
        start = time.perf_counter()
        self.model.learn(self.args.block * self.args.batch, reset_num_timesteps=False)
        return self.args.block * self.args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed blocks per contender")
    parser.add_argument("--block", type=int, default=2, help="updates per block")
    parser.add_argument("--batch", type=int, default=2048, help="env steps per update")
    parser.add_argument("--minibatch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both libraries (0: torch's default; 1 is faster for both here)")
    parser.add_argument("--contenders", default=DEFAULT,
                        help=f"comma-separated, the first is the reference; from: {', '.join(CONTENDERS)}")
    args = parser.parse_args()
    keys = [k.strip() for k in args.contenders.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONTENDERS]
    if unknown or not keys:
        parser.error(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch

    from mlproject.data import synthetic_bars

    if args.threads:
        torch.set_num_threads(args.threads)
    bars = synthetic_bars(20_000, seed=0)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    built: dict[str, Any] = {}
    try:
        for key in keys:
            built[CONTENDERS[key]] = (SB3 if key.startswith("sb3") else RLlib)(bars, args, key)
        print(f"batch={args.batch} minibatch={args.minibatch} epochs={args.epochs} window={args.window} "
              f"block={args.block} updates cpus={os.cpu_count()} torch_threads={torch.get_num_threads()}")
        rates = interleave(built, args.rounds)
        notes = {name: f"{c.sgd_steps:.0f} SGD steps/update" for name, c in built.items()}
        print_rates(rates, CONTENDERS[keys[0]], "env-steps/s", notes)
    finally:
        for c in built.values():
            if isinstance(c, RLlib):
                c.algo.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
