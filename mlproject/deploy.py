"""Make the deployed model equal the registry's Production version (level-triggered, idempotent).

The library half of ``registry_hooks.reconcile`` (the command and the timer) and of the webhook
receiver; ``pipelines.promote`` and ``pipelines.rollback`` call :func:`reconcile` after every
registry change.

Deploy directory layout::

    deploy/
      releases/v3-20261124T101500Z/   model/ (the MLflow model) + manifest.json
      current  -> releases/v3-...      the deployed model (a symlink, switched atomically)
      previous -> releases/v2-...      the one before, for an instant switch back
      reload.json                      what a running bridge watches: rewritten atomically on every switch

An export is written under ``.staging-*`` and only renamed into ``releases/`` when complete, and
``current`` moves by ``os.replace`` of a symlink: a reconcile killed at any point leaves the
previous complete model deployed, and the next run cleans up and finishes the job.

Every pass runs under the registry lock (``mlproject.registry.registry_lock``), finishes a
promotion a crash interrupted, and checks every part of the deployed state, not only
``current``: the model's checksum, ``previous`` (an intact release, or none), and the reload
notice (it must name what ``current`` holds). A new export is deployed only after it loaded and
predicted valid actions on its input example.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlproject.atomic import atomic_write_text
from mlproject.digests import update_from_file
from mlproject.faults import fault_point
from mlproject.policy import SETTINGS_KEY
from mlproject.registry import (
    complete_pending,
    ensure_alias,
    model_exists,
    production_version,
    registry_lock,
    rollback_target,
)
from mlproject.staging import complete_staging, staging_version

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RELOAD_FILE = "reload.json"


@dataclass
class ReconcileResult:
    """What one reconcile pass did."""

    version: str | None
    changed: bool
    alias_repaired: bool
    release: Path | None
    shadow: str | None = None
    """The Staging version deployed to ``<deploy_dir>/shadow`` for the bridge to shadow-trade (None: none)."""


def tree_checksum(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file (order-independent of listing)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        update_from_file(digest, path)
    return digest.hexdigest()


def deployed_manifest(deploy_dir: Path) -> dict[str, Any] | None:
    """The manifest of the currently deployed release, or None."""
    current = deploy_dir / "current"
    try:
        return json.loads((current / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _switch_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (a new symlink renamed over the old one)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    # A relative link keeps the deploy dir movable as a whole.
    tmp.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))
    os.replace(tmp, link)


def export_release(name: str, version: str, deploy_dir: Path) -> Path:
    """Download ``models:/name/version`` into a new release folder (complete or absent)."""
    import mlflow
    from mlflow import MlflowClient

    mv = MlflowClient().get_model_version(name, version)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    staging = deploy_dir / f".staging-v{version}-{stamp}"
    staging.mkdir(parents=True)
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(staging / "model"))
        manifest = {"name": name, "version": str(version), "run_id": mv.run_id, "source": mv.source,
                    "checksum": tree_checksum(staging / "model"),
                    "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        release = deploy_dir / "releases" / f"v{version}-{stamp}"
        release.parent.mkdir(exist_ok=True)
        os.replace(staging, release)
        return release
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def notify_reload(deploy_dir: Path, manifest: dict[str, Any]) -> None:
    """Tell a running bridge to reload: ``reload.json`` is rewritten atomically with the new
    manifest and an increasing sequence number (the bridge compares the number it last saw)."""
    previous = reload_notice(deploy_dir) or {}  # none: the first deploy (the file is only ever replaced whole)
    atomic_write_text(deploy_dir / RELOAD_FILE,
                  json.dumps({**manifest, "sequence": int(previous.get("sequence", 0)) + 1,
                              "deploy_path": str((deploy_dir / "current").resolve())
                              if manifest.get("version") is not None else None}, indent=2))


def _prune(deploy_dir: Path, keep: int) -> None:
    """Remove stale staging folders and all but the newest ``keep`` releases (never current or previous)."""
    for stale in deploy_dir.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    in_use = {(deploy_dir / link).resolve() for link in ("current", "previous") if (deploy_dir / link).exists()}
    releases = sorted((deploy_dir / "releases").glob("v*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in releases[keep:]:
        if old.resolve() not in in_use:
            shutil.rmtree(old, ignore_errors=True)


class DeployRefused(ValueError):
    """A Production version that does not load or does not predict valid actions is not deployed."""


def check_deployable(model_dir: Path, label: str) -> None:
    """Load the MLflow model in ``model_dir`` and predict on its input example (or zeros of its
    signature's shape); raise ``DeployRefused`` unless every action is a finite integer in
    0..2*max_contracts (the model's recorded max_contracts, when it has one)."""
    import mlflow
    import numpy as np
    from mlflow.models import Model

    try:
        meta = Model.load(str(model_dir))
        example = meta.load_input_example(str(model_dir))
        if example is None:
            schema = meta.get_input_schema()
            if schema is None or not schema.is_tensor_spec():
                raise DeployRefused(f"{label}: the model has no input example or tensor signature to check it with")
            example = np.zeros((4, *schema.inputs[0].shape[1:]), np.float32)
        actions = np.asarray(mlflow.pyfunc.load_model(str(model_dir)).predict(example), dtype=np.float64)
    except DeployRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a broken model raises, it is not deployed
        raise DeployRefused(f"{label}: does not load and predict: {type(exc).__name__}: {exc}") from None
    settings = (meta.metadata or {}).get(SETTINGS_KEY) or {}
    top = 2 * int(settings.get("instrument", {}).get("max_contracts", 0)) or None
    ok = actions.size and np.isfinite(actions).all() and (actions == np.round(actions)).all() and (actions >= 0).all()
    if not ok or (top is not None and actions.max() > top):
        raise DeployRefused(f"{label}: predicts invalid actions {actions.reshape(-1)[:5].tolist()} on its input "
                            f"example (expected integers 0..{top if top is not None else 'max'})")


def check_version_deployable(name: str, version: str) -> None:
    """:func:`check_deployable` on ``models:/name/version`` (downloaded to a temporary folder):
    run before the stage moves, so Production never names a model that reconcile would refuse."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="nt8-check-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp)
        except Exception as exc:  # noqa: BLE001 - a junk source is refused, whatever MLflow raises
            raise DeployRefused(f"{name} v{version}: cannot be downloaded: {exc}") from None
        check_deployable(Path(local), f"{name} v{version}")


def _intact(release: Path, name: str | None = None, version: str | None = None) -> dict[str, Any] | None:
    """The manifest of ``release`` when the folder, its manifest and its model checksum agree."""
    try:
        manifest = json.loads((release / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if name is not None and (manifest.get("name"), manifest.get("version")) != (name, version):
        return None
    return manifest if tree_checksum(release / "model") == manifest.get("checksum") else None


def reconcile(name: str, deploy_dir: str | Path, keep_releases: int = 3,
              lock_file: str | Path | None = None) -> ReconcileResult:
    """One pass under the registry lock: finish an interrupted promotion, repair the alias, and
    make current, previous and the reload notice agree with the Production version."""
    deploy_dir = Path(deploy_dir).resolve()  # relative (as in config) or absolute, one meaning
    deploy_dir.mkdir(parents=True, exist_ok=True)
    with registry_lock(lock_file):
        result = _reconcile_production(name, deploy_dir, keep_releases, lock_file)
        try:
            result.shadow = _reconcile_shadow(name, deploy_dir, lock_file)
        except Exception:  # noqa: BLE001 - Production is deployed; the shadow is retried by the next pass
            log.exception("%s: the shadow deployment (Staging) failed; Production's is done", name)
    return result


def _reconcile_production(name: str, deploy_dir: Path, keep_releases: int,
                          lock_file: str | Path | None) -> ReconcileResult:
    """:func:`reconcile`'s Production half (under the lock)."""
    complete_pending(name, lock_file)
    version = production_version(name)
    if version is None:
        current = deploy_dir / "current"
        if current.exists() and not model_exists(name):  # the wrong store, not an empty Production
            import mlflow

            log.warning("%s: no such registered model in %s: %s left as it is (%s)", name,
                        mlflow.get_tracking_uri(), deploy_dir, current.resolve().name)
            return ReconcileResult(None, False, False, current.resolve())
        return ReconcileResult(None, _stand_down(deploy_dir, name), False, None)
    repaired = ensure_alias(name)
    changed = False
    if _intact(deploy_dir / "current", name, version) is None:
        _deploy(name, version, deploy_dir)
        changed = True
    _repair_previous(deploy_dir, name)
    current = json.loads((deploy_dir / "current" / MANIFEST).read_text())
    if _reload_notice(deploy_dir) != (current["version"], current["checksum"]):
        notify_reload(deploy_dir, current)  # also after a crash between the switch and the notice
        changed = True
    _prune(deploy_dir, keep_releases)
    if changed:
        log.info("%s: deployed version %s (%s)", name, version, (deploy_dir / "current").resolve().name)
    return ReconcileResult(version, changed, repaired, (deploy_dir / "current").resolve())


SHADOW_DIR = "shadow"
"""The Staging version's deployment inside the deploy directory (same layout: releases/, current,
reload.json), what the bridge shadow-trades (:mod:`mlproject.bridge.shadow`)."""


def _reconcile_shadow(name: str, deploy_dir: Path, lock_file: str | Path | None) -> str | None:
    """Make ``<deploy_dir>/shadow`` hold the Staging version (or nothing). A Staging version that
    does not deploy is logged and left out: Production's deployment never depends on it."""
    if not model_exists(name):
        return None
    complete_staging(name, lock_file)
    shadow, version = deploy_dir / SHADOW_DIR, staging_version(name)
    if version is None:
        if (shadow / "current").is_symlink():
            (shadow / "current").unlink()
        if (_reload_notice(shadow) or (None,))[0] is not None:
            notify_reload(shadow, {"name": name, "version": None, "checksum": None})
            log.info("%s: nothing in Staging: the shadow deployment stood down", name)
        return None
    try:
        if _intact(shadow / "current", name, version) is None:
            release = _deploy(name, version, shadow)  # a refused export is removed again
            log.info("%s: Staging v%s deployed for shadow trading (%s)", name, version, release.name)
        manifest = json.loads((shadow / "current" / MANIFEST).read_text())
        if _reload_notice(shadow) != (manifest["version"], manifest["checksum"]):
            notify_reload(shadow, manifest)
        _prune(shadow, 2)
    except DeployRefused as exc:
        log.error("%s: the Staging version is not shadow-traded: %s", name, exc)
        return None
    return version


def _stand_down(deploy_dir: Path, name: str) -> bool:
    """Nothing is in Production (archived by hand, or never promoted): no model may trade. The
    deployed release becomes ``previous``, ``current`` goes, and the reload notice names no version
    (a running bridge then trades flat: :func:`mlproject.bridge.deployed.stood_down`). True if
    anything changed; a crash at any step is finished by the next pass."""
    current, changed = deploy_dir / "current", False
    if current.is_symlink() or current.exists():
        if current.exists() and _intact(current) is not None:
            _switch_link(deploy_dir / "previous", current.resolve())
        fault_point("reconcile:stand-down-previous")
        current.unlink()
        fault_point("reconcile:stand-down-current")
        changed = True
    notice = _reload_notice(deploy_dir)
    if notice is not None and notice[0] is not None:  # something was deployed: tell the bridge it is not any more
        notify_reload(deploy_dir, {"name": name, "version": None, "checksum": None})
        changed = True
    if changed:
        log.warning("%s: nothing in Production: deployment stood down (a bridge trades flat); the last release "
                    "is %s", name, deploy_dir / "previous")
    else:
        log.info("%s: nothing in Production; nothing deployed", name)
    return changed


def _deploy(name: str, version: str, deploy_dir: Path) -> Path:
    """Make ``current`` a checked release of ``version``; ``previous`` the intact one before it."""
    release = _matching_release(deploy_dir, name, version)
    if release is None:
        release = export_release(name, version, deploy_dir)
        fault_point("reconcile:exported")
        try:
            check_deployable(release / "model", f"{name} v{version}")
        except DeployRefused:
            shutil.rmtree(release, ignore_errors=True)
            raise
    current = deploy_dir / "current"
    if current.exists() and _intact(current) is not None:
        _switch_link(deploy_dir / "previous", current.resolve())
    fault_point("reconcile:previous-switched")
    _switch_link(current, release)
    fault_point("reconcile:current-switched")
    return release


def _repair_previous(deploy_dir: Path, name: str) -> None:
    """``previous`` must be an intact release other than current; else the newest intact release
    of the rollback target takes its place, or the link goes."""
    link, current = deploy_dir / "previous", (deploy_dir / "current").resolve()
    if link.is_symlink() and link.exists() and link.resolve() != current and _intact(link) is not None:
        return
    target = rollback_target(name)
    release = _matching_release(deploy_dir, name, target) if target else None
    if release is not None and release.resolve() != current:
        _switch_link(link, release)
        log.warning("%s: previous release repaired to version %s", name, target)
    elif link.is_symlink():
        link.unlink()
        log.warning("%s: previous release was not intact and no release of the rollback target is kept: removed", name)


def reload_notice(deploy_dir: str | Path) -> dict[str, Any] | None:
    """The last deploy notice (``reload.json``: version, checksum, sequence, ...); None when there
    is none or it is unreadable."""
    try:
        notice = json.loads((Path(deploy_dir) / RELOAD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return notice if isinstance(notice, dict) else None


def _reload_notice(deploy_dir: Path) -> tuple[Any, Any] | None:
    notice = reload_notice(deploy_dir)
    return None if notice is None else (notice.get("version"), notice.get("checksum"))


def _matching_release(deploy_dir: Path, name: str, version: str) -> Path | None:
    """A kept, intact release of this version (instant rollback without a download)."""
    for release in sorted((deploy_dir / "releases").glob(f"v{version}-*"), reverse=True):
        if _intact(release, name, str(version)) is not None:
            return release
    return None
