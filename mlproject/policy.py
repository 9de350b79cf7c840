"""The trained policy outside Ray: load an RLlib RLModule checkpoint and act greedily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MODULE_SUBDIR = "learner_group/learner/rl_module/default_policy"
"""Where an RLlib algorithm checkpoint keeps the policy's RLModule."""


def load_module(path: str | Path) -> Any:
    """RLModule from a module checkpoint dir, or from an algorithm checkpoint containing one.
    Needs no running Ray."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    path = Path(path)
    if (path / MODULE_SUBDIR).is_dir():
        path = path / MODULE_SUBDIR
    return RLModule.from_checkpoint(str(path))


def greedy_actions(module: Any, obs: np.ndarray) -> np.ndarray:
    """Most likely action (int64) for each row of a float32 observation batch."""
    import torch
    from ray.rllib.core.columns import Columns

    batch = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32))
    if batch.ndim == 1:
        batch = batch[None]
    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: batch})
    return torch.argmax(out[Columns.ACTION_DIST_INPUTS], dim=-1).numpy().astype(np.int64)


def module_policy(module: Any):
    """A backtest policy (``mlproject.backtest.Policy``: observation batch -> actions) from an RLModule."""
    return lambda obs: greedy_actions(module, obs)


def module_weights(module: Any) -> dict[str, np.ndarray]:
    """The module's parameters as numpy arrays (to compare two policies)."""
    return {k: np.asarray(v) for k, v in module.get_state().items() if hasattr(v, "shape")}
