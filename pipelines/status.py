"""Print the registry status: versions, stage, aliases, key eval metrics, Production history.

    python -m pipelines.status [--config conf/default.yaml]
"""

from __future__ import annotations

import argparse

from mlproject.cli import base_parser, run_cli
from mlproject.config import Config
from mlproject.registry import status
from mlproject.tracking import setup_tracking


def main(cfg: Config) -> str:
    setup_tracking(cfg)
    text = status(cfg.promotion.model_name)
    print(text)  # the command's output, not a log line
    return text


def build_parser() -> argparse.ArgumentParser:
    return base_parser(__doc__.splitlines()[0])


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, a: main(cfg))
