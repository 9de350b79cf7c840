"""Model Registry access. The only module that calls MLflow's (deprecated) stage APIs, so that
moving to aliases alone is a one-file change (see shared DESIGN: "Registry")."""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

log = logging.getLogger(__name__)

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
    client, name = MlflowClient(), match["name"]
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(name, match["alias"])
        ref = match["ref"]
        if ref.isdigit():
            return client.get_model_version(name, ref)
        with warnings.catch_warnings():
            # Stages are deprecated in MLflow 3 but are how this project deploys (DESIGN.md).
            warnings.simplefilter("ignore", FutureWarning)
            versions = client.get_latest_versions(name, stages=[ref])
    except MlflowException as exc:
        raise ValueError(f"{model_uri}: {exc.message}") from None
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
