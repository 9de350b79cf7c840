"""Make the deployed model equal the registry's Production version: the command and its timer.

    python -m registry_hooks.reconcile                      # once
    python -m registry_hooks.reconcile --every 30s          # safety net: forever, every 30 s

The work is :func:`mlproject.deploy.reconcile` (layout of the deploy directory, crash safety and
checks are described there); this module runs it once or on a timer.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from mlproject.cli import base_parser, parse_every, run_cli
from mlproject.deploy import (  # noqa: F401 - re-exported: the names a deploy script uses
    MANIFEST,
    RELOAD_FILE,
    DeployRefused,
    ReconcileResult,
    check_deployable,
    deployed_manifest,
    reconcile,
    tree_checksum,
)
from mlproject.tracking import setup_tracking

log = logging.getLogger(__name__)


def describe(name: str, deploy_dir: str | Path, result: ReconcileResult) -> str:
    """One line saying what is deployed after a pass (what the command prints)."""
    if result.version is None:
        if result.release is not None:
            return (f"{name}: no such registered model in this tracking store; {deploy_dir} left as it is "
                    f"(still {result.release.name}): is this the store that deployed it?")
        if result.changed:
            return (f"{name}: nothing in Production: stood down ({Path(deploy_dir) / 'current'} removed, the last "
                    "release kept as previous); a bridge trades flat")
        return f"{name}: nothing in Production; nothing deployed in {deploy_dir} (a bridge trades flat)"
    done = "deployed now" if result.changed else "already deployed"
    repaired = "; alias production repaired" if result.alias_repaired else ""
    release = result.release.name if result.release is not None else "?"
    shadow = (f"; Staging v{result.shadow} shadow-deployed in {Path(deploy_dir) / 'shadow'}" if result.shadow
              else "")
    return (f"{name} v{result.version} (Production) {done}: {Path(deploy_dir) / 'current'} -> {release}{repaired}"
            f"{shadow}")


def main(cfg: Any, every: float | None = None, max_passes: int | None = None) -> ReconcileResult:
    """Reconcile once, or every ``every`` seconds (a failed pass is logged and retried). Prints
    one line saying what is deployed: after the pass, or in a loop on the first pass and on
    every change."""
    setup_tracking(cfg)
    p = cfg.promotion
    passes, result, said = 0, ReconcileResult(None, False, False, None), None
    while True:
        try:
            result = reconcile(p.model_name, p.deploy_dir, p.keep_releases, lock_file=p.lock_file)
            state = (result.version, result.release)
            if every is None or state != said or result.changed or result.alias_repaired:
                print(describe(p.model_name, p.deploy_dir, result), flush=True)
                said = state
        except Exception:  # noqa: BLE001 - the safety net must outlive a flaky tracking server
            if every is None:
                raise
            log.exception("reconcile pass failed; retrying in %.0f s", every)
        passes += 1
        if every is None or (max_passes is not None and passes >= max_passes):
            return result
        time.sleep(every)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--every", default="", help="repeat forever at this interval, e.g. 30s")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, a: main(cfg, parse_every(a.every) if a.every else None))
