"""Shared fixtures: a fresh sqlite MLflow store per test, small synthetic bars."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def use_store(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    """Point MLflow (this process and the subprocesses it starts) at ``uri`` until the
    monkeypatch is undone."""
    import mlflow
    from mlflow.tracking import fluent

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; an id from another test's store must not leak.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)


REPO_OUTPUTS = ("mlruns", "mlflow.db", "mlartifacts", "data", "deploy")
"""What the pipelines write relative to the working directory; the tests must never write them
into the repository (a sqlite store's artifacts default to ./mlruns of the working directory,
and `mlflow run` runs entry points in the project directory)."""


def _snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    out = {}
    for name in REPO_OUTPUTS:
        top = root / name
        for path in [top, *(top.rglob("*") if top.is_dir() else [])]:
            if path.exists() or path.is_symlink():
                st = path.lstat()
                out[str(path.relative_to(root))] = ("dir" if path.is_dir() else "file", st.st_size, st.st_mtime_ns)
    return out


SLOW_FIRST = ("test_readme.py", "test_pipelines.py", "test_signals.py", "test_scale_out.py", "test_webhook.py",
              "test_registry_reliability.py", "test_bridge.py",
              "test_registry.py", "test_finetune.py", "test_train.py", "test_notebooks.py", "test_ui.py",
              "test_experience.py", "test_evaluate.py", "test_monitor.py", "test_model_settings.py",
              "test_cli_safety.py", "test_simulate_user.py", "test_user_errors.py")
"""Test files by their time on one worker, longest first (the rest, seconds each, after them):
``make test`` runs two workers (pytest-xdist, a file per worker at a time, in this order with
``--no-loadscope-reorder``; xdist's own order is by test count), and a long file left to the end
would run alone."""


def pytest_collection_modifyitems(session, config, items):
    rank = {name: k for k, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def repo_stays_clean():
    """Fails the session if any test wrote mlruns/, mlflow.db, data/ or deploy/ into the repo."""
    before = _snapshot(ROOT)
    yield
    after = _snapshot(ROOT)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"tests wrote into the repository (use tmp_path): {changed[:10]}"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite tracking/registry store under tmp_path, run from tmp_path (artifacts land in
    tmp_path/mlruns, never the repo's); fails the test if it leaves a run open."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    use_store(monkeypatch, uri)
    monkeypatch.chdir(tmp_path)
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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers the tests start)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_mlflow_server(base: str, server: Any, timeout: float = 300.0, log: Path | None = None) -> None:
    """Wait until the ``mlflow server`` process ``server`` answers ``base``/health (about 80 s on
    2 cores); fail the test, with the end of ``log``, when it exits or the time is up."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                tail = log.read_text()[-3000:] if log and log.exists() else ""
                pytest.fail(f"mlflow server did not answer /health within {timeout:.0f} s {tail}")
            time.sleep(2)


S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""What a local S3 server (moto) accepts; set in the environment of whoever talks to it, as in real use."""


@contextlib.contextmanager
def s3_server(bucket: str = "nt8") -> Iterator[str]:
    """A local S3-compatible server (moto) on 127.0.0.1 with one bucket; yields ``host:port``."""
    import socket
    import subprocess
    import time

    import pyarrow.fs as pafs

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                          access_key=S3_KEYS["AWS_ACCESS_KEY_ID"], secret_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                          allow_bucket_creation=True).create_dir(bucket)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_module(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run ``python -m ...`` (or a console script from this venv) in a subprocess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init takes 6-12 s here)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def momentum_bars(n: int, seed: int, persist: float = 0.85):
    """Bars with a planted, learnable signal (``mlproject.data.momentum_bars``)."""
    from mlproject.data import momentum_bars as planted

    return planted(n, seed, persist)


def export_bars(n: int, seed: int):
    """``momentum_bars`` as an NT8 export holds them: prices on a 0.01 grid, whole volumes (so a
    file written and read back gives the same bars)."""
    bars = momentum_bars(n, seed)
    bars[["open", "high", "low", "close"]] = bars[["open", "high", "low", "close"]].round(2)
    bars["volume"] = bars["volume"].round()
    return bars


@pytest.fixture(scope="session")
def trained(ray_session, tmp_path_factory):
    """One tiny training run (smoke profile, 2 iterations) registered as nt8-agent version 1 in
    a session-wide sqlite store. Yields (store uri, TrainResult, config, folder). Tests that use
    it talk to that store (MLFLOW_TRACKING_URI points there while they run)."""
    from mlproject.config import load_config
    from pipelines import train

    tmp = tmp_path_factory.mktemp("trained")
    cfg = load_config(ROOT / "conf" / "smoke.yaml", ["train.iterations=2"])
    with fresh_store(tmp) as uri:
        result = train.main(cfg)
    yield uri, result, cfg, tmp


@contextlib.contextmanager
def fresh_store(folder: Path) -> Iterator[str]:
    """A new sqlite store in ``folder``, used from ``folder`` while the block runs (for fixtures
    wider than one test, which cannot use ``monkeypatch``); yields its URI."""
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    use_store(mp, uri)
    mp.chdir(folder)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()


def visit_store(monkeypatch: pytest.MonkeyPatch, uri: str, folder: Path, value: Any) -> Iterator[Any]:
    """Body of a fixture that points one test at an existing store and runs it from ``folder``;
    yields ``value`` and ends any run the test left open."""
    import mlflow

    use_store(monkeypatch, uri)
    monkeypatch.chdir(folder)
    yield value
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def trained_store(trained, monkeypatch):
    """Point MLflow at the session's trained-model store for one test."""
    yield from visit_store(monkeypatch, trained[0], trained[3], trained)
