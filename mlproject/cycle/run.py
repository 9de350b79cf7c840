"""One mode of the cycle as one MLflow run, under the orchestrator lock: the frame every mode
(``pipelines.orchestrate``) and the simulation (``pipelines.simulate``) run in."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from mlproject.config import Config
from mlproject.cycle.retrain import step
from mlproject.cycle.settle import HOST_TAG, PID_TAG, settle_killed
from mlproject.cycle.summary import CycleResult, summary
from mlproject.locks import file_lock
from mlproject.tracking import pipeline_run, setup_tracking

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 5.0


def cycle_lock(cfg: Config) -> AbstractContextManager[None]:
    """The lock that stops two orchestrators (``<state_dir>/orchestrator.lock``)."""
    return file_lock(Path(cfg.continuous_learning.state_dir) / "orchestrator.lock", LOCK_TIMEOUT_S,
                     "another orchestrator run")


@contextmanager
def cycle_run(cfg: Config, mode: str) -> Iterator[CycleResult]:
    """Under the lock, the run ``cycle-<mode>`` (tagged with this process and host), after settling
    what killed cycles left; yields the :class:`CycleResult` the mode fills in, and at the end
    writes its summary (``cycle/summary.txt``)."""
    import mlflow

    setup_tracking(cfg)
    with cycle_lock(cfg), pipeline_run(cfg, f"cycle-{mode}") as run:
        mlflow.set_tags({PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
        result = CycleResult(run.info.run_id, mode)
        result.settled = step("settle", settle_killed, run.info.run_id)
        if result.settled:
            mlflow.set_tags({"cycle.settled_runs": ",".join(result.settled.runs) or "none",
                             "cycle.settled_versions": ",".join(result.settled.versions) or "none"})
        yield result
        result.summary = summary(cfg, result)
        mlflow.log_text(result.summary, "cycle/summary.txt")
        log.info("cycle %s done: %s", mode, run.info.run_id)
