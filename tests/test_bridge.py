"""The NT8 bridge and the paper trader: protocol, auth, bad input, guards, kill switch, reload
under traffic, observations equal to the env's, paper accounting equal to the env's, flushing.

Real parts: a real RLModule (untrained, of the training shape) logged as the pyfunc policy,
registered in a sqlite registry, deployed by ``reconcile``; a real asyncio server on loopback;
the experiences in a real Parquet buffer.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, fresh_store, run_module, visit_store
from envs import FuturesTradingEnv
from mlproject.bridge.paper import PaperError, paper_trade, period_text
from mlproject.bridge.server import Bridge, BridgeThread
from mlproject.config import EnvConfig, load_config
from mlproject.data import synthetic_bars
from mlproject.deploy import reconcile
from mlproject.experience import ExperienceBuffer
from mlproject.features import FeatureStream, bar_features
from mlproject.instruments import resolve_instrument
from mlproject.policy import PolicySettings, fresh_module
from mlproject.registry import promote
from mlproject.trades import PositionBook
from mlproject.ood import feature_reference
from mlproject.training import log_policy_model

TOKEN = "test-token-0123456789abcdef"
ENV = {"instrument": {"preset": "MES", "max_contracts": 2}, "window": 8, "vol_window": 10, "norm_window": 30}
SPEC = resolve_instrument(EnvConfig.model_validate(ENV).instrument)


def env_for(bars: pd.DataFrame) -> FuturesTradingEnv:
    return FuturesTradingEnv({**ENV, "bars": bars, "random_start": False, "episode_bars": None,
                              "max_episode_steps": None, "reward_scale": 1.0, "risk_penalty": 0.0})


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """nt8-agent v1 and v2 (two untrained policies of the training shape, different weights),
    v1 in Production and deployed. Yields (store uri, folder, bars)."""
    tmp = tmp_path_factory.mktemp("bridge")
    bars = synthetic_bars(1200, seed=11)  # a little over three sessions of 1-minute bars
    env_cfg = EnvConfig.model_validate(ENV)
    settings = PolicySettings.from_env(env_cfg, bars)
    env = env_for(bars)
    obs, _ = env.reset()
    example = np.stack([obs] + [env.step(a)[0] for a in (0, 4, 2)])
    with fresh_store(tmp) as uri:
        for seed in (1, 2):
            folder = tmp / f"module{seed}"
            fresh_module(settings.obs_size, 2 * SPEC.max_contracts + 1, (16, 16), seed=seed).save_to_path(str(folder))
            with mlflow.start_run():
                info = log_policy_model(folder, example, settings,  # the reference of the first 800 bars
                                        feature_reference(bars.iloc[:800], settings.vol_window, settings.norm_window))
            mlflow.register_model(info.model_uri, "nt8-agent")
        promote("nt8-agent", "1", "bridge tests")
        reconcile("nt8-agent", tmp / "deploy")
    yield uri, tmp, bars


def config(tmp: Path, *overrides: str):
    return load_config(None, [f"continuous_learning.experience_storage={tmp / 'buffer'}",
                              f"promotion.deploy_dir={tmp / 'deploy'}", "bridge.port=0", "bridge.flush_interval_s=0.2",
                              "bridge.reload_poll_s=0.05", "env.instrument.preset=MES", "env.instrument.max_contracts=2",
                              *overrides])


@pytest.fixture
def bridge(deployed, tmp_path):
    """A running bridge over the deployed v1, with its own buffer and kill file; yields
    (BridgeThread, (host, port), buffer folder)."""
    cfg = config(deployed[1], f"continuous_learning.experience_storage={tmp_path / 'buffer'}",
                 f"bridge.kill_file={tmp_path / 'KILL'}")
    thread = BridgeThread(Bridge(cfg, token=TOKEN))
    address = thread.start()
    yield thread, address, tmp_path / "buffer"
    thread.stop()


class Client:
    """A blocking line client of the protocol."""

    def __init__(self, address, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(address, timeout=30)
        self.sock = context.wrap_socket(sock, server_hostname="localhost") if context else sock
        self.lines = self.sock.makefile("rb")
        self.pushed: list[dict] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: dict) -> None:
        self.send_raw((json.dumps(msg) + "\n").encode())

    def recv(self) -> dict | None:
        line = self.lines.readline()
        return json.loads(line) if line else None

    def request(self, msg: dict) -> dict:
        self.send(msg)
        while True:
            reply = self.recv()
            if reply is None or reply.get("type") != "kill":
                return reply
            self.pushed.append(reply)

    def hello(self, account: str = "acct", token: str = TOKEN, source: str = "paper", **extra) -> dict:
        return self.request({"type": "hello", "protocol": 1, "token": token, "instrument": "MES", "bar_period": "1min",
                             "account": account, "source": source, **extra})

    def close(self) -> None:
        self.lines.close()  # the socket closes only when its file object does too
        self.sock.close()


def bar_msg(bars: pd.DataFrame, i: int, **extra) -> dict:
    row = bars.iloc[i]
    return {"type": "bar", "time": bars.index[i].isoformat(), **{k: float(row[k]) for k in
                                                                  ("open", "high", "low", "close", "volume")}, **extra}


def rows_of(buffer_dir: Path, timeout: float = 10.0, at_least: int = 1) -> pd.DataFrame:
    deadline = time.time() + timeout
    while True:
        frame = ExperienceBuffer(buffer_dir).query() if buffer_dir.exists() else pd.DataFrame()
        if len(frame) >= at_least or time.time() > deadline:
            return frame
        time.sleep(0.05)


# -- features, book ------------------------------------------------------------------------------


def test_the_feature_reference_scores_the_newest_bar_of_an_observation():
    from mlproject.features import FEATURE_NAMES
    from mlproject.ood import Reference, reference_or_none

    bars = synthetic_bars(600, seed=3)
    raw = feature_reference(bars, 20, 100)
    assert raw["features"] == ["ret_z", "range_z", "volume_z"] and raw["n_bars"] == 600
    ref = Reference(raw)
    window = 4
    obs = np.zeros(window * len(FEATURE_NAMES) + 2, dtype=np.float32)
    newest = slice((window - 1) * len(FEATURE_NAMES), window * len(FEATURE_NAMES))
    obs[newest] = [raw["median"][0], raw["median"][1], raw["median"][2], 0.0, 1.0]
    assert ref.largest_z(obs)[0] == pytest.approx(0.0, abs=1e-6)
    obs[newest.start + 2] = raw["median"][2] + 7 * raw["scale"][2]  # volume 7 robust sd out
    z, feature = ref.largest_z(obs)
    assert feature == "volume_z" and z == pytest.approx(7, rel=1e-5)
    obs[newest.start] = np.nan  # a missing feature is skipped; the others still count
    assert ref.largest_z(obs) == (pytest.approx(7, rel=1e-5), "volume_z")
    obs[newest] = np.nan
    assert ref.largest_z(obs) == (float("inf"), "ret_z")  # nothing to judge by: out of distribution
    assert reference_or_none(bars.iloc[:1], 20, 100) is None  # too few bars: no reference, no crash


def test_feature_stream_equals_bar_features_bit_for_bit():
    bars = synthetic_bars(700, seed=5)
    bars.iloc[100:160, bars.columns.get_loc("volume")] = 9.0  # a flat volume stretch: std exactly 0
    bars.iloc[300:340, :4] = 4500.0  # flat prices: sigma exactly 0
    expected = bar_features(bars, vol_window=10, norm_window=30)
    for start in (0, 200):  # from the first bar, and from a later one once the windows have filled
        stream = FeatureStream(vol_window=10, norm_window=30)
        rows = np.stack([stream.push(t.hour, t.minute, t.second, h, lo, c, v) for t, h, lo, c, v in
                         zip(bars.index[start:], bars["high"][start:], bars["low"][start:], bars["close"][start:],
                             bars["volume"][start:])])
        skip = 0 if start == 0 else 31
        assert np.array_equal(rows[skip:], expected[start + skip:])


def test_multi_timeframe_observations_are_built_bar_by_bar_as_the_env_builds_them():
    """A model of feature set multi_timeframe (v2): the stream's context row (5- and 15-bar
    returns, volatility regime) equals context_features bit for bit, and the bridge's observation
    of every bar equals the env's: the window's rows, the context, the account."""
    from mlproject.bridge.observations import ObservationBuilder
    from mlproject.bridge.protocol import Bar
    from mlproject.features import context_features

    bars = synthetic_bars(500, seed=6)
    bars.iloc[300:340, :4] = 4500.0  # flat prices: sigma exactly 0
    multi = {**ENV, "feature_set": "multi_timeframe"}
    settings = PolicySettings.from_env(EnvConfig.model_validate(multi), bars)
    assert settings.feature_set == "multi_timeframe" and settings.feature_set_version == 2
    assert settings.obs_size == 8 * 5 + 3 + 2
    env = FuturesTradingEnv({**multi, "bars": bars, "random_start": False})
    builder, book = ObservationBuilder(settings), PositionBook(SPEC.point_value, SPEC.commission_per_side)
    expected_context = context_features(bars, vol_window=10, norm_window=30)
    for t in range(len(bars)):
        stamp = bars.index[t].to_pydatetime()
        row = bars.iloc[t]
        builder.push(Bar(stamp, stamp, row.open, row.high, row.low, row.close, row.volume, False))
        assert np.array_equal(builder._stream.context_row, expected_context[t]), t
        if t >= env.market.t_min:
            obs, _ = env.reset(options={"start": t}) if t < len(bars) - 1 else (None, None)
            if obs is not None:
                assert np.array_equal(builder.observation(book, row.close), obs), t


def test_trader_observations_follow_the_book_bar_by_bar_as_the_env_builds_them():
    """Feature set trader (v3): with the env's fills applied to the book before each bar (as
    NinjaTrader reports them) and one bar_closed per bar (as the session does), the bridge's
    observation equals the env's bit for bit, bars_in_trade included (adds, reductions, flips)."""
    from mlproject.bridge.observations import ObservationBuilder
    from mlproject.bridge.protocol import Bar

    bars = synthetic_bars(600, seed=8)
    trader = {**ENV, "feature_set": "trader"}
    settings = PolicySettings.from_env(EnvConfig.model_validate(trader), bars)
    assert settings.feature_set == "trader" and settings.feature_set_version == 3
    assert settings.features[-1] == "bars_in_trade" and settings.obs_size == 8 * 5 + 3 + 1 + 2
    env = FuturesTradingEnv({**trader, "bars": bars, "random_start": False})
    obs, _ = env.reset()
    builder, book = ObservationBuilder(settings), PositionBook(SPEC.point_value, SPEC.commission_per_side)
    for t in range(env.market.t_min + 1):
        stamp, row = bars.index[t].to_pydatetime(), bars.iloc[t]
        builder.push(Bar(stamp, stamp, row.open, row.high, row.low, row.close, row.volume, False))
        book.bar_closed()
    assert np.array_equal(builder.observation(book, bars.iloc[env.market.t_min].close), obs)
    rng = np.random.default_rng(3)
    held, fills = 0, 0
    for t in range(env.market.t_min + 1, len(bars) - 1):
        obs, *_ = env.step(int(rng.choice(5, p=[0.05, 0.05, 0.1, 0.7, 0.1])))
        if env.fills and env.fills[-1][0] == t:  # filled at this bar's open
            _, q, price = env.fills[-1]
            book.fill(q - book.position, price)
            fills += 1
        stamp, row = bars.index[t].to_pydatetime(), bars.iloc[t]
        builder.push(Bar(stamp, stamp, row.open, row.high, row.low, row.close, row.volume, False))
        book.bar_closed()
        assert np.array_equal(builder.observation(book, row.close), obs), t
        held = max(held, book.bars_held)
    assert fills > 50 and held > 10


def test_position_book_matches_the_env_account():
    bars = synthetic_bars(400, seed=2)
    env = env_for(bars)
    env.reset(options={"start": 10})
    rng = np.random.default_rng(0)
    for action in rng.integers(0, 5, 300):
        env.step(int(action))
    book = PositionBook(SPEC.point_value, SPEC.commission_per_side)
    previous = 0
    for _, q, price in env.fills:
        book.fill(q - previous, price)
        previous = q
    assert book.position == env._pos and book.avg == env._avg and book.realised == env._realised
    assert book.closed == env._n_closed


# -- protocol ------------------------------------------------------------------------------------


def test_protocol_round_trip(bridge, deployed):
    thread, address, _ = bridge
    bars = deployed[2]
    c = Client(address)
    welcome = c.hello(id=7)
    assert welcome["type"] == "welcome" and welcome["id"] == 7 and welcome["model_version"] == "1"
    assert welcome["bars_needed"] == 11 and welcome["max_position"] == 2 and welcome["position"] == 0
    assert c.request({"type": "heartbeat", "id": "h1"})["id"] == "h1"
    decisions = [c.request(bar_msg(bars, i)) for i in range(12)]
    assert all(d["type"] == "decision" and d["model_version"] == "1" for d in decisions)
    assert [d["guard"] for d in decisions[:10]] == ["warmup"] * 10 and decisions[10]["guard"] in (None, "max_position")
    assert decisions[11]["reference_price"] == float(bars["close"].iloc[11])
    again = c.request(bar_msg(bars, 11))  # a resend after a lost reply: the same decision
    assert again["repeat"] is True and again["decision_id"] == decisions[11]["decision_id"]
    replayed = c.request(bar_msg(bars, 3, historical=True))  # NT8 replaying its chart after a re-enable
    assert replayed["guard"] == "historical" and replayed["repeat"] is True and replayed["decision_id"] is None
    assert c.request(bar_msg(bars, 3))["code"] == "bad_value"  # a live bar back in time is an error
    target = decisions[11]["target_position"]
    if target:
        ack = c.request({"type": "fill", "decision_id": decisions[11]["decision_id"], "time": bars.index[12].isoformat(),
                         "price": float(bars["open"].iloc[12]), "quantity": target})
        assert ack == {"type": "ack", "ref": "fill", "position": target, "model_version": "1"}
    ack = c.request({"type": "position", "position": target, "avg_price": float(bars["open"].iloc[12])})
    assert ack["position"] == target
    assert c.request({"type": "bye"})["type"] == "bye"
    assert c.recv() is None  # closed after bye


def test_auth_is_refused_without_or_with_a_wrong_token(bridge):
    _, address, _ = bridge
    for token in ("", "wrong-token-0123456789", TOKEN[:-1]):
        c = Client(address)
        reply = c.hello(token=token)
        assert reply["type"] == "error" and reply["code"] == "unauthorized"
        assert c.recv() is None
    c = Client(address)
    reply = c.request({"type": "bar", "time": "2024-01-02T09:31:00", "open": 1, "high": 1, "low": 1, "close": 1,
                       "volume": 1})
    assert reply["code"] == "not_authenticated" and c.recv() is None
    c = Client(address)
    assert c.hello(protocol=2)["code"] == "protocol"
    c = Client(address)
    assert c.hello(instrument="ES")["code"] == "mismatch"
    c = Client(address)
    assert c.hello(bar_period="5min")["code"] == "mismatch"
    c = Client(address)
    assert c.hello(account="same")["type"] == "welcome"
    other = Client(address)
    assert other.hello(account="same")["code"] == "session_busy"


def test_malformed_and_oversized_messages_leave_the_connection_usable(deployed, tmp_path):
    cfg = config(deployed[1], f"continuous_learning.experience_storage={tmp_path / 'b'}", "bridge.max_message_bytes=1024",
                 f"bridge.kill_file={tmp_path / 'KILL'}")
    bars = deployed[2]
    with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
        c = Client(thread.bridge.address)
        assert c.hello()["type"] == "welcome"
        good = bar_msg(bars, 0)
        cases = [
            (b"x" * 5000 + b"\n", "too_large"),
            (b'{"type": "bar", "pad": "' + b"y" * 300_000 + b'"}\n', "too_large"),
            (b"{not json\n", "bad_json"),
            (b"[1, 2]\n", "bad_json"),
            (b'{"no_type": 1}\n', "bad_json"),
            (b'{"type": "launch_missiles"}\n', "unknown_type"),
            (json.dumps({**good, "close": "4500"}).encode() + b"\n", "bad_value"),
            (json.dumps(good).replace('"close": ' + json.dumps(good["close"]), '"close": NaN').encode() + b"\n",
             "bad_json"),
            (json.dumps({**good, "high": good["low"] - 1}).encode() + b"\n", "bad_value"),
            (json.dumps({**good, "volume": -1}).encode() + b"\n", "bad_value"),
            (json.dumps({**good, "open": 0}).encode() + b"\n", "bad_value"),
            (json.dumps({**good, "time": "yesterday"}).encode() + b"\n", "bad_value"),
            (json.dumps({**good, "historical": "yes"}).encode() + b"\n", "bad_value"),
            (json.dumps({"type": "fill", "quantity": True, "price": 1.0}).encode() + b"\n", "bad_value"),
            (json.dumps({"type": "fill", "quantity": 10**9, "price": 1.0}).encode() + b"\n", "bad_value"),
            (json.dumps({"type": "fill", "quantity": 1, "price": -1.0}).encode() + b"\n", "bad_value"),
            (json.dumps({"type": "position", "position": 1.5}).encode() + b"\n", "bad_value"),
            (json.dumps({"type": "heartbeat", "id": ["list"]}).encode() + b"\n", "bad_value"),
            (b"\xff\xfe\n", "bad_json"),
            (json.dumps({"type": "hello"}).encode() + b"\n", "bad_value"),
        ]
        for raw, code in cases:
            c.send_raw(raw)
            reply = c.recv()
            assert reply["type"] == "error" and reply["code"] == code, (raw[:60], reply)
            assert c.request({"type": "heartbeat"})["type"] == "heartbeat"  # still usable
        assert c.request(good)["type"] == "decision"
        c.request(bar_msg(bars, 1))
        reply = c.request(bar_msg(bars, 0))  # back in time
        assert reply["code"] == "bad_value" and "before the previous bar" in reply["message"]


def test_a_silent_client_is_dropped_and_its_session_resumes(deployed, tmp_path):
    cfg = config(deployed[1], f"continuous_learning.experience_storage={tmp_path / 'b'}",
                 "bridge.heartbeat_timeout_s=0.5", "bridge.hello_timeout_s=0.5", f"bridge.kill_file={tmp_path / 'K'}")
    bars = deployed[2]
    with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
        silent = Client(thread.bridge.address)  # never says hello
        assert silent.recv()["code"] == "timeout" and silent.recv() is None
        c = Client(thread.bridge.address)
        c.hello(account="resume")
        decisions = [c.request(bar_msg(bars, i)) for i in range(15)]
        time.sleep(1.0)
        assert c.recv()["code"] == "timeout" and c.recv() is None
        again = Client(thread.bridge.address)
        welcome = again.hello(account="resume")
        assert welcome["type"] == "welcome"
        resumed = again.request(bar_msg(bars, 15))  # history kept: no second warm-up
        assert resumed["guard"] != "warmup" and decisions[-1]["guard"] != "warmup"


def test_server_busy_beyond_max_sessions(deployed, tmp_path):
    cfg = config(deployed[1], f"continuous_learning.experience_storage={tmp_path / 'b'}", "bridge.max_sessions=2",
                 f"bridge.kill_file={tmp_path / 'K'}")
    with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
        first, second = Client(thread.bridge.address), Client(thread.bridge.address)
        assert first.hello(account="a")["type"] == "welcome" and second.hello(account="b")["type"] == "welcome"
        third = Client(thread.bridge.address)
        assert third.recv()["code"] == "server_busy" and third.recv() is None


# -- the loop: observations, decisions, accounting -----------------------------------------------


def test_paper_trading_equals_the_env_bit_for_bit_and_decisions_equal_the_pyfunc_model(bridge, deployed):
    thread, (host, port), buffer_dir = bridge
    bars = deployed[2].iloc[:600]
    result = asyncio.run(paper_trade(host, port, TOKEN, bars, SPEC, account="exact"))
    assert result.decisions == len(bars) and result.model_versions == {"1": len(bars)}
    thread.call(thread.bridge.flush)
    rows = rows_of(buffer_dir)
    env = env_for(bars)
    start = env.market.t_min
    assert len(rows) == len(bars) - start - 1  # one per decision after the warm-up; the last has no next bar
    obs, _ = env.reset(options={"start": start})
    rewards = []
    for row in rows.itertuples():
        assert np.array_equal(row.observation, obs), f"observation differs at {row.time}"
        obs, reward, terminated, truncated, info = env.step(int(row.action))
        assert np.array_equal(row.next_observation, obs)
        assert row.position == info["position"]
        rewards.append(reward)
    assert np.allclose(rows["reward"], rewards, rtol=0, atol=1e-6)
    assert rows["equity"].iloc[-1] == pytest.approx(info["equity"], abs=1e-6)
    assert rows["realised_pnl"].sum() == pytest.approx(info["realised_pnl"], abs=1e-6)
    assert result.realised_pnl == pytest.approx(info["realised_pnl"], abs=1e-6)
    pd.testing.assert_frame_equal(result.trades, env.trades_frame())
    assert len(result.trades) > 5  # the untrained policy trades: the accounting is exercised
    assert (rows["source"] == "paper").all() and rows["guard"].isna().all()
    closing = rows[rows["realised_pnl"] != 0]
    assert closing["trade_id"].notna().all()
    # Slippage against the decision's close: (fill - close) * signed quantity * point value.
    traded = rows[rows["fill_price"].notna()]
    assert len(traded) and traded["slippage"].notna().all()
    model = mlflow.pyfunc.load_model(str(deployed[1] / "deploy" / "current" / "model"))
    assert np.array_equal(model.predict(np.stack(rows["observation"].to_numpy())), rows["action"].to_numpy())


def test_reload_under_traffic_switches_models_between_requests(bridge, deployed, monkeypatch):
    thread, (host, port), buffer_dir = bridge
    uri, folder, bars = deployed
    results, errors = [], []

    def traffic(account: str) -> None:
        try:
            results.append(asyncio.run(paper_trade(host, port, TOKEN, bars, SPEC, account=account)))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    clients = [threading.Thread(target=traffic, args=(f"reload{i}",)) for i in range(4)]
    for c in clients:
        c.start()
    gen = visit_store(monkeypatch, uri, folder, None)
    next(gen)
    try:
        time.sleep(0.5)
        promote("nt8-agent", "2", "reload test")
        reconcile("nt8-agent", folder / "deploy")
        for c in clients:
            c.join(timeout=300)
    finally:
        promote("nt8-agent", "1", "back to v1 for the other tests")
        reconcile("nt8-agent", folder / "deploy")
        gen.close()
    assert not errors, errors
    assert len(results) == 4 and all(r.decisions == len(bars) for r in results)  # nothing failed or dropped
    assert all(set(r.model_versions) == {"1", "2"} for r in results), [r.model_versions for r in results]
    thread.call(thread.bridge.flush)
    rows = rows_of(buffer_dir, at_least=4 * (len(bars) - 11))
    assert len(rows) == 4 * (len(bars) - 11)
    for r in results:  # each session: v1, then v2 from the switch on, never back
        switch = r.versions.index("2")
        assert set(r.versions[:switch]) == {"1"} and set(r.versions[switch:]) == {"2"}
    assert set(rows["model_version"]) == {"1", "2"}
    v2 = rows[rows["model_version"] == "2"]
    model2 = mlflow.pyfunc.load_model(str(_release_of(folder / "deploy", "2") / "model"))
    assert np.array_equal(model2.predict(np.stack(v2["observation"].to_numpy())), v2["action"].to_numpy())


def _release_of(deploy: Path, version: str) -> Path:
    return next(p for p in (deploy / "releases").iterdir() if p.name.startswith(f"v{version}-"))


# -- the risk guard ------------------------------------------------------------------------------


def test_stale_bars_get_no_decision_on_a_live_session(bridge, deployed):
    _, address, buffer_dir = bridge
    bars = deployed[2]
    c = Client(address)
    c.hello(account="live-stale", source="live")
    decisions = [c.request(bar_msg(bars, i)) for i in range(14)]  # 2024 bars: hours old
    assert [d["guard"] for d in decisions[10:]] == ["stale_bar"] * 4
    assert all(d["target_position"] == 0 for d in decisions)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    fresh = {**bar_msg(bars, 14), "time": now.isoformat()}
    assert c.request(fresh)["guard"] in (None, "max_position")
    historical = c.request({**bar_msg(bars, 15), "time": (now + pd.Timedelta("1min")).isoformat(), "historical": True})
    assert historical["guard"] == "historical"
    c.request({"type": "bye"})
    rows = rows_of(buffer_dir)
    assert (rows["guard"] == "stale_bar").sum() >= 2 and rows["policy_action"].notna().sum() >= 2


def test_daily_loss_flattens_and_stops_entries_until_the_next_day(deployed, tmp_path):
    cfg = config(deployed[1], f"continuous_learning.experience_storage={tmp_path / 'b'}", "bridge.max_daily_loss=20.0",
                 f"bridge.kill_file={tmp_path / 'K'}")
    bars = deployed[2]
    with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
        host, port = thread.bridge.address
        result = asyncio.run(paper_trade(host, port, TOKEN, bars, SPEC, account="loss"))
    rows = ExperienceBuffer(tmp_path / "b").query()
    assert result.guards["daily_loss"] > 0
    days = rows["time"].dt.date
    stop_days = []
    for day, group in rows.groupby(days):
        stopped = np.flatnonzero((group["guard"] == "daily_loss").to_numpy())
        if len(stopped):
            stop_days.append(day)
            after = group.iloc[stopped[0]:]
            assert (after["guard"] == "daily_loss").all(), f"{day}: entries after the stop"
            assert (after["action"] == SPEC.max_contracts).all() and (after["position"].iloc[1:] == 0).all()
            assert group["equity"].iloc[:stopped[0]].min() < group["equity"].iloc[0]  # it lost first
    later = rows[days > stop_days[0]]
    assert len(later) and later["guard"].isna().any()  # the next day trades again


def test_max_position_clips_the_policy(deployed, tmp_path):
    cfg = config(deployed[1], f"continuous_learning.experience_storage={tmp_path / 'b'}", "bridge.max_position=1",
                 f"bridge.kill_file={tmp_path / 'K'}")
    bars = deployed[2].iloc[:300]
    with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
        host, port = thread.bridge.address
        result = asyncio.run(paper_trade(host, port, TOKEN, bars, SPEC, account="clip"))
    rows = ExperienceBuffer(tmp_path / "b").query()
    assert rows["position"].abs().max() <= 1 and result.guards["max_position"] > 0
    clipped = rows[rows["guard"] == "max_position"]
    assert set(clipped["policy_action"]) <= {0, 4} and set(clipped["action"]) <= {1, 3}


def test_kill_switch_by_message_and_by_file(bridge, deployed, tmp_path):
    thread, address, buffer_dir = bridge
    bars = deployed[2]
    a, b = Client(address), Client(address)
    a.hello(account="ka")
    b.hello(account="kb")
    for i in range(30):
        a.request(bar_msg(bars, i))
        b.request(bar_msg(bars, i))
    assert a.request({"type": "kill", "reason": "news"})["ref"] == "kill"
    assert b.recv()["type"] == "kill"  # pushed to every connected client
    assert (tmp_path / "KILL").exists()  # holds over a restart
    for i in range(30, 40):
        for c in (a, b):
            d = c.request(bar_msg(bars, i))
            assert d["guard"] == "kill_switch" and d["target_position"] == 0
    a.request({"type": "resume"})
    assert not (tmp_path / "KILL").exists()
    assert a.request(bar_msg(bars, 40))["guard"] != "kill_switch"
    (tmp_path / "KILL").write_text("operator\n")  # the file alone (python -m pipelines.bridge kill): the next bar
    assert a.request(bar_msg(bars, 41))["guard"] == "kill_switch"
    assert a.pushed and a.pushed[-1]["type"] == "kill"
    (tmp_path / "KILL").unlink()
    time.sleep(0.3)  # the file's removal is seen by the watcher (bridge.reload_poll_s, 0.05 here)
    assert a.request(bar_msg(bars, 42))["guard"] != "kill_switch"


# -- durability ----------------------------------------------------------------------------------


def test_disconnect_and_stop_flush_what_the_bridge_holds(deployed, tmp_path):
    cfg = config(deployed[1], f"continuous_learning.experience_storage={tmp_path / 'b'}", "bridge.flush_every=100000",
                 "bridge.flush_interval_s=3600", f"bridge.kill_file={tmp_path / 'K'}")
    bars = deployed[2].iloc[:100]
    thread = BridgeThread(Bridge(cfg, token=TOKEN))
    host, port = thread.start()
    try:
        asyncio.run(paper_trade(host, port, TOKEN, bars, SPEC, account="bye"))  # ends with bye
        assert len(rows_of(tmp_path / "b", at_least=len(bars) - 11)) == len(bars) - 11
        c = Client((host, port))
        c.hello(account="abrupt")
        for i in range(50):
            c.request(bar_msg(bars, i))
        c.close()  # no bye: the connection just drops
        assert len(rows_of(tmp_path / "b", at_least=len(bars) - 11 + 39)) == len(bars) - 11 + 39
        c = Client((host, port))
        c.hello(account="at-stop")
        for i in range(30):
            c.request(bar_msg(bars, i))
    finally:
        thread.stop()
    assert len(ExperienceBuffer(tmp_path / "b").query()) == len(bars) - 11 + 39 + 19


def test_tls(deployed, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                           str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    cfg = config(deployed[1], f"continuous_learning.experience_storage={tmp_path / 'b'}", f"bridge.tls_cert={cert}",
                 f"bridge.tls_key={key}", f"bridge.kill_file={tmp_path / 'K'}")
    context = ssl.create_default_context(cafile=str(cert))
    with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
        host, port = thread.bridge.address
        c = Client((host, port), context)
        assert c.hello()["type"] == "welcome"
        plain = Client((host, port))
        plain.send({"type": "hello"})
        assert plain.recv() is None  # no TLS, no talk
        result = asyncio.run(paper_trade(host, port, TOKEN, deployed[2].iloc[:50], SPEC, account="tls",
                                         ssl_context=context))
        assert result.decisions == 50


def test_refusals_are_clear(deployed, tmp_path):
    cfg = config(tmp_path, f"promotion.deploy_dir={tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="at least 16"):
        Bridge(cfg, token="short")
    with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:  # nothing deployed, another instrument: refused
        refused = Client(thread.bridge.address).hello(instrument="ES")
        assert refused["code"] == "no_model" and "configuration trades MES, not ES" in refused["message"]
        with pytest.raises(PaperError, match="no_model"):
            asyncio.run(paper_trade(*thread.bridge.address, TOKEN, deployed[2].iloc[:20],
                                    resolve_instrument(EnvConfig.model_validate({"instrument": "ES"}).instrument)))
        with pytest.raises(PaperError, match="nothing is deployed yet: the session would trade flat"):
            asyncio.run(paper_trade(*thread.bridge.address, TOKEN, deployed[2].iloc[:20], SPEC))  # welcomed, flat
    assert period_text(deployed[2]) == "1min"


def test_with_no_model_deployed_sessions_trade_flat_until_one_is_and_after_a_stand_down(deployed, tmp_path,
                                                                                      monkeypatch):
    """No model is a state, not an error: with nothing deployed a session of the configured
    instrument opens and every decision is flat (guard no_model; a held position is closed); a
    deploy takes over at the next bar (the observation rebuilt from the session's history), and a
    stand-down (Production emptied, reconcile) makes it flat again. Only the model's decisions
    become experiences."""
    from mlproject.registry import stand_down

    uri, folder, bars = deployed
    deploy = tmp_path / "deploy"
    cfg = config(tmp_path, f"promotion.deploy_dir={deploy}", f"bridge.kill_file={tmp_path / 'KILL'}",
                 "env.window=8", "env.vol_window=10")  # the deployed models' (bars_needed before a model is there)
    gen = visit_store(monkeypatch, uri, folder, None)
    next(gen)
    try:
        with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
            c = Client(thread.bridge.address)
            welcome = c.hello()
            assert (welcome["model_version"], welcome["bars_needed"], welcome["max_position"]) == (None, 11, 2)
            assert c.request({"type": "position", "position": 1, "avg_price": float(bars["open"].iloc[0])})["position"] == 1
            flat = [c.request(bar_msg(bars, i)) for i in range(40)]
            assert {(d["guard"], d["target_position"], d["model_version"]) for d in flat} == {("no_model", 0, None)}
            reconcile("nt8-agent", deploy)  # v1 is Production: deployed now
            deadline = time.time() + 30
            while thread.bridge.policy is None and time.time() < deadline:
                time.sleep(0.05)
            traded = [c.request(bar_msg(bars, i)) for i in range(40, 60)]
            assert all(d["model_version"] == "1" and d["guard"] in (None, "max_position") for d in traded)
            stand_down("nt8-agent", "the test stands it down")
            reconcile("nt8-agent", deploy)
            while thread.bridge.policy is not None and time.time() < deadline + 30:
                time.sleep(0.05)
            after = [c.request(bar_msg(bars, i)) for i in range(60, 70)]
            assert {(d["guard"], d["target_position"], d["model_version"]) for d in after} == {("no_model", 0, None)}
            c.request({"type": "bye"})
            thread.call(thread.bridge.flush)
        rows = rows_of(tmp_path / "buffer", at_least=20)
        assert len(rows) == 20 and set(rows["model_version"]) == {"1"}  # bars 40..59; the last completed at 60
    finally:
        promote("nt8-agent", "1", "back to v1 for the other tests")
        gen.close()


def test_out_of_distribution_bars_get_flat_decisions_recorded_with_guard_ood(deployed, tmp_path):
    """bridge.max_feature_z: a bar whose features are far from the model's training bars (the
    reference it carries) gets a flat decision, guard ood, the policy's own choice recorded; the
    same market as the training bars seldom does; off (the default) nothing is judged."""
    _, folder, bars = deployed
    shifted = bars.iloc[800:1000].copy()  # a wilder market: bars 6x as wide, 40x the volume
    shifted["high"] = shifted["close"] + 6 * (shifted["high"] - shifted["close"])
    shifted["low"] = shifted["close"] - 6 * (shifted["close"] - shifted["low"])
    shifted["volume"] *= 40
    market = pd.concat([bars.iloc[:800], shifted])
    counts = {}
    for limit in (None, 6.0):
        buffer = tmp_path / f"buffer-{limit}"
        cfg = config(folder, f"continuous_learning.experience_storage={buffer}", f"bridge.kill_file={tmp_path / 'KILL'}",
                     *([f"bridge.max_feature_z={limit}"] if limit else []))
        with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
            c = Client(thread.bridge.address)
            assert c.hello(account=f"ood-{limit}")["model_version"] == "1"
            decisions = [c.request(bar_msg(market, i)) for i in range(len(market))]
            c.request({"type": "bye"})
            thread.call(thread.bridge.flush)
        guards = [d["guard"] for d in decisions]
        counts[limit] = (guards[100:800].count("ood"), guards[820:].count("ood"))
        flagged = [d for d in decisions if d["guard"] == "ood"]
        assert all(d["target_position"] == 0 and d["policy_target"] is not None for d in flagged)
        if limit:
            rows = rows_of(buffer, at_least=len(market) - 20)
            assert (rows["guard"] == "ood").sum() >= len(flagged) - 1 and rows.loc[rows["guard"] == "ood",
                                                                                   "policy_action"].notna().all()
    assert counts[None] == (0, 0)
    in_sample, wild = counts[6.0]
    assert in_sample <= 0.02 * 700 and wild >= 0.5 * 180, counts


# -- the commands --------------------------------------------------------------------------------


def test_collect_command_runs_a_paper_session_into_mlflow_and_the_buffer(deployed, tmp_path):
    uri, folder, bars = deployed
    data = tmp_path / "bars.csv"
    bars.iloc[:200].reset_index().to_csv(data, index=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"continuous_learning.experience_storage={tmp_path / 'buffer'}", f"promotion.deploy_dir={folder / 'deploy'}",
            "bridge.port=0", "env.instrument.preset=MES", "env.instrument.max_contracts=2"]
    out = run_module(["python", "-m", "pipelines.collect", "--data", str(data), *sum((["--set", s] for s in sets), [])],
                     tmp_path, env={"MLFLOW_TRACKING_URI": store})
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(ExperienceBuffer(tmp_path / "buffer").query()) == 200 - 11
    client = mlflow.MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("nt8-rl").experiment_id],
                             "tags.`pipeline.step` = 'collect'")[0]
    assert run.data.metrics["collect/decisions"] == 200 and run.data.tags["collect.model_versions"] == "1"
    assert "collect/realised_pnl" in run.data.metrics and run.data.metrics["buffer/experiences"] == 189
    bad = run_module(["python", "-m", "pipelines.collect", "--data", str(tmp_path / "missing.csv"),
                      *sum((["--set", s] for s in sets), [])], tmp_path, env={"MLFLOW_TRACKING_URI": store})
    assert bad.returncode == 2 and "missing.csv" in bad.stderr


def test_bridge_command_serves_kills_and_resumes(deployed, tmp_path):
    folder, bars = deployed[1], deployed[2]
    sets = [f"continuous_learning.experience_storage={tmp_path / 'buffer'}", f"promotion.deploy_dir={folder / 'deploy'}",
            f"bridge.kill_file={tmp_path / 'KILL'}"]
    args = sum((["--set", s] for s in sets), [])
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    refused = run_module(["python", "-m", "pipelines.bridge", *args], tmp_path, env={**env, "NT8_BRIDGE_TOKEN": ""})
    assert refused.returncode == 2 and "NT8_BRIDGE_TOKEN" in refused.stderr
    proc, port = _serve(args, tmp_path, env)
    try:
        assert run_module(["python", "-m", "pipelines.bridge", "kill", "--reason", "test", *args], tmp_path,
                          env=env).returncode == 0
        result = asyncio.run(paper_trade("127.0.0.1", port, TOKEN, bars.iloc[:30], SPEC, account="cmd"))
        assert result.guards["kill_switch"] == 30 - 10
        assert run_module(["python", "-m", "pipelines.bridge", "resume", *args], tmp_path, env=env).returncode == 0
        proc.terminate()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(ExperienceBuffer(tmp_path / "buffer").query()) == 30 - 11  # SIGTERM wrote what it held


def _serve(args: list[str], cwd: Path, env: dict) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(["python", "-m", "pipelines.bridge", "--port", "0", *args], cwd=cwd,
                            env={**os.environ, **env, "NT8_BRIDGE_TOKEN": TOKEN, "PYTHONPATH": str(ROOT),
                                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, proc.stderr.read() if proc.poll() is not None else line
    return proc, int(line.rsplit(":", 1)[1])


def test_a_bridge_killed_with_sigkill_loses_only_its_last_flush_interval(deployed, tmp_path):
    """kill -9 at a random moment of a busy session, three times into one buffer: the buffer stays
    readable (no torn file), no experience is there twice, and everything older than the flush
    interval when the kill came is there."""
    import random
    import signal

    folder, bars = deployed[1], deployed[2]
    sets = [f"continuous_learning.experience_storage={tmp_path / 'buffer'}", f"promotion.deploy_dir={folder / 'deploy'}",
            f"bridge.kill_file={tmp_path / 'KILL'}", "bridge.flush_interval_s=0.2", "bridge.flush_every=25"]
    args = sum((["--set", s] for s in sets), [])
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    rng = random.Random(4)
    kept = 0
    for round_ in range(3):
        proc, port = _serve(args, tmp_path, env)
        c = Client(("127.0.0.1", port))
        c.hello(account=f"crash{round_}")
        sent = 11 + rng.randrange(20, 200)
        for i in range(sent):
            c.request(bar_msg(bars, i))
        time.sleep(0.6)  # three flush intervals: all of it is durable now ...
        for i in range(sent, sent + rng.randrange(0, 150)):
            c.request(bar_msg(bars, i))  # ... and this part may or may not be
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        c.close()
        buffer = ExperienceBuffer(tmp_path / "buffer")
        assert buffer.check() == []
        rows = buffer.query(columns=["experience_id", "time"])
        assert rows["experience_id"].is_unique
        assert len(rows) >= kept + (sent - 11)  # every experience completed before the pause is there
        kept = len(rows)


def test_a_second_bridge_on_the_same_port_is_refused(deployed, tmp_path):
    folder = deployed[1]
    sets = [f"continuous_learning.experience_storage={tmp_path / 'buffer'}", f"promotion.deploy_dir={folder / 'deploy'}",
            f"bridge.kill_file={tmp_path / 'KILL'}"]
    args = sum((["--set", s] for s in sets), [])
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc, port = _serve(args, tmp_path, env)
    try:
        second = run_module(["python", "-m", "pipelines.bridge", "--port", str(port), *args], tmp_path,
                            env={**env, "NT8_BRIDGE_TOKEN": TOKEN}, timeout=120)
        assert second.returncode == 2 and "address already in use" in second.stderr.lower(), second.stderr[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
