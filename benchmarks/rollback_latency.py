"""Rollback latency with the embedded (sqlite) store: from the command to the previous model
being the deployed one. Reference: the 5 s goal.

Measured two ways, side by side in this run, on a registry with two promoted versions of a
trained-size policy model: ``pipelines.rollback.main`` in a running process (what the
orchestrator and the webhook pay), and the whole ``python -m pipelines.rollback`` command
(interpreter start and imports included, what an engineer at a terminal waits for).

    python benchmarks/rollback_latency.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

GOAL_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="rollback-bench-"))
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"

    import mlflow
    import numpy as np

    from benchmarks_support import policy_model_versions
    from mlproject import registry
    from mlproject.config import load_config
    from pipelines import rollback
    from mlproject.deploy import deployed_manifest, reconcile

    cfg = load_config(None, [f"promotion.deploy_dir={work / 'deploy'}"])
    v1, v2 = policy_model_versions(work, 2)
    registry.promote("nt8-agent", v1, "bench setup")
    registry.promote("nt8-agent", v2, "bench setup")
    reconcile("nt8-agent", cfg.promotion.deploy_dir)
    in_process, command = [], []
    for _ in range(2 * args.repeat):  # each rollback flips between v1 and v2 (a kept release each time)
        before = registry.production_version("nt8-agent")
        start = time.perf_counter()
        rollback.main(cfg, reason="bench")
        in_process.append(time.perf_counter() - start)
        assert deployed_manifest(work / "deploy")["version"] != before
    for _ in range(args.repeat):
        current = registry.production_version("nt8-agent")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipelines.rollback", "--set", f"promotion.deploy_dir={work / 'deploy'}"],
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        command.append(time.perf_counter() - start)
        assert deployed_manifest(work / "deploy")["version"] != current
    print(f"rollback latency, sqlite store, {2 * args.repeat} in-process and {args.repeat} command runs (median)")
    print(f"{'measure':52s} {'seconds':>8s} {'vs 5 s goal':>12s}")
    for name, values in (("pipelines.rollback.main in a running process", in_process),
                         ("python -m pipelines.rollback (whole command)", command)):
        median = float(np.median(values))
        print(f"{name:52s} {median:8.2f} {median / GOAL_S:11.2f}x")
    mlflow.set_tracking_uri(None)


if __name__ == "__main__":
    main()
