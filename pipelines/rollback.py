"""Roll Production back to the previous version (or a named one) and redeploy.

    python -m pipelines.rollback                     # to the version that was Production before
    python -m pipelines.rollback --version 3 --reason "slippage spike after v5"
    mlflow run . -e rollback -P version=3 --env-manager local

A "Production" stage transition (plus the alias) recorded with its reason, then
``registry_hooks.reconcile``; the MLflow run logs ``rollback/latency_s``, from the command to the
previous model being the deployed one.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from mlproject.config import Config
from pipelines.cli import base_parser, run_cli

log = logging.getLogger(__name__)


def main(cfg: Config, version: str | None = None, reason: str = "") -> dict[str, Any]:
    """Roll back and redeploy; returns the history event, the deployed release and the latency."""
    import mlflow

    from mlproject.registry import rollback
    from mlproject.tracking import pipeline_run, setup_tracking
    from registry_hooks.reconcile import reconcile

    started = time.perf_counter()
    setup_tracking(cfg)
    p = cfg.promotion
    with pipeline_run(cfg, "rollback", nested=mlflow.active_run() is not None):
        event = rollback(p.model_name, version or None, reason)
        deployed = reconcile(p.model_name, p.deploy_dir, p.keep_releases)
        latency = time.perf_counter() - started
        mlflow.set_tags({"decision": "rolled back", "to_version": event["version"], "from_version": event["previous"],
                         "reasons": event["reason"]})
        mlflow.log_metric("rollback/latency_s", latency)
        log.info("rolled back %s from v%s to v%s in %.2f s (deployed %s)", p.model_name, event["previous"],
                 event["version"], latency, deployed.release)
        return {"event": event, "release": deployed.release, "latency_s": latency}


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--version", default="", help="version to go back to (default: the previous Production)")
    parser.add_argument("--reason", default="", help="why (recorded in the registry history)")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, a: main(cfg, a.version or None, a.reason))
