"""Model Registry: promotion, rollback, history, cleanup, the gate, reconcile and the webhook,
against a real sqlite registry (and a real `mlflow server` for the webhook)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import ROOT, free_port, momentum_bars, run_module, use_store, wait_for_mlflow_server
from mlproject import registry
from mlproject.config import load_config
from registry_hooks.reconcile import deployed_manifest, reconcile, tree_checksum

NAME = "nt8-agent"
SECRET = "test-secret-0123456789abcdef"
CONSTANT_MODEL = textwrap.dedent('''
    """Test policy: always the same action (from model_config) or NaN."""
    import mlflow
    import numpy as np


    class Constant(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.action = context.model_config["action"]

        def predict(self, context, model_input, params=None):
            return np.full(len(model_input), self.action, dtype=np.float64)


    mlflow.models.set_model(Constant())
''')


@pytest.fixture
def store(mlflow_store, tmp_path, monkeypatch):
    """Sqlite registry + a bar file whose test split rises steadily; cwd = tmp_path."""
    monkeypatch.chdir(tmp_path)
    bars = momentum_bars(3000, seed=4, persist=0.5)
    bars[["open", "high", "low", "close"]] += np.linspace(0, 1500, len(bars))[:, None]
    bars.to_parquet(tmp_path / "bars.parquet")
    (tmp_path / "constant_model.py").write_text(CONSTANT_MODEL)
    return tmp_path


def config(tmp: Path, *extra: str):
    return load_config(ROOT / "conf" / "smoke.yaml", [
        f"data.source={tmp / 'bars.parquet'}", "env.instrument=ES", "promotion.min_trades=0",
        "promotion.max_drawdown=0.9", f"promotion.deploy_dir={tmp / 'deploy'}", *extra])


def register_constant(tmp: Path, action: float) -> str:
    """Log a constant-action pyfunc and register it as a new version; returns the version."""
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="policy", python_model=str(tmp / "constant_model.py"),
                                       model_config={"action": action}, pip_requirements=["mlflow", "numpy"],
                                       input_example=np.zeros((4, 82), np.float32))  # smoke: window 16
    return str(mlflow.register_model(info.model_uri, NAME).version)


def stage_and_alias(version: str | None = None) -> tuple[str | None, str | None]:
    return registry.production_version(NAME), registry.alias_version(NAME)


# -- promote / rollback / history / cleanup ---------------------------------------------------------


def test_promote_rollback_sequences_keep_stage_and_alias_together(store):
    versions = [register_constant(store, 2) for _ in range(4)]
    for v in versions[:3]:
        registry.promote(NAME, v, reason=f"test {v}", metrics={"eval/sharpe": float(v)})
        assert stage_and_alias() == (v, v)
    stages = {str(mv.version): mv.current_stage for mv in MlflowClient().search_model_versions(f"name='{NAME}'")}
    assert list(stages.values()).count("Production") == 1
    assert [(e["version"], e["previous"], e["action"]) for e in registry.history(NAME)] == [
        ("1", "", "promote"), ("2", "1", "promote"), ("3", "2", "promote")]
    registry.rollback(NAME, reason="bad fills")
    assert stage_and_alias() == ("2", "2")
    registry.rollback(NAME)
    assert stage_and_alias() == ("1", "1")  # twice: two versions back, never to the version it left
    registry.rollback(NAME, to_version=3, reason="known good")
    assert stage_and_alias() == ("3", "3")
    events = registry.history(NAME)
    assert [e["action"] for e in events] == ["promote"] * 3 + ["rollback"] * 3
    assert events[3]["reason"] == "bad fills" and events[-1]["reason"] == "known good"
    tags = MlflowClient().get_model_version(NAME, "3").tags
    assert tags["previous_production"] == "1" and tags["promotion_action"] == "rollback"
    with pytest.raises(ValueError, match="already Production"):
        registry.rollback(NAME, to_version=3)
    text = registry.status(NAME)
    assert "Production = 3" in text and "history (oldest first)" in text and "#6" in text


def test_the_history_lives_on_a_history_run_and_the_model_keeps_two_compact_tags(store):
    """The registered model's UI page shows `production_history` (the run) and `production_latest`,
    not one JSON tag per event; the events outlive deleted versions; an over-long reason is cut to
    fit a run tag."""
    v1, v2, v3 = (register_constant(store, 1) for _ in range(3))
    registry.promote(NAME, v1, "first")
    registry.promote(NAME, v3, "x" * 12000)
    tags = MlflowClient().get_registered_model(NAME).tags
    assert set(tags) == {registry.HISTORY_TAG, registry.LATEST_TAG}
    assert tags[registry.LATEST_TAG].startswith(f"#2 promote to v{v3} (was {v1}) at ")
    run = mlflow.get_run(tags[registry.HISTORY_TAG])
    assert mlflow.get_experiment(run.info.experiment_id).name == registry.HISTORY_EXPERIMENT
    assert sorted(k for k in run.data.tags if k.startswith(registry.EVENT_PREFIX)) == [
        "production_event.000001", "production_event.000002"]
    long_reason = registry.history(NAME)[-1]["reason"]
    assert long_reason.endswith("...") and 7000 < len(long_reason) < 8000
    registry.delete_version(NAME, v2)
    assert [e["version"] for e in registry.history(NAME)] == [v1, v3]


def test_a_store_written_before_the_history_run_reads_the_same_and_goes_on(store):
    """Events that older releases wrote as tags on the registered model still count: the next
    event continues their numbering on the history run, and rollback finds its target in them."""
    client = MlflowClient()
    v1, v2 = register_constant(store, 1), register_constant(store, 2)
    with registry._stage_api():
        client.transition_model_version_stage(NAME, v1, "Production")
    client.set_registered_model_alias(NAME, registry.ALIAS, v1)
    old = {"seq": 1, "action": "promote", "version": v1, "previous": "", "at": "2026-01-02T00:00:00+00:00",
           "reason": "before the history run", "metrics": {}, "status": "done"}
    client.set_registered_model_tag(NAME, "production_event.000001", json.dumps(old))
    registry.promote(NAME, v2, "after")
    assert [(e["seq"], e["version"], e["previous"]) for e in registry.history(NAME)] == [(1, v1, ""), (2, v2, v1)]
    registry.rollback(NAME, reason="back")
    assert stage_and_alias() == (v1, v1) and registry.history(NAME)[-1]["seq"] == 3


def test_rollback_with_nothing_before_is_a_clear_error(store):
    v = register_constant(store, 1)
    registry.promote(NAME, v, "first")
    with pytest.raises(ValueError, match="nothing to roll back to"):
        registry.rollback(NAME)


def test_cleanup_never_removes_production_or_the_rollback_target(store):
    versions = [register_constant(store, 1) for _ in range(6)]
    registry.promote(NAME, versions[3], "v4")
    registry.promote(NAME, versions[4], "v5")  # Production 5, rollback target 4
    archived = registry.cleanup(NAME, keep=1)
    assert "5" not in archived and "4" not in archived and set(archived) == {"1", "2", "3"}
    with pytest.raises(ValueError, match="version 5 is Production"):
        registry.delete_version(NAME, "5")
    with pytest.raises(ValueError, match="version 4 is the rollback target"):
        registry.delete_version(NAME, "4")
    deleted = registry.cleanup(NAME, keep=0, delete=True)
    assert set(deleted) == {"1", "2", "3", "6"}
    left = {str(mv.version) for mv in MlflowClient().search_model_versions(f"name='{NAME}'")}
    assert left == {"4", "5"}
    assert stage_and_alias() == ("5", "5") and registry.rollback_target(NAME) == "4"


# -- the gate --------------------------------------------------------------------------------------


def test_gate_first_promotes_then_refuses_worse_and_promotes_better(store):
    from pipelines import promote

    short, long_, short_again = (register_constant(store, a) for a in (0, 2, 0))
    cfg = config(store)
    first = promote.main(cfg, short)
    assert first.decision == "promoted" and "nothing in Production" in " ".join(first.reasons)
    better = promote.main(cfg, long_)
    assert better.decision == "promoted" and better.production_before == short
    assert better.metrics["gate/improvement"] > 0 and better.metrics["gate/psr"] > 0.5
    worse = promote.main(cfg, short_again)
    assert worse.decision == "refused" and stage_and_alias() == (long_, long_)
    assert any("improvement" in r for r in worse.reasons) and any("PSR" in r for r in worse.reasons)
    run = mlflow.get_run(worse.run_id)
    assert run.data.tags["decision"] == "refused" and "improvement" in run.data.tags["reasons"]
    assert "challenger/sharpe" in run.data.metrics and "production/sharpe" in run.data.metrics
    dry = promote.main(cfg, short_again, dry_run=True)
    assert dry.decision == "refused" and stage_and_alias() == (long_, long_)
    assert deployed_manifest(store / "deploy")["version"] == long_  # promote reconciled the deploy dir


def test_gate_refuses_nan_actions_and_risk_limits(store):
    from pipelines import promote

    nan_policy = register_constant(store, float("nan"))
    refused = promote.main(config(store), nan_policy)
    assert refused.decision == "refused" and "NaN" in refused.reasons[0]
    long_ = register_constant(store, 2)
    strict = promote.main(config(store, "promotion.min_trades=1000", "promotion.max_drawdown=0.0001"), long_)
    assert strict.decision == "refused" and registry.production_version(NAME) is None
    assert any("min_trades" in r for r in strict.reasons) and any("max_drawdown" in r for r in strict.reasons)
    assert promote.main(config(store), long_, dry_run=True).decision == "would promote"
    assert registry.production_version(NAME) is None


# -- reconcile -------------------------------------------------------------------------------------


def test_reconcile_repairs_a_crash_between_stage_and_alias(store):
    deploy = store / "deploy"  # the calls below use the relative path, as conf/default.yaml does (cwd = store)
    v1, v2 = register_constant(store, 1), register_constant(store, 2)
    registry.promote(NAME, v1, "first")
    assert reconcile(NAME, "deploy").changed
    assert not reconcile(NAME, "deploy").changed  # idempotent
    registry.promote(NAME, v2, "second")
    MlflowClient().set_registered_model_alias(NAME, registry.ALIAS, v1)  # as if we crashed before the alias
    assert stage_and_alias() == (v2, v1)
    result = reconcile(NAME, "deploy")
    assert result.alias_repaired and result.changed and stage_and_alias() == (v2, v2)
    manifest = deployed_manifest(deploy)
    assert manifest["version"] == v2 and manifest["checksum"] == tree_checksum(deploy / "current" / "model")
    assert json.loads((deploy / "previous" / "manifest.json").read_text())["version"] == v1
    reload = json.loads((deploy / "reload.json").read_text())
    assert reload["version"] == v2 and reload["sequence"] == 2
    model = mlflow.pyfunc.load_model(str(deploy / "current" / "model"))
    assert model.predict(np.zeros((3, 82), np.float32)).tolist() == [2.0, 2.0, 2.0]


def test_an_export_killed_half_way_leaves_the_previous_model_deployed(store):
    deploy = store / "deploy"
    v1, v2 = register_constant(store, 1), register_constant(store, 2)
    registry.promote(NAME, v1, "first")
    reconcile(NAME, deploy)
    registry.promote(NAME, v2, "second")
    env = {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    cmd = [sys.executable, "-m", "registry_hooks.reconcile", "--config", str(ROOT / "conf" / "smoke.yaml"),
           "--set", f"promotion.deploy_dir={deploy}"]
    for delay in (1.5, 2.5, 3.5):
        proc = subprocess.Popen(cmd, cwd=store, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        manifest = deployed_manifest(deploy)  # whatever moment it died, one complete model is deployed
        assert manifest["version"] in (v1, v2)
        assert tree_checksum(deploy / "current" / "model") == manifest["checksum"]
        if manifest["version"] == v2:
            break
    (deploy / ".staging-v2-crashed" / "model").mkdir(parents=True)  # debris of a killed export
    result = reconcile(NAME, deploy)
    assert deployed_manifest(deploy)["version"] == v2 and result.version == v2
    assert not list(deploy.glob(".staging-*"))


def test_reconcile_command_says_what_is_deployed(store):
    deploy = store / "deploy"
    cmd = ["python", "-m", "registry_hooks.reconcile", "--config", str(ROOT / "conf" / "smoke.yaml"),
           "--set", f"promotion.deploy_dir={deploy}"]
    empty = run_module(cmd, cwd=store)
    assert empty.returncode == 0 and empty.stdout.strip() == (f"{NAME}: nothing in Production; nothing deployed "
                                                              f"in {deploy} (a bridge trades flat)")
    v1 = register_constant(store, 1)
    registry.promote(NAME, v1, "first")
    first, again = run_module(cmd, cwd=store), run_module(cmd, cwd=store)
    release = (deploy / "current").resolve().name
    assert first.returncode == 0 and again.returncode == 0
    assert first.stdout.strip() == f"{NAME} v{v1} (Production) deployed now: {deploy / 'current'} -> {release}"
    assert again.stdout.strip() == f"{NAME} v{v1} (Production) already deployed: {deploy / 'current'} -> {release}"
    registry.stand_down(NAME, "no edge")
    down = run_module(cmd, cwd=store)
    assert down.returncode == 0 and down.stdout.strip() == (
        f"{NAME}: nothing in Production: stood down ({deploy / 'current'} removed, the last release kept as "
        "previous); a bridge trades flat")
    assert not (deploy / "current").exists() and (deploy / "previous").resolve().name == release
    registry.promote(NAME, v1, "back")
    assert run_module(cmd, cwd=store).returncode == 0 and (deploy / "current").exists()
    other = store / "elsewhere"  # run from the wrong folder: a new, empty store is not an empty Production
    other.mkdir()
    wrong = run_module(cmd, cwd=other, env={"MLFLOW_TRACKING_URI": f"sqlite:///{other / 'mlflow.db'}"})
    assert wrong.returncode == 0 and wrong.stdout.strip().startswith(
        f"{NAME}: no such registered model in this tracking store; {deploy} left as it is (still ")
    assert (deploy / "current").exists() and deployed_manifest(deploy)["version"] == v1


def test_rollback_pipeline_redeploys_and_logs_latency(store):
    from pipelines import rollback

    v1, v2 = register_constant(store, 1), register_constant(store, 2)
    cfg = config(store)
    registry.promote(NAME, v1, "first")
    registry.promote(NAME, v2, "second")
    reconcile(NAME, cfg.promotion.deploy_dir)
    out = rollback.main(cfg, reason="drawdown alarm")
    assert out["event"]["version"] == v1 and deployed_manifest(store / "deploy")["version"] == v1
    assert out["latency_s"] > 0
    status = run_module(["python", "-m", "pipelines.status", "--config", str(ROOT / "conf" / "smoke.yaml")],
                        cwd=store)
    assert status.returncode == 0 and "Production = 1" in status.stdout and "drawdown alarm" in status.stdout


def test_mlflow_run_promote_and_rollback_entry_points(store):
    v1, v2 = register_constant(store, 0), register_constant(store, 2)
    overrides = (f"data.source={store / 'bars.parquet'} env.instrument=ES promotion.min_trades=0 "
                 f"promotion.max_drawdown=0.9 promotion.deploy_dir={store / 'deploy'}")
    for candidate in (v1, v2):
        out = run_module(["mlflow", "run", str(ROOT), "-e", "promote", "--env-manager", "local",
                          "-P", f"candidate={candidate}", "-P", "config=conf/smoke.yaml", "-P", f"overrides={overrides}"],
                         cwd=store)
        assert out.returncode == 0, out.stderr[-2000:]
    assert stage_and_alias() == (v2, v2)
    out = run_module(["mlflow", "run", str(ROOT), "-e", "rollback", "--env-manager", "local",
                      "-P", "config=conf/smoke.yaml", "-P", f"overrides={overrides}"], cwd=store)
    assert out.returncode == 0, out.stderr[-2000:]
    assert stage_and_alias() == (v1, v1) and deployed_manifest(store / "deploy")["version"] == v1


# -- webhook receiver with a real mlflow server -------------------------------------------------


def test_webhook_from_a_real_mlflow_server_deploys_and_rejects_bad_signatures(tmp_path, monkeypatch):
    from registry_hooks.webhook import Receiver, make_server, register, signature

    port = free_port()
    env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts"), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("w"))
    receiver_server = None
    try:
        wait_for_mlflow_server(f"http://127.0.0.1:{port}", server, log=tmp_path / "server.log")
        use_store(monkeypatch, f"http://127.0.0.1:{port}")
        (tmp_path / "constant_model.py").write_text(CONSTANT_MODEL)
        deploy = tmp_path / "deploy"
        receiver = Receiver(SECRET, NAME, str(deploy))
        receiver_server = make_server(receiver, port=0).start()
        hook_url = f"http://127.0.0.1:{receiver_server.server_port}/webhook"
        register(hook_url, SECRET)
        v1 = register_constant(tmp_path, 1)
        started = time.time()
        registry.promote(NAME, v1, "first via the server")
        while deployed_manifest(deploy) is None and time.time() - started < 30:
            time.sleep(0.2)
        assert deployed_manifest(deploy)["version"] == v1, "the alias webhook did not deploy within 30 s"
        # A forged request (wrong secret) is rejected and changes nothing.
        v2 = register_constant(tmp_path, 2)
        with registry._stage_api():
            MlflowClient().transition_model_version_stage(NAME, v2, "Production", archive_existing_versions=True)
        body = json.dumps({"entity": "model_version_alias", "action": "created",
                           "data": {"name": NAME, "alias": "production", "version": v2}})
        stamp = str(int(time.time()))
        request = urllib.request.Request(hook_url, data=body.encode(), method="POST", headers={
            "X-MLflow-Signature": signature("wrong", "d-1", stamp, body), "X-MLflow-Timestamp": stamp,
            "X-MLflow-Delivery-Id": "d-1", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 401
        assert deployed_manifest(deploy)["version"] == v1
        stale = str(int(time.time()) - 3600)
        request = urllib.request.Request(hook_url, data=body.encode(), method="POST", headers={
            "X-MLflow-Signature": signature(SECRET, "d-2", stale, body), "X-MLflow-Timestamp": stale,
            "X-MLflow-Delivery-Id": "d-2"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 401 and deployed_manifest(deploy)["version"] == v1
    finally:
        if receiver_server is not None:
            receiver_server.shutdown()
        mlflow.set_tracking_uri(None)
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
