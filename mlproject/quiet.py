"""Third-party messages that tell this project's users nothing, silenced at their source.

Each entry says why it is noise. Only exact, known messages are silenced, never a logger or
a warning category as a whole, and never an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

RLLIB_LOG_ONCE_KEYS: tuple[str, ...] = (
    # "You are running PPO on the new API stack! This is the new default behavior ...": the new
    # stack is RLlib 2.60's default and the one this project chose (DESIGN.md, Training).
    "PPO_on_new_api_stack",
    # "`RLModule(config=[RLModuleConfig object])` has been deprecated": RLlib's own RLModule
    # constructor builds an RLModuleConfig for backwards compatibility (rl_module.py); no code
    # of ours passes a config, so there is nothing for a user to change.
    "RLModule(config=[RLModuleConfig object])",
)
"""Keys RLlib passes to ``ray.util.debug.log_once`` before printing those messages once."""


def quiet_rllib() -> None:
    """Mark RLlib's one-time notices above as already shown in this process."""
    from ray.util.debug import log_once

    for key in RLLIB_LOG_ONCE_KEYS:
        log_once(key)


@contextmanager
def quiet_env_reregistration() -> Iterator[None]:
    """RLlib registers its helper env ``rllib-single-agent-env-v0`` with gymnasium each time an
    algorithm is built; the second build in a process makes gymnasium warn that it overrides
    an env, which is RLlib replacing its own identical entry."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*Overriding environment rllib-single-agent-env-v0")
        yield


@contextmanager
def quiet_checkpointing_rename() -> Iterator[None]:
    """transformers 5.23 renamed gradient to activation checkpointing and warns on the old name
    (``is_gradient_checkpointing``); PEFT 0.21's ``prepare_model_for_kbit_training`` and TRL 1.16
    still use it. Nothing of ours does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"`gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextmanager
def quiet_dataset_source() -> Iterator[None]:
    """``mlflow.data.from_pandas`` with a local path as source: MLflow 3.17 registers the local
    file source twice and warns that the path "can be interpreted in multiple ways", then picks
    the one it always picks."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        yield
