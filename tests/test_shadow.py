"""Shadow trading in Staging: a challenger that passes the gate shadows Production on the same
bars in the bridge and earns Production (or is archived) on the live comparison.

Real parts: a sqlite registry, real RLModules logged as pyfunc policies and deployed by
``reconcile``, a real bridge on loopback with the paper trader, a real Parquet buffer.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import run_module, visit_store
from mlproject import registry, staging
from mlproject.bridge.paper import paper_trade
from mlproject.bridge.server import Bridge, BridgeThread
from mlproject.deploy import RELOAD_FILE, SHADOW_DIR, notify_reload, reconcile
from mlproject.experience import ExperienceBuffer
from mlproject.faults import FAULT_ENV, KILLED_EXIT_CODE
from mlproject.shadow_verdict import decide, evidence
from mlproject.config import EnvConfig
from mlproject.policy import PolicySettings, fast_greedy, fresh_module
from mlproject.training import log_policy_model
from test_bridge import ENV, SPEC, TOKEN, config, deployed, env_for, rows_of  # noqa: F401 (fixture)
from test_registry import NAME, register_constant, store  # noqa: F401 (fixture)
from test_registry import config as registry_config


@pytest.fixture
def shadowed(deployed, monkeypatch):
    """The bridge tests' store (v1 in Production, deployed; v2 never trades) plus v3, an untrained
    policy that does trade (the first seed whose actions vary on these bars), for Staging."""
    uri, folder, bars = deployed
    for _ in visit_store(monkeypatch, uri, folder, deployed):
        if len(MlflowClient().search_model_versions(f"name='{NAME}'")) < 3:
            _register_trading_version(folder, bars)
        yield deployed


def _register_trading_version(folder, bars) -> str:
    settings = PolicySettings.from_env(EnvConfig.model_validate(ENV), bars)
    env = env_for(bars.iloc[:400])
    observations = [env.reset()[0]] + [env.step(a % 5)[0] for a in range(300)]
    for seed in range(3, 40):
        module = fresh_module(settings.obs_size, 2 * SPEC.max_contracts + 1, (16, 16), seed=seed)
        if len(set(fast_greedy(module)(np.stack(observations).astype(np.float32)).tolist())) >= 3:
            break
    module.save_to_path(str(folder / "module-trading"))
    with mlflow.start_run():
        info = log_policy_model(folder / "module-trading", np.stack(observations[:4]), settings)
    return str(mlflow.register_model(info.model_uri, NAME).version)


def stages() -> dict[str, str]:
    return {str(mv.version): mv.current_stage for mv in MlflowClient().search_model_versions(f"name='{NAME}'")}


def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_staged_challenger_shadows_production_without_touching_its_orders(shadowed, tmp_path, monkeypatch):
    """The Staging model decides on every bar beside Production, in its own process: its
    experiences (source shadow) equal the Staging pyfunc's decisions bit for bit and the env's
    accounting under the paper trader's fills; Production's orders are the same with no shadow,
    with the shadow, with a shadow that does not load and with a slow one (20 ms a forward pass)."""
    uri, folder, bars = shadowed
    deploy, bars = folder / "deploy", bars.iloc[:400]
    staging.stage(NAME, "3", "shadow test")
    assert reconcile(NAME, deploy).shadow == "3"
    cfg = config(folder, f"continuous_learning.experience_storage={tmp_path / 'buffer'}",
                 f"bridge.kill_file={tmp_path / 'KILL'}")
    runs, stats = {}, []
    try:
        with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
            shadow, (host, port) = thread.bridge.shadow, thread.bridge.address
            assert shadow.version == "3"
            _until(lambda: shadow.loaded == "3")  # the shadow process started and loaded the Staging model
            runs["with"] = asyncio.run(paper_trade(host, port, TOKEN, bars, SPEC, account="with"))
            staging.archive_staged(NAME, "3", "off for a while")
            reconcile(NAME, deploy)
            _until(lambda: shadow.version is None and shadow.loaded is None)
            runs["none"] = asyncio.run(paper_trade(host, port, TOKEN, bars, SPEC, account="none"))
            staging.stage(NAME, "3", "back on")
            reconcile(NAME, deploy)
            _until(lambda: shadow.loaded == "3")
            release = deploy / SHADOW_DIR / "current"
            good = (release / "model" / "MLmodel").read_text()
            (release / "model" / "MLmodel").write_text("not: [a model")
            notify_reload(deploy / SHADOW_DIR, json.loads((release / "manifest.json").read_text()))
            _until(lambda: shadow.stats["shadow_load_errors"] == 1)  # it reloads, fails and idles
            runs["broken"] = asyncio.run(paper_trade(host, port, TOKEN, bars, SPEC, account="broken"))
            (release / "model" / "MLmodel").write_text(good)
        stats.append(dict(shadow.stats))
        monkeypatch.setenv(FAULT_ENV, "shadow:decide")  # the shadow process sleeps 20 ms per forward pass
        with BridgeThread(Bridge(cfg, token=TOKEN)) as thread:
            host, port = thread.bridge.address
            _until(lambda: thread.bridge.shadow.loaded == "3")
            runs["slow"] = asyncio.run(paper_trade(host, port, TOKEN, bars, SPEC, account="slow"))
            _until(lambda: thread.bridge.shadow.stats["shadow_decisions"] == len(bars))  # it caught up
            thread.bridge.shadow._process.kill()  # kill -9 of the shadow process: Production trades on
            thread.bridge.shadow._process.join(30)
            runs["killed"] = asyncio.run(paper_trade(host, port, TOKEN, bars, SPEC, account="killed"))
        stats.append(dict(thread.bridge.shadow.stats))
        # What maintenance does next: the live comparison on what the bridge recorded.
        live_cfg = config(folder, f"continuous_learning.experience_storage={tmp_path / 'buffer'}",
                          "promotion.shadow_bars=300", "promotion.shadow_min_trades=5")
        judged = decide(live_cfg, ExperienceBuffer(tmp_path / "buffer"))
        assert judged.bars == len(bars) - env_for(bars).market.t_min - 1 and judged.decision in ("promoted", "archived")
        assert staging.staging_version(NAME) is None  # decided: in Production or archived
        assert registry.production_version(NAME) == ("3" if judged.decision == "promoted" else "1")
        if judged.decision == "promoted":
            registry.rollback(NAME, reason="back to v1 for the other tests")
    finally:
        if staging.staging_version(NAME):
            staging.archive_staged(NAME, "3", "end of the shadow test")
        reconcile(NAME, deploy)
    fills = {name: run.fills for name, run in runs.items()}
    assert fills["with"] == fills["none"] == fills["slow"] == fills["broken"] == fills["killed"]
    assert len(fills["none"]) > 5
    assert all(run.model_versions == {"1": len(bars)} for run in runs.values())
    assert stats[0]["shadow_load_errors"] == 1 and stats[0]["shadow_decisions"] == len(bars)
    assert stats[1]["shadow_decisions"] == len(bars)
    assert stats[0]["shadow_errors"] == stats[0]["shadow_dropped"] == stats[1]["shadow_errors"] == 0, stats
    assert stats[1]["shadow_dropped"] == len(bars)  # after the kill: every bar of the "killed" session
    rows = rows_of(tmp_path / "buffer")
    shadow = rows[rows["source"] == "shadow"].sort_values("time", kind="stable").reset_index(drop=True)
    start = env_for(bars).market.t_min
    assert len(shadow) == 2 * (len(bars) - start - 1)  # the "with" and the "slow" sessions
    assert set(shadow["model_version"]) == {"3"} and shadow["guard"].isna().all()
    assert shadow["position"].abs().sum() > 0 and (shadow["realised_pnl"] != 0).sum() > 5  # the shadow trades
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/3")
    assert np.array_equal(model.predict(np.stack(shadow["observation"].to_numpy())), shadow["action"].to_numpy())
    one = shadow.iloc[::2].reset_index(drop=True)  # the two sessions decided the same bars the same way
    assert np.array_equal(one["action"].to_numpy(), shadow.iloc[1::2]["action"].to_numpy())
    env = env_for(bars)
    obs, _ = env.reset(options={"start": start})
    for row in one.itertuples():  # the paper trader's fills and the env's accounting
        assert np.array_equal(row.observation, obs)
        obs, reward, *_ = env.step(int(row.action))
        assert row.reward == pytest.approx(reward, abs=1e-6)
    assert stages()["3"] == "Archived"


def test_two_challengers_in_a_row_leave_one_staging_and_the_history_says_so(store):
    v1, v2, v3 = (register_constant(store, a) for a in (0, 2, 2))
    registry.promote(NAME, v1, "first")
    with pytest.raises(ValueError, match="cannot shadow itself"):
        staging.stage(NAME, v1, "no")
    staging.stage(NAME, v2, "passed the gate")
    staging.stage(NAME, v3, "passed the gate later")
    assert staging.staging_version(NAME) == v3 and registry.alias_version(NAME, "staging") == v3
    assert stages() == {v1: "Production", v2: "Archived", v3: "Staging"}
    events = staging.staging_history(NAME)
    assert [(e["action"], e["version"], e["replaced"], e["production"]) for e in events] == [
        ("stage", v2, "", v1), ("stage", v3, v2, v1)]
    assert registry.cleanup(NAME, keep=0) == [] or stages()[v3] == "Staging"  # cleanup never archives Staging
    with pytest.raises(ValueError, match="is not Staging"):
        staging.promote_staged(NAME, v2, "stale")
    assert [e["action"] for e in registry.history(NAME)] == ["promote"]  # Production's history untouched


def _experiences(symbol: str, times: pd.DatetimeIndex, version: str, source: str, rewards: np.ndarray) -> list[dict]:
    equity = 100_000 + np.cumsum(rewards)
    pnl = np.where(np.arange(len(times)) % 4 == 3, rewards, 0.0)  # a closed trade every fourth bar
    return [{"time": t, "symbol": symbol, "model_name": NAME, "model_version": version, "observation": np.zeros(3),
             "action": 2, "reward": float(r), "source": source, "equity": float(e), "realised_pnl": float(p),
             "trade_id": f"{source}{i // 4}"} for i, (t, r, e, p) in enumerate(zip(times, rewards, equity, pnl))]


@pytest.mark.parametrize("shadow_better", [True, False])
def test_the_live_comparison_promotes_a_better_shadow_and_archives_a_worse_one(store, shadow_better):
    v1, v2 = register_constant(store, 0), register_constant(store, 2)
    registry.promote(NAME, v1, "first")
    staging.stage(NAME, v2, "passed the gate")
    cfg = registry_config(store, "promotion.shadow_bars=60", "promotion.shadow_min_trades=5", "promotion.min_dsr=0",
                          f"continuous_learning.experience_storage={store / 'buffer'}")
    buffer = ExperienceBuffer(store / "buffer")
    rng = np.random.default_rng(3)
    times = pd.date_range("2026-11-02 14:30", periods=80, freq="1min", tz="UTC")
    good, bad = rng.normal(40, 20, 80), rng.normal(-40, 20, 80)
    live = _experiences("ES", times, v1, "paper", bad if shadow_better else good)
    buffer.add(live[:50])
    buffer.add(_experiences("ES", times, v2, "shadow", good if shadow_better else bad)[:50])
    buffer.flush()
    waiting = decide(cfg, buffer)
    assert (waiting.decision, waiting.bars, waiting.version) == ("waiting", 50, v2)
    assert staging.staging_version(NAME) == v2  # not enough evidence yet: nothing moved
    from pipelines import status

    shown = status.main(cfg)
    assert f"shadow: Staging v{v2} shadowing Production v{v1}: 50 same bars, 12 trades" in shown
    assert "waiting: needs 60 same bars and 5 trades" in shown and f"stage v{v2}: passed the gate" in shown
    from pipelines import monitor

    watched = monitor.check(cfg)  # the shadow beside Production, in its own monitor run
    assert (watched.version, watched.shadow.version, watched.shadow.stats["n_bars"]) == (v1, v2, 50)
    run = MlflowClient().get_run(watched.shadow.run_id)
    assert run.data.tags["monitor.role"] == "shadow" and run.info.run_name == f"monitor {NAME} v{v2} (shadow)"
    assert run.data.metrics["monitor/n_bars"] == 50 and watched.run_id != watched.shadow.run_id
    buffer.add(live[50:])
    buffer.add(_experiences("ES", times, v2, "shadow", good if shadow_better else bad)[50:])
    buffer.add(_experiences("NQ", times, v1, "live", good))  # another market's bars are not paired
    buffer.flush()
    verdict = decide(cfg, buffer)
    assert verdict.bars == 80 and verdict.trades == 20
    events = staging.staging_history(NAME)
    if shadow_better:
        assert verdict.decision == "promoted" and verdict.metrics["live/paired_psr"] > 0.99
        assert registry.production_version(NAME) == v2 and staging.staging_version(NAME) is None
        assert registry.history(NAME)[-1]["reason"].startswith("live shadow evidence")
    else:
        assert verdict.decision == "archived" and any("return" in r for r in verdict.reasons)
        assert registry.production_version(NAME) == v1 and stages()[v2] == "Archived"
        assert "live shadow evidence" in MlflowClient().get_model_version(NAME, v2).tags["shadow_verdict"]
    assert events[-1]["action"] == ("promote" if shadow_better else "archive") and events[-1]["status"] == "done"
    assert registry.alias_version(NAME, "staging") is None
    assert evidence(cfg, buffer) is None  # nothing in Staging any more
    run = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`pipeline.step` = 'shadow'")
    assert sorted(run["tags.decision"]) == sorted(["waiting", verdict.decision])


def test_the_gate_stages_a_passing_challenger_when_shadow_bars_are_set(store):
    from pipelines import promote

    v1, v2 = register_constant(store, 0), register_constant(store, 2)
    cfg = registry_config(store, "promotion.shadow_bars=20")
    registry.promote(NAME, v1, "first")
    staged = promote.main(cfg, v2)
    assert staged.decision == "staged" and registry.production_version(NAME) == v1
    assert staging.staging_version(NAME) == v2
    shadow_dir = store / "deploy" / SHADOW_DIR
    assert json.loads((shadow_dir / "current" / "manifest.json").read_text())["version"] == v2
    assert json.loads((shadow_dir / RELOAD_FILE).read_text())["version"] == v2
    from registry_hooks.reconcile import describe

    assert describe(NAME, store / "deploy", reconcile(NAME, store / "deploy")).endswith(
        f"; Staging v{v2} shadow-deployed in {store / 'deploy' / SHADOW_DIR}")
    staging.archive_staged(NAME, v2, "withdrawn")
    assert reconcile(NAME, store / "deploy").shadow is None
    assert not (shadow_dir / "current").exists() and json.loads((shadow_dir / RELOAD_FILE).read_text())["version"] is None


STAGING_WRITER = textwrap.dedent('''
    import sys
    from mlproject import staging
    what, version = sys.argv[1], sys.argv[2]
    if what == "stage":
        staging.stage("nt8-agent", version, "killed test")
    else:
        staging.promote_staged("nt8-agent", version, "killed test")
''')

KILL_POINTS = [("stage", "stage:event-pending"), ("stage", "stage:stage-moved"),
               ("promote", "shadow-promote:event-pending"), ("promote", "promote:stage-moved"),
               ("promote", "shadow-promote:promoted")]


@pytest.mark.parametrize("what, point", KILL_POINTS)
def test_staging_moves_killed_at_each_step_lose_nothing_after_one_reconcile(store, what, point):
    v1, v2, v3 = (register_constant(store, a) for a in (0, 2, 2))
    registry.promote(NAME, v1, "first")
    staging.stage(NAME, v2, "first challenger")
    deploy = store / "deploy"
    reconcile(NAME, deploy)
    (store / "writer.py").write_text(STAGING_WRITER)
    target = v3 if what == "stage" else v2
    out = run_module([sys.executable, str(store / "writer.py"), what, target], cwd=store, env={FAULT_ENV: point})
    assert out.returncode == KILLED_EXIT_CODE, out.stderr[-2000:]
    result = reconcile(NAME, deploy)
    moved = point not in ("stage:event-pending", "shadow-promote:event-pending", "promote:event-pending")
    staged, production = staging.staging_version(NAME), registry.production_version(NAME)
    if what == "stage":
        assert (staged, production) == ((v3 if moved else v2), v1)
    else:
        assert (staged, production) == ((None, v2) if moved else (v2, v1))
    assert list(stages().values()).count("Staging") <= 1 and list(stages().values()).count("Production") == 1
    assert registry.alias_version(NAME, "staging") == staged and registry.alias_version(NAME) == production
    events = staging.staging_history(NAME, include_unfinished=True)
    assert all(e["status"] in ("done", "abandoned") for e in events)
    assert events[-1]["status"] == ("done" if moved else "abandoned")
    assert result.shadow == staged and result.version == production
    manifest = deploy / SHADOW_DIR / "current" / "manifest.json"
    assert (json.loads(manifest.read_text())["version"] if manifest.exists() else None) == staged


def test_shadow_experiences_do_not_count_towards_a_retrain(tmp_path):
    """Not new bars: counted, they doubled the retrain rate, and each retrain replaced the Staging
    version before its live verdict."""
    from mlproject.cycle.state import CycleState, due

    cfg = registry_config(tmp_path, "continuous_learning.retrain_frequency=30", "continuous_learning.min_experiences=1",
                          f"continuous_learning.experience_storage={tmp_path / 'buffer'}")
    buffer = ExperienceBuffer(tmp_path / "buffer")
    times = pd.date_range("2026-11-02 14:30", periods=20, freq="1min", tz="UTC")
    buffer.add(_experiences("ES", times, "1", "paper", np.ones(20)) + _experiences("ES", times, "2", "shadow", np.ones(20)))
    buffer.flush()
    d = due(cfg, buffer, CycleState(tmp_path / "state"))
    assert (d.experiences, d.new_since_retrain, d.shadow, d.retrain_due) == (20, 20, 20, False)
