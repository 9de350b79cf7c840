"""Look after the experience buffer: stats, check, quarantine a bad file, compact.

    python -m pipelines.buffer stats                    # counts, PnL, annotation coverage (JSON)
    python -m pipelines.buffer check                    # every file that is not a buffer file, and why (exit 1 if any)
    python -m pipelines.buffer quarantine FILE          # move FILE to <storage>/_quarantine/: the rest stays readable
    python -m pipelines.buffer compact [--max-rows N]   # keep the newest N (default experience_buffer_size)
    mlflow run . -e buffer -P command=compact --env-manager local

The buffer is ``continuous_learning.experience_storage``. ``compact`` is an MLflow run that logs
the ``buffer/...`` stats after it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mlproject.cli import base_parser, optional_int, run_cli
from mlproject.config import Config
from mlproject.experience import ExperienceBuffer
from mlproject.tracking import log_buffer_stats, pipeline_run, setup_tracking

log = logging.getLogger(__name__)

COMMANDS = ("stats", "check", "quarantine", "compact")


def existing_storage(storage: str) -> str:
    """``storage`` if there is a buffer there (a folder, locally or in the URI's file system); else a
    ValueError naming ``continuous_learning.experience_storage``. Opening a buffer creates its
    folder: a mistyped path would look like an empty, healthy buffer."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(storage) if "://" in storage else \
            (pafs.LocalFileSystem(), str(Path(storage).resolve()))
        kind = fs.get_file_info(path).type
    except (OSError, ValueError) as exc:  # pyarrow's errors for a bad URI
        raise ValueError(f"continuous_learning.experience_storage {storage}: cannot be read ({exc})") from None
    if kind == pafs.FileType.NotFound:
        raise ValueError(f"continuous_learning.experience_storage {storage}: no such folder (nothing created); set "
                         "it to the buffer that paper trading and collect write to (--set "
                         "continuous_learning.experience_storage=PATH)")
    if kind != pafs.FileType.Directory:
        raise ValueError(f"continuous_learning.experience_storage {storage}: is a file, not a buffer folder")
    return storage


def main(cfg: Config, command: str, file: str | None = None, max_rows: int | None = None) -> Any:
    """Run ``command`` on the configured buffer, which must exist (:func:`existing_storage`);
    returns what it produced."""
    buffer = ExperienceBuffer(existing_storage(cfg.continuous_learning.experience_storage))
    if command == "stats":
        return buffer.stats()
    if command == "check":
        return buffer.check()
    if command == "quarantine":
        if not file:
            raise ValueError("quarantine needs the FILE to move aside (see `python -m pipelines.buffer check`)")
        return buffer.quarantine(file)
    if command == "compact":
        import mlflow

        setup_tracking(cfg)
        with pipeline_run(cfg, "buffer-compact"):
            counts = buffer.compact(max_rows or cfg.continuous_learning.experience_buffer_size)
            mlflow.log_metrics({f"compact/{k}": float(v) for k, v in counts.items()})
            log_buffer_stats(buffer)
            return counts
    raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("file", nargs="?", default="", help="quarantine: the file to move aside")
    parser.add_argument("--max-rows", type=optional_int, default=None,
                        help="compact: experiences kept (default continuous_learning.experience_buffer_size)")
    return parser


def _cli(cfg: Config, args: argparse.Namespace) -> None:
    result = main(cfg, args.command, args.file or None, args.max_rows)
    if args.command == "check":
        for path, problem in result:
            print(f"{path}: {problem}")
        if result:
            sys.exit(1)
        print("all files are buffer files")
    else:
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    run_cli(build_parser(), _cli)
