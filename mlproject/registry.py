"""Model Registry access: deploy and rollback as "Production" stage transitions.

The only module that calls MLflow's (deprecated) stage APIs, so that moving to aliases alone is
a one-file change (shared DESIGN: "Registry"). The stage is the source of truth; every
transition also sets the alias ``production`` (aliases fire MLflow webhooks, stages do not).
Every promotion and rollback is recorded twice: as tags on the promoted version (the latest
promotion of that version) and as an event tag (``production_event.<seq>``, JSON) on the model's
history run (one run per registered model, in the experiment ``nt8-registry``, that outlives
deleted versions), from which :func:`history` prints who was Production when. The registered
model carries two compact tags only: ``production_history`` (that run's id) and
``production_latest`` (the latest event in one line), so its UI page stays readable. Stores
written before the history run (events as tags on the registered model) read the same.

Writes are serialised and crash-safe:

- Every write (promote, rollback, cleanup, delete) and every reconcile runs under one
  cross-process file lock (:func:`registry_lock`): beside a sqlite store by default, or the
  ``promotion.lock_file`` a team puts in a shared folder.
- A promotion writes its history event first, as ``pending``, then moves the stage and the alias,
  tags the version and marks the event ``done``. A crash anywhere leaves a pending event, which
  :func:`complete_pending` (run by every later write and by every reconcile) finishes when the
  stage moved, or marks ``abandoned`` when it did not: no crash point loses a promotion.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlproject.faults import fault_point
from mlproject.locks import LockBusy, file_lock, temp_lock_path
from mlproject.tracking import experiment_id

log = logging.getLogger(__name__)

PRODUCTION = "Production"
ARCHIVED = "Archived"
STAND_DOWN = "stand_down"
"""The history action that empties Production (no model trades: flat)."""
ALIAS = "production"
EVENT_PREFIX = "production_event."
HISTORY_EXPERIMENT = "nt8-registry"
HISTORY_TAG = "production_history"
LATEST_TAG = "production_latest"
LOCK_TIMEOUT_S = 600.0
"""How long a registry write waits for another one before giving up with a clear error."""


class RegistryBusy(LockBusy):
    """Another process held the registry lock for longer than the timeout."""


def default_lock_path(tracking_uri: str | None = None) -> Path:
    """Beside a sqlite store (``mlflow.db.registry.lock``); for any other store a file in the
    temp folder named after the store's URI (every process on this machine that writes to the
    same store shares it). Writers on several machines set ``promotion.lock_file`` to a path in
    a folder they share."""
    uri = tracking_uri or _tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db = db if db.is_absolute() or uri.startswith("sqlite:////") else Path.cwd() / db
        return db.with_name(db.name + ".registry.lock")
    return temp_lock_path("registry", uri)


def registry_lock(path: str | Path | None = None, timeout: float = LOCK_TIMEOUT_S) -> Any:
    """Hold the cross-process registry lock (reentrant within a thread: a promote that
    reconciles takes it once). ``path`` None: :func:`default_lock_path`."""
    return file_lock(path or default_lock_path(), timeout, "another registry write (promote, rollback, reconcile)",
                     RegistryBusy)


@contextlib.contextmanager
def _stage_api() -> Iterator[None]:
    """Stages are deprecated in MLflow 3 but are how this project deploys (DESIGN.md): their
    FutureWarning is silenced here, at the stage call sites only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<ref>[^/]+)|@(?P<alias>[^/]+))/?$")


def resolve_version(model_uri: str) -> Any | None:
    """The registered ModelVersion a ``models:/`` URI points at (``models:/name/3``,
    ``models:/name/Production``, ``models:/name@alias``); None for other URIs (runs:/, paths).

    Raises ValueError naming the URI when the name, version, stage or alias does not exist.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    match = _MODELS_URI.match(model_uri)
    if not match:
        return None
    client = MlflowClient()
    try:
        return _version_named(client, model_uri, match)
    except MlflowException as exc:
        raise ValueError(f"{model_uri}: {exc.message}") from None


def _version_named(client: Any, model_uri: str, match: re.Match[str]) -> Any:
    """The version a parsed ``models:/`` URI names: by alias, by number, or the one in a stage."""
    name, ref = match["name"], match["ref"]
    if match["alias"]:
        return client.get_model_version_by_alias(name, match["alias"])
    if ref.isdigit():
        return client.get_model_version(name, ref)
    with _stage_api():
        versions = client.get_latest_versions(name, stages=[ref])
    if not versions:
        raise ValueError(f"{model_uri}: no version of '{name}' is in stage '{ref}'")
    return versions[0]


def register_version(model_uri: str, name: str, tags: dict[str, str], description: str = "") -> Any:
    """Register ``model_uri`` as a new version of ``name`` with ``tags``; returns the ModelVersion."""
    import mlflow
    from mlflow import MlflowClient

    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    if description:
        MlflowClient().update_model_version(name, version.version, description=description)
    log.info("registered %s version %s", name, version.version)
    return version


TRIALS_TAG = "trials.lineage"
"""Candidates evaluated for a registered model so far (model tag), and up to a version (its tag):
the validated checkpoints of every training that registered a version, summed."""


def record_trials(name: str, version: str, checkpoints: int, lock_file: str | Path | None = None) -> int:
    """Add a training's ``checkpoints`` (the validated checkpoints its policy was selected from) to
    ``name``'s count of candidates tried, under the registry lock (two trainings at once both
    count); the version records both (``trials.checkpoints``, and ``trials.lineage``: the count
    including it). Versions deleted later still count. Returns the new count."""
    client = _client()
    checkpoints = max(int(checkpoints), 1)
    with registry_lock(lock_file):
        total = int(client.get_registered_model(name).tags.get(TRIALS_TAG, 0) or 0) + checkpoints
        client.set_registered_model_tag(name, TRIALS_TAG, str(total))
    client.set_model_version_tag(name, version, "trials.checkpoints", str(checkpoints))
    client.set_model_version_tag(name, version, TRIALS_TAG, str(total))
    return total


def trials_of(name: str, version: str) -> int:
    """Candidates tried for ``name`` up to ``version`` (1 for a version registered before they
    were counted, or by hand)."""
    from mlflow.exceptions import MlflowException

    try:
        return max(int(_client().get_model_version(name, version).tags.get(TRIALS_TAG, 1)), 1)
    except (MlflowException, ValueError):
        return 1


# -- Production: read ----------------------------------------------------------------------------


def production_version(name: str) -> str | None:
    """The version in stage Production (the source of truth), or None."""
    from mlflow.exceptions import MlflowException

    try:
        with _stage_api():
            versions = _client().get_latest_versions(name, stages=[PRODUCTION])
    except MlflowException:
        return None  # no such registered model yet
    return str(versions[0].version) if versions else None


def model_exists(name: str) -> bool:
    """Whether the registered model ``name`` is in this tracking store."""
    from mlflow.exceptions import MlflowException

    try:
        _client().get_registered_model(name)
    except MlflowException:
        return False
    return True


def alias_version(name: str, alias: str = ALIAS) -> str | None:
    """The version the alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def history(name: str, *, include_unfinished: bool = False, prefix: str = EVENT_PREFIX) -> list[dict[str, Any]]:
    """Every promotion and rollback, oldest first: seq, action, version, previous, at, reason,
    metrics, status. Only ``done`` events unless ``include_unfinished`` (pending, abandoned).
    ``prefix``: another series of events on the history run (``mlproject.staging``'s)."""
    client = _client()
    tags = client.get_registered_model(name).tags
    by_seq = {}
    sources = [tags]  # events of stores written before the history run, then the run's
    if tags.get(HISTORY_TAG):
        sources.append(client.get_run(tags[HISTORY_TAG]).data.tags)
    for source in sources:
        for key, value in source.items():
            if key.startswith(prefix):
                event = json.loads(value)
                by_seq[event["seq"]] = event
    events = [by_seq[seq] for seq in sorted(by_seq)]
    return events if include_unfinished else [e for e in events if e.get("status", "done") == "done"]


def rollback_target(name: str) -> str | None:
    """The version a rollback goes back to (None: nothing to go back to).

    The history is read as a stack: a promotion pushes its version, a rollback to a version on
    the stack pops back to it (a forced one to another version pushes it). The target is the
    version under the top, so a second rollback goes further back instead of returning to the
    version the first one left (two rollbacks never cancel each other). Production moved outside
    this tooling (not the top of the stack): the target is the top, the last version it deployed.
    """
    stack: list[str] = []
    for event in history(name):
        version = event["version"]
        if event["action"] == STAND_DOWN:  # like a rollback to flat: the version it stood down is off the stack
            if stack and stack[-1] == event["previous"]:
                stack.pop()
        elif event["action"] == "rollback" and version in stack:
            del stack[len(stack) - stack[::-1].index(version):]
        else:
            stack.append(version)
    current = production_version(name)
    if stack and stack[-1] != current:
        return stack[-1]
    below = [v for v in stack[:-1] if v != current]
    return below[-1] if below else None


def was_production(name: str, version: str | int) -> bool:
    """Whether ``version`` was ever made Production (a done event of the history)."""
    return any(e["version"] == str(version) for e in history(name))


# -- Production: change --------------------------------------------------------------------------


def _history_run(name: str) -> str:
    """The id of ``name``'s history run, created (with the experiment) on the first event. Under
    the registry lock: a crash between creating the run and tagging the model leaves an empty run
    that nothing points at, never an event without a home."""
    client = _client()
    run_id = client.get_registered_model(name).tags.get(HISTORY_TAG)
    if run_id:
        return run_id
    run = client.create_run(experiment_id(HISTORY_EXPERIMENT), run_name=f"{name} production history",
                            tags={"registered_model": name, "mlflow.note.content":
                                  f"Every promotion and rollback of the registered model `{name}`, one "
                                  f"`{EVENT_PREFIX}<seq>` tag (JSON) each; `python -m pipelines.status` "
                                  "prints them."})
    client.set_terminated(run.info.run_id)  # a record, not a running job; tags can still be set
    client.set_registered_model_tag(name, HISTORY_TAG, run.info.run_id)
    return run.info.run_id


def _write_event(name: str, event: dict[str, Any], prefix: str = EVENT_PREFIX) -> None:
    """Write (or rewrite, by seq) one event on the history run; a finished Production one also
    becomes the model's one-line ``production_latest``. A reason too long for a run tag is shortened."""
    client, text = _client(), json.dumps(event)
    if len(text) > 7900:  # MLflow's run tag limit is 8,000 characters
        event = {**event, "reason": event["reason"][: max(0, len(event["reason"]) - (len(text) - 7800))] + "..."}
        text = json.dumps(event)
    client.set_tag(_history_run(name), f"{prefix}{event['seq']:06d}", text)
    if event["status"] == "done" and prefix == EVENT_PREFIX:
        client.set_registered_model_tag(name, LATEST_TAG, f"#{event['seq']} {event['action']} to {shown(event)} "
                                        f"(was {event['previous'] or 'none'}) at {event['at']}: {event['reason'][:200]}")


def _tag_promoted_version(name: str, event: dict[str, Any]) -> None:
    """The event on the version it made Production. The metrics a promotion was decided on stay in
    ``promotion_metrics`` (the drift monitor's reference for the version); a rollback's (the
    monitor's live figures of the version it left) go to ``rollback_metrics`` and do not replace them."""
    client = _client()
    metrics_key = "promotion_metrics" if event["action"] == "promote" else f"{event['action']}_metrics"
    for key, value in (("promoted_at", event["at"]), ("promotion_reason", event["reason"][:4000]),
                       ("previous_production", event["previous"]), ("promotion_action", event["action"]),
                       (metrics_key, json.dumps(event["metrics"])[:4000])):
        client.set_model_version_tag(name, event["version"], key, value)


def complete_pending(name: str, lock_file: str | Path | None = None) -> list[dict[str, Any]]:
    """Finish what a crashed promote or rollback left (under the registry lock): a pending event
    whose version is the Production stage is completed (alias, version tags, ``done``); one whose
    transition never happened is marked ``abandoned``. Returns the events it touched."""
    from mlflow.exceptions import MlflowException

    touched = []
    with registry_lock(lock_file):
        try:
            events = history(name, include_unfinished=True)  # read under the lock: no writer between
        except MlflowException:
            return []  # no such registered model yet
        current = production_version(name)
        for event in (e for e in events if e.get("status") == "pending"):
            _settle_pending(name, event, current)
            touched.append(event)
    return touched


def _settle_pending(name: str, event: dict[str, Any], current: str | None) -> None:
    """Finish one pending event: ``done`` when its version is the Production stage (the crash
    came after the transition), else ``abandoned``."""
    if event["action"] == STAND_DOWN:
        event["status"] = "done" if current is None else "abandoned"
        if current is None:
            _drop_alias(name)
    elif event["version"] == current:
        _client().set_registered_model_alias(name, ALIAS, current)
        _tag_promoted_version(name, event)
        event["status"] = "done"
    else:
        event["status"] = "abandoned"
    _write_event(name, event)
    log.warning("%s: completed a %s interrupted by a crash: event #%d -> %s %s", name, event["action"],
                event["seq"], shown(event), event["status"])


def promote(name: str, version: str | int, reason: str, metrics: dict[str, float] | None = None,
            action: str = "promote", lock_file: str | Path | None = None) -> dict[str, Any]:
    """Make ``version`` the Production version: history event (pending), stage transition
    (archiving the previous one), alias ``production``, version tags, event done; all under the
    registry lock. Returns the event."""
    client, version = _client(), str(version)
    with registry_lock(lock_file):
        client.get_model_version(name, version)  # unknown version: MlflowException before any change
        complete_pending(name, lock_file)
        previous = production_version(name)
        event = _new_event(name, action, version, previous, reason, metrics)
        _write_event(name, event)
        fault_point("promote:event-pending")
        with _stage_api():
            client.transition_model_version_stage(name, version, PRODUCTION, archive_existing_versions=True)
        fault_point("promote:stage-moved")
        client.set_registered_model_alias(name, ALIAS, version)
        fault_point("promote:alias-moved")
        _tag_promoted_version(name, event)
        fault_point("promote:version-tagged")
        event["status"] = "done"
        _write_event(name, event)
    log.info("%s: version %s is Production (%s; was %s): %s", name, version, action, previous or "none", reason)
    return event


def _new_event(name: str, action: str, version: str, previous: str | None, reason: str,
               metrics: dict[str, float] | None) -> dict[str, Any]:
    """The next history event (numbered after every event so far, unfinished ones included), pending."""
    events = history(name, include_unfinished=True)
    return {"seq": (events[-1]["seq"] + 1) if events else 1, "action": action, "version": version,
            "previous": previous or "", "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "reason": reason, "metrics": {k: float(v) for k, v in (metrics or {}).items()}, "status": "pending"}


def rollback(name: str, to_version: str | int | None = None, reason: str = "", force: bool = False,
             lock_file: str | Path | None = None, metrics: dict[str, float] | None = None,
             expected_current: str | int | None = None,
             check: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Back to the previous Production version (:func:`rollback_target`, or ``to_version``, which
    must have been Production before unless ``force`` with a reason); records why (and
    ``metrics``, such as the drift monitor's). ``expected_current``: refuse unless that version is
    still Production (two operators rolling back the same bad version roll back once).
    ``check(name, target)`` runs under the lock before anything moves (e.g. that the target still
    loads and predicts: ``mlproject.deploy.check_version_deployable``)."""
    with registry_lock(lock_file):
        complete_pending(name, lock_file)
        current = production_version(name)
        if expected_current is not None and str(expected_current) != current:
            raise ValueError(_not_current_message(name, str(expected_current), current))
        target = _rollback_to(name, to_version, current)
        if to_version is not None and not was_production(name, target):
            reason = _forced_reason(name, target, reason, force)
        if check is not None:
            check(name, target)
        default = f"rollback from version {current}" if current else "back from flat"
        return promote(name, target, reason or default, metrics, action="rollback", lock_file=lock_file)


def stand_down(name: str, reason: str = "", metrics: dict[str, float] | None = None,
               lock_file: str | Path | None = None, expected_current: str | int | None = None) -> dict[str, Any]:
    """Empty Production: no model trades (after ``mlproject.deploy.reconcile`` a running bridge
    trades flat). For a Production version that must stop with nothing to roll back to. Under the
    registry lock: history event ``stand_down`` (version "", pending), the version archived, the
    alias removed, event done; a crash at any step is finished by :func:`complete_pending`. A
    later rollback goes back to the version before the one stood down, when there is one."""
    client = _client()
    with registry_lock(lock_file):
        complete_pending(name, lock_file)
        current = production_version(name)
        if expected_current is not None and str(expected_current) != current:
            raise ValueError(_not_current_message(name, str(expected_current), current))
        if current is None:
            raise ValueError(f"{name}: nothing is in Production: nothing to stand down")
        event = _new_event(name, STAND_DOWN, "", current, reason or f"stand down from version {current}", metrics)
        _write_event(name, event)
        fault_point("stand-down:event-pending")
        with _stage_api():
            client.transition_model_version_stage(name, current, ARCHIVED)
        fault_point("stand-down:stage-moved")
        _drop_alias(name)
        event["status"] = "done"
        _write_event(name, event)
    log.warning("%s: version %s stood down: nothing is in Production (a bridge trades flat): %s", name, current,
                event["reason"])
    return event


def _drop_alias(name: str) -> None:
    """Remove alias ``production`` (nothing is in Production)."""
    if alias_version(name) is not None:
        _client().delete_registered_model_alias(name, ALIAS)


def shown(event: dict[str, Any]) -> str:
    """What a history event made Production: ``v7``, or ``flat`` for a stand-down."""
    return f"v{event['version']}" if event["version"] else "flat"


def _rollback_to(name: str, to_version: str | int | None, current: str | None) -> str:
    """``to_version``, else :func:`rollback_target`; refuses nothing to go back to and the current version."""
    target = str(to_version) if to_version is not None else rollback_target(name)
    if target is None:
        raise ValueError(f"{name}: nothing to roll back to (Production is {current or 'empty'} and has no "
                         "earlier version in its history); name one with to_version, or stand it down to flat")
    if target == current:
        raise ValueError(f"{name}: version {target} is already Production")
    return target


def _forced_reason(name: str, target: str, reason: str, force: bool) -> str:
    """The recorded reason of a rollback to a version that was never Production: only with
    ``force`` and a reason, which then says it was forced."""
    if not force:
        raise ValueError(f"{name}: version {target} was never Production; a rollback goes back to a "
                         "version that was (see the history), or use --force with a --reason")
    if not reason:
        raise ValueError(f"{name}: a forced rollback to version {target} needs a reason")
    return f"forced: {reason}"


def _not_current_message(name: str, expected: str, current: str | None) -> str:
    """Why a rollback ``--from-version expected`` refused: no such version (a typo), or another
    rollback or promotion moved Production away from it."""
    from mlflow.exceptions import MlflowException

    production = f"Production is version {current}" if current else "no version is in Production"
    try:
        _client().get_model_version(name, expected)
    except MlflowException:
        return f"{name}: version {expected} does not exist ({production}); nothing rolled back"
    return f"{name}: {production}, not {expected}: someone else moved it meanwhile; nothing rolled back"


def ensure_alias(name: str) -> bool:
    """Point alias ``production`` at the Production stage version if it drifted; True if repaired."""
    current = production_version(name)
    if current is None or alias_version(name) == current:
        return False
    _client().set_registered_model_alias(name, ALIAS, current)
    log.warning("%s: alias %s repaired to version %s (the Production stage)", name, ALIAS, current)
    return True


def record_verdict(name: str, version: str | int, decision: str, reasons: str, run_id: str) -> None:
    """Tag a version with the gate's verdict (``gate.decision``, ``gate.reasons``, ``gate.run_id``),
    so refused versions are visible in the registry UI and cleaned up first."""
    client = _client()
    for key, value in (("gate.decision", decision), ("gate.reasons", reasons[:4000]), ("gate.run_id", run_id)):
        client.set_model_version_tag(name, str(version), key, value)


def delete_version(name: str, version: str | int, lock_file: str | Path | None = None) -> None:
    """Delete a version; refuses the Production version and the rollback target."""
    version = str(version)
    with registry_lock(lock_file):
        if version == production_version(name):
            raise ValueError(f"{name}: version {version} is Production; promote or roll back to another version first")
        if version == rollback_target(name):
            raise ValueError(f"{name}: version {version} is the rollback target of Production; it is kept")
        _client().delete_model_version(name, version)


def cleanup(name: str, keep: int = 5, delete: bool = False, lock_file: str | Path | None = None) -> list[str]:
    """Archive (or delete) versions beyond the newest ``keep``, refused ones first (whatever their
    age), never Production, its rollback target nor Staging. Returns the versions touched."""
    with registry_lock(lock_file):
        complete_pending(name, lock_file)
        protected = {production_version(name), rollback_target(name)}
        versions = sorted(_client().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version),
                          reverse=True)
        refused = [mv for mv in versions if mv.tags.get("gate.decision") == "refused"]
        others = [mv for mv in versions if mv.tags.get("gate.decision") != "refused"]
        touched = []
        for mv in refused + others[keep:]:
            if str(mv.version) in protected or mv.current_stage == "Staging":  # shadow-trading: its verdict decides
                continue
            if delete:
                _client().delete_model_version(name, str(mv.version))
            elif mv.current_stage != "Archived":
                with _stage_api():
                    _client().transition_model_version_stage(name, str(mv.version), "Archived")
            else:
                continue
            touched.append(str(mv.version))
    log.info("%s: %s versions %s", name, "deleted" if delete else "archived", ", ".join(touched) or "none")
    return touched


# -- status --------------------------------------------------------------------------------------


STATUS_METRICS = ("eval/sharpe", "eval/total_return", "eval/max_drawdown")


def status(name: str) -> str:
    """A table of every version: stage, aliases, key eval metrics, created and promoted times
    (the seed's print_status), then the Production history."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"no registered model named '{name}' in {_tracking_uri()}") from None
    rows = [_status_row(client.get_model_version(name, mv.version))
            for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))]
    header = ["version", "stage", "aliases", "sharpe", "total_return", "max_dd", "created", "promoted"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"registered model {name}: Production = {production_version(name) or 'none'}",
             "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    events = history(name)
    if events:
        lines.append("history (oldest first):")
        lines += [f"  #{e['seq']} {e['at']} {e['action']} -> {shown(e)} (was {e['previous'] or 'none'}): "
                  f"{e['reason']}" for e in events]
    return "\n".join(lines)


def _status_row(full: Any) -> list[str]:
    """One version's cells of the :func:`status` table (a full ModelVersion, with its tags)."""
    metrics = _eval_metrics(full)
    created = datetime.fromtimestamp(full.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds")
    return [str(full.version), full.current_stage, ",".join(full.aliases or []) or "-",
            *(f"{metrics[k]:.4g}" if k in metrics else "-" for k in STATUS_METRICS),
            created, full.tags.get("promoted_at", "-")]


def version_model_id(mv: Any) -> str | None:
    """The MLflow 3 LoggedModel id of a ModelVersion (the sqlite registry leaves ``model_id``
    empty; the ``models:/m-...`` source still names it)."""
    source = mv.source or ""
    return mv.model_id or (source.split("/")[1] if source.startswith("models:/m-") else None)


def model_id_of(model_uri: str) -> str | None:
    """The LoggedModel id behind a model URI (None for runs:/ URIs and paths)."""
    if model_uri.startswith("models:/m-"):
        return model_uri.split("/")[1]
    version = resolve_version(model_uri)
    return version_model_id(version) if version is not None else None


def _eval_metrics(mv: Any) -> dict[str, float]:
    """Latest evaluation metrics linked to the version's logged model (MLflow 3)."""
    import mlflow

    model_id = version_model_id(mv)
    if not model_id:
        return {}
    return {m.key: m.value for m in mlflow.get_logged_model(model_id).metrics or [] if m.key in STATUS_METRICS}
