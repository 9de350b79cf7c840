"""Every notebook runs top to bottom against the current code."""

from __future__ import annotations

import pytest

from conftest import ROOT, run_module, use_store

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

FIXTURES = {"registry_and_runs.ipynb": "trained_store_and_other_runs", "experience_buffer.ipynb": "filled_buffer",
            "finetune_curves.ipynb": "finetuned_store", "walk_forward.ipynb": "simulated_store"}
"""The data each notebook reads, made by the real pipelines under tmp_path (the kernel inherits
MLFLOW_TRACKING_URI and NT8_EXPERIENCE_STORAGE)."""

PLOTTED = ("experience_buffer.ipynb", "finetune_curves.ipynb", "walk_forward.ipynb")
"""Notebooks that show their plots as PNGs: with data, they must show at least one."""

SIM_SETTINGS = ["data.synthetic.n_bars=1200", "train.iterations=1", "train.train_batch_size=200",
                "train.minibatch_size=100", "train.num_epochs=1", "train.val_windows=2",
                "continuous_learning.retrain_history_bars=400", "continuous_learning.evaluation_episodes=2",
                "promotion.beat_flat=false", "promotion.min_trades=0"]
"""conf/simulate.yaml shrunk to a two-period walk forward of ~15-25 s: one PPO iteration per point,
and a gate the first barely trained model always passes (simulate stops when none does)."""


@pytest.fixture
def filled_buffer(tmp_path, monkeypatch):
    """A buffer of three days: paper trades of version 1 annotated by the rules, unannotated live
    experiences and pre-annotated backtest ones of version 2."""
    from test_experience import experiences
    from test_finetune import trades_buffer

    buffer = trades_buffer(tmp_path / "buffer", 12)
    buffer.add(experiences(20, start="2024-01-03 14:31", version="2", source="live", prefix="l", pnl=-2.0))
    buffer.add(experiences(10, start="2024-01-04 14:31", version="2", source="backtest", prefix="k", quality=0.9,
                           pnl=3.0))
    buffer.flush()
    monkeypatch.setenv("NT8_EXPERIENCE_STORAGE", str(tmp_path / "buffer"))
    return buffer


@pytest.fixture
def trained_store_and_other_runs(trained, tmp_path, monkeypatch):
    """A copy of the session's trained store (artifacts stay where they are) with two more train
    runs the registry notebook must not list: a FAILED one and a simulation's (registered under
    ``nt8-agent-sim-...``). Returns (the trained run's id, the other two run ids)."""
    import shutil

    import mlflow

    _, result, _, folder = trained
    shutil.copy(folder / "mlflow.db", tmp_path / "mlflow.db")
    use_store(monkeypatch, f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_run(result.run_id).info.experiment_id
    others = []
    for status, model in (("FAILED", "nt8-agent"), ("FINISHED", "nt8-agent-sim-0123abcd")):
        run = client.create_run(experiment, tags={"pipeline.step": "train"})
        client.log_param(run.info.run_id, "train.register_model", model)
        client.set_terminated(run.info.run_id, status)
        others.append(run.info.run_id)
    yield result.run_id, others
    mlflow.set_tracking_uri(None)


@pytest.fixture
def finetuned_store(tmp_path, mlflow_store):
    """One fine-tuning run of the tiny model on rule-annotated trades, its adapter promoted."""
    from mlproject.reasoner.tiny import build_tiny_model
    from pipelines import finetune
    from test_finetune import _cfg, trades_buffer

    tiny = build_tiny_model(tmp_path / "tiny")
    trades_buffer(tmp_path / "buffer", 10)
    result = finetune.main(_cfg(tmp_path, tiny, **{"finetune.max_steps": 4, "finetune.eval_steps": 2}))
    assert result.decision == "promoted"
    return result


@pytest.fixture
def simulated_store(tmp_path, mlflow_store, ray_session):
    """A two-period walk-forward simulation (conf/simulate.yaml shrunk: SIM_SETTINGS)."""
    from mlproject.config import load_config
    from pipelines import simulate

    cfg = load_config(ROOT / "conf" / "simulate.yaml", [*SIM_SETTINGS, f"data.output_dir={tmp_path / 'bars'}"])
    return simulate.main(cfg, periods=2, start_fraction=0.5).simulate


def execute(notebook, cwd) -> list[str]:
    """Run every cell (on past an error, so every failing cell is reported); return one line
    per cell that failed or did not run."""
    from nbclient import NotebookClient

    NotebookClient(notebook, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    problems = []
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("execution_count") is None:
            problems.append(f"cell {i}: did not run")
        problems += [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for o in cell.get("outputs", [])
                     if o.output_type == "error"]
    return problems


def outputs(notebook) -> list:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def shown_text(notebook) -> str:
    return "\n".join(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
                     for o in outputs(notebook))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch, request):
    """Each notebook runs top to bottom against the data it reads (FIXTURES): the registry
    notebook against a store with a trained, registered model, the buffer notebook against a
    filled buffer, the fine-tuning one against a store with a fine-tuning run, the walk-forward
    one against a store with a simulation."""
    import nbformat

    store = request.getfixturevalue(FIXTURES[path.name]) if path.name in FIXTURES else None
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(path, as_version=4)
    problems = execute(notebook, path.parent)
    assert not problems, problems
    assert any(o.output_type in ("execute_result", "display_data") for o in outputs(notebook)), \
        "the notebook showed nothing"
    if path.name in PLOTTED:  # it found the data: the empty-store messages show no plot
        assert any("image/png" in o.get("data", {}) for o in outputs(notebook)), shown_text(notebook)[-2000:]
    if path.name == "registry_and_runs.ipynb":
        import re

        trained_run, others = store
        shown = shown_text(notebook)
        assert trained_run in shown and not any(run in shown for run in others), shown[-2000:]
        assert "1 finished training runs of nt8-agent; not shown: 2" in shown
        gaps = [int(n) for n in re.findall(r"lines broken at (\d+) session gaps", shown)]
        assert gaps and min(gaps) > 0, shown[-2000:]  # RTH minute bars: the equity lines break overnight


@pytest.mark.parametrize(("name", "says"), [
    pytest.param("experience_buffer.ipynb", "does not exist", id="experience_buffer.ipynb"),
    pytest.param("finetune_curves.ipynb", "no fine-tuning run yet", id="finetune_curves.ipynb"),
])
def test_notebooks_say_what_is_missing(name, says, tmp_path, mlflow_store, monkeypatch):
    """On an empty store and a missing buffer the notebooks run through and say what is missing
    (and which command makes it), and the buffer notebook does not create the buffer's folder."""
    import nbformat

    monkeypatch.setenv("NT8_EXPERIENCE_STORAGE", str(tmp_path / "no-buffer"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    problems = execute(notebook, ROOT / "notebooks")
    assert not problems, problems
    assert says in shown_text(notebook)
    assert not (tmp_path / "no-buffer").exists()


def test_a_failing_cell_is_reported(tmp_path, monkeypatch):
    """The check above can fail: an error in a cell is caught, and so are the cells it stopped."""
    import nbformat

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                               nbformat.v4.new_code_cell("raise ValueError('broken cell')"),
                                               nbformat.v4.new_code_cell("x + 1")])
    assert execute(notebook, tmp_path) == ["cell 1: ValueError: broken cell"]


def test_documented_nbconvert_command_runs_a_notebook(tmp_path, mlflow_store):
    """docs/quickstart.md's `jupyter nbconvert --to notebook --execute notebooks/<nb>.ipynb --output-dir
    DIR`, from the repository root, on an empty store: the walk-forward notebook runs through and
    says which command makes its data."""
    import nbformat

    out = run_module(["jupyter", "nbconvert", "--to", "notebook", "--execute", "notebooks/walk_forward.ipynb",
                      "--output-dir", str(tmp_path / "out")], cwd=ROOT, env={"MLFLOW_TRACKING_URI": mlflow_store},
                     timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    notebook = nbformat.read(tmp_path / "out" / "walk_forward.ipynb", as_version=4)
    assert not [o for o in outputs(notebook) if o.output_type == "error"]
    assert "python -m pipelines.simulate --config conf/simulate.yaml --periods 5" in shown_text(notebook)
