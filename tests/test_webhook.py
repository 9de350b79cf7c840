"""The webhook receiver under malformed, oversized, stalled and bursty requests (a real uvicorn
server on 127.0.0.1; the registry behind it is a sqlite store with nothing in Production, so a
genuine event reconciles to "nothing to deploy"); and ``register`` against ``mlflow server``
started as users start it (its default 4 workers), with and without
MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_module, use_store, wait_for_mlflow_server
from registry_hooks.webhook import MAX_BODY_BYTES, DeliveryError, Receiver, make_server, register, signature

SECRET = "test-secret-0123456789abcdef"


@pytest.fixture
def hook(mlflow_store, tmp_path):
    """A running receiver; yields its port."""
    server = make_server(Receiver(SECRET, "nt8-agent", str(tmp_path / "deploy")), port=0).start()
    yield server.server_port
    server.shutdown()


def post(port: int, body: bytes, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/webhook", body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, (json.loads(data) if data.startswith(b"{") else {"raw": data.decode(errors="replace")})


def signed(body: str, secret: str = SECRET, delivery: str = "d-1") -> dict[str, str]:
    stamp = str(int(time.time()))
    return {"X-MLflow-Signature": signature(secret, delivery, stamp, body), "X-MLflow-Timestamp": stamp,
            "X-MLflow-Delivery-Id": delivery}


def raw_request(port: int, data: bytes, read_timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


@pytest.mark.parametrize("secret", ["", "short"])
def test_an_empty_or_short_secret_is_refused_at_start(secret, tmp_path):
    with pytest.raises(ValueError, match="at least 16 characters"):
        Receiver(secret, "nt8-agent", str(tmp_path))
    out = run_module([sys.executable, "-m", "registry_hooks.webhook", "serve", "--secret", secret, "--port", "0"],
                     cwd=tmp_path)
    assert out.returncode == 2 and "at least 16 characters" in out.stderr and "Traceback" not in out.stderr


def test_malformed_requests_get_4xx_never_500(hook):
    """JSON [] / null / non-object data and a non-ASCII signature used to answer 500."""
    for body in ("[]", "null", '"text"', json.dumps({"entity": "model_version_alias", "data": []})):
        status, answer = post(hook, body.encode(), signed(body))
        assert status == 400, (body, answer)
    status, _ = post(hook, b"{}", {"X-MLflow-Signature": "v1,\u00e9t\u00e9".encode().decode("latin-1"),
                                    "X-MLflow-Timestamp": str(int(time.time())), "X-MLflow-Delivery-Id": "x"})
    assert status == 401
    assert post(hook, b"\xff\xfe{", signed("x"))[0] == 400  # not UTF-8
    assert post(hook, b"{}", {})[0] == 401  # unsigned
    empty_key = "{}"
    assert post(hook, empty_key.encode(), signed(empty_key, secret=""))[0] == 401  # signed with the empty key
    # Content-Length: abc used to drop the connection
    reply = raw_request(hook, b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
    reply = raw_request(hook, b"GET /webhook HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405"), reply[:80]


def test_a_genuine_event_reconciles(hook):
    for alias in ("production", "staging"):  # Staging's moves change the shadow deployment
        body = json.dumps({"entity": "model_version_alias", "action": "created",
                           "data": {"name": "nt8-agent", "alias": alias, "version": "1"}})
        status, answer = post(hook, body.encode(), signed(body))
        assert status == 200 and answer["message"] == "reconciled: version None deployed"
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": "nt8-agent", "alias": "champion", "version": "1"}})
    assert post(hook, body.encode(), signed(body))[1]["message"].startswith("ignored")


def test_mlflows_test_delivery_is_accepted_without_reconciling(hook):
    """What ``MlflowClient.test_webhook`` sends (mlflow/webhooks/types.py: the example payload)."""
    body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2026-12-03T00:00:00",
                       "data": {"name": "example_model", "alias": "example_alias", "version": "1"}})
    status, answer = post(hook, body.encode(), signed(body))
    assert status == 200 and answer["message"].startswith("test delivery received")


def test_a_huge_body_is_refused_unread(hook):
    """A 200 MB unsigned body used to be read into memory (265 -> 675 MB) before the 401."""
    header = (f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: {200 * 1024 * 1024}\r\n\r\n").encode()
    started = time.perf_counter()
    reply = raw_request(hook, header + b"x" * 1024)
    assert reply.startswith(b"HTTP/1.1 413") and time.perf_counter() - started < 5
    assert str(MAX_BODY_BYTES).encode() in reply


def test_stalled_bodies_time_out_and_do_not_block_others(hook):
    """200 clients that announce a body and never send it: each is answered 408 after the body
    timeout, and a genuine request is served meanwhile (asyncio: no thread per socket)."""
    stalled = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", hook), timeout=30)
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        stalled.append(sock)
    try:
        body = json.dumps({"entity": "other", "action": "x", "data": {}})
        started = time.perf_counter()
        assert post(hook, body.encode(), signed(body))[0] == 200
        assert time.perf_counter() - started < 5
        reply = stalled[0].recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    finally:
        for sock in stalled:
            sock.close()


def test_idle_and_slow_header_sockets_are_closed(mlflow_store, tmp_path):
    """uvicorn times out only the idle time after a response: a socket that sent nothing, or half a
    request head, stayed open (seen for 20 s and more). Each is closed after the head deadline."""
    server = make_server(Receiver(SECRET, "nt8-agent", str(tmp_path / "deploy")), port=0, header_timeout=1.5).start()
    port, body = server.server_port, json.dumps({"entity": "other", "action": "x", "data": {}})
    try:
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        partial = socket.create_connection(("127.0.0.1", port), timeout=10)
        partial.sendall(b"POST /webh")
        after = socket.create_connection(("127.0.0.1", port), timeout=10)  # one request, then half a head
        head = signed(body)
        after.sendall(("POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + "".join(f"{k}: {v}\r\n" for k, v in head.items())
                       + f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        assert after.recv(4096).startswith(b"HTTP/1.1 200")
        after.sendall(b"POST /webhook HTTP/1.1\r\nHost:")
        started = time.perf_counter()
        for sock in (idle, partial, after):
            try:
                while sock.recv(4096):  # a 400/408 may come first; then the close
                    pass
            except ConnectionResetError:
                pass
            sock.close()
        assert time.perf_counter() - started < 6  # closed by the server, not by the 10 s client timeout
        assert post(port, body.encode(), signed(body, delivery="d-2"))[0] == 200  # still serving
    finally:
        server.shutdown()


def test_500_requests_100_at_a_time_without_a_reset(hook):
    """Listen backlog 5 used to reset 59 of 100 concurrent connections."""
    body = json.dumps({"entity": "other", "action": "x", "data": {}})

    def one(i: int) -> int:
        return post(hook, body.encode(), signed(body, delivery=f"d-{i}"), timeout=60)[0]

    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(one, range(500)))
    assert statuses.count(200) == 500


def test_cli_rejects_a_bad_port(tmp_path):
    out = run_module([sys.executable, "-m", "registry_hooks.webhook", "serve", "--secret", SECRET, "--port", "70000",
                      "--config", str(ROOT / "conf" / "smoke.yaml")], cwd=tmp_path)
    assert out.returncode == 2 and "--port 70000" in out.stderr


def test_register_refuses_a_store_that_delivers_no_webhooks(tmp_path):
    """Webhooks are delivered only by `mlflow server`; one stored straight into a sqlite file, under
    this process's own encryption key, would never fire."""
    out = run_module([sys.executable, "-m", "registry_hooks.webhook", "register", "--url", "http://127.0.0.1:1/webhook",
                      "--secret", SECRET, "--config", str(ROOT / "conf" / "smoke.yaml")], cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "register needs the `mlflow server`" in out.stderr.strip().splitlines()[-1]


# -- register against `mlflow server` as users start it ----------------------------------------


@pytest.fixture(scope="module")
def mlflow_servers(tmp_path_factory):
    """Two `mlflow server`s with their default number of workers (4, uvicorn), started together
    (each takes minutes to start on 2 cores): "key" with MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY,
    "nokey" without. Yields {kind: (base URL, process, home)}; each test waits for its own."""
    from cryptography.fernet import Fernet

    servers = {}
    for kind in ("key", "nokey"):
        home, port = tmp_path_factory.mktemp(f"server-{kind}"), free_port()
        env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", None)
        if kind == "key":
            env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] = Fernet.generate_key().decode()
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{home / 'server.db'}",
             "--artifacts-destination", str(home / "artifacts")],
            cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=(home / "server.log").open("w"))
        servers[kind] = (f"http://127.0.0.1:{port}", process, home)
    yield servers
    for _, process, _ in servers.values():
        process.terminate()
    for _, process, _ in servers.values():
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def started(servers: dict, kind: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    base, process, home = servers[kind]
    wait_for_mlflow_server(base, process, timeout=600, log=home / "server.log")
    use_store(monkeypatch, base)
    return base, home


def live_webhooks(home: Path) -> int:
    import sqlite3

    with sqlite3.connect(home / "server.db") as db:
        return db.execute("SELECT COUNT(*) FROM webhooks WHERE deleted_timestamp IS NULL").fetchone()[0]


def test_register_with_the_key_delivers_and_an_alias_move_deploys(mlflow_servers, tmp_path, monkeypatch):
    """With MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY: register (as users run it) passes its test
    deliveries, which the receiver accepts without deploying; promote then deploys through the
    webhook. Another secret or no receiver: register fails naming it. A webhook stored under another
    key (here: by this process's own sqlite store) makes the next register fail, naming it, and
    leaves its own webhook deleted."""
    import mlflow
    from mlflow import MlflowClient

    from mlproject import registry
    from registry_hooks.reconcile import deployed_manifest
    from test_registry import CONSTANT_MODEL, NAME, register_constant

    _, home = started(mlflow_servers, "key", monkeypatch)
    receiver = Receiver(SECRET, NAME, str(tmp_path / "deploy"))
    hook_server = make_server(receiver, port=0).start()
    url = f"http://127.0.0.1:{hook_server.server_port}/webhook"
    try:
        out = run_module([sys.executable, "-m", "registry_hooks.webhook", "register", "--url", url, "--secret", SECRET,
                          "--config", str(ROOT / "conf" / "smoke.yaml")], cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "8 test deliveries reached" in out.stderr and receiver.deployments == 0
        assert deployed_manifest(tmp_path / "deploy") is None
        (tmp_path / "constant_model.py").write_text(CONSTANT_MODEL)
        version = register_constant(tmp_path, 1)
        registry.promote(NAME, version, "via the webhook")  # a client of its own: any server worker
        deadline = time.time() + 60
        while receiver.deployments == 0 and time.time() < deadline:  # counted once reconcile returned
            time.sleep(0.2)
        assert receiver.deployments == 1, "the alias move did not deploy within 60 s"
        assert deployed_manifest(tmp_path / "deploy")["version"] == version
        # The other failures register names, each leaving no webhook behind.
        before = live_webhooks(home)
        with pytest.raises(DeliveryError, match="refused MLflow's signature.*same --secret"):
            register(url, "another-secret-0123456789")
        dead = f"http://127.0.0.1:{free_port()}/webhook"
        with pytest.raises(DeliveryError, match="could not reach the receiver.*start `python -m registry_hooks"):
            register(dead, SECRET)
        assert live_webhooks(home) == before
        # A webhook the server cannot decrypt (another key) blocks every alias delivery.
        monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
        monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
        MlflowClient(registry_uri=f"sqlite:///{home / 'server.db'}").create_webhook(
            name="other-key", url=url, events=["model_version_alias.created"], secret=SECRET)
        before = live_webhooks(home)
        with pytest.raises(DeliveryError, match="cannot read back a webhook registered earlier.*deleted\\)$"):
            register(url, SECRET)
        assert live_webhooks(home) == before
    finally:
        hook_server.shutdown()
        mlflow.set_tracking_uri(None)


def test_register_without_the_key_fails_naming_it_and_leaves_no_webhook(mlflow_servers, tmp_path, monkeypatch):
    """`mlflow server` as the README used to start it: each worker its own Fernet key. register
    exits 2 with one line naming MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY and deletes its webhook;
    repeated, it fails every time (the test deliveries go out on new connections, spread over the
    workers)."""
    import mlflow

    _, home = started(mlflow_servers, "nokey", monkeypatch)
    receiver = Receiver(SECRET, "nt8-agent", str(tmp_path / "deploy"))
    hook_server = make_server(receiver, port=0).start()
    url = f"http://127.0.0.1:{hook_server.server_port}/webhook"
    try:
        out = run_module([sys.executable, "-m", "registry_hooks.webhook", "register", "--url", url, "--secret", SECRET,
                          "--config", str(ROOT / "conf" / "smoke.yaml")], cwd=tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert "could not decrypt the webhook secret" in lines[-1]
        assert "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY" in lines[-1]
        assert lines[-1].endswith("deleted)")
        for _ in range(5):
            with pytest.raises(DeliveryError, match="MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"):
                register(url, SECRET)
        assert live_webhooks(home) == 0 and receiver.deployments == 0
    finally:
        hook_server.shutdown()
        mlflow.set_tracking_uri(None)
