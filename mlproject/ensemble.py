"""An ensemble policy (``train.ensemble`` K > 1): K policies trained with seeds ``seed``,
``seed + 1000``, ... in one Ray session, acting on the average of their logits.

It is logged and registered as one pyfunc model (``policy_model.py``): member 0 is the
``rl_module`` artifact, the one every single-policy reader uses (warm starts, the offline pass,
the network checks), members 1.. are ``rl_module_1`` ...; evaluation, the gate and the bridge
see one model. The logits are averaged in one way everywhere (:func:`mean_logits`: summed in
member order, then divided by K, in float32), so the logged model, the training's validation and
the bridge pick the same action bit for bit (tests/test_ensemble.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mlproject.policy import (
    fast_greedy,
    float64_layers,
    forward_float64,
    layer_steps,
    module_policy,
    near_ties,
    plain_net,
)


def mean_logits(logits: list[Any]) -> Any:
    """The members' logits (float32 tensors) summed in member order, then divided by K."""
    total = logits[0]
    for more in logits[1:]:
        total = total + more
    return total / len(logits)


def _member_logits(module: Any) -> Callable[[Any], Any]:
    """Logits of a float32 batch through the module's own layers (as called functions) when they
    reproduce ``forward_inference`` exactly, else through ``forward_inference``."""
    from ray.rllib.core.columns import Columns

    net = plain_net(module)
    if net is None:
        return lambda h: module.forward_inference({Columns.OBS: h})[Columns.ACTION_DIST_INPUTS]
    steps = layer_steps(net)

    def logits(h: Any) -> Any:
        for fn, args in steps:
            h = fn(h, *args)
        return h

    return logits


def ensemble_policy(modules: list[Any]) -> Callable[[np.ndarray], np.ndarray]:
    """A backtest policy (observation batch -> actions): the argmax of the members' mean logits;
    one member is :func:`mlproject.policy.module_policy` itself."""
    import torch

    if len(modules) == 1:
        return module_policy(modules[0])
    members = [_member_logits(m) for m in modules]

    def act(obs: np.ndarray) -> np.ndarray:
        h = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32))
        if h.ndim == 1:
            h = h[None]
        with torch.inference_mode():
            return torch.argmax(mean_logits([m(h) for m in members]), dim=-1).numpy().astype(np.int64)

    return act


def ensemble_fast_greedy(modules: list[Any]) -> Callable[[np.ndarray], np.ndarray]:
    """The bridge's path (:func:`mlproject.policy.fast_greedy` for K members): the mean of the
    members' logits in float64 numpy; rows whose two best are too close for float64 to be sure of
    float32's choice go through :func:`ensemble_policy`, so the action is the logged model's."""
    if len(modules) == 1:
        return fast_greedy(modules[0])
    exact = ensemble_policy(modules)
    nets = [plain_net(m) for m in modules]
    if any(net is None for net in nets):
        return exact
    layers = [float64_layers(net) for net in nets]

    def act(obs: np.ndarray) -> np.ndarray:
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        if obs.ndim == 1:
            obs = obs[None]
        h64 = obs.astype(np.float64)
        h = sum(forward_float64(h64, steps) for steps in layers) / len(layers)
        actions = np.argmax(h, axis=-1)
        if h.shape[-1] > 1:
            close = near_ties(h, actions)
            if close.any():
                actions[close] = exact(obs[close])
        return actions.astype(np.int64)

    return act
