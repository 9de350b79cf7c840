"""The README's commands, run as written.

Every fenced shell or Python block of README.md carries a marker on the line above it:
``<!-- readme-test: run -->`` (run by this test, in README order, in one shell),
``<!-- readme-test: run, except: CMD (why) -->`` (run, without the lines that start with CMD) or
``<!-- readme-test: skip: why -->`` (reference text with placeholders, servers that run until
stopped, hours of training, a GPU). A block without a marker fails the fast test, so a new
command cannot slip in untested by accident.

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


@dataclass
class Block:
    line: int
    lang: str
    body: list[str]
    action: str | None
    """``run``, ``skip`` or None (no marker)."""
    except_prefix: str | None = None
    reason: str | None = None


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` with the marker (if any) on the line above each."""
    lines, blocks, k = text.split("\n"), [], 0
    while k < len(lines):
        if lines[k].startswith("```"):
            lang, start = lines[k][3:].strip(), k
            end = next(j for j in range(k + 1, len(lines)) if lines[j].startswith("```"))
            m = MARKER.match(lines[k - 1].strip()) if k > 0 else None
            blocks.append(Block(start + 1, lang, lines[k + 1:end], m and m.group(1),
                                m and m.group(2), m and m.group(3)))
            k = end
        k += 1
    return blocks


def runnable_script(blocks: list[Block]) -> tuple[str, str]:
    """(bash script, python script) of the ``run`` blocks in README order."""
    shell, python = ["set -euo pipefail", "set -x"], []
    for block in blocks:
        if block.action != "run":
            continue
        body = [ln for ln in block.body
                if not (block.except_prefix and ln.strip().startswith(block.except_prefix))]
        if block.lang in SHELLS:
            shell += [f"# README.md line {block.line}", *body]
        elif block.lang == "python":
            python += [f"# README.md line {block.line}", *body]
    return "\n".join(shell) + "\n", "\n".join(python) + "\n"


def test_every_command_block_says_whether_the_test_runs_it():
    blocks = [b for b in readme_blocks((ROOT / "README.md").read_text()) if b.lang in (*SHELLS, "python")]
    unmarked = [f"README.md line {b.line} ({b.lang})" for b in blocks if b.action is None]
    assert not unmarked, f"blocks without a readme-test marker: {unmarked}"
    assert all(b.reason for b in blocks if b.action == "skip"), "a skipped block must say why"
    shell, python = runnable_script(blocks)
    commands = [ln.strip() for ln in shell.splitlines()]
    assert any(c.startswith("make demo") for c in commands)
    assert not any(c.startswith("make test") for c in commands)  # the suite must not run itself
    assert "pipelines.evaluate" in shell and "policy.predict" in python


def test_the_marker_grammar():
    text = "x\n<!-- readme-test: run, except: make test (the suite) -->\n```bash\nmake demo\nmake test\n```\n" \
           "<!-- readme-test: skip: a server -->\n```bash\nmake ui\n```\n```python\nprint(1)\n```\n"
    run, skip, bare = readme_blocks(text)
    assert (run.action, run.except_prefix, run.body) == ("run", "make test", ["make demo", "make test"])
    assert (skip.action, skip.reason, bare.action) == ("skip", "a server", None)
    assert runnable_script([run, skip])[0].splitlines()[-1] == "make demo"


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
def test_the_readme_quick_path_runs_as_written(tmp_path):
    repo = _copy_of_the_repo(tmp_path / "nt8")
    shell, python = runnable_script(readme_blocks((ROOT / "README.md").read_text()))
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
    assert proc.returncode == 0, (f"README command failed (exit {proc.returncode}): {trace[-1:]}\n"
                                  f"stdout tail:\n{proc.stdout[-3000:]}\nstderr tail:\n{proc.stderr[-5000:]}")
    assert "target positions:" in proc.stdout
    assert "Traceback" not in proc.stderr
