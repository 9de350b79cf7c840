"""Command-line pieces every pipeline shares: --config / --set and error reporting."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

from mlproject.config import Config, ConfigError, load_config
from mlproject.data import DataError
from mlproject.locks import LockBusy

log = logging.getLogger("pipelines")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="", help="YAML settings file (default: the embedded defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set env.instrument=NQ (repeatable; one argument may "
                             "hold several, space-separated, as MLproject passes them)")
    return parser


def optional_int(text: str) -> int | None:
    """argparse type for an int that may be left empty (MLproject passes '' for 'not given')."""
    text = text.strip()
    if not text:
        return None
    try:
        return int(float(text)) if float(text).is_integer() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = [item for chunk in args.overrides for item in shlex.split(chunk)]
    return load_config(args.config or None, overrides)


def run_cli(parser: argparse.ArgumentParser, main: Callable[[Config, argparse.Namespace], Any]) -> None:
    """Parse, load the config, call ``main``; a bad input exits with code 2 and one clear message."""
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from mlflow.exceptions import MlflowException

    args = parser.parse_args()
    try:
        main(config_from_args(args), args)
    except (ConfigError, DataError, OSError, ValueError, MlflowException, LockBusy) as exc:
        # Bad input (a file, a key, a model URI, a path that is a folder, a busy registry): one
        # message that names it. LOGLEVEL=DEBUG in the environment also prints the traceback.
        log.debug("traceback", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
