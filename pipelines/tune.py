"""A tracked hyper-parameter search: Ray Tune (ASHA) over PPO and env settings, each trial a
nested MLflow run; the winner is registered and goes through the promotion gate.

    python -m pipelines.tune [--config conf/default.yaml] [--samples 8] [--iterations 50] [--dry-run]
    python -m pipelines.tune --set 'tune.space.train.lr=[0.0001,0.001]' --set 'tune.space.env.reward=[money]'
    mlflow run . -e tune -P samples=8 --env-manager local

Trials are scored on the validation split (the median of ``train.val_metric`` over
``train.val_windows`` folds), never on the test split, which only the gate sees; every
validation of every trial counts for the gate's Deflated Sharpe. ``tune.*`` settings:
``docs/configuration.md``; how it works: :mod:`mlproject.tuning`.
"""

from __future__ import annotations

import argparse

from mlproject.cli import base_parser, optional_int, run_cli
from mlproject.config import Config
from mlproject.tuning import TuneResult, tune_policy


def main(cfg: Config, samples: int | None = None, iterations: int | None = None, data: str | None = None,
         dry_run: bool = False) -> TuneResult:
    """Search, register the best trial's policy and gate it (:func:`mlproject.tuning.tune_policy`)."""
    if data:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": data})})
    if iterations is not None:
        if iterations < 1:
            raise ValueError(f"--iterations must be at least 1, got {iterations}")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"iterations": iterations})})
    if samples is not None and samples < 1:
        raise ValueError(f"--samples must be at least 1, got {samples}")
    result = tune_policy(cfg, samples=samples, dry_run=dry_run)
    print(result.table.to_string(index=False))
    decision = result.decision
    print(f"best: {' '.join(f'{k}={v}' for k, v in result.best_overrides.items())} (score {result.best_score:.4g}); "
          f"registered {'v' + result.registered_version if result.registered_version else 'nothing'}; "
          f"gate: {decision.decision if decision else 'not run'}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--samples", type=optional_int, default=None, help="trials (default: tune.num_samples)")
    parser.add_argument("--iterations", type=optional_int, default=None,
                        help="most training iterations per trial (default: train.iterations)")
    parser.add_argument("--data", default="", help="bar file or 'synthetic' (default: data.source)")
    parser.add_argument("--dry-run", action="store_true", help="register the winner and decide, promote nothing")
    parser.add_argument("--dry-run-flag", default="false", choices=("true", "false"),
                        help="the same as a value (how MLproject passes -P dry_run=true)")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, a: main(cfg, a.samples, a.iterations, a.data or None,
                                                a.dry_run or a.dry_run_flag == "true"))
