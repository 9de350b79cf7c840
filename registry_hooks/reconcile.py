"""Make the deployed model equal the registry's Production version (level-triggered, idempotent).

    python -m registry_hooks.reconcile                      # once
    python -m registry_hooks.reconcile --every 30s          # safety net: forever, every 30 s

Deploy directory layout::

    deploy/
      releases/v3-20261124T101500Z/   model/ (the MLflow model) + manifest.json
      current  -> releases/v3-...      the deployed model (a symlink, switched atomically)
      previous -> releases/v2-...      the one before, for an instant switch back
      reload.json                      what a running bridge watches: rewritten atomically on every switch

An export is written under ``.staging-*`` and only renamed into ``releases/`` when complete, and
``current`` moves by ``os.replace`` of a symlink: a reconcile killed at any point leaves the
previous complete model deployed, and the next run cleans up and finishes the job.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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


def tree_checksum(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file (order-independent of listing)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def deployed_manifest(deploy_dir: Path) -> dict[str, Any] | None:
    """The manifest of the currently deployed release, or None."""
    current = deploy_dir / "current"
    try:
        return json.loads((current / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    previous = json.loads((deploy_dir / RELOAD_FILE).read_text()) if (deploy_dir / RELOAD_FILE).exists() else {}
    _atomic_write(deploy_dir / RELOAD_FILE,
                  json.dumps({**manifest, "sequence": int(previous.get("sequence", 0)) + 1,
                              "deploy_path": str((deploy_dir / "current").resolve())}, indent=2))


def _prune(deploy_dir: Path, keep: int) -> None:
    """Remove stale staging folders and all but the newest ``keep`` releases (never current or previous)."""
    for stale in deploy_dir.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    in_use = {(deploy_dir / link).resolve() for link in ("current", "previous") if (deploy_dir / link).exists()}
    releases = sorted((deploy_dir / "releases").glob("v*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in releases[keep:]:
        if old.resolve() not in in_use:
            shutil.rmtree(old, ignore_errors=True)


def reconcile(name: str, deploy_dir: str | Path, keep_releases: int = 3) -> ReconcileResult:
    """One pass: repair the alias, deploy the Production version if it is not what is deployed."""
    from mlproject.registry import ensure_alias, production_version

    deploy_dir = Path(deploy_dir).resolve()  # relative (as in config) or absolute, one meaning
    deploy_dir.mkdir(parents=True, exist_ok=True)
    version = production_version(name)
    if version is None:
        log.info("%s: nothing in Production; deployment left as it is", name)
        return ReconcileResult(None, False, False, None)
    repaired = ensure_alias(name)
    current = deployed_manifest(deploy_dir)
    if current and current.get("name") == name and current.get("version") == version \
            and tree_checksum(deploy_dir / "current" / "model") == current.get("checksum"):
        _prune(deploy_dir, keep_releases)
        return ReconcileResult(version, False, repaired, (deploy_dir / "current").resolve())
    release = _matching_release(deploy_dir, name, version) or export_release(name, version, deploy_dir)
    if (deploy_dir / "current").exists():
        _switch_link(deploy_dir / "previous", (deploy_dir / "current").resolve())
    _switch_link(deploy_dir / "current", release)
    notify_reload(deploy_dir, json.loads((release / MANIFEST).read_text()))
    _prune(deploy_dir, keep_releases)
    log.info("%s: deployed version %s (%s)", name, version, release.name)
    return ReconcileResult(version, True, repaired, release)


def _matching_release(deploy_dir: Path, name: str, version: str) -> Path | None:
    """A kept, intact release of this version (instant rollback without a download)."""
    for release in sorted((deploy_dir / "releases").glob(f"v{version}-*"), reverse=True):
        try:
            manifest = json.loads((release / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if manifest.get("name") == name and tree_checksum(release / "model") == manifest.get("checksum"):
            return release
    return None


def parse_every(text: str) -> float:
    """'30s', '5m', '1h' or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise ValueError(f"--every {text!r}: expected a duration such as 30s, 5m or 1h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def main(cfg: Any, every: float | None = None, max_passes: int | None = None) -> ReconcileResult:
    """Reconcile once, or every ``every`` seconds (a failed pass is logged and retried)."""
    from mlproject.tracking import setup_tracking

    setup_tracking(cfg)
    p = cfg.promotion
    passes, result = 0, ReconcileResult(None, False, False, None)
    while True:
        try:
            result = reconcile(p.model_name, p.deploy_dir, p.keep_releases)
        except Exception:  # noqa: BLE001 - the safety net must outlive a flaky tracking server
            if every is None:
                raise
            log.exception("reconcile pass failed; retrying in %.0f s", every)
        passes += 1
        if every is None or (max_passes is not None and passes >= max_passes):
            return result
        time.sleep(every)


def build_parser() -> argparse.ArgumentParser:
    from pipelines.cli import base_parser

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--every", default="", help="repeat forever at this interval, e.g. 30s")
    return parser


if __name__ == "__main__":
    from pipelines.cli import run_cli

    run_cli(build_parser(), lambda cfg, a: main(cfg, parse_every(a.every) if a.every else None))
