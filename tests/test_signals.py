"""Stopping long runs with a signal, as a user or a service manager does (SIGTERM, Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from conftest import ROOT

SMOKE = str(ROOT / "conf" / "smoke.yaml")


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {text!r} within {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, sig: int, timeout: float = 60) -> tuple[int, float]:
    started = time.time()
    proc.send_signal(sig)
    try:
        return proc.wait(timeout), time.time() - started
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_stops_the_loop_between_modes_after_a_turn_that_trained(tmp_path, mlflow_store):
    """A turn that retrains starts Ray, which installs its own SIGTERM handler (sys.exit); the
    loop's handler must still be the one that answers: "stopping the loop" and exit 0."""
    from mlproject.experience import ExperienceBuffer
    from test_experience import experiences

    buffer = ExperienceBuffer(tmp_path / "buffer")
    buffer.add(experiences(3))
    buffer.flush()
    sets = ["data.synthetic.n_bars=600", "train.iterations=1", "continuous_learning.paper_bars=null",
            "continuous_learning.retrain_frequency=1", "continuous_learning.min_experiences=1",
            "continuous_learning.evaluation_episodes=1", "train.val_windows=1",
            f"continuous_learning.experience_storage={tmp_path / 'buffer'}"]
    log = tmp_path / "loop.log"
    proc = _start(["pipelines.orchestrate", "--loop", "--config", SMOKE, *[a for s in sets for a in ("--set", s)]],
                  tmp_path, log)
    try:
        _wait_for(proc, log, "loop: turn 1 done", 300)
    finally:
        code, took = _stop(proc, signal.SIGTERM)
    text = log.read_text()
    assert "retrain" in text and "stopping the loop" in text, text[-3000:]
    assert code == 0 and took < 30, (code, text[-3000:])
    assert all(r.info.status == "FINISHED" for r in mlflow.search_runs(search_all_experiments=True,
                                                                        output_format="list"))


def _runs() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_sigterm_during_a_simulation_ends_every_run_killed_and_exits_143(tmp_path, mlflow_store):
    """Killed while it trains (inside Ray), the walk-forward's parent run and the step runs end
    KILLED (none stays RUNNING for good) and the process exits 143 promptly with one line."""
    sets = ["train.iterations=50", "data.synthetic.n_bars=1400", "continuous_learning.evaluation_episodes=2",
            "train.val_windows=2", f"data.output_dir={tmp_path / 'bars'}"]
    log = tmp_path / "simulate.log"
    proc = _start(["pipelines.simulate", "--periods", "2", "--start-fraction", "0.6",
                   "--config", SMOKE, *[a for s in sets for a in ("--set", s)]], tmp_path, log)
    try:
        _wait_for(proc, log, "iter 1/50", 180)  # the parent run exists, a train run is open, Ray trains
    finally:
        code, took = _stop(proc, signal.SIGTERM)
    text = log.read_text()
    assert code == 143 and took < 30, (code, took, text[-3000:])
    assert "stopped by SIGTERM" in text.splitlines()[-1], text[-2000:]
    runs = _runs()
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert statuses["cycle-simulate"] == "KILLED" and statuses["train"] == "KILLED", statuses
    assert not [r.info.run_name for r in runs if r.info.status not in ("KILLED", "FAILED", "FINISHED")], statuses
