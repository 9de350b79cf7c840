"""The dependency direction of the code base, checked by walking every module's imports (`ast`):
applications (`pipelines/`, `registry_hooks/`) over the library (`mlproject/`, with `envs/` as its
environment part); arrows never point the other way."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

LIBRARY = ("mlproject", "envs")
APPLICATIONS = ("pipelines", "registry_hooks")
DRIVER = "pipelines.orchestrate"
"""Chains the steps: it may run other steps (their ``main``, the monitor's ``check``), and only it."""
DRIVER_USES = {"main", "check"}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for top in LIBRARY + APPLICATIONS for p in (ROOT / top).rglob("*.py")}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(project module imported, whether the import sits inside a function) for each import;
    ``if TYPE_CHECKING:`` blocks are not imports at run time and are skipped."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, in_function) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in MODULES else node.module, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return [(m, f) for m, f in found if m.split(".")[0] in LIBRARY + APPLICATIONS]


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_library_never_imports_an_application():
    wrong = [(m, d) for m, deps in GRAPH.items() if _top(m) in LIBRARY for d, _ in deps if _top(d) in APPLICATIONS]
    assert not wrong, wrong


def test_applications_share_code_only_through_the_library():
    wrong = []
    for module, deps in GRAPH.items():
        if _top(module) not in APPLICATIONS:
            continue
        for dep, _ in deps:
            if _top(dep) in APPLICATIONS and dep != _top(module) and not (module == DRIVER and dep.startswith("pipelines.")):
                wrong.append((module, dep))
    assert not wrong, wrong


def test_the_driver_only_runs_other_steps():
    """The driver imports steps to run them, never to borrow their helpers (those belong in the
    library): every attribute it reads from a step module is the step's entry point."""
    tree = ast.parse(MODULES[DRIVER].read_text())
    steps = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.module == "pipelines" for alias in node.names}
    used = {(node.value.id, node.attr) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id in steps}
    assert steps and used, (steps, used)
    assert not [u for u in used if u[1] not in DRIVER_USES], sorted(used)


def test_relative_imports_are_not_used():
    """The import walk reads absolute imports; a relative one could hide an arrow or a cycle."""
    relative = [name for name, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert not relative, relative


def test_no_import_cycles_in_the_library():
    edges = {m: {d for d, _ in deps if d in MODULES and d != m} for m, deps in GRAPH.items() if _top(m) in LIBRARY}
    state: dict[str, int] = {}

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (found := cycle_from(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = cycle_from(start, [])
            assert found is None, " -> ".join(found)


def test_project_imports_sit_at_the_top_of_modules():
    """Imports inside functions hide edges; project modules are cheap to import, so none is needed."""
    inside = [(m, d) for m, deps in GRAPH.items() for d, in_function in deps if in_function]
    assert not inside, inside


def test_the_walk_sees_the_whole_code_base():
    assert len(MODULES) >= 40 and "mlproject.data.formats" in MODULES and "registry_hooks.webhook" in MODULES
    assert ("mlproject.gate", False) in GRAPH["pipelines.promote"]
    assert ("mlproject.deploy", False) in GRAPH["mlproject.gate"]


MAX_MODULE_LINES = 600
MAX_P90_FUNCTION_LINES = 24


def test_no_module_is_over_600_lines():
    """A module past 600 lines is doing several jobs (the orchestrator once did nine in 1,017)."""
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_functions_stay_short():
    """House style: median function 10-15 lines, split what passes about 50; the 90th percentile of
    function length (def to last line, docstring included) stays at 24 lines or less."""
    lengths = sorted(node.end_lineno - node.lineno + 1 for path in MODULES.values()
                     for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
    p90 = lengths[int(0.9 * (len(lengths) - 1))]
    assert p90 <= MAX_P90_FUNCTION_LINES, f"p90 function length {p90} lines (median {lengths[len(lengths) // 2]})"


def test_the_driver_is_thin():
    """The orchestrator reads as a table of steps; what a step does lives in the library."""
    assert len(MODULES[DRIVER].read_text().splitlines()) < 300


def test_no_source_file_is_git_ignored():
    """A lost package once: `data/` in .gitignore also matched `mlproject/data/`, so the package
    never reached a commit and a clean checkout could not import it. Ignore rules for run outputs
    must be anchored to the repo root."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return  # an unpacked source tree: nothing is ignored there
    sources = [str(p.relative_to(ROOT)) for top in LIBRARY + APPLICATIONS + ("tests", "benchmarks", "conf", "notebooks")
               for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(sources),
                             capture_output=True, text=True).stdout.split()
    assert not ignored, f"source files matched by .gitignore (never committed): {ignored}"
