"""Print the registry status: versions, stage, aliases, key eval metrics, Production history,
and the Staging version's shadow trading so far (its live comparison with Production).

    python -m pipelines.status [--config conf/default.yaml]

Exits 1 while the drift monitor's alert (``monitor.alert``) is on the Production version.
"""

from __future__ import annotations

import argparse
import sys

from mlproject.cli import base_parser, run_cli
from mlproject.config import Config
from mlproject.monitor import monitor_alert
from mlproject.experience import ExperienceBuffer
from mlproject.registry import status
from mlproject.shadow_verdict import evidence, judge
from mlproject.staging import staging_history
from mlproject.tracking import setup_tracking


def main(cfg: Config) -> str:
    setup_tracking(cfg)
    text = status(cfg.promotion.model_name) + _staging_lines(cfg)
    alert = monitor_alert(cfg.promotion.model_name)
    if alert:
        text += f"\nDRIFT MONITOR ALERT on the Production version: {alert}"
    print(text)  # the command's output, not a log line
    return text


def _staging_lines(cfg: Config) -> str:
    """The Staging version's evidence so far (what maintenance would decide now) and the staging history."""
    name = cfg.promotion.model_name
    lines = [f"  #{e['seq']} {e['at']} {e['action']} v{e['version']}: {e['reason']}" for e in staging_history(name)]
    text = "\nstaging history (oldest first):\n" + "\n".join(lines) if lines else ""
    verdict = evidence(cfg, ExperienceBuffer(cfg.continuous_learning.experience_storage))
    if verdict is not None:
        verdict = judge(cfg, verdict)
        if verdict.decision != "waiting":  # maintenance decides; status only says what it would do
            verdict.decision = f"would be {verdict.decision} by the next maintenance"
        text += f"\nshadow: {verdict.describe()}"
    return text


def build_parser() -> argparse.ArgumentParser:
    return base_parser(__doc__)


if __name__ == "__main__":
    def run(cfg: Config, args: argparse.Namespace) -> None:
        main(cfg)
        if monitor_alert(cfg.promotion.model_name):
            sys.exit(1)

    run_cli(build_parser(), run)
