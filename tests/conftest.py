"""Shared fixtures: a fresh sqlite MLflow store per test, small synthetic bars."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite tracking/registry store under tmp_path; fails the test if it leaves a run open."""
    import mlflow

    from mlflow.tracking import fluent

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; an id from another test's store must not leak.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    yield uri
    active = mlflow.active_run()
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    assert active is None, "test left an MLflow run open"


@pytest.fixture(scope="session")
def small_bars():
    """3,000 seeded synthetic 1-minute bars (shared, do not mutate)."""
    from mlproject.data import synthetic_bars

    return synthetic_bars(3000, seed=3)


def run_module(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run ``python -m ...`` (or a console script from this venv) in a subprocess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
