"""Gymnasium environments of the platform.

Importing the package registers ``FuturesTrading-v0`` with gymnasium (an entry-point string;
the env modules need numpy, pandas and gymnasium only). :func:`register_rllib` registers the same
name with RLlib; it imports Ray, so it is called by the training code, not on import.
"""

from __future__ import annotations

import gymnasium as gym

from envs.futures_env import FuturesTradingEnv
from envs.futures_vector_env import FuturesTradingVectorEnv

ENV_ID = "FuturesTrading-v0"


def _make_vector(num_envs: int = 1, **kwargs):
    return FuturesTradingVectorEnv(num_envs, kwargs.get("config"))


def register_gymnasium() -> None:
    """``gymnasium.make("FuturesTrading-v0", config={...})`` and ``make_vec(..., vectorization_mode="vector_entry_point")``."""
    if ENV_ID not in gym.registry:
        gym.register(
            id=ENV_ID,
            entry_point="envs.futures_env:FuturesTradingEnv",
            vector_entry_point="envs:_make_vector",
            disable_env_checker=False,
        )


def register_rllib() -> None:
    """Register ``FuturesTrading-v0`` with RLlib (``PPOConfig().environment("FuturesTrading-v0", env_config=...)``)."""
    from ray.tune.registry import register_env

    register_env(ENV_ID, make_rllib_env)


def make_rllib_env(env_config):
    """RLlib's env creator. With ``gym_env_vectorize_mode="vector_entry_point"`` RLlib passes
    ``num_envs`` in the config and gets the numpy vector twin instead of N single envs."""
    config = dict(env_config)
    num_envs = config.pop("num_envs", None)
    return FuturesTradingEnv(config) if num_envs is None else FuturesTradingVectorEnv(num_envs, config)


register_gymnasium()

__all__ = ["ENV_ID", "register_gymnasium", "register_rllib"]
