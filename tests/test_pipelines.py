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


SECOND_CYCLE = ("refused", ["sharpe -64.09 vs Production -47.1: improvement -17 is not > min_improvement 0",
                            "PSR vs Production's Sharpe 0.142 < min_psr 0.5"])
"""What the seeded second cycle decides (training, evaluation and the gate are all seeded)."""


def test_orchestrate_all_runs_the_existing_cycle(tmp_path, mlflow_store, monkeypatch, ray_session):
    from pipelines import orchestrate

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "conf" / "smoke.yaml", ["train.iterations=2"])
    result = orchestrate.main(cfg, "all")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    names = {r.info.run_name: r for r in runs}
    assert {"cycle-all", "ingest", "train", "evaluate", "promote"} <= set(names)
    for step in ("ingest", "train", "evaluate", "promote"):
        assert names[step].data.tags["mlflow.parentRunId"] == result["run_id"]
    assert result["model_uri"] == "models:/nt8-agent/1"
    evaluated = names["evaluate"]
    assert evaluated.data.tags["model_uri"] == "models:/nt8-agent/1"
    report = result["evaluate"].reports["models:/nt8-agent/1"]
    assert evaluated.data.metrics["eval/total_return"] == pytest.approx(report.summary()["total_return"])
    assert evaluated.data.metrics["baseline/flat/total_return"] == 0.0
    decision = result["promote"]
    # Seeded: the first valid candidate is promoted (nothing in Production) and deployed.
    assert (decision.decision, decision.reasons) == ("promoted", ["nothing in Production: first valid candidate"])
    assert names["promote"].data.tags["decision"] == "promoted"
    assert json.loads((tmp_path / "deploy" / "current" / "manifest.json").read_text())["version"] == "1"
    train_inputs = {i.dataset.name for i in names["train"].inputs.dataset_inputs}
    assert train_inputs == {"train-split", "validation-split"}
    assert "parent_version" not in names["train"].data.tags  # nothing deployed yet: trained from scratch
    again = orchestrate.main(cfg, "all")  # the next cycle continues from the deployed policy
    child = mlflow.MlflowClient().get_model_version("nt8-agent", again["train"].registered_version)
    assert child.tags["parent_version"] == "1" and child.tags["parent_uri"] == "models:/nt8-agent/Production"
    assert (again["promote"].decision, again["promote"].reasons) == SECOND_CYCLE


@pytest.mark.parametrize("entry, params", [
    ("ingest", ["-P", "source=synthetic", "-P", "overrides=data.synthetic.n_bars=500 env.window=8"]),
    ("main", ["-P", "overrides=data.synthetic.n_bars=800 train.iterations=1"]),
])
def test_mlflow_run_entry_points(tmp_path, mlflow_store, entry, params):
    # `mlflow run` runs the entry point in the project directory: outputs go to tmp_path explicitly.
    params = [p + f" data.output_dir={tmp_path / 'bars'} promotion.deploy_dir={tmp_path / 'deploy'}"
              if p.startswith("overrides=") else p for p in params]
    out = run_module(["mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local", *params], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    if entry == "main":  # the steps are child runs in their parent's experiment
        assert len({r.info.experiment_id for r in runs}) == 1 and len(runs) == 5
    if entry == "ingest":
        assert runs[0].data.metrics["data/n_bars"] == 500
        assert runs[0].data.params["env.window"] == "8"
