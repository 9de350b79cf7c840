""""No worse model ever reaches Production, and no crash leaves the deployment wrong": concurrent
writers, a kill at every step, junk arguments and the quality floor, on a real sqlite registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import ROOT, run_module
from mlproject import registry
from mlproject.faults import FAULT_ENV, KILLED_EXIT_CODE
from mlproject.deploy import RELOAD_FILE, deployed_manifest, reconcile, tree_checksum
from test_registry import NAME, config, register_constant, stage_and_alias, store  # noqa: F401 (fixture)


def assert_consistent(deploy) -> None:
    """One Production version, the alias on it, a complete ordered history whose chain of
    `previous` links holds, and the deploy dir (current, reload notice) on Production."""
    stages = [str(mv.version) for mv in MlflowClient().search_model_versions(f"name='{NAME}'")
              if mv.current_stage == "Production"]
    assert len(stages) == 1, f"Production versions: {stages}"
    assert stage_and_alias() == (stages[0], stages[0])
    events = registry.history(NAME, include_unfinished=True)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "sequence numbers lost or doubled"
    assert all(e["status"] in ("done", "abandoned") for e in events), "a pending event was left"
    done = [e for e in events if e["status"] == "done"]
    for before, after in zip(done, done[1:]):
        assert after["previous"] == before["version"], f"history chain broken at #{after['seq']}"
    assert done[-1]["version"] == stages[0]
    manifest = deployed_manifest(deploy)
    assert manifest["version"] == stages[0]
    assert manifest["checksum"] == tree_checksum(deploy / "current" / "model")
    assert json.loads((deploy / RELOAD_FILE).read_text())["version"] == stages[0]


def first_deployed(store) -> tuple:
    """Two registered versions, the first promoted and deployed: (deploy dir, v1, v2)."""
    deploy = store / "deploy"
    v1, v2 = register_constant(store, 1), register_constant(store, 2)
    registry.promote(NAME, v1, "first")
    reconcile(NAME, deploy)
    return deploy, v1, v2


WRITER = textwrap.dedent('''
    import random, sys, time
    from mlproject import registry
    from mlproject.deploy import reconcile

    writer, rounds, deploy, versions, start = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].split(","), float(sys.argv[5])
    lock = sys.argv[6] if len(sys.argv) > 6 else None  # promotion.lock_file (None: the default place)
    rng = random.Random(writer)
    while time.time() < start:  # every writer starts at the same moment
        time.sleep(0.01)
    for k in range(rounds):
        try:
            if rng.random() < 0.6:
                registry.promote("nt8-agent", rng.choice(versions), f"writer {writer} round {k}", lock_file=lock)
            else:
                registry.rollback("nt8-agent", reason=f"writer {writer} round {k}", lock_file=lock)
        except ValueError:
            pass  # "already Production", "nothing to roll back to": normal answers
        reconcile("nt8-agent", deploy, lock_file=lock)
''')


@pytest.mark.parametrize("writers, rounds", [(3, 8), (4, 5)])
def test_concurrent_promotes_rollbacks_and_reconciles_stay_consistent(store, writers, rounds):
    """Before the lock: two Production versions in 15 of 25 rounds, lost history events, crashed
    reconciles. Here every write and reconcile is serialised."""
    import time

    deploy = store / "deploy"
    versions = [register_constant(store, a) for a in (1, 2, 1, 2)]
    registry.promote(NAME, versions[0], "start")
    reconcile(NAME, deploy)
    (store / "writer.py").write_text(WRITER)
    start = time.time() + 6  # the writers import mlflow first
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(store / "writer.py"), str(w), str(rounds), str(deploy),
                               ",".join(versions), str(start)], cwd=store, env=env, stderr=subprocess.PIPE, text=True)
             for w in range(writers)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert_consistent(deploy)
    ops = len(registry.history(NAME, include_unfinished=True))
    assert ops > writers * rounds // 3  # many writes really happened


def test_the_gate_is_checked_again_when_production_moves_during_the_evaluation(store, monkeypatch):
    """A worse candidate used to replace a better Production that was promoted while it was
    being evaluated, with the reason "better than Production v1"."""
    from mlproject import gate
    from pipelines import promote

    short, long_, long_again = (register_constant(store, a) for a in (0, 2, 2))
    registry.promote(NAME, short, "start")
    real = gate.evaluate_and_gate
    calls = []

    def evaluate_while_another_process_promotes(*args, **kwargs):
        verdict = real(*args, **kwargs)
        if not calls:  # the other writer wins the race right after our first evaluation
            registry.promote(NAME, long_, "the other writer")
        calls.append(args[1])
        return verdict

    monkeypatch.setattr(gate, "evaluate_and_gate", evaluate_while_another_process_promotes)
    result = promote.main(config(store), long_again)
    assert calls == [short, long_]  # gated against the new Production under the lock
    assert result.decision == "refused" and stage_and_alias() == (long_, long_)
    text = mlflow.get_run(result.run_id).data.tags["reasons"]
    assert text.startswith(f"Production changed to v{long_} during the evaluation, gated again: sharpe")
    assert MlflowClient().get_model_version(NAME, long_again).tags["gate.decision"] == "refused"


# -- crash points -----------------------------------------------------------------------------------

PROMOTE_POINTS = ("promote:event-pending", "promote:stage-moved", "promote:alias-moved", "promote:version-tagged")
RECONCILE_POINTS = ("reconcile:exported", "reconcile:previous-switched", "reconcile:current-switched")


@pytest.mark.parametrize("point", PROMOTE_POINTS + RECONCILE_POINTS)
def test_a_kill_at_every_step_is_repaired_by_one_reconcile(store, point):
    """kill -9 (os._exit, no cleanup) at each step of a promotion and of its deploy; then one
    reconcile, and everything agrees again, with the history intact."""
    deploy, v1, v2 = first_deployed(store)
    code = (f"from mlproject import registry; from registry_hooks.reconcile import reconcile; "
            f"registry.promote('{NAME}', '{v2}', 'second'); reconcile('{NAME}', r'{deploy}')")
    out = run_module([sys.executable, "-c", code], cwd=store, env={FAULT_ENV: point})
    assert out.returncode == KILLED_EXIT_CODE, out.stderr[-2000:]
    reconcile(NAME, deploy)
    assert_consistent(deploy)
    events = registry.history(NAME, include_unfinished=True)
    moved = point != "promote:event-pending"
    assert events[-1]["version"] == v2 and events[-1]["status"] == ("done" if moved else "abandoned")
    assert registry.production_version(NAME) == (v2 if moved else v1)
    if moved:  # the history still knows where to roll back to, and cleanup keeps it
        assert registry.rollback_target(NAME) == v1 and v1 not in registry.cleanup(NAME, keep=0)
        assert json.loads((deploy / "previous" / "manifest.json").read_text())["version"] == v1


STAND_DOWN_POINTS = ("stand-down:event-pending", "stand-down:stage-moved", "reconcile:stand-down-previous",
                     "reconcile:stand-down-current")


@pytest.mark.parametrize("point", STAND_DOWN_POINTS)
def test_a_stand_down_killed_at_every_step_ends_flat_or_not_at_all_after_one_reconcile(store, point):
    """The only Production version must stop and there is nothing to roll back to: `pipelines.rollback
    --flat` empties Production and the deployment stands down (a bridge trades flat). kill -9 at
    each step; one reconcile after it, and the registry and the deploy dir agree: flat, or (killed
    before the stage moved) still the version, as if nothing had happened."""
    deploy, v1, v2 = first_deployed(store)
    out = run_module([sys.executable, "-m", "pipelines.rollback", "--flat", "--reason", "drifted",
                      "--config", str(ROOT / "conf" / "smoke.yaml"), "--set", f"promotion.deploy_dir={deploy}"],
                     cwd=store, env={FAULT_ENV: point})
    assert out.returncode == KILLED_EXIT_CODE, out.stderr[-2000:]
    reconcile(NAME, deploy)
    events = registry.history(NAME, include_unfinished=True)
    assert events[-1]["action"] == "stand_down" and events[-1]["previous"] == v1
    if point == "stand-down:event-pending":  # nothing moved: still v1, the event abandoned
        assert events[-1]["status"] == "abandoned"
        assert_consistent(deploy)
        return
    assert events[-1]["status"] == "done" and stage_and_alias() == (None, None)
    assert not (deploy / "current").exists() and json.loads((deploy / RELOAD_FILE).read_text())["version"] is None
    assert json.loads((deploy / "previous" / "manifest.json").read_text())["version"] == v1
    assert registry.rollback_target(NAME) is None  # the version stood down is not the way back
    again = reconcile(NAME, deploy)
    assert (again.version, again.changed) == (None, False)  # a stand-down is done once
    registry.promote(NAME, v2, "a new model")  # the history goes on from flat
    reconcile(NAME, deploy)
    assert_consistent(deploy)
    assert registry.rollback_target(NAME) is None  # back from v2 would be flat: --flat says so explicitly


def test_a_rollback_with_nothing_to_go_back_to_says_how_to_stand_down(store):
    deploy, v1, v2 = first_deployed(store)
    with pytest.raises(ValueError, match="or stand it down to flat"):
        registry.rollback(NAME, reason="drifted")
    from pipelines import rollback

    with pytest.raises(ValueError, match="--flat and --version"):
        rollback.main(config(store), "1", flat=True)
    assert stage_and_alias() == (v1, v1)
    registry.promote(NAME, v2, "a new model")
    down = rollback.main(config(store), flat=True)  # v2 stood down although v1 is there: asked for
    assert (down["event"]["action"], down["event"]["version"], down["release"]) == ("stand_down", "", None)
    back = rollback.main(config(store))  # from flat, a plain rollback goes to the version before v2
    assert (back["event"]["version"], back["event"]["previous"], back["event"]["reason"]) == (v1, "", "back from flat")
    assert stage_and_alias() == (v1, v1)


def test_a_killed_rollback_is_completed_and_can_be_rolled_back_again(store):
    deploy = store / "deploy"
    v1, v2 = register_constant(store, 1), register_constant(store, 2)
    for v in (v1, v2):
        registry.promote(NAME, v, f"promote {v}")
    reconcile(NAME, deploy)
    out = run_module([sys.executable, "-m", "pipelines.rollback", "--config", str(ROOT / "conf" / "smoke.yaml"),
                      "--set", f"promotion.deploy_dir={deploy}"], cwd=store, env={FAULT_ENV: "promote:alias-moved"})
    assert out.returncode == KILLED_EXIT_CODE, out.stderr[-2000:]
    reconcile(NAME, deploy)
    assert_consistent(deploy)
    assert registry.history(NAME)[-1]["action"] == "rollback" and registry.production_version(NAME) == v1
    with pytest.raises(ValueError, match="nothing to roll back to"):  # a rollback never undoes a rollback
        registry.rollback(NAME, reason="and back")
    registry.rollback(NAME, to_version=v2, reason="and back")  # naming the version does
    assert stage_and_alias() == (v2, v2)


def test_a_corrupt_previous_release_is_replaced_or_removed(store):
    deploy, v1, v2 = first_deployed(store)
    registry.promote(NAME, v2, "second")
    reconcile(NAME, deploy)
    previous = (deploy / "previous").resolve()
    (previous / "model" / "MLmodel").write_text("corrupt")
    reconcile(NAME, deploy)
    assert not (deploy / "previous").exists() and not (deploy / "previous").is_symlink()
    assert_consistent(deploy)
    registry.rollback(NAME, reason="v2 bad")  # the registry still rolls back: a fresh export of v1
    reconcile(NAME, deploy)
    assert_consistent(deploy)
    assert deployed_manifest(deploy)["version"] == v1


def test_a_missing_reload_notice_is_rewritten(store):
    deploy = store / "deploy"
    registry.promote(NAME, register_constant(store, 1), "first")
    reconcile(NAME, deploy)
    sequence = json.loads((deploy / RELOAD_FILE).read_text())["sequence"]
    (deploy / RELOAD_FILE).write_text(json.dumps({"version": "0", "sequence": sequence}))
    assert reconcile(NAME, deploy).changed
    notice = json.loads((deploy / RELOAD_FILE).read_text())
    assert notice["version"] == "1" and notice["sequence"] == sequence + 1
    assert not reconcile(NAME, deploy).changed  # and then it is quiet


# -- arguments and the quality floor -------------------------------------------------------------


@pytest.mark.parametrize("candidate", ["abc", "-1", "ES-v4", "0", "runs:/0123456789abcdef/policy"])
def test_junk_candidates_are_errors_and_register_nothing(store, candidate):
    from pipelines import promote

    with pytest.raises(ValueError, match="expected a version number|runs:/0123456789abcdef"):
        promote.main(config(store), candidate)
    assert MlflowClient().search_model_versions(f"name='{NAME}'") == []


def test_promote_cli_junk_candidate_exits_2(store):
    out = run_module([sys.executable, "-m", "pipelines.promote", "--candidate", "abc", "--config",
                      str(ROOT / "conf" / "smoke.yaml")], cwd=store)
    assert out.returncode == 2 and "--candidate 'abc': expected a version number" in out.stderr
    assert "Traceback" not in out.stderr
    assert MlflowClient().search_model_versions(f"name='{NAME}'") == []


def test_rollback_only_to_a_former_production_version_unless_forced(store):
    from pipelines import rollback

    deploy = store / "deploy"
    v1, v2, v3 = (register_constant(store, a) for a in (1, 2, 1))
    cfg = config(store)
    for v in (v1, v2):
        registry.promote(NAME, v, f"promote {v}")
    with pytest.raises(ValueError, match=f"version {v3} was never Production"):
        rollback.main(cfg, v3)
    with pytest.raises(ValueError, match="needs a reason"):
        rollback.main(cfg, v3, force=True)
    with pytest.raises(ValueError, match="expected a version number"):
        rollback.main(cfg, "abc")
    junk = str(MlflowClient().create_model_version(NAME, source=str(store / "no-such-model")).version)
    with pytest.raises(ValueError, match=f"nt8-agent v{junk}: (cannot be downloaded|does not load)"):
        rollback.main(cfg, junk, "try it", force=True)
    assert stage_and_alias() == (v2, v2)
    out = rollback.main(cfg, v3, "known good build", force=True)
    assert out["event"]["reason"] == "forced: known good build" and stage_and_alias() == (v3, v3)
    assert deployed_manifest(deploy)["version"] == v3
    rollback.main(cfg, v1, "former Production")  # in the history: no force needed
    assert stage_and_alias() == (v1, v1)


def test_rollbacks_go_further_back_and_never_return_to_the_version_they_left(store):
    """Two rollbacks used to cancel each other: the second went back to the version the first had
    just rolled back from. The history reads as a stack now."""
    v1, v2, v3, v4 = (register_constant(store, a) for a in (1, 2, 1, 2))
    for v in (v1, v2, v3):
        registry.promote(NAME, v, f"promote {v}")
    assert registry.rollback(NAME)["version"] == v2
    assert registry.rollback(NAME)["version"] == v1
    with pytest.raises(ValueError, match="nothing to roll back to"):
        registry.rollback(NAME)
    registry.promote(NAME, v3, "again")
    assert registry.rollback_target(NAME) == v1
    registry.rollback(NAME, to_version=v4, reason="hotfix", force=True)  # pushed: back from it goes to v3
    assert registry.rollback_target(NAME) == v3
    with registry._stage_api():  # Production moved by hand in the UI: back to what the tooling deployed
        MlflowClient().transition_model_version_stage(NAME, v2, "Production", archive_existing_versions=True)
    assert registry.rollback_target(NAME) == v4


def test_two_rollbacks_of_the_same_version_at_once_roll_back_once(store):
    """Two operators (or an operator and the drift monitor) both rolling back bad v3: with
    --from-version the second is refused instead of rolling back v2 as well."""
    v1, v2, v3 = (register_constant(store, a) for a in (1, 2, 1))
    for v in (v1, v2, v3):
        registry.promote(NAME, v, f"promote {v}")
    (store / "conf.yaml").write_text(f"promotion:\n  deploy_dir: {store / 'deploy'}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.rollback", "--config", str(store / "conf.yaml"),
                               "--from-version", v3, "--reason", "bad fills"],
                              cwd=store, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    assert any(f"Production is version {v2}, not {v3}" in err for _, err in results)
    assert stage_and_alias() == (v2, v2)
    assert [e["action"] for e in registry.history(NAME)] == ["promote"] * 3 + ["rollback"]


def test_a_rollback_target_that_no_longer_loads_is_refused_before_the_stage_moves(store):
    from pipelines import rollback

    good = register_constant(store, 1)
    junk = str(MlflowClient().create_model_version(NAME, source=str(store / "gone")).version)
    registry.promote(NAME, junk, "once Production (its files since lost)")
    registry.promote(NAME, good, "now")
    with pytest.raises(ValueError, match=f"nt8-agent v{junk}: (cannot be downloaded|does not load)"):
        rollback.main(config(store))
    assert stage_and_alias() == (good, good) and registry.history(NAME)[-1]["version"] == good


def test_the_first_candidate_must_beat_flat(store):
    """A random policy used to be promoted into an empty registry; the demo deployed a Sharpe of
    -29.6. With the floor (the default) a candidate must beat flat as it must beat Production."""
    from pipelines import promote

    short, long_ = register_constant(store, 0), register_constant(store, 2)
    floor = config(store, "promotion.beat_flat=true")
    refused = promote.main(floor, short)
    assert refused.decision == "refused" and registry.production_version(NAME) is None
    assert any("vs flat" in r for r in refused.reasons) and any("PSR vs flat" in r for r in refused.reasons)
    tags = MlflowClient().get_model_version(NAME, short).tags
    assert tags["gate.decision"] == "refused" and "vs flat" in tags["gate.reasons"]
    assert tags["gate.run_id"] == refused.run_id
    promoted = promote.main(floor, long_)
    assert promoted.decision == "promoted" and promoted.metrics["gate/psr_vs_flat"] > 0.5
    assert MlflowClient().get_model_version(NAME, long_).tags["gate.decision"] == "promoted"


def test_cleanup_takes_refused_versions_first(store):
    from pipelines import promote

    good = [register_constant(store, 2) for _ in range(3)]
    registry.promote(NAME, good[0], "first")
    registry.promote(NAME, good[1], "second")
    bad = register_constant(store, 0)  # the newest version, refused
    assert promote.main(config(store, "promotion.beat_flat=true"), bad).decision == "refused"
    assert registry.cleanup(NAME, keep=2) == [bad]  # refused first, though newest; keep 2 of the rest
    stages = {str(mv.version): mv.current_stage for mv in MlflowClient().search_model_versions(f"name='{NAME}'")}
    assert stages[bad] == "Archived" and stages[good[2]] == "None"


def test_a_candidate_that_cannot_be_deployed_is_refused_before_the_stage_moves(store):
    """It evaluates (it predicts), but it has no input example to check a deploy with: Production
    must not name a model that reconcile would refuse."""
    from pipelines import promote

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="policy", python_model=str(store / "constant_model.py"),
                                       model_config={"action": 2}, pip_requirements=["mlflow", "numpy"])
    bare = str(mlflow.register_model(info.model_uri, NAME).version)
    result = promote.main(config(store), bare)
    assert result.decision == "refused" and result.reasons[0].startswith("not deployable: nt8-agent v1: the model has no")
    assert registry.production_version(NAME) is None and not (store / "deploy" / "current").exists()


def test_two_trainings_registering_at_once_both_count_their_candidates(store):
    """The count of candidates tried (the Deflated Sharpe's N) is read, added to and written under
    the registry lock: two processes recording 15 trainings each at once lose none."""
    versions = [register_constant(store, a) for a in (0, 1)]
    script = textwrap.dedent(f"""
        import sys
        from mlproject import registry
        for _ in range(15):
            registry.record_trials({NAME!r}, sys.argv[1], 2)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    procs = [subprocess.Popen([sys.executable, "-c", script, v], cwd=store, env=env, stderr=subprocess.PIPE, text=True)
             for v in versions]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert MlflowClient().get_registered_model(NAME).tags[registry.TRIALS_TAG] == "60"
    assert registry.trials_of(NAME, versions[0]) in range(2, 61) and registry.trials_of(NAME, "999") == 1
