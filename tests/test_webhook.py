"""The webhook receiver under malformed, oversized, stalled and bursty requests (a real uvicorn
server on 127.0.0.1; the registry behind it is a sqlite store with nothing in Production, so a
genuine event reconciles to "nothing to deploy")."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, run_module
from registry_hooks.webhook import MAX_BODY_BYTES, Receiver, make_server, signature

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
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": "nt8-agent", "alias": "production", "version": "1"}})
    status, answer = post(hook, body.encode(), signed(body))
    assert status == 200 and answer["message"] == "reconciled: version None deployed"


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
