"""Walk-forward simulation: the continuous-learning cycle replayed on history, out of sample.

    python -m pipelines.simulate [--config conf/simulate.yaml] [--data FILE] [--instrument ES]
                                 [--periods 4] [--start-fraction 0.5] [--seeds 1]
    mlflow run . -e simulate -P periods=4 -P start_fraction=0.5 --env-manager local

At each of ``--periods`` decision points the model is retrained (warm-started from the Production
of that time) on the bars of ``data.source`` (``--data``) before the point only and gated on the
last held-out part of them; the period up to the next point is traded by the Production of that
time (the learning agent), by the first Production (never retrained), flat, buy-and-hold and a
moving-average crossover rule. ``--start-fraction`` of the bars come before the first decision
point. It prints (and logs as ``sim/report.md``) the table: total return, Sharpe, max drawdown,
trades, costs and periods won per agent, promotion regret and the paired test; with ``--seeds N``
it walks forward N times (seeds ``seed`` .. ``seed+N-1``, each its own run tagged ``sim.seed``) and
then prints the spread across seeds. Out-of-sample
equity curves (``equity/<agent>``), metrics (``sim/<agent>/...``, ``sim/regret/...``,
``sim/paired/...``) and a plot with dates and the period boundaries (``sim/equity.png``) go in the
run ``cycle-simulate``; the simulation's versions are registered under their own name and deleted
at the end, so the real Production is never touched (``mlproject.cycle.simulate``).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from mlproject.cli import base_parser, run_cli
from mlproject.config import Config
from mlproject.cycle.run import cycle_run
from mlproject.cycle.sim_report import seed_table
from mlproject.cycle.simulate import check_split, simulate
from mlproject.cycle.summary import CycleResult


def main(cfg: Config, periods: int = 4, start_fraction: float = 0.5) -> CycleResult:
    """Run the walk-forward simulation in its own cycle run; the result's ``simulate`` holds it."""
    check_split(periods, start_fraction)  # junk arguments fail before any run exists
    source = cfg.data.source
    if source != "synthetic" and not Path(source).exists():
        raise ValueError(f"--data / data.source: no such file: {source}")
    with cycle_run(cfg, "simulate") as result:
        result.simulate = simulate(cfg, periods, start_fraction)
    return result


def main_seeds(cfg: Config, periods: int = 4, start_fraction: float = 0.5, seeds: int = 1) -> list[CycleResult]:
    """:func:`main` once per seed (``seed``, ``seed + 1``, ...), each its own run tagged
    ``sim.seed``; the spread across seeds is what a claim about learning has to beat."""
    import mlflow

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (got {seeds})")
    results = []
    for k in range(seeds):
        result = main(cfg.model_copy(update={"seed": cfg.seed + k}), periods, start_fraction)
        mlflow.MlflowClient().set_tag(result.run_id, "sim.seed", str(cfg.seed + k))
        results.append(result)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--periods", type=int, default=4, help="decision points (retrain, gate, trade)")
    parser.add_argument("--start-fraction", type=float, default=0.5,
                        help="share of the bars before the first decision point")
    parser.add_argument("--seeds", type=int, default=1,
                        help="walk forward this many times, seeds seed, seed+1, ... (each its own run), and "
                             "print the spread across them")
    parser.add_argument("--data", action=SetKey, key="data.source", metavar="FILE",
                        help="the bars to walk through (an NT8 export, CSV or Parquet): --set data.source=FILE")
    parser.add_argument("--instrument", action=SetKey, key="env.instrument", metavar="PRESET",
                        help="the contract the bars are traded as (ES, NQ, 6E, ...): --set env.instrument=PRESET")
    return parser


class SetKey(argparse.Action):
    """An option that is a shorthand for ``--set <key>=VALUE`` (applied in command-line order)."""

    def __init__(self, *args: Any, key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.overrides = [*namespace.overrides, shlex.quote(f"{self.key}={values}")]


def _cli(cfg: Config, args: argparse.Namespace) -> None:
    results = main_seeds(cfg, args.periods, args.start_fraction, args.seeds)
    for result in results:
        print(result.summary)
    if len(results) > 1:
        print(seed_table([cfg.seed + k for k in range(len(results))], [r.simulate for r in results]))


if __name__ == "__main__":
    run_cli(build_parser(), _cli)
