"""Shared set-up for benchmarks: registered policy models of the size training produces."""

from __future__ import annotations

from pathlib import Path


def policy_model_versions(work: Path, count: int, obs_dim: int = 32 * 5 + 2) -> list[str]:
    """Log ``count`` PPO policy pyfunc models (64x64, random weights) and register each as a
    version of nt8-agent; returns the version numbers."""
    import mlflow
    import numpy as np

    from mlproject.policy import fresh_module
    from mlproject.registry import register_version
    from pipelines.train import log_policy_model

    versions = []
    for i in range(count):
        module = fresh_module(obs_dim, 3, seed=i)
        module.save_to_path(str(work / f"module{i}"))
        with mlflow.start_run():
            info = log_policy_model(work / f"module{i}", np.zeros((4, obs_dim), np.float32))
        versions.append(str(register_version(info.model_uri, "nt8-agent", {}).version))
    return versions
