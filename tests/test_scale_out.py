"""Scale-out against real services on 127.0.0.1: a Ray cluster (`ray start --head`) that training
joins by address; an S3-compatible store (moto) holding the experience buffer; and a team
tracking server (`mlflow server` with MLflow's basic-auth app, PostgreSQL for runs, registry and
users, artifacts proxied to S3) that the whole cycle and two writer "hosts" use."""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import ROOT, S3_KEYS, free_port, run_module, s3_server, wait_for_mlflow_server



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
def s3_endpoint(monkeypatch):
    """A local S3-compatible server (moto) with one bucket; credentials only in the environment."""
    for key, value in S3_KEYS.items():
        monkeypatch.setenv(key, value)
    with s3_server() as endpoint:
        yield endpoint


def test_the_experience_buffer_lives_on_an_s3_compatible_store(s3_endpoint, tmp_path, mlflow_store):
    """Append, filtered reads, annotations, compaction, the integrity check and the MLflow
    snapshot, through pyarrow's S3 filesystem against a real (local) S3 API."""
    from mlproject.experience import ExperienceBuffer, Query
    from mlproject.tracking import experience_dataset
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
        mlflow.log_input(experience_dataset(buffer), context="experiences")


# -- a team tracking server: PostgreSQL backend, artifacts proxied to S3, basic auth ----------------


def _postgres_bin() -> Path | None:
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[::-1]), None)
    return Path(initdb).resolve().parent if initdb else None


@contextlib.contextmanager
def postgres_server(password: str):
    """A private PostgreSQL cluster on 127.0.0.1 (password login for the role ``mlflow``, which owns
    the databases ``mlflow`` and ``mlflow_auth``); yields ``(port, run_sql)``. PostgreSQL refuses to
    run as root: as root the cluster belongs to the ``postgres`` user, in a folder outside pytest's
    private tmp tree so that user can reach it."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a `postgres` user to own the test cluster")
    wrap = ["runuser", "-u", "postgres", "--"] if as_root else []
    home = Path(tempfile.mkdtemp(prefix="nt8-pg-"))
    if as_root:
        shutil.chown(home, "postgres", "postgres")
    data, port = home / "db", free_port()

    def pg(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([*wrap, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{args[0]}: {out.stderr[-2000:]}"
        return out

    def run_sql(sql: str, database: str = "postgres") -> str:
        return pg(str(bindir / "psql"), "-h", str(home), "-p", str(port), "-U", "postgres", "-d", database,
                  "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql).stdout.strip()

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--auth-local=trust",
           "--auth-host=scram-sha-256")
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "-t", "60", "-o",
           f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start")
        run_sql(f"CREATE ROLE mlflow LOGIN PASSWORD '{password}'")
        run_sql("CREATE DATABASE mlflow OWNER mlflow")
        run_sql("CREATE DATABASE mlflow_auth OWNER mlflow")
        yield port, run_sql
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*wrap, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


def _basic_auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` on 127.0.0.1 with its tracking, registry and user
    stores in PostgreSQL and artifacts proxied (``--artifacts-destination``) to a local S3 API.
    Every secret reaches the servers through their environment (PGPASSWORD, AWS_*,
    MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY); nothing is written into a config file. Yields a dict: ``uri``,
    the non-admin user ``trader`` and its password, ``s3`` endpoint, ``sql`` runner."""
    if not shutil.which("runuser") and os.geteuid() == 0:
        pytest.skip("runuser is missing")
    home = tmp_path_factory.mktemp("team")
    db_password, admin_password, trader_password, csrf_key = (secrets.token_urlsafe(16) for _ in range(4))
    with postgres_server(db_password) as (pg_port, run_sql), s3_server() as s3:
        (home / "auth.ini").write_text(textwrap.dedent(f"""\
            [mlflow]
            default_permission = READ
            database_uri = postgresql+psycopg2://mlflow@127.0.0.1:{pg_port}/mlflow_auth
            admin_username = admin
            authorization_function = mlflow.server.auth:authenticate_request_basic_auth
            auth_cache_ttl_seconds = 300
            """))
        port = free_port()
        env = {**os.environ, **S3_KEYS, "PGPASSWORD": db_password, "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": csrf_key,               "MLFLOW_AUTH_CONFIG_PATH": str(home / "auth.ini"), "MLFLOW_S3_ENDPOINT_URL": f"http://{s3}",
               "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://mlflow@127.0.0.1:{pg_port}/mlflow",
               "MLFLOW_ARTIFACTS_DESTINATION": "s3://nt8/mlartifacts", "MLFLOW_DISABLE_TELEMETRY": "true"}
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(key, None)
        log = open(home / "server.log", "w")
        server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_mlflow_server(base, server, log=home / "server.log")
            request = urllib.request.Request(
                f"{base}/api/2.0/mlflow/users/create", method="POST",
                data=json.dumps({"username": "trader", "password": trader_password}).encode(),
                headers={"Content-Type": "application/json", **_basic_auth("admin", admin_password)})
            urllib.request.urlopen(request, timeout=30)
            yield {"uri": base, "user": "trader", "password": trader_password, "s3": s3, "sql": run_sql,
                   "secrets": (db_password, admin_password, trader_password), "log": home / "server.log"}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
            log.close()


@pytest.fixture
def team_client(team_server, monkeypatch, tmp_path):
    """This process (and what it starts) as the user ``trader`` of the team server; cwd = tmp_path."""
    from conftest import use_store

    use_store(monkeypatch, team_server["uri"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team_server["user"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team_server["password"])
    for key, value in S3_KEYS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    yield team_server
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_the_whole_cycle_runs_against_a_team_server(team_client, tmp_path, ray_session):
    """Postgres holds the runs and the registry, S3 the artifacts (through the server), the
    buffer sits on S3 too, and only the environment carries credentials."""
    from mlflow import MlflowClient
    from mlproject.config import load_config
    from pipelines import orchestrate

    server = team_client
    try:  # the server really asks who is calling
        urllib.request.urlopen(f"{server['uri']}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        raise AssertionError("an anonymous request was answered")
    except urllib.error.HTTPError as err:
        assert err.code == 401
    buffer = f"s3://nt8/buffer?endpoint_override={server['s3']}&scheme=http&region=us-east-1"
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [
        "train.iterations=2", "data.synthetic.n_bars=1500", "continuous_learning.paper_bars=60",
        "continuous_learning.min_annotated_for_finetune=100000", f"continuous_learning.experience_storage={buffer}",
        f"promotion.lock_file={tmp_path / 'shared' / 'registry.lock'}"])
    result = orchestrate.main(cfg, "all")
    assert result.bootstrap.promote.decision == "promoted", result.summary

    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    steps = {r.data.tags.get("pipeline.step") for r in runs}
    assert {"ingest", "train", "evaluate", "promote"} <= steps, steps
    production = client.get_model_version_by_alias("nt8-agent", "production")
    assert production.current_stage == "Production"
    # ... and they are where the team server keeps them: rows in PostgreSQL, files in S3.
    assert int(server["sql"]("SELECT count(*) FROM runs", "mlflow")) == len(runs)
    assert server["sql"]("SELECT count(*) FROM model_versions WHERE name = 'nt8-agent'", "mlflow") != "0"
    assert server["sql"]("SELECT username FROM users ORDER BY username", "mlflow_auth").split() == ["admin", "trader"]
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=server["s3"], scheme="http", region="us-east-1")
    stored = [f.path for f in s3.get_file_info(pafs.FileSelector("nt8/mlartifacts", recursive=True))]
    assert any(p.endswith("/MLmodel") for p in stored) and any("/buffer/" not in p for p in stored)
    assert any(f.path.endswith(".parquet") for f in s3.get_file_info(pafs.FileSelector("nt8/buffer", recursive=True)))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
    # No secret was logged anywhere a run shows.
    for run in runs:
        text = json.dumps([run.data.params, run.data.tags])
        assert not any(secret in text for secret in server["secrets"])


HOST_B = textwrap.dedent('''
    import sys, time
    from mlproject import registry

    print("ready", flush=True)
    sys.stdin.readline()  # host A holds the lock now
    started = time.time()
    registry.promote("nt8-agent", sys.argv[1], "host b", lock_file=sys.argv[2] if len(sys.argv) > 2 else None)
    print(f"{time.time() - started:.2f}", flush=True)
''')


def test_two_hosts_share_the_registry_lock_through_a_shared_folder(team_client, tmp_path):
    """Two "hosts" (their own working and temp folders, so their default lock files differ) write
    to one team server. With `promotion.lock_file` in a folder both mount, one waits for the
    other; with the defaults they do not (which is why a team must set it); and writers racing
    through the shared lock leave one consistent Production."""
    from mlproject import registry
    from mlproject.deploy import reconcile
    from test_registry import CONSTANT_MODEL, NAME, register_constant
    from test_registry_reliability import WRITER, assert_consistent

    (tmp_path / "constant_model.py").write_text(CONSTANT_MODEL)
    mlflow.set_experiment("two-hosts")  # the user may only read the Default experiment
    versions = [register_constant(tmp_path, a) for a in (1, 2, 1, 2)]
    registry.promote(NAME, versions[0], "start")
    shared = tmp_path / "shared" / "registry.lock"
    hosts = {h: tmp_path / h for h in ("a", "b")}
    for host in hosts.values():
        (host / "tmp").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(hosts["b"] / "tmp")}

    def host_b_promotes_while_a_holds_the_lock(version: str, *lock: str, hold: float = 12) -> bool:
        """Whether host B's promote finished while this process (host A) held the shared lock (up
        to ``hold`` s; a promote takes 1-4 s here), B waiting for the lock before it starts."""
        proc = subprocess.Popen([sys.executable, "-c", HOST_B, version, *lock], cwd=hosts["b"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
        with registry.registry_lock(shared):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            try:
                proc.wait(timeout=hold)
                finished = True
            except subprocess.TimeoutExpired:
                finished = False
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return finished

    assert not host_b_promotes_while_a_holds_the_lock(versions[1], str(shared))  # B waited for A
    assert registry.production_version(NAME) == versions[1]
    assert host_b_promotes_while_a_holds_the_lock(versions[2], hold=120)  # B's default lock: no exclusion across hosts
    assert registry.production_version(NAME) == versions[2], registry.history(NAME, include_unfinished=True)[-3:]

    (tmp_path / "writer.py").write_text(WRITER)
    start = time.time() + 8  # the writers import mlflow first
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(w), "4", str(host / "deploy"),
                               ",".join(versions), str(start), str(shared)], cwd=host,
                              env={**env, "TMPDIR": str(host / "tmp")}, stderr=subprocess.PIPE, text=True)
             for w, host in enumerate(hosts.values())]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    for host in hosts.values():  # each host's deploy dir follows Production at its next reconcile
        reconcile(NAME, host / "deploy", lock_file=shared)
        assert_consistent(host / "deploy")
