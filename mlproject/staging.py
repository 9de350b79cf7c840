"""The Staging stage: a challenger that passed the gate earns Production by shadow-trading.

With ``promotion.shadow_bars`` > 0 the gate stages a passing challenger here instead of
promoting it (:func:`stage`): stage ``Staging`` (the source of truth) plus the alias ``staging``;
at most one Staging version per model (a newer one archives the older). ``registry_hooks``
deploys it to ``<deploy_dir>/shadow``, where the bridge loads it beside Production; its decisions
are recorded as experiences with source ``shadow`` (:mod:`mlproject.bridge.shadow`), and the
orchestrator's maintenance decides on the live comparison (:mod:`mlproject.shadow_verdict`):
:func:`promote_staged` or :func:`archive_staged`.

Every move is a history event on the model's history run (``staging_event.<seq>``, beside the
Production events of :mod:`mlproject.registry`), written ``pending`` first and ``done`` last, all
under the registry lock; :func:`complete_staging` (run by every staging write and every reconcile)
finishes or abandons what a crash interrupted, and repairs the alias: no crash point loses a
decision or leaves two Staging versions.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlproject import registry
from mlproject.faults import fault_point

log = logging.getLogger(__name__)

STAGING = "Staging"
STAGING_ALIAS = "staging"
STAGING_PREFIX = "staging_event."
ACTIONS = ("stage", "promote", "archive")
"""A challenger staged; the staged version promoted to Production; the staged version archived."""


def staging_version(name: str) -> str | None:
    """The version in stage Staging, or None (the newest, should a hand-made move leave two)."""
    from mlflow.exceptions import MlflowException

    try:
        with registry._stage_api():
            versions = registry._client().get_latest_versions(name, stages=[STAGING])
    except MlflowException:
        return None
    return str(max(int(v.version) for v in versions)) if versions else None


def staging_history(name: str, *, include_unfinished: bool = False) -> list[dict[str, Any]]:
    """Every staging event, oldest first (only ``done`` ones unless ``include_unfinished``)."""
    return registry.history(name, include_unfinished=include_unfinished, prefix=STAGING_PREFIX)


def _write(name: str, event: dict[str, Any]) -> None:
    registry._write_event(name, event, STAGING_PREFIX)


def _new_event(name: str, action: str, version: str, reason: str, metrics: dict[str, float] | None) -> dict[str, Any]:
    events = staging_history(name, include_unfinished=True)
    return {"seq": (events[-1]["seq"] + 1) if events else 1, "action": action, "version": str(version),
            "replaced": staging_version(name) or "", "production": registry.production_version(name) or "",
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reason": reason,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()}, "status": "pending"}


def complete_staging(name: str, lock_file: str | Path | None = None) -> list[dict[str, Any]]:
    """Finish what a crashed staging move left (under the registry lock): a pending event is
    ``done`` when its move happened (stage: the version is Staging; promote: it is Production;
    archive: it is no longer Staging), else ``abandoned``; the alias ``staging`` then names the
    Staging version (or is removed). Returns the events it settled."""
    settled = []
    with registry.registry_lock(lock_file):
        if not registry.model_exists(name):
            return []
        staged = staging_version(name)
        for event in (e for e in staging_history(name, include_unfinished=True) if e["status"] == "pending"):
            happened = {"stage": staged == event["version"],
                        "promote": registry.production_version(name) == event["version"],
                        "archive": staged != event["version"]}[event["action"]]
            event["status"] = "done" if happened else "abandoned"
            _write(name, event)
            settled.append(event)
            log.warning("%s: completed a staging %s of v%s interrupted by a crash: %s", name, event["action"],
                        event["version"], event["status"])
        _repair_alias(name, staged)
    return settled


def _repair_alias(name: str, staged: str | None) -> None:
    aliased = registry.alias_version(name, STAGING_ALIAS)
    if aliased == staged:
        return
    client = registry._client()
    if staged is None:
        client.delete_registered_model_alias(name, STAGING_ALIAS)
    else:
        client.set_registered_model_alias(name, STAGING_ALIAS, staged)


def stage(name: str, version: str | int, reason: str, metrics: dict[str, float] | None = None,
          lock_file: str | Path | None = None) -> dict[str, Any]:
    """Move ``version`` to Staging (archiving the Staging version it replaces), alias ``staging``;
    a history event. Returns the event."""
    client, version = registry._client(), str(version)
    with registry.registry_lock(lock_file):
        client.get_model_version(name, version)  # an unknown version: MlflowException before any change
        complete_staging(name, lock_file)
        if registry.production_version(name) == version:
            raise ValueError(f"{name} v{version} is Production: it cannot shadow itself")
        event = _new_event(name, "stage", version, reason, metrics)
        _write(name, event)
        fault_point("stage:event-pending")
        with registry._stage_api():
            client.transition_model_version_stage(name, version, STAGING, archive_existing_versions=True)
        fault_point("stage:stage-moved")
        client.set_registered_model_alias(name, STAGING_ALIAS, version)
        client.set_model_version_tag(name, version, "staged_at", event["at"])
        client.set_model_version_tag(name, version, "staging_reason", reason[:4000])
        event["status"] = "done"
        _write(name, event)
    log.info("%s: version %s is Staging (shadow-trading beside Production%s): %s", name, version,
             f"; replaces v{event['replaced']}" if event["replaced"] else "", reason)
    return event


def promote_staged(name: str, version: str | int, reason: str, metrics: dict[str, float] | None = None,
                   lock_file: str | Path | None = None) -> dict[str, Any]:
    """The Staging version earned Production on live evidence: a staging event, then
    :func:`mlproject.registry.promote` (its own Production history event), then the alias
    ``staging`` dropped. Refused unless ``version`` is still Staging."""
    with _staged_move(name, "promote", str(version), reason, metrics, lock_file) as event:
        registry.promote(name, str(version), reason, metrics, lock_file=lock_file)
        fault_point("shadow-promote:promoted")
        _repair_alias(name, None)
    return event


def archive_staged(name: str, version: str | int, reason: str, metrics: dict[str, float] | None = None,
                   lock_file: str | Path | None = None) -> dict[str, Any]:
    """The Staging version lost on live evidence (or is withdrawn): archived with the reasons."""
    client = registry._client()
    with _staged_move(name, "archive", str(version), reason, metrics, lock_file) as event:
        with registry._stage_api():
            client.transition_model_version_stage(name, str(version), registry.ARCHIVED)
        fault_point("shadow-archive:stage-moved")
        _repair_alias(name, None)
        client.set_model_version_tag(name, str(version), "shadow_verdict", reason[:4000])
    log.info("%s: Staging v%s archived: %s", name, version, reason)
    return event


@contextlib.contextmanager
def _staged_move(name: str, action: str, version: str, reason: str, metrics: dict[str, float] | None,
                 lock_file: str | Path | None) -> Iterator[dict[str, Any]]:
    """Under the registry lock: the Staging version checked, its event written pending, the
    block's move, the event done (a crash in between is :func:`complete_staging`'s)."""
    with registry.registry_lock(lock_file):
        complete_staging(name, lock_file)
        _check_staged(name, version)
        event = _new_event(name, action, version, reason, metrics)
        _write(name, event)
        fault_point(f"shadow-{action}:event-pending")
        yield event
        event["status"] = "done"
        _write(name, event)


def _check_staged(name: str, version: str) -> None:
    staged = staging_version(name)
    if staged != version:
        raise ValueError(f"{name} v{version} is not Staging (Staging: {f'v{staged}' if staged else 'none'})")
