"""Gated promotion: challenger vs current Production on the same held-out bars.

    python -m pipelines.promote --candidate 7                       # a version of nt8-agent
    python -m pipelines.promote --candidate models:/nt8-agent/7 --dry-run
    mlflow run . -e promote -P candidate=7 --env-manager local

Both models are backtested on the test split of ``data.source`` and gated (``promotion.*``); a
promotion is a "Production" stage transition plus the alias, then a reconcile of the deployment.
The rules and the records: :mod:`mlproject.gate`, whose
:func:`~mlproject.gate.promote_candidate` the cycle calls too.
"""

from __future__ import annotations

import argparse

from mlproject.cli import base_parser, run_cli
from mlproject.config import Config
from mlproject.gate import PromoteResult, promote_candidate


def main(cfg: Config, candidate: str, dry_run: bool = False) -> PromoteResult:
    """Evaluate, gate, promote or refuse ``candidate``; always an MLflow run
    (:func:`mlproject.gate.promote_candidate`, the function the cycle calls)."""
    return promote_candidate(cfg, candidate, dry_run=dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--candidate", required=True, help="a version number of promotion.model_name or a model URI")
    parser.add_argument("--dry-run", action="store_true", help="evaluate and decide, change nothing")
    parser.add_argument("--dry-run-flag", default="false", choices=("true", "false"),
                        help="the same as a value (how MLproject passes -P dry_run=true)")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, a: main(cfg, a.candidate, a.dry_run or a.dry_run_flag == "true"))
