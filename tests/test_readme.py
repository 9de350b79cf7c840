"""The README's and the docs' commands, run as written.

Every fenced block of README.md and of the pages in docs/ carries a marker on the line above it:
``<!-- readme-test: run -->`` (run by this test, in one shell),
``<!-- readme-test: run, except: CMD (why) -->`` (run, without the lines that start with CMD) or
``<!-- readme-test: skip: why -->`` (reference text with placeholders, servers that run until
stopped, hours of training, a GPU, a picture). A block without a marker fails the fast test, so a
new command cannot slip in untested by accident. ``run`` blocks live in the pages of ``RUN_ORDER``
only: README.md (set-up) and then docs/quickstart.md (the quick path), in that order. A block
skipped as ``lines of docs/<page>.md`` must repeat lines that page runs.

The slow test copies the repository (the files git tracks, the venv linked) into ``tmp_path`` and
runs the ``run`` blocks there as a new user would: ``make demo``, ``source .venv/bin/activate``,
then the quick path, with the store in the copy's working directory (MLflow's default), no
``MLFLOW_TRACKING_URI`` and the venv not on ``PATH`` until the README activates it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- readme-test: (run|skip)(?:, except: (.+?) \(.*?\)|: (.+?))? -->$")
SHELLS = ("bash", "sh", "shell", "console")
RUN_ORDER = ("README.md", "docs/quickstart.md")
"""The pages whose ``run`` blocks the slow test runs, in this order, in one shell."""
REPEATS = re.compile(r"lines of (\S+\.md)")


@dataclass
class Block:
    line: int
    lang: str
    body: list[str]
    action: str | None
    """``run``, ``skip`` or None (no marker)."""
    except_prefix: str | None = None
    reason: str | None = None
    page: str = "README.md"
    """The file the block is in, relative to the repository root."""


def pages() -> list[str]:
    """README.md and every page of docs/, relative to the repository root."""
    return ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]


def fenced_blocks(text: str, page: str = "README.md") -> list[Block]:
    """The fenced blocks of ``text`` (the file ``page``) with the marker (if any) on the line above each."""
    lines, blocks, k = text.split("\n"), [], 0
    while k < len(lines):
        if lines[k].startswith("```"):
            lang, start = lines[k][3:].strip(), k
            end = next(j for j in range(k + 1, len(lines)) if lines[j].startswith("```"))
            m = MARKER.match(lines[k - 1].strip()) if k > 0 else None
            blocks.append(Block(start + 1, lang, lines[k + 1:end], m and m.group(1),
                                m and m.group(2), m and m.group(3), page))
            k = end
        k += 1
    return blocks


def page_blocks(page: str) -> list[Block]:
    return fenced_blocks((ROOT / page).read_text(encoding="utf-8"), page)


def runnable_script(blocks: list[Block]) -> tuple[str, str]:
    """(bash script, python script) of the ``run`` blocks in the order given."""
    shell, python = ["set -euo pipefail", "set -x"], []
    for block in blocks:
        if block.action != "run":
            continue
        body = [ln for ln in block.body
                if not (block.except_prefix and ln.strip().startswith(block.except_prefix))]
        if block.lang in SHELLS:
            shell += [f"# {block.page} line {block.line}", *body]
        elif block.lang == "python":
            python += [f"# {block.page} line {block.line}", *body]
    return "\n".join(shell) + "\n", "\n".join(python) + "\n"


def run_blocks() -> list[Block]:
    """The blocks of the ``RUN_ORDER`` pages, README.md first."""
    return [b for page in RUN_ORDER for b in page_blocks(page)]


def _commands(blocks: list[Block]) -> set[str]:
    return {ln.strip() for b in blocks for ln in b.body if ln.strip() and not ln.strip().startswith("#")}


def test_every_block_says_whether_the_test_runs_it():
    blocks = [b for page in pages() for b in page_blocks(page)]
    assert {"README.md", *RUN_ORDER} <= {b.page for b in blocks}
    unmarked = [f"{b.page} line {b.line} ({b.lang or 'no language'})" for b in blocks if b.action is None]
    assert not unmarked, f"blocks without a readme-test marker: {unmarked}"
    assert all(b.reason for b in blocks if b.action == "skip"), "a skipped block must say why"
    stray = [f"{b.page} line {b.line}" for b in blocks if b.action == "run"
             and (b.page not in RUN_ORDER or b.lang not in (*SHELLS, "python"))]
    assert not stray, f"run blocks the test would not run (only shell or python, only in {RUN_ORDER}): {stray}"
    shell, python = runnable_script(run_blocks())
    commands = [ln.strip() for ln in shell.splitlines()]
    assert any(c.startswith("make demo") for c in commands)
    assert not any(c.startswith("make test") for c in commands)  # the suite must not run itself
    assert "pipelines.evaluate" in shell and "policy.predict" in python


def test_repeated_lines_are_the_lines_that_run():
    """A block skipped as ``lines of docs/quickstart.md`` shows lines that page runs, word for word."""
    for page in pages():
        for block in page_blocks(page):
            named = REPEATS.search(block.reason or "") if block.action == "skip" else None
            if named:
                ran = _commands([b for b in page_blocks(named.group(1)) if b.action == "run"])
                missing = _commands([block]) - ran
                assert not missing, f"{page} line {block.line}: not run in {named.group(1)}: {sorted(missing)}"


def test_the_marker_grammar():
    text = "x\n<!-- readme-test: run, except: make test (the suite) -->\n```bash\nmake demo\nmake test\n```\n" \
           "<!-- readme-test: skip: a server -->\n```bash\nmake ui\n```\n```python\nprint(1)\n```\n"
    run, skip, bare = fenced_blocks(text, "docs/x.md")
    assert (run.action, run.except_prefix, run.body) == ("run", "make test", ["make demo", "make test"])
    assert (skip.action, skip.reason, bare.action) == ("skip", "a server", None)
    assert runnable_script([run, skip])[0].splitlines()[-2:] == ["# docs/x.md line 3", "make demo"]


def _copy_of_the_repo(dest: Path) -> Path:
    """The files git tracks (or the working tree's, where git is absent), the venv linked in,
    pyproject.toml dated before the venv's install stamp so make does not reinstall."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    venv = Path(sys.prefix)
    (dest / ".venv").symlink_to(venv, target_is_directory=True)
    stamp = venv / ".installed"
    if stamp.exists():
        t = stamp.stat().st_mtime - 60
        os.utime(dest / "pyproject.toml", (t, t))
    return dest


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_readme_and_the_quick_path_run_as_written(tmp_path):
    repo = _copy_of_the_repo(tmp_path / "nt8")
    shell, python = runnable_script(run_blocks())
    (tmp_path / "readme.sh").write_text(shell + f'python {tmp_path / "readme.py"}\n')
    (tmp_path / "readme.py").write_text(python)
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "VIRTUAL_ENV", "PYTEST_", "NT8_", "RAY_ADDRESS"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(repo))
    proc = subprocess.run(["bash", str(tmp_path / "readme.sh")], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1200)
    trace = [ln for ln in proc.stderr.splitlines() if ln.startswith("+ ")]
    assert proc.returncode == 0, (f"README or quick-path command failed (exit {proc.returncode}): {trace[-1:]}\n"
                                  f"stdout tail:\n{proc.stdout[-3000:]}\nstderr tail:\n{proc.stderr[-5000:]}")
    assert "target positions:" in proc.stdout
    assert "Traceback" not in proc.stderr
