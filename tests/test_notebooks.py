"""Every notebook runs top to bottom against the current code."""

from __future__ import annotations

import pytest

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch, request):
    """Each notebook runs top to bottom; the registry notebook against a store with a trained,
    registered model (the kernel inherits MLFLOW_TRACKING_URI)."""
    import nbformat

    if "registry" in path.name:
        request.getfixturevalue("trained_store")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(path, as_version=4)
    problems = execute(notebook, path.parent)
    assert not problems, problems
    assert any(o.output_type in ("execute_result", "display_data") for c in notebook.cells
               if c.cell_type == "code" for o in c.get("outputs", [])), "the notebook showed nothing"


def test_a_failing_cell_is_reported(tmp_path, monkeypatch):
    """The check above can fail: an error in a cell is caught, and so are the cells it stopped."""
    import nbformat

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                               nbformat.v4.new_code_cell("raise ValueError('broken cell')"),
                                               nbformat.v4.new_code_cell("x + 1")])
    assert execute(notebook, tmp_path) == ["cell 1: ValueError: broken cell"]
