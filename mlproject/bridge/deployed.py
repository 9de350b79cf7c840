"""The model a bridge trades with: the release ``registry_hooks.reconcile`` deployed.

``deploy_dir/current`` is a complete, checked release (an MLflow model folder plus
``manifest.json``); ``deploy_dir/reload.json`` changes with every switch. The bridge loads the
RLModule directly (no pyfunc round trip: a decision must take well under a millisecond) and acts
through :func:`mlproject.policy.fast_greedy`, checked equal to the pyfunc model's forward pass.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlproject.deploy import MANIFEST, reload_notice
from mlproject.ensemble import ensemble_fast_greedy
from mlproject.ood import REFERENCE_KEY, Reference
from mlproject.policy import SETTINGS_KEY, PolicySettings, fast_greedy, find_module_dirs, load_module

log = logging.getLogger(__name__)


class NotDeployed(RuntimeError):
    """Nothing usable in the deploy directory (yet)."""


@dataclass
class DeployedPolicy:
    """One loaded release."""

    name: str
    version: str
    checksum: str
    settings: PolicySettings
    module: Any
    path: Path
    act: Any = None
    """Greedy actions (int64) for a float32 batch of observations (``mlproject.policy.fast_greedy``;
    an ensemble's mean logits, ``mlproject.ensemble.ensemble_fast_greedy``)."""
    members: list[Any] | None = None
    """An ensemble's RLModules (``module`` is the first); None for one policy."""
    reference: Reference | None = None
    """The training bars' feature reference (the out-of-distribution guard); None for a model
    logged without one."""

    def __post_init__(self) -> None:
        if self.act is None:
            self.act = ensemble_fast_greedy(self.members) if self.members else fast_greedy(self.module)

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    @classmethod
    def load(cls, deploy_dir: str | Path) -> DeployedPolicy:
        """The release ``current`` points at (resolved once: a switch meanwhile does not tear it)."""
        current = Path(deploy_dir) / "current"
        if not current.exists():
            raise NotDeployed(f"{deploy_dir}: no deployed model (current is missing): promote a model, or run "
                              "python -m registry_hooks.reconcile")
        release = current.resolve()
        try:
            manifest = json.loads((release / MANIFEST).read_text())
            metadata = _metadata(release / "model")  # read once: the settings and the ood reference
            settings = PolicySettings.from_dict(metadata[SETTINGS_KEY]) if metadata.get(SETTINGS_KEY) else None
        except (OSError, ValueError) as exc:
            raise NotDeployed(f"{release}: not a complete release ({exc})") from None
        label = f"{manifest.get('name')} v{manifest.get('version')}"
        if settings is None:
            raise NotDeployed(f"{label} ({release}) records no observation settings (logged before they were); "
                              "retrain it before it can trade")
        modules = [load_module(folder) for folder in find_module_dirs(release / "model")]
        return cls(str(manifest["name"]), str(manifest["version"]), str(manifest.get("checksum", "")), settings,
                   modules[0], release, members=modules if len(modules) > 1 else None,
                   reference=Reference.of(metadata.get(REFERENCE_KEY)))


def _metadata(model_dir: Path) -> dict[str, Any]:
    """The MLflow model's metadata (empty when it has none)."""
    from mlflow.models import Model

    return Model.load(str(model_dir)).metadata or {}


def stood_down(deploy_dir: str | Path) -> bool:
    """Whether reconcile stood the deployment down (nothing in Production): no ``current`` and a
    reload notice that names no version."""
    if (Path(deploy_dir) / "current").exists():
        return False
    notice = reload_notice(deploy_dir)
    return notice is not None and notice.get("version") is None


def reload_sequence(deploy_dir: str | Path) -> Any:
    """The sequence number of the last deploy notice (None when there is none)."""
    notice = reload_notice(deploy_dir)
    return notice.get("sequence") if notice is not None else None


def deployed_version(deploy_dir: str | Path) -> str | None:
    """The version the last deploy notice names (None: none, or nothing deployed)."""
    version = (reload_notice(deploy_dir) or {}).get("version")
    return None if version is None else str(version)
