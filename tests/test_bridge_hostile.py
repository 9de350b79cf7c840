"""The bridge under hostile input (issue 27): a flood of connections that never say hello,
~100 malformed messages on one connection, and listen settings the command must refuse before it
loads the model.

Real parts, as in ``test_bridge.py`` (whose fixtures and client this module reuses): a real policy
deployed through the registry, a real asyncio server on loopback, ``python -m pipelines.bridge`` in
a subprocess.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from mlproject.bridge.server import Bridge, BridgeThread
from test_bridge import TOKEN, Client, bar_msg, config, deployed  # noqa: F401 - deployed is a fixture

IDLE = 300
"""Idle connections of the flood: more than max_sessions (64) and than max_pending (256)."""


def test_idle_connections_never_shut_a_real_client_out(deployed, tmp_path):  # noqa: F811
    # hello_timeout_s is long here: the real client gets in while every idle connection is open,
    # not after the sweeper has dropped them.
    cfg = config(deployed[1], f"continuous_learning.experience_storage={tmp_path / 'b'}",
                 f"bridge.kill_file={tmp_path / 'K'}", "bridge.hello_timeout_s=120")
    bars = deployed[2]
    idle: list[socket.socket] = []
    with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
        try:
            started = time.monotonic()
            for _ in range(IDLE):
                idle.append(socket.create_connection(thread.bridge.address, timeout=10))
            c = Client(thread.bridge.address)  # while all 300 are open and silent
            assert c.hello(account="real")["type"] == "welcome"
            decisions = [c.request(bar_msg(bars, i)) for i in range(15)]
            assert all(d["type"] == "decision" for d in decisions)
            assert decisions[-1]["guard"] != "warmup"  # past the warm-up: the policy decided
            assert time.monotonic() - started < 30.0
            stats = thread.call(lambda: dict(thread.bridge.stats))
            pending = thread.call(lambda: len(thread.bridge.pending()))
            assert stats["pending_dropped"] == IDLE + 1 - cfg.bridge.max_pending  # the oldest went first
            assert pending == cfg.bridge.max_pending - 1  # the real client left the pending ones
            oldest = idle[0].makefile("rb").readline()
            assert json.loads(oldest)["code"] == "server_busy"
            c.close()
        finally:
            for sock in idle:
                sock.close()


def _line(msg: dict) -> bytes:
    return json.dumps(msg).encode() + b"\n"


def _bar_with(good: dict, **fields) -> bytes:
    return _line({**good, **fields})


def _prices(good: dict, value) -> bytes:
    return _line({**good, "open": value, "high": value, "low": value, "close": value})


def _raw_field(good: dict, key: str, raw: str) -> bytes:
    """``good`` with the field ``key`` spelled as raw JSON text (a 400-digit integer, NaN, 1e400...)."""
    return json.dumps({**good, key: "@@"}).replace('"@@"', raw).encode() + b"\n"


def _deep(depth: int, open_: str = "[", close: str = "]", inner: str = "1") -> str:
    return open_ * depth + inner + close * depth


BIG = "9" * 400


def hostile_cases(good: dict) -> list[tuple[bytes, str, str]]:
    """(line, expected error code, text the error message must contain) for a session with no bar yet."""
    cases: list[tuple[bytes, str, str]] = []
    for stamp in ("0001-01-01T00:00:00-05:00", "9999-12-31T23:59:59+14:00", "0001-01-01T00:00:00",
                  "9999-12-31T23:59:59", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00",
                  "1899-12-31T23:59:59Z", "2200-01-01T00:00:00Z", "2262-04-12T00:00:00", "1677-09-21T00:00:00",
                  "2024-13-01T00:00:00", "2024-01-02T25:00:00", "", "2024-01-02T09:31:00" + "0" * 30):
        cases.append((_bar_with(good, time=stamp), "bad_value", "time"))
    for value in (12345, None, True, [], {}, ["2024-01-02T09:31:00"]):
        cases.append((_bar_with(good, time=value), "bad_value", "time"))
    for key in ("open", "high", "low", "close", "volume"):
        for raw in (BIG, "-" + BIG, BIG + ".5", "1e400", "-1e400", "1e99999999", '"NaN"', '"Infinity"', '"4500"',
                    "null", "true", "[]", "{}", _deep(500)):
            cases.append((_raw_field(good, key, raw), "bad_value", key))
        for raw in ("NaN", "Infinity", "-Infinity", "9" * 5000, _deep(5000), _deep(5000, '{"a":', "}")):
            cases.append((_raw_field(good, key, raw), "bad_json", "JSON"))
    for value in (1e300, 1e-300, 1e-3, 5e12, 1e12 * 0.25):
        cases.append((_prices(good, value), "bad_value", "open"))
    cases.append((_bar_with(good, volume=1e300), "bad_value", "volume"))
    fill = {"type": "fill", "quantity": 1, "price": good["close"]}
    for key, raw in (("price", BIG), ("price", "1e300"), ("price", "1e-300"), ("price", "1e400"),
                     ("quantity", BIG), ("quantity", "-" + BIG), ("quantity", "1e300"), ("quantity", _deep(500)),
                     ("commission", BIG), ("commission", '"NaN"'), ("commission", "-1")):
        cases.append((_raw_field(fill, key, raw), "bad_value", key))
    position = {"type": "position", "position": 1, "avg_price": good["close"]}
    for key, raw in (("avg_price", BIG), ("avg_price", "1e300"), ("avg_price", "1e-300"), ("avg_price", _deep(500)),
                     ("position", BIG), ("position", "-" + BIG)):
        cases.append((_raw_field(position, key, raw), "bad_value", key))
    cases += [
        ((_deep(5000) + "\n").encode(), "bad_json", "nested"),
        ((_deep(5000, '{"a":', "}") + "\n").encode(), "bad_json", "nested"),
        (_raw_field({"type": "heartbeat"}, "id", BIG), "bad_value", "id"),
        (_raw_field({"type": "heartbeat"}, "id", _deep(500)), "bad_value", "id"),
        (_raw_field({"type": "kill"}, "reason", _deep(500)), "bad_value", "reason"),
        (_raw_field({"type": "kill"}, "reason", BIG), "bad_value", "reason"),
        (_raw_field({"type": "hello"}, "protocol", _deep(500)), "bad_value", "hello"),
        (_raw_field({"type": "bar"}, "type", _deep(500)), "bad_json", "type"),
        (b'{"type": "heartbeat", "id": "\\ud800"}\n', "heartbeat", ""),  # a lone surrogate is still a string
    ]
    return cases


def test_hostile_messages_get_a_named_error_and_the_connection_stays_usable(deployed, tmp_path):  # noqa: F811
    cfg = config(deployed[1], f"continuous_learning.experience_storage={tmp_path / 'b'}",
                 f"bridge.kill_file={tmp_path / 'K'}")
    bars = deployed[2]
    good = bar_msg(bars, 0)
    cases = hostile_cases(good)
    assert len(cases) >= 100
    started = time.monotonic()
    with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
        c = Client(thread.bridge.address)
        assert c.hello()["type"] == "welcome"

        def answered(raw: bytes, code: str, names: str) -> None:
            c.send_raw(raw)
            reply = c.recv()
            assert reply is not None, raw[:80]
            got = reply.get("code", reply["type"])
            assert got == code and names in reply.get("message", ""), (raw[:80], reply)

        for raw, code, names in cases:
            answered(raw, code, names)
        assert c.request(good)["type"] == "decision"  # the first accepted bar: this session's prices
        anchor = good["close"]
        for value in (anchor * 1001, anchor / 1001):  # plausible ticks, but not for this market
            answered(_prices(bar_msg(bars, 1), value), "bad_value", "first price")
        answered(_raw_field({"type": "fill", "quantity": 1}, "price", repr(anchor * 1001)), "bad_value", "price")
        decisions = [c.request(bar_msg(bars, i)) for i in range(1, 15)]
        assert all(d["type"] == "decision" for d in decisions) and decisions[-1]["guard"] != "warmup"
        assert thread.bridge.stats["error_internal"] == 0 and thread.bridge.stats["decisions"] == 15
        assert c.request({"type": "position", "position": 0, "avg_price": 0})["type"] == "ack"
    assert time.monotonic() - started < 30


def _bridge_command(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.bridge", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env, "PYTHONPATH": str(ROOT), "NT8_BRIDGE_TOKEN": TOKEN, "LOGLEVEL": "INFO"})


def test_bad_listen_settings_are_one_line_errors_before_the_model_loads(deployed, tmp_path):  # noqa: F811
    import os

    binary = tmp_path / "binary.pem"
    binary.write_bytes(bytes(range(256)) * 8)
    sets = ["--set", f"promotion.deploy_dir={deployed[1] / 'deploy'}",
            "--set", f"continuous_learning.experience_storage={tmp_path / 'buffer'}"]
    cases = {
        "port 99999": (["--port", "99999"], "bridge.port"),
        "port -1": (["--port=-1"], "bridge.port"),
        "missing cert": (["--set", f"bridge.tls_cert={tmp_path / 'nope.pem'}", "--set",
                          f"bridge.tls_key={tmp_path / 'nope.key'}"], "bridge.tls_cert"),
        "binary cert": (["--set", f"bridge.tls_cert={binary}", "--set", f"bridge.tls_key={binary}"],
                        "bridge.tls_cert"),
        "host 256.1.1.1": (["--host", "256.1.1.1"], "bridge.host"),
    }
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    procs = {name: _bridge_command([*args, *sets], tmp_path, env) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        try:
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, (name, stderr[-2000:])
        assert len(errors) == 1 and cases[name][1] in errors[0], (name, stderr[-2000:])
        assert "Traceback" not in stderr and "trading with" not in stderr, (name, stderr[-2000:])
    assert not (tmp_path / "mlflow.db").exists()  # failed before the run (and the model load) began
