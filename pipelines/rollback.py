"""Roll Production back to the previous version (or a named one) and redeploy.

    python -m pipelines.rollback                     # to the version that was Production before
    python -m pipelines.rollback --version 3 --reason "slippage spike after v5"
    python -m pipelines.rollback --from-version 5    # only if v5 is still Production
    python -m pipelines.rollback --flat --reason "..."   # stand down: nothing in Production, the bridge trades flat
    mlflow run . -e rollback -P version=3 --env-manager local

A "Production" stage transition (plus the alias) recorded with its reason, then
``mlproject.deploy.reconcile``; the MLflow run logs ``rollback/latency_s``, from the command to the
previous model being the deployed one.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from mlproject.cli import base_parser, run_cli
from mlproject.config import Config
from mlproject.deploy import check_version_deployable, reconcile
from mlproject.registry import registry_lock, rollback, shown, stand_down
from mlproject.tracking import pipeline_run, setup_tracking

log = logging.getLogger(__name__)


def main(cfg: Config, version: str | None = None, reason: str = "", force: bool = False,
         from_version: str | None = None, flat: bool = False) -> dict[str, Any]:
    """Roll back and redeploy; returns the history event, the deployed release and the latency.

    ``version`` must have been Production before (the history says so) unless ``force`` with a
    ``reason``; ``from_version``: only if that version is still Production. Every target must
    load and predict valid actions before the stage moves. ``flat``: stand Production down
    instead (nothing in Production; the deployment stands down and a bridge trades flat).
    """
    started = time.perf_counter()
    _check_version_numbers(version, from_version)
    if flat and version:
        raise ValueError("--flat and --version: a stand-down goes to no version")
    setup_tracking(cfg)
    p = cfg.promotion
    with pipeline_run(cfg, "rollback"), registry_lock(p.lock_file):
        if flat:
            event = stand_down(p.model_name, reason, lock_file=p.lock_file, expected_current=from_version)
        else:
            event = rollback(p.model_name, version, reason, force=force, lock_file=p.lock_file,
                             expected_current=from_version, check=check_version_deployable)
        deployed = reconcile(p.model_name, p.deploy_dir, p.keep_releases, lock_file=p.lock_file)
        latency = time.perf_counter() - started
        _log_rollback(event, latency)
        log.info("rolled back %s from %s to %s in %.2f s (deployed %s)", p.model_name,
                 f"v{event['previous']}" if event["previous"] else "flat", shown(event), latency,
                 deployed.release or "nothing: a bridge trades flat")
        return {"event": event, "release": deployed.release, "latency_s": latency}


def _check_version_numbers(version: str | None, from_version: str | None) -> None:
    """``--version`` and ``--from-version``, when given, are version numbers (1, 2, ...)."""
    for flag, value in (("--version", version), ("--from-version", from_version)):
        if value is not None and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"{flag} {value!r}: expected a version number such as 3")


def _log_rollback(event: dict[str, Any], latency: float) -> None:
    """The run's decision tags (to and from which version, why) and ``rollback/latency_s``."""
    import mlflow

    mlflow.set_tags({"decision": "rolled back" if event["version"] else "stood down",
                     "to_version": event["version"] or "flat", "from_version": event["previous"],
                     "reasons": event["reason"]})
    mlflow.log_metric("rollback/latency_s", latency)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--version", default="", help="version to go back to (default: the previous Production); "
                        "it must have been Production before, unless --force")
    parser.add_argument("--reason", default="", help="why (recorded in the registry history)")
    parser.add_argument("--force", action="store_true", help="allow a version that was never Production "
                        "(needs --reason; it must still load and predict valid actions)")
    parser.add_argument("--from-version", default="", help="roll back only if this version is still Production "
                        "(two people rolling back the same bad version roll back once)")
    parser.add_argument("--force-flag", default="false", choices=("true", "false"),
                        help="the same as a value (how MLproject passes -P force=true)")
    parser.add_argument("--flat", action="store_true", help="stand down instead: nothing in Production, the "
                        "deployment stands down and a bridge trades flat (when there is nothing to roll back to)")
    parser.add_argument("--flat-flag", default="false", choices=("true", "false"),
                        help="the same as a value (how MLproject passes -P flat=true)")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, a: main(cfg, a.version or None, a.reason, a.force or a.force_flag == "true",
                                                     a.from_version or None, a.flat or a.flat_flag == "true"))
