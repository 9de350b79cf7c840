"""Fingerprint of fixed-seed backtests: what ``test_evaluate`` pins so that no speed-up of the
backtest changes its results (the same positions, trades and metrics as when it was recorded).

    python tests/backtest_golden.py      # re-record tests/golden/backtest.json (after a change
                                         # that is meant to change results, and says why)
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent / "golden" / "backtest.json"
CASES = {"es-1-contract": 1, "es-2-contracts": 2}
"""Name -> max_contracts (2 exercises adds and partial exits, the trade loop)."""


def fingerprint() -> dict:
    """Per case: sha256 of every window's per-bar positions and of the trades' integer columns
    (entry/exit bar, side, size), the trade count, and every metric of every window."""
    from mlproject.data import synthetic_bars
    from mlproject.evaluation import backtest
    from mlproject.policy import fresh_module, module_policy

    bars = synthetic_bars(6000, seed=11)
    out = {}
    for name, contracts in CASES.items():
        env = {"window": 8, "instrument": {"preset": "ES", "max_contracts": contracts}}
        module = fresh_module(8 * 5 + 2, 2 * contracts + 1, seed=5 + contracts)
        report = backtest(module_policy(module), bars, env, n_windows=8)
        positions = np.stack([w.positions.to_numpy(np.int64) for w in report.windows])
        trades = report.trades()
        integers = np.stack([bars.index.get_indexer(trades["entry_time"]), bars.index.get_indexer(trades["exit_time"]),
                             trades["side"].to_numpy(np.int64), trades["size"].to_numpy(np.int64)])
        out[name] = {"positions_sha256": hashlib.sha256(positions.tobytes()).hexdigest(),
                     "trades_sha256": hashlib.sha256(integers.astype(np.int64).tobytes()).hexdigest(),
                     "n_trades": len(trades),
                     "metrics": [{k: (None if isinstance(v, (float, np.floating)) and math.isnan(v) else v) for k, v in w.metrics.items()} for w in report.windows]}
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(GOLDEN.parents[2]))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(fingerprint(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
