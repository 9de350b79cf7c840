"""What a killed cycle left, settled by the next one.

A cycle killed outright (SIGKILL, a power cut: no ``finally`` runs) leaves its runs RUNNING and the
version it registered without a gate verdict. Each cycle run records its process and host
(``cycle.pid``, ``cycle.host``); the next cycle, under the lock, settles what a killed one left
(:func:`settle_killed`): its runs and their child runs still RUNNING end KILLED (tag
``cycle.settled_by``), and a version they registered without ``gate.decision`` is marked refused
("its cycle was killed before the gate"), so that ``review`` archives it first. The summary and the
log say what was settled.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlproject.registry import record_verdict, was_production

log = logging.getLogger(__name__)


PID_TAG, HOST_TAG = "cycle.pid", "cycle.host"
"""Tags of a cycle run: the process running it and its host, so that the next cycle can tell a
cycle that still runs from one that was killed."""
SETTLED_TAG = "cycle.settled_by"
"""Tag of a run that the next cycle ended KILLED: which cycle, and why."""
KILLED_BEFORE_GATE = "its cycle was killed before the gate"
"""The refusal reason recorded on a version whose cycle was killed before the gate decided."""


@dataclass
class Settled:
    """What a cycle settled of killed ones: the runs it ended KILLED and the versions it marked
    refused (``<model> v<N>``)."""

    runs: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.runs or self.versions)

    def describe(self) -> str:
        versions = ", ".join(self.versions) or "none"
        return (f"{len(self.runs)} run(s) of a killed cycle ended KILLED ({', '.join(self.runs) or 'none'}); "
                f"version(s) marked refused ({KILLED_BEFORE_GATE}): {versions}")


def _process_state(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in seconds since the epoch) of process ``pid`` from Linux's
    /proc (proc(5): fields 3 and 22 of /proc/<pid>/stat, boot time ``btime`` of /proc/stat);
    None where the system does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def process_gone(pid: int, host: str, since_ms: int) -> bool:
    """Whether the process ``pid`` of ``host``, which started a run at ``since_ms`` (ms since the
    epoch), is gone: ``host`` is this host and the process is not running (no such process, or a
    zombie), or the process of that id started after the run did (the id was reused). A process
    of another host is never judged gone: this host cannot tell."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive (and not ours, unless the id was reused)
        pass
    state = _process_state(pid)
    # The cycle's process imports for seconds before it creates its run; 1 s covers btime's rounding.
    return state is not None and (state[0] == "Z" or state[1] > since_ms / 1000 + 1)


def _search_runs(client: Any, experiments: list[str], filter_string: str) -> list[Any]:
    """Every run of ``experiments`` that matches ``filter_string`` (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiments, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _family(client: Any, experiments: list[str], run: Any) -> list[Any]:
    """``run`` and its child runs, theirs too (any status)."""
    family, todo = [run], [run.info.run_id]
    while todo:
        children = _search_runs(client, experiments, f"tags.mlflow.parentRunId = '{todo.pop()}'")
        family.extend(children)
        todo.extend(child.info.run_id for child in children)
    return family


def _refuse_ungated(client: Any, run_id: str, by_run: str) -> list[str]:
    """Mark refused the versions registered from run ``run_id`` that have no gate verdict (never a
    version that is or was Production: a cycle killed between its promotion and the verdict tag)."""
    refused = []
    for mv in client.search_model_versions(f"run_id = '{run_id}'"):
        if mv.tags.get("gate.decision") or mv.current_stage == "Production" or was_production(mv.name, mv.version):
            continue
        record_verdict(mv.name, mv.version, "refused", KILLED_BEFORE_GATE, by_run)
        refused.append(f"{mv.name} v{mv.version}")
    return refused


def settle_killed(cycle_run_id: str) -> Settled:
    """Settle what killed cycles left (see the module doc): the cycle runs still RUNNING whose
    process is gone (:func:`process_gone`, from their ``cycle.pid``/``cycle.host``) and their
    child runs still RUNNING end KILLED, tagged ``cycle.settled_by``; the versions any of those
    runs registered without a gate verdict are marked refused. Call it under the orchestrator
    lock from the cycle run ``cycle_run_id``."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client, out = MlflowClient(), Settled()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return out
    for run in _search_runs(client, experiments, "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if run.info.run_id == cycle_run_id or not tags.get(PID_TAG, "").isdigit():
            continue
        if not process_gone(int(tags[PID_TAG]), tags.get(HOST_TAG, ""), run.info.start_time or 0):
            continue
        why = (f"ended KILLED by the next cycle (run {cycle_run_id}): the process of cycle run {run.info.run_id} "
               f"({tags[PID_TAG]} on {tags.get(HOST_TAG)}) was gone")
        for member in _family(client, experiments, run):
            out.versions.extend(_refuse_ungated(client, member.info.run_id, cycle_run_id))
            if client.get_run(member.info.run_id).info.status == "RUNNING":
                client.set_tag(member.info.run_id, SETTLED_TAG, why)
                client.set_terminated(member.info.run_id, "KILLED")
                out.runs.append(member.info.run_id)
    if out:
        log.warning("settled what a killed cycle left: %s", out.describe())
    return out
