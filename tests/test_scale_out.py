"""Scale-out: training joins a running Ray cluster by address (a real `ray start --head`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow

from conftest import ROOT, run_module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_joins_a_ray_cluster_by_address_with_remote_env_runners(tmp_path, mlflow_store):
    """A head node on 127.0.0.1 (its own processes, stopped by SIGTERM to `ray start --block`, so
    the test session's own Ray is left alone); training connects by `train.ray_address` and samples
    with one remote env runner."""
    port = _free_port()
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        out = run_module(["python", "-m", "pipelines.train", "--config", str(ROOT / "conf" / "smoke.yaml"),
                          "--iterations", "2", "--set", f"train.ray_address={address} train.num_env_runners=1 "
                          f"data.synthetic.n_bars=1500 data.output_dir={tmp_path / 'bars'}"], tmp_path,
                         env={"RAY_AUTH_MODE": "disabled"}, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        run = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`pipeline.step` = 'train'",
                                 output_format="list")[0]
        assert run.data.tags["ray.cluster"].endswith(f":{port}") and run.data.tags["ray.env_runners"] == "1"
        assert run.data.metrics["train/env_steps"] == 1024
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
