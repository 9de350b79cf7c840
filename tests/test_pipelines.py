"""Entry points end to end: python -m and mlflow run, against a real sqlite MLflow store."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from conftest import ROOT, run_module
from mlproject.config import load_config


def _nt8_minute_file(path, n=400):
    from mlproject.data import synthetic_bars

    bars = synthetic_bars(n, seed=1)
    lines = [f"{ts:%Y%m%d %H%M%S};{r.open};{r.high};{r.low};{r.close};{int(r.volume)}"
             for ts, r in zip(bars.index, bars.itertuples())]
    path.write_text("\n".join(lines) + "\n")
    return bars


def test_ingest_main_logs_dataset_and_writes_parquet(tmp_path, mlflow_store):
    from pipelines import ingest

    src = tmp_path / "ES 03-24.Last.txt"
    bars = _nt8_minute_file(src)
    cfg = load_config(None, [f"data.source={src}", f"data.output_dir={tmp_path / 'out'}"])
    result = ingest.main(cfg)
    written = pd.read_parquet(result.path)
    pd.testing.assert_frame_equal(written, bars, check_freq=False, check_names=False)
    run = mlflow.get_run(result.run_id)
    assert run.data.metrics["data/n_bars"] == 400
    assert run.data.tags["data.format"] == "nt8_minute"
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "ES 03-24.Last"
    assert inputs[0].dataset.digest == run.data.tags["data.digest"]
    assert run.data.params["env.instrument.preset"] == "ES"


def test_ingest_cli_bad_file_exits_nonzero_with_line(tmp_path, mlflow_store):
    bad = tmp_path / "bad.txt"
    bad.write_text("20240102 093100;4750.25;4751;4749.5;4750.75;10\n"
                   "20240102 093200;4750.25;4749;4749.5;4750.75;10\n")
    out = run_module(["python", "-m", "pipelines.ingest", "--source", str(bad)], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "bad.txt" in out.stderr and "line 2" in out.stderr
    assert "Traceback" not in out.stderr
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "FAILED" and "line 2" in run.data.tags["error"]


SECOND_CYCLE = ("refused", ["sharpe -72.55 vs Production -47.1: improvement -25.45 is not > min_improvement 0",
                            "PSR vs Production's Sharpe 0.081 < min_psr 0.5",
                            "Deflated Sharpe vs Production 0.003 < min_dsr 0.5 (4 candidates tried for this model)",
                            "beat Production in 0 of 3 evaluation windows, < min_window_share 0.6"])
"""What the seeded second cycle decides (training, evaluation and the gate are all seeded)."""


def test_the_whole_cycle_bootstraps_paper_trades_annotates_retrains_and_gates(tmp_path, mlflow_store, monkeypatch,
                                                                               ray_session):
    """``--mode all`` on a fresh store with the demo profile: a first model (promoted, deployed),
    300 bars paper-traded through the bridge, annotated, a retrain warm-started from Production
    that the gate refuses (seeded numbers), a first reasoner adapter fine-tuned; then a re-run of
    ``retrain`` does nothing (the watermark), a failing step leaves Production as it was."""
    from mlproject.cycle import retrain as cycle_retrain
    from mlproject.experience import ExperienceBuffer
    from pipelines import orchestrate

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "conf" / "smoke.yaml", ["train.iterations=2"])
    result = orchestrate.main(cfg, "all")
    cycle_experiment = mlflow.get_run(result.run_id).info.experiment_id
    runs = [r for r in mlflow.search_runs([cycle_experiment], output_format="list")  # not the registry's history run
            if r.data.tags.get("pipeline.step") != "monitor"]  # nor the drift monitor's long-running run
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    assert {"cycle-all", "ingest", "train", "evaluate", "promote", "collect", "annotate"} <= set(by_name)
    assert len(by_name["train"]) == len(by_name["promote"]) == 2 and len(by_name["ingest"]) == 1  # bars loaded once
    assert all(r.data.tags["mlflow.parentRunId"] == result.run_id for r in runs if r.info.run_name != "cycle-all")
    first = result.bootstrap
    assert first.model_uri == "models:/nt8-agent/1"
    report = first.evaluate.reports["models:/nt8-agent/1"]
    evaluated = next(r for r in by_name["evaluate"] if r.data.tags["model_uri"] == "models:/nt8-agent/1")
    assert evaluated.data.metrics["eval/total_return"] == pytest.approx(report.summary()["total_return"])
    assert evaluated.data.metrics["baseline/flat/total_return"] == 0.0
    # Seeded: the first valid candidate is promoted (nothing in Production) and deployed.
    assert (first.promote.decision, first.promote.reasons) == ("promoted", ["nothing in Production: first valid candidate"])
    assert first.train.registered_version == "1"
    assert "parent_version" not in mlflow.MlflowClient().get_model_version("nt8-agent", "1").tags  # from scratch
    assert {i.dataset.name for i in next(r for r in by_name["train"] if r.info.run_id == first.train.run_id)
            .inputs.dataset_inputs} == {"train-split", "validation-split"}
    # Paper trading through the bridge with v1, annotated.
    paper = result.collect.paper
    assert paper.decisions == 300 and set(paper.model_versions) == {"1"}
    due = result.maintenance.due
    # window 16, vol_window 20: decisions from the 21st bar; the last one has no next bar
    assert due.experiences == 300 - 21 and due.retrain_due and due.annotated > 0
    # The retrain continues from the deployed policy; the gate refuses it (seeded).
    again = result.retrain
    child = mlflow.MlflowClient().get_model_version("nt8-agent", again.train.registered_version)
    assert str(child.version) == "2" and child.tags["parent_version"] == "1"
    assert child.tags["parent_uri"] == "models:/nt8-agent/1"  # Production then, downloaded once per cycle
    # Two validated checkpoints per training: the second version is the fourth candidate tried.
    assert (child.tags["trials.checkpoints"], child.tags["trials.lineage"]) == ("2", "4")
    assert (again.promote.decision, again.promote.reasons) == SECOND_CYCLE
    # One pass: the gate decided on the very reports the evaluate run logged (one backtest of each).
    gate_run = mlflow.get_run(again.promote.run_id).data.metrics
    eval_run = next(r for r in by_name["evaluate"] if r.data.tags["model_uri"] == "models:/nt8-agent/2").data.metrics
    assert gate_run["challenger/sharpe"] == eval_run["eval/sharpe"]
    # The quantities users compare across steps have the same names in the train, evaluate and
    # promote runs; the promote run's metrics are linked to the models it compared.
    from mlproject.registry import model_id_of

    headline = {"sharpe", "total_return", "max_drawdown", "n_trades"}
    assert headline <= set(gate_run) & set(eval_run) & set(mlflow.get_run(again.train.run_id).data.metrics)
    assert gate_run["sharpe"] == eval_run["sharpe"] == eval_run["eval/sharpe"]
    for version, key in (("2", "challenger/sharpe"), ("1", "production/sharpe")):
        model_id = model_id_of(f"models:/nt8-agent/{version}")
        assert key in {m.key for m in mlflow.get_logged_model(model_id).metrics if m.run_id == again.promote.run_id}
    assert json.loads((tmp_path / "deploy" / "current" / "manifest.json").read_text())["version"] == "1"
    # Fine-tuning: the first nt8-reasoner adapter (the tiny base of the demo profile), promoted, and
    # the reasoning engine answered with it.
    tuned = result.finetune
    assert (tuned.result.version, tuned.result.decision, tuned.engine_version) == ("1", "promoted", "1")
    cycle = mlflow.get_run(result.run_id)
    assert cycle.data.tags["cycle.retrain"] == "refused" and cycle.data.tags["cycle.finetune"] == "promoted"
    # The UI opens the experiment in its model-training view (runs list), not the GenAI one.
    assert mlflow.get_experiment(cycle.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert "cycle/reasoner_sample.json" in {f.path for f in mlflow.MlflowClient().list_artifacts(result.run_id, "cycle")}
    assert cycle.data.tags["cycle.created_versions"] == "1,2" and cycle.data.tags["cycle.compared_with"] == "v1"
    assert "experiences" in {i.tags[0].value for i in cycle.inputs.dataset_inputs if i.tags}
    assert "refused" in result.summary and "make ui" in result.summary
    assert f"/#/experiments/{cycle.info.experiment_id}/runs?workflowType=machine_learning" in result.summary
    state = json.loads((tmp_path / "data" / "orchestrator" / "state.json").read_text())
    assert state["retrain"]["version"] == "2" and state["retrain"]["experiences_seen"] == 279

    # A re-run finds nothing new: no retrain twice on the same experiences.
    rerun = orchestrate.main(cfg, "retrain")
    assert rerun.retrain is None
    assert mlflow.get_run(rerun.run_id).data.tags["cycle.retrain"] == "not due"
    assert len(mlflow.MlflowClient().search_model_versions("name='nt8-agent'")) == 2

    # Review: the live versions compared on the same bars, the refused one archived (never Production).
    reviewed = orchestrate.main(cfg, "review").review
    assert reviewed.versions == ["2", "1"] and reviewed.archived == ["2"]
    compare = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
               if r.info.run_name == "compare"]
    assert len(compare) == 1 and compare[0].data.tags["mlflow.parentRunId"] == mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.mlflow.runName = 'cycle-review'", output_format="list")[0].info.run_id
    assert mlflow.MlflowClient().get_model_version("nt8-agent", "1").current_stage == "Production"

    # The loop runs each mode when its cadence has passed, and not again before.
    looped = load_config(ROOT / "conf" / "smoke.yaml", ["train.iterations=2", "continuous_learning.paper_bars=null",
                                                       "continuous_learning.review_every=30d"])
    assert [m for m, _ in orchestrate.loop(looped, max_rounds=1, tick_s=0)] == ["maintenance", "retrain", "finetune", "review"]
    assert orchestrate.loop(looped, max_rounds=1, tick_s=0) == []

    # A failing step: Production untouched, the watermark untouched, the run says which step.
    def broken(*args, **kwargs):
        raise RuntimeError("injected training failure")

    real_train = cycle_retrain.train_policy
    monkeypatch.setattr(cycle_retrain, "train_policy", broken)
    with pytest.raises(RuntimeError, match="injected"):
        orchestrate.main(cfg, "retrain", force=True)
    failed = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
              if r.info.run_name == "cycle-retrain" and r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["cycle.failed_step"] == "train"
    after = json.loads((tmp_path / "data" / "orchestrator" / "state.json").read_text())
    assert after["retrain"] == state["retrain"]
    assert json.loads((tmp_path / "deploy" / "current" / "manifest.json").read_text())["version"] == "1"

    # The offline pass: MARWIL on the buffer's 279 experiences (high-value ones x3) from Production
    # v1, then PPO from its result, in one Ray session; its own child run says what it read.
    monkeypatch.setattr(cycle_retrain, "train_policy", real_train)
    offline_cfg = load_config(ROOT / "conf" / "smoke.yaml", [
        "train.iterations=1", "continuous_learning.offline_pass=marwil", "continuous_learning.offline_iterations=2"])
    done = orchestrate.main(offline_cfg, "retrain", force=True).retrain
    high = len(ExperienceBuffer("data/experience_buffer").high_value(0.7, ["experience_id"]))
    assert 0 < high < 279
    assert (done.offline.experiences, done.offline.high_value, done.offline.rows) == (279, high, 279 + 2 * high)
    offline_run = next(r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                       if r.info.run_name == "offline")
    assert offline_run.data.params["offline.start"] == "models:/nt8-agent/1"
    assert offline_run.data.metrics["offline/rows"] == 279 + 2 * high and "offline/policy_loss" in offline_run.data.metrics
    grandchild = mlflow.MlflowClient().get_model_version("nt8-agent", done.train.registered_version)
    assert grandchild.tags["parent_uri"] == "offline pass (marwil) from models:/nt8-agent/1"
    assert grandchild.tags["parent_version"] == "1"


def test_a_retrain_learns_from_the_bars_its_experiences_came_from_plus_history():
    from mlproject.data import synthetic_bars
    from mlproject.cycle.state import retrain_window

    bars = synthetic_bars(1000, seed=1)
    assert retrain_window(bars, None, bars.index[100]) == (bars, "")  # null: every bar
    newest, note = retrain_window(bars, 200, None)
    assert newest.index[0] == bars.index[800] and note == ""  # forced, no new experiences: the newest 200
    # Experiences from bar 500 on: their bars plus 200 bars of history, to the newest bar.
    window, _ = retrain_window(bars, 200, bars.index[500])
    assert window.index[0] == bars.index[300] and window.index[-1] == bars.index[-1]
    assert retrain_window(bars, 200, bars.index[950])[0].index[0] == bars.index[750]  # at least the newest 200
    naive = bars.index[500].tz_convert("UTC").tz_localize(None) if bars.index.tz else bars.index[500]
    assert retrain_window(bars, 200, naive)[0].index[0] == bars.index[300]  # a naive time is read as UTC
    later, note = retrain_window(bars, 200, bars.index[-1] + pd.Timedelta("1D"))
    assert later.index[0] == bars.index[800] and "after the market data ends" in note


def test_thresholds_below_do_nothing_and_a_second_orchestrator_is_refused(tmp_path, mlflow_store):
    import subprocess
    import sys
    import time

    from mlproject.cycle.state import CycleState, due
    from mlproject.experience import ExperienceBuffer
    from pipelines import orchestrate
    from test_experience import experiences

    cfg = load_config(ROOT / "conf" / "smoke.yaml", [f"continuous_learning.experience_storage={tmp_path / 'b'}",
                                                     f"continuous_learning.state_dir={tmp_path / 'state'}"])
    buffer = ExperienceBuffer(tmp_path / "b")
    buffer.add(experiences(49))  # retrain_frequency is 50 in the demo profile
    buffer.flush()
    result = orchestrate.main(cfg, "retrain")
    assert result.retrain is None
    state = CycleState(tmp_path / "state")
    found = due(cfg, buffer, state)
    assert (found.new_since_retrain, found.retrain_due) == (49, False)
    buffer.add(experiences(1, prefix="x"))
    buffer.flush()
    assert due(cfg, buffer, state).retrain_due  # 50: due (the retrain itself is tested above)
    buffer.add(experiences(500, start="2024-01-05 14:31", prefix="y"))  # 550 > experience_buffer_size 500
    buffer.flush()
    done = orchestrate.main(cfg, "maintenance").maintenance
    assert done.compaction["kept"] == 500 and len(buffer) == 500
    assert done.due.experiences == 500 and done.reconcile is None  # nothing in Production
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from mlproject.locks import file_lock; "
                               "ctx = file_lock(sys.argv[2], 5, 'test'); ctx.__enter__(); print('held', flush=True); "
                               "time.sleep(60)", str(ROOT), str(tmp_path / "state" / "orchestrator.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.time()
        out = run_module(["python", "-m", "pipelines.orchestrate", "--mode", "maintenance", "--config",
                          str(ROOT / "conf" / "smoke.yaml"), "--set", f"continuous_learning.state_dir={tmp_path / 'state'}",
                          "--set", f"continuous_learning.experience_storage={tmp_path / 'b'}"], tmp_path)
        assert out.returncode == 2 and "another orchestrator run" in out.stderr, out.stderr[-2000:]
        assert time.time() - started < 60
    finally:
        holder.kill()


@pytest.mark.parametrize("entry, params", [
    ("ingest", ["-P", "source=synthetic", "-P", "overrides=data.synthetic.n_bars=500 env.window=8"]),
    ("main", ["-P", "overrides=data.synthetic.n_bars=800 train.iterations=1 continuous_learning.paper_bars=60"]),
])
def test_mlflow_run_entry_points(tmp_path, mlflow_store, entry, params):
    # `mlflow run` runs the entry point in the project directory: outputs go to tmp_path explicitly.
    params = [p + f" data.output_dir={tmp_path / 'bars'} promotion.deploy_dir={tmp_path / 'deploy'}"
              f" continuous_learning.experience_storage={tmp_path / 'buffer'} continuous_learning.state_dir={tmp_path / 'state'}"
              f" finetune.tiny_dir={tmp_path / 'tiny'} finetune.output_dir={tmp_path / 'ft'}"
              if p.startswith("overrides=") else p for p in params]
    out = run_module(["mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local", *params], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    runs = [r for r in runs if "registered_model" not in r.data.tags  # the registry's history run
            and r.data.tags.get("pipeline.step") != "monitor"]  # the drift monitor's run
    if entry == "main":  # the steps are child runs in their parent's experiment
        assert len({r.info.experiment_id for r in runs}) == 1
        assert {"cycle-all", "ingest", "train", "evaluate", "promote", "collect", "annotate"} <= {r.info.run_name for r in runs}
    if entry == "ingest":
        assert runs[0].data.metrics["data/n_bars"] == 500
        assert runs[0].data.params["env.window"] == "8"


def test_the_walk_forward_simulation_never_reads_a_bar_before_its_time(tmp_path, mlflow_store, ray_session):
    """Changing every bar after the second decision point changes nothing before it: not the
    models trained at the first two points, not the first period's trading; the second period is
    traded on the changed bars. The simulation's versions never touch the real model name."""
    import numpy as np

    from mlproject.data import load_source
    from pipelines import simulate

    sets = ["train.iterations=1", "data.synthetic.n_bars=1400", "continuous_learning.evaluation_episodes=2",
            "train.val_windows=2", f"data.output_dir={tmp_path / 'bars'}"]
    cfg = load_config(ROOT / "conf" / "smoke.yaml", sets)
    first = simulate.main(cfg, periods=2, start_fraction=0.6)
    a = first.simulate
    bars = load_source(cfg)
    point = a.points[1]
    changed = bars.copy()
    changed.iloc[point:, :4] *= 1.01  # a different future (still valid bars)
    changed.to_parquet(tmp_path / "changed.parquet")
    b = simulate.main(cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "source": str(tmp_path / "changed.parquet")})}), periods=2, start_fraction=0.6).simulate
    assert a.points == b.points and a.decisions == b.decisions
    for agent in a.reports:
        before = [w.equity.to_numpy() for w in (a.reports[agent].windows[0], b.reports[agent].windows[0])]
        assert np.array_equal(*before), agent
    assert not np.array_equal(a.reports["buy_hold"].windows[1].equity.to_numpy(),
                              b.reports["buy_hold"].windows[1].equity.to_numpy())
    run = mlflow.get_run(first.run_id)
    assert {"sim/learning/total_return", "sim/never_retrained/total_return", "sim/buy_hold/total_return"} <= set(
        run.data.metrics)
    assert "sim/equity.png" in {f.path for f in mlflow.MlflowClient().list_artifacts(first.run_id, "sim")}
    names = {m.name for m in mlflow.MlflowClient().search_registered_models()}
    assert "nt8-agent" not in names and all(n.startswith("nt8-agent-sim-") for n in names)


def test_when_no_model_passes_the_gate_the_agent_stays_flat_and_the_simulation_goes_on(tmp_path, mlflow_store,
                                                                                      ray_session):
    """"No model" is a state: with a gate nothing can pass (no edge found), the walk-forward used to
    stop with an error at the first decision point; now the learning and never-retrained agents
    trade flat, flat is an agent of its own, and the run and the summary say which periods and why."""
    from pipelines import simulate

    sets = ["train.iterations=1", "data.synthetic.n_bars=1400", "continuous_learning.evaluation_episodes=2",
            "train.val_windows=2", f"data.output_dir={tmp_path / 'bars'}", "promotion.min_trades=1000000"]
    result = simulate.main(load_config(ROOT / "conf" / "smoke.yaml", sets), periods=2, start_fraction=0.6)
    sim = result.simulate
    assert sim.decisions == ["refused", "refused"]
    assert [p.split(":")[0] for p in sim.flat_periods] == ["period 1", "period 2"]
    assert all("no model passed the gate" in p and "< min_trades 1000000" in p for p in sim.flat_periods)
    for agent in ("learning", "never_retrained", "flat"):
        assert (sim.metrics[agent]["total_return"], sim.metrics[agent]["n_trades"]) == (0.0, 0.0), agent
    assert sim.metrics["buy_hold"]["total_return"] != 0.0
    assert "the learning agent stayed flat (no model in Production): period 1: no model passed" in result.summary
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sim.flat_periods"].startswith("period 1: no model")
    assert run.data.metrics["sim/flat/total_return"] == 0.0



def test_several_seeds_walk_forward_once_each_in_runs_tagged_with_their_seed(tmp_path, mlflow_store, ray_session):
    """--seeds 2: two walk-forwards (seed and seed + 1), each its own cycle-simulate run tagged
    sim.seed, trained with its own seed."""
    from pipelines import simulate

    sets = ["train.iterations=1", "data.synthetic.n_bars=1400", "continuous_learning.evaluation_episodes=2",
            "train.val_windows=2", f"data.output_dir={tmp_path / 'bars'}", "promotion.min_trades=1000000", "seed=7"]
    results = simulate.main_seeds(load_config(ROOT / "conf" / "smoke.yaml", sets), periods=2, start_fraction=0.6,
                                  seeds=2)
    runs = [mlflow.get_run(r.run_id) for r in results]
    assert [r.data.tags["sim.seed"] for r in runs] == ["7", "8"] and all(r.info.status == "FINISHED" for r in runs)
    trained = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string="run_name = 'train'")
    assert sorted({r.data.params["seed"] for r in trained}) == ["7", "8"]


def test_on_a_drifting_market_the_learning_agent_beats_the_never_retrained_one(tmp_path, mlflow_store, ray_session):
    """A planted momentum signal reverses half way; the first model learns momentum. Retrained on
    its recent past at the second decision point, the learning agent adapts and the gate promotes
    it; the never-retrained one keeps trading momentum into the reversal (seeded: -5% vs -29%)."""
    from pipelines import orchestrate

    cfg = load_config(ROOT / "conf" / "simulate.yaml", [
        "data.synthetic.n_bars=3000", "data.synthetic.momentum_flip_at=0.5", "train.iterations=10",
        "continuous_learning.retrain_history_bars=800", f"data.output_dir={tmp_path / 'bars'}"])
    result = orchestrate.main(cfg, "simulate", periods=2, start_fraction=0.5).simulate
    m = result.metrics
    assert result.decisions == ["promoted", "promoted"]
    assert m["learning"]["total_return"] > m["never_retrained"]["total_return"] + 0.1, m
    assert result.paired["p_value"] < 0.01
    with pytest.raises(ValueError, match="before the first decision point"):
        orchestrate.main(cfg, "simulate", periods=2, start_fraction=0.001)
