"""Scale-out against real services on 127.0.0.1: a Ray cluster (`ray start --head`) that training
joins by address, and an S3-compatible store (moto) holding the experience buffer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from conftest import ROOT, free_port, run_module



def test_training_joins_a_ray_cluster_by_address_with_remote_env_runners(tmp_path, mlflow_store):
    """A head node on 127.0.0.1 (its own processes, stopped by SIGTERM to `ray start --block`, so
    the test session's own Ray is left alone); training connects by `train.ray_address` and samples
    with one remote env runner."""
    port = free_port()
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
        # Without an address a run starts its own Ray, even with a cluster on this machine (plain
        # ray.init would join that cluster and then refuse num_cpus).
        out = run_module(["python", "-m", "pipelines.train", "--config", str(ROOT / "conf" / "smoke.yaml"),
                          "--iterations", "1", "--set", f"data.synthetic.n_bars=1500 data.output_dir={tmp_path / 'bars'}"],
                         tmp_path, env={"RAY_AUTH_MODE": "disabled"}, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`pipeline.step` = 'train'",
                                  output_format="list")
        assert len(runs) == 2 and not runs[0].data.tags["ray.cluster"].endswith(f":{port}")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


@pytest.fixture
def s3_endpoint(tmp_path, monkeypatch):
    """A local S3-compatible server (moto) on 127.0.0.1 with one bucket; credentials only in the
    environment, as in real use."""
    import pyarrow.fs as pafs

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
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
                          allow_bucket_creation=True).create_dir("nt8")
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_experience_buffer_lives_on_an_s3_compatible_store(s3_endpoint, tmp_path, mlflow_store):
    """Append, filtered reads, annotations, compaction, the integrity check and the MLflow
    snapshot, through pyarrow's S3 filesystem against a real (local) S3 API."""
    from mlproject.experience import ExperienceBuffer, Query
    from test_experience import experiences

    uri = f"s3://nt8/buffer?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    buffer = ExperienceBuffer(uri)
    buffer.add(experiences(30, version="1"))
    buffer.flush()
    buffer.add(experiences(20, start="2024-01-03 14:31", version="2", prefix="x", quality=0.9))
    buffer.flush()
    again = ExperienceBuffer(uri)  # another process's view: only whole files
    assert len(again) == 50 and all(f.startswith("nt8/buffer/date=") for f in again.files())
    assert len(again.query(Query(model_version="2"), ["experience_id"])) == 20
    assert len(again.high_value(0.7, ["experience_id"])) == 20
    assert buffer.check() == []
    assert buffer.compact(25)["kept"] == 25 and len(ExperienceBuffer(uri)) == 25
    with mlflow.start_run():
        mlflow.log_input(buffer.snapshot(), context="experiences")
