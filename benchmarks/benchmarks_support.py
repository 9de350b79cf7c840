"""Shared set-up for benchmarks: registered policy models of the size training produces, and
interleaved timing (contenders alternated in short blocks in one process, median of ratios)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path


def policy_model_versions(work: Path, count: int, window: int = 32) -> list[str]:
    """Log ``count`` PPO policy pyfunc models (64x64, random weights, observations over ``window``
    bars) and register each as a version of nt8-agent; returns the version numbers."""
    import mlflow
    import numpy as np

    from mlproject.features import obs_size
    from mlproject.policy import fresh_module
    from mlproject.registry import register_version
    from mlproject.training import log_policy_model

    versions, obs_dim = [], obs_size(window)
    for i in range(count):
        module = fresh_module(obs_dim, 3, seed=i)
        module.save_to_path(str(work / f"module{i}"))
        with mlflow.start_run():
            info = log_policy_model(work / f"module{i}", np.zeros((4, obs_dim), np.float32))
        versions.append(str(register_version(info.model_uri, "nt8-agent", {}).version))
    return versions


def interleave(contenders: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Rates (higher is better) of each contender, one block per round.

    This machine's speed swings by about 25% within seconds, so one run of each says little:
    every contender first runs ``warmup`` untimed blocks, then each round runs one block of every
    contender, the order reversed on every other round (A B C, C B A, ...) so that a slow drift
    hits all alike. Compare per-round ratios (:func:`print_rates`), not rates from far apart.
    """
    for run in contenders.values():
        for _ in range(warmup):
            run()
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for k in range(rounds):
        for name in order if k % 2 == 0 else order[::-1]:
            rates[name].append(contenders[name]())
        print(f"  round {k + 1}/{rounds}: " + ", ".join(f"{rates[n][-1]:,.0f}" for n in order), flush=True)
    return rates


def print_rates(rates: dict[str, list[float]], reference: str, unit: str,
                notes: dict[str, str] | None = None) -> dict[str, float]:
    """Table of median rate, its range, and the median (min-max) of the per-round ratios to
    ``reference``; returns each contender's median ratio."""
    notes = notes or {}
    width = max(len(n) for n in rates) + 2
    print(f"{'':{width}s} {unit + ' (median)':>16s} {'range':>21s} {'ratio (median)':>15s} {'ratio range':>13s}  ")
    medians = {}
    for name, values in rates.items():
        ratios = [v / r for v, r in zip(values, rates[reference])]
        medians[name] = statistics.median(ratios)
        label = "reference" if name == reference else f"{medians[name]:.2f}x"
        spread = "" if name == reference else f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"{name:{width}s} {statistics.median(values):16,.0f} {min(values):10,.0f}-{max(values):<10,.0f} "
              f"{label:>15s} {spread:>13s}  {notes.get(name, '')}")
    print(f"({len(rates[reference])} rounds, order reversed every other round; ratios are per round)")
    return medians
