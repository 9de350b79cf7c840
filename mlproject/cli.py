"""Command-line pieces every pipeline shares: --config / --set and error reporting."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from mlproject.config import Config, ConfigError, load_config, parse_duration
from mlproject.data import DataError
from mlproject.locks import LockBusy
from mlproject.signals import Stopped, install, raise_stopped, restore

log = logging.getLogger("pipelines")


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The parser every command shares; its description is the first paragraph of ``doc`` (the
    module's docstring), whole: a first sentence may wrap onto a second line."""
    parser = argparse.ArgumentParser(description=" ".join(doc.strip().split("\n\n")[0].split()))
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


MIN_EVERY_S = 1.0
"""The shortest ``--every`` of a command that repeats a pass (reconcile, monitor): a pass reads the
registry (and the buffer); ``--every 0`` was a busy loop on the store."""


def parse_every(text: str) -> float:
    """``--every``: '30s', '15m', '1h' or plain seconds -> seconds (at least :data:`MIN_EVERY_S`)."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise ValueError(f"--every {text!r}: expected a duration such as 30s, 15m or 1h") from None
    if not seconds >= MIN_EVERY_S:
        raise ValueError(f"--every {text!r}: at least {MIN_EVERY_S:g} s between passes")
    return seconds


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = [item for chunk in args.overrides for item in shlex.split(chunk)]
    return load_config(args.config or None, overrides)


def run_cli(parser: argparse.ArgumentParser, main: Callable[[Config, argparse.Namespace], Any]) -> None:
    """Parse, load the config, call ``main``; a bad input exits with code 2 and one clear message."""
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from mlflow.exceptions import MlflowException

    args = parser.parse_args()
    # SIGTERM/SIGINT unwind the pipeline (its runs end KILLED) instead of ending the process
    # where it stands; the loops install their own handler (stop between passes) while they run.
    previous = install(raise_stopped())
    try:
        main(config_from_args(args), args)
    except (Stopped, KeyboardInterrupt) as exc:
        _exit_stopped(exc)
    except (ConfigError, DataError, OSError, ValueError, MlflowException, LockBusy) as exc:
        # Bad input (a file, a key, a model URI, a path that is a folder, a busy registry): one
        # message that names it. LOGLEVEL=DEBUG in the environment also prints the traceback.
        log.debug("traceback", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        restore(previous)


def _exit_stopped(exc: BaseException) -> NoReturn:
    """A signal or Ctrl-C stopped the pipeline: end what runs are still open KILLED, say so, and
    exit with the signal's code."""
    stopped = exc if isinstance(exc, Stopped) else Stopped(signal.SIGINT)
    ended = end_active_runs("KILLED")  # what no `with` block ended (none, normally)
    print(f"{stopped}: the runs it had open ended KILLED{f' ({ended} more here)' if ended else ''}",
          file=sys.stderr)
    sys.exit(stopped.exit_code)


def end_active_runs(status: str) -> int:
    """End every run still on MLflow's active-run stack with ``status``; returns how many."""
    import mlflow

    ended = 0
    while mlflow.active_run() is not None:
        mlflow.end_run(status)
        ended += 1
    return ended
