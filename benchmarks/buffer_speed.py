"""Experience buffer speed against the seed's approach (a pickled list of experience dicts, dumped
whole after each batch and loaded whole to filter), in the same process.

    python benchmarks/buffer_speed.py [--rows 1000000] [--rounds 5]

1. Durable append through the public API (``add`` + ``flush``), batches of 1,000, against
   appending to a list and pickling it after every batch; alternated in short blocks, median.
2. Filtered read (time range + model version + quality, no observations) of ``--rows`` rows,
   against loading the pickle and filtering the list; alternated, median and ratio.
3. Compaction of ``--rows`` rows (with 82-float observations): time and peak memory (RSS).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mlproject.experience import ExperienceBuffer, Query

OBS = 82
ROOT = Path(__file__).resolve().parents[1]


def frame(n: int, start: pd.Timestamp, seed: int, prefix: str) -> pd.DataFrame:
    """``n`` experiences a minute apart from ``start``, as the bridge would add them."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, OBS)).astype(np.float32)
    return pd.DataFrame({
        "experience_id": [f"{prefix}{i}" for i in range(n)],
        "time": pd.date_range(start, periods=n, freq="1min", tz="UTC"),
        "symbol": "ES", "bar_period": "1min", "model_name": "nt8-agent",
        "model_version": rng.choice(["1", "2", "3"], n), "observation": list(obs), "action": rng.integers(0, 3, n),
        "reward": rng.standard_normal(n), "next_observation": list(obs), "terminated": False, "truncated": False,
        "position": rng.integers(-1, 2, n), "equity": 100_000.0, "realised_pnl": 0.0, "source": "paper",
        "quality": rng.random(n).astype(np.float32)})


def append_blocks(root: Path, pickle_path: Path, batches: int, rounds: int) -> tuple[float, float]:
    ours, seed_ = [], []
    buffer, store = ExperienceBuffer(root), []
    start = pd.Timestamp("2024-01-02", tz="UTC")
    for r in range(rounds):
        data = [frame(1000, start + pd.Timedelta(minutes=1000 * (r * batches + b)), b, f"a{r}-{b}-")
                for b in range(batches)]
        records = [d.to_dict("records") for d in data]
        t = time.perf_counter()
        for d in data:
            buffer.add(d)
            buffer.flush()
        ours.append(batches * 1000 / (time.perf_counter() - t))
        t = time.perf_counter()
        for rec in records:
            store.extend(rec)
            with pickle_path.open("wb") as fh:  # the seed saved the whole list after each batch
                pickle.dump(store, fh)
                fh.flush()
                os.fsync(fh.fileno())
        seed_.append(batches * 1000 / (time.perf_counter() - t))
    return statistics.median(ours), statistics.median(seed_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="buffer-bench-"))
    try:
        ours, seed_ = append_blocks(work / "append", work / "append.pkl", batches=20, rounds=args.rounds)
        print(f"{'durable append, batches of 1,000 (exp/s)':58s} ours {ours:>10,.0f}  pickle {seed_:>10,.0f}  "
              f"ratio {ours / seed_:6.1f}x")

        buffer = ExperienceBuffer(work / "read")
        chunk = 100_000
        start = pd.Timestamp("2024-01-02", tz="UTC")
        for i in range(0, args.rows, chunk):
            buffer.add(frame(min(chunk, args.rows - i), start + pd.Timedelta(minutes=i), i, f"r{i}-"))
            buffer.flush()
        records = buffer.query().to_dict("records")
        with (work / "read.pkl").open("wb") as fh:
            pickle.dump(records, fh)
        del records
        lo, hi = start + pd.Timedelta(days=100), start + pd.Timedelta(days=400)
        query = Query(start=lo, end=hi, model_version="2", min_quality=0.5)
        columns = ["experience_id", "time", "model_version", "quality", "action", "reward"]
        ours_t, seed_t, ratios = [], [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            got = buffer.query(query, columns)
            a = time.perf_counter() - t
            t = time.perf_counter()
            with (work / "read.pkl").open("rb") as fh:
                rows = pickle.load(fh)
            want = [r for r in rows if lo <= r["time"] <= hi and r["model_version"] == "2" and r["quality"] >= 0.5]
            b = time.perf_counter() - t
            del rows
            assert len(want) == len(got)
            ours_t.append(a)
            seed_t.append(b)
            ratios.append(b / a)
        print(f"{f'filtered read of {args.rows:,} ({len(got):,} match), seconds':58s} ours "
              f"{statistics.median(ours_t):>10.3f}  pickle {statistics.median(seed_t):>10.3f}  "
              f"ratio {statistics.median(ratios):6.1f}x (spread {min(ratios):.1f}-{max(ratios):.1f})")

        # In a fresh process: this one's peak memory already holds the pickle contender's.
        code = ("import resource, sys, time; from mlproject.experience import ExperienceBuffer; "
                "t = time.perf_counter(); c = ExperienceBuffer(sys.argv[1]).compact(int(sys.argv[2])); "
                "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
                "c['kept'], c['files_before'], c['files_after'])")
        out = subprocess.run([sys.executable, "-c", code, str(work / "read"), str(args.rows // 2)], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        seconds, peak, kept, files_before, files_after = out.stdout.split()
        label = f"compaction of {args.rows:,} rows to {int(kept):,}"
        print(f"{label:58s} {float(seconds):.1f} s, peak RSS {int(peak) / 1024:,.0f} MB, files {files_before} -> "
              f"{files_after}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
