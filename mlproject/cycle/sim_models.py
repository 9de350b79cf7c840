"""The walk-forward simulation's registered models (``<model_name>-sim-<run>``): each simulation
registers its own model so that its promotions never touch the real one, and deletes it at its
end; a killed simulation's leftovers are deleted by the next one.

Kept apart from :mod:`mlproject.registry` (the real model's Production, history and status).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlproject.registry import HISTORY_TAG, registry_lock

log = logging.getLogger(__name__)


SIM_RUN_TAG = "sim.run_id"
"""Registered-model tag: the simulation run whose versions the model holds."""


def drop_sim_models(model_name: str, only: str | None = None, lock_file: str | Path | None = None) -> list[str]:
    """Delete the registered model ``only`` (a walk-forward simulation's, at its end), or every
    ``<model_name>-sim-*`` model whose simulation run no longer runs (killed ones' leftovers),
    with their registry history runs, under the registry lock. Returns the names deleted."""
    with registry_lock(lock_file):
        return _drop_sim_models(model_name, only)


def _drop_sim_models(model_name: str, only: str | None) -> list[str]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    models = client.search_registered_models(filter_string=f"name = '{only}'" if only else
                                             f"name LIKE '{model_name}-sim-%'")
    deleted = []
    for model in models:
        if only is None and _sim_running(client, model):
            continue
        client.delete_registered_model(model.name)
        history = model.tags.get(HISTORY_TAG)
        if history:
            try:
                client.delete_run(history)
            except MlflowException:  # already gone
                pass
        deleted.append(model.name)
    if deleted:
        log.info("simulate: deleted the registered model(s) %s (the runs keep their logged models)",
                 ", ".join(deleted))
    return deleted


def _sim_running(client: Any, model: Any) -> bool:
    """Whether the simulation that registered ``model`` still runs (its run, else the parent of a
    version's run: models of before the tag)."""
    from mlflow.exceptions import MlflowException

    run_id = model.tags.get(SIM_RUN_TAG)
    try:
        if run_id is None:
            versions = client.search_model_versions(f"name='{model.name}'", max_results=1)
            if not versions or not versions[0].run_id:
                return False
            run_id = client.get_run(versions[0].run_id).data.tags.get("mlflow.parentRunId")
        return bool(run_id) and client.get_run(run_id).info.status == "RUNNING"
    except MlflowException:  # the run was deleted
        return False
