"""Print the registry status: versions, stage, aliases, key eval metrics, Production history.

    python -m pipelines.status [--config conf/default.yaml]

Exits 1 while the drift monitor's alert (``monitor.alert``) is on the Production version.
"""

from __future__ import annotations

import argparse
import sys

from mlproject.cli import base_parser, run_cli
from mlproject.config import Config
from mlproject.monitor import monitor_alert
from mlproject.registry import status
from mlproject.tracking import setup_tracking


def main(cfg: Config) -> str:
    setup_tracking(cfg)
    text = status(cfg.promotion.model_name)
    alert = monitor_alert(cfg.promotion.model_name)
    if alert:
        text += f"\nDRIFT MONITOR ALERT on the Production version: {alert}"
    print(text)  # the command's output, not a log line
    return text


def build_parser() -> argparse.ArgumentParser:
    return base_parser(__doc__)


if __name__ == "__main__":
    def run(cfg: Config, args: argparse.Namespace) -> None:
        main(cfg)
        if monitor_alert(cfg.promotion.model_name):
            sys.exit(1)

    run_cli(build_parser(), run)
