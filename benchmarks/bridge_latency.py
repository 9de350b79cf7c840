"""Bridge decision round trip against a bare asyncio JSON echo server, in the same run.

    python benchmarks/bridge_latency.py [--blocks 7] [--block 400] [--clients 16] [--shadow]

Both servers run in their own process (one core each on a 2-core machine); this process is the
client. The bridge serves the default-config policy (window 32, 162 inputs, 64x64 PPO module,
deployed through the registry) and writes every experience to a Parquet buffer, so a round trip is
bar in -> observation -> policy inference -> experience recorded -> decision out. The echo server
parses each line as JSON and answers a decision-shaped JSON line: the floor any line-JSON server
over loopback has.

1. One client: blocks of ``--block`` requests, alternating echo and bridge; p50, p99, p99.9 per
   block, median over blocks, and the bridge's overhead over the echo as a ratio.
2. ``--clients`` concurrent clients: decisions/s per block, alternating; median and ratio.
Goals (issue 12): p99 <= 1 ms with one client; >= 5,000 decisions/s with 16 clients.

``--shadow`` adds a third server, alternating with the other two: a bridge over the same
Production model with a second version in Staging, shadow-trading every bar beside it (its
experiences written too). Goal (issue 30): its p99 at 16 clients at most 1.5x the bridge's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "benchmark-token-0123456789"


# -- the servers (run with --serve in a child process) -------------------------------------------


async def echo_server() -> None:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while line := await reader.readline():
            msg = json.loads(line)
            n += 1
            writer.write((json.dumps({"type": "decision", "decision_id": str(n), "time": msg.get("time"),
                                      "target_position": 0, "action": 1, "model_name": "echo", "model_version": "0",
                                      "reference_price": msg.get("close"), "guard": None, "policy_target": None},
                                     separators=(",", ":")) + "\n").encode())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


async def bridge_server(work: Path, deploy_dir: str = "deploy") -> None:
    from mlproject.bridge.server import Bridge, tune_process
    from mlproject.config import load_config

    tune_process()  # as pipelines.bridge does
    cfg = load_config(None, [f"promotion.deploy_dir={work / deploy_dir}", "bridge.port=0",
                             f"continuous_learning.experience_storage={work / 'buffer'}",
                             f"bridge.kill_file={work / 'KILL'}", *os.environ.get("BENCH_SET", "").split()])
    bridge = Bridge(cfg, token=TOKEN)
    _, port = await bridge.start()
    print(port, flush=True)
    await asyncio.Event().wait()


def deploy(work: Path) -> None:
    """nt8-agent v1 (default settings, untrained weights) in Production, deployed to work/deploy;
    then v2 (other weights) in Staging, deployed with v1 to work/deploy-shadow."""
    import mlflow

    from envs import FuturesTradingEnv
    from mlproject.config import EnvConfig
    from mlproject.data import synthetic_bars
    from mlproject.deploy import reconcile
    from mlproject.policy import PolicySettings, fresh_module
    from mlproject.registry import promote, register_version
    from mlproject.staging import stage
    from mlproject.training import log_policy_model

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    bars = synthetic_bars(2000, seed=1)
    settings = PolicySettings.from_env(EnvConfig(), bars)
    env = FuturesTradingEnv({"bars": bars, "random_start": False})
    example = np.stack([env.reset()[0]] * 4)
    os.chdir(work)
    versions = []
    for seed in (0, 1):
        fresh_module(settings.obs_size, 2 * settings.max_contracts + 1, seed=seed).save_to_path(str(work / f"m{seed}"))
        with mlflow.start_run():
            info = log_policy_model(work / f"m{seed}", example, settings)
        versions.append(register_version(info.model_uri, "nt8-agent", {}).version)
    promote("nt8-agent", versions[0], "benchmark")
    reconcile("nt8-agent", work / "deploy")
    stage("nt8-agent", versions[1], "benchmark")
    reconcile("nt8-agent", work / "deploy-shadow")


# -- the client ----------------------------------------------------------------------------------


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, account: str) -> Conn:
        conn = cls(*await asyncio.open_connection("127.0.0.1", port))
        reply = await conn.request({"type": "hello", "protocol": 1, "token": TOKEN, "instrument": "ES",
                                    "bar_period": "1min", "account": account, "source": "paper"})
        assert reply["type"] in ("welcome", "decision"), reply
        return conn

    async def request(self, msg: dict) -> dict:
        self.writer.write((json.dumps(msg, separators=(",", ":")) + "\n").encode())
        return json.loads(await self.reader.readline())


class Feed:
    """Bars for one session, as the messages a client sends."""

    def __init__(self, n: int, seed: int) -> None:
        from mlproject.data import synthetic_bars

        bars = synthetic_bars(n, seed=seed)
        self.messages = [{"type": "bar", "time": t.isoformat(), "open": o, "high": h, "low": lo, "close": c,
                          "volume": v} for t, o, h, lo, c, v in
                         zip(bars.index, *(bars[k].tolist() for k in ("open", "high", "low", "close", "volume")))]
        self.next = 0

    def take(self) -> dict:
        msg = self.messages[self.next]
        self.next += 1
        return msg


async def latency_block(conn: Conn, feed: Feed, count: int) -> np.ndarray:
    out = np.empty(count)
    for i in range(count):
        msg = feed.take()
        t = time.perf_counter()
        reply = await conn.request(msg)
        out[i] = time.perf_counter() - t
        assert reply["type"] == "decision", reply
    return out


async def throughput_block(conns: list[Conn], feeds: list[Feed], count: int) -> tuple[float, float]:
    """(decisions/s, p99 round trip in microseconds) of the clients sending at once."""
    t = time.perf_counter()
    lat = await asyncio.gather(*(latency_block(c, f, count) for c, f in zip(conns, feeds)))
    rate = len(conns) * count / (time.perf_counter() - t)
    return rate, float(np.percentile(np.concatenate(lat), 99) * 1e6)


async def measure(ports: dict[str, int], blocks: int, block: int, clients: int) -> None:
    warm = 200  # past the bridge's warm-up (bars_needed 33) and the first inferences
    n_bars = warm + blocks * block + 10
    single = {name: (await Conn.open(port, f"single-{name}"), Feed(n_bars, 1)) for name, port in ports.items()}
    for conn, feed in single.values():
        await latency_block(conn, feed, warm)
    stats: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ports}
    for _ in range(blocks):
        for name, (conn, feed) in single.items():
            lat = await latency_block(conn, feed, block)
            stats[name].append(tuple(np.percentile(lat, [50, 99, 99.9]) * 1e6))
    print(f"\n1 client, {blocks} blocks of {block} round trips (microseconds, median over blocks):")
    print(f"{'server':8} {'p50':>8} {'p99':>8} {'p99.9':>8}")
    med = {name: [statistics.median(s[k] for s in rows) for k in range(3)] for name, rows in stats.items()}
    for name in ports:
        print(f"{name:8} {med[name][0]:8.0f} {med[name][1]:8.0f} {med[name][2]:8.0f}")
    if "shadow" in stats:
        shadow_ratio = statistics.median(s[1] / b[1] for s, b in zip(stats["shadow"], stats["bridge"]))
        print(f"with a shadow p99 / without: median ratio {shadow_ratio:.2f}")
    ratios = [b[1] / e[1] for b, e in zip(stats["bridge"], stats["echo"])]
    print(f"bridge p99 / echo p99: median ratio {statistics.median(ratios):.2f} "
          f"(p50 ratio {statistics.median(b[0] / e[0] for b, e in zip(stats['bridge'], stats['echo'])):.2f}); "
          f"goal p99 <= 1000 us: {'met' if med['bridge'][1] <= 1000 else 'NOT met'}")

    per_client = max(20, block // clients * 4)
    n_bars = warm + blocks * per_client + 10
    many = {name: ([await Conn.open(port, f"c{i}-{name}") for i in range(clients)],
                   [Feed(n_bars, 10 + i) for i in range(clients)]) for name, port in ports.items()}
    for conns, feeds in many.values():
        await asyncio.gather(*(latency_block(c, f, warm) for c, f in zip(conns, feeds)))
    rates: dict[str, list[float]] = {name: [] for name in ports}
    p99s: dict[str, list[float]] = {name: [] for name in ports}
    for _ in range(blocks):
        for name, (conns, feeds) in many.items():
            rate, p99 = await throughput_block(conns, feeds, per_client)
            rates[name].append(rate)
            p99s[name].append(p99)
    print(f"\n{clients} clients, {blocks} blocks of {clients}x{per_client} round trips (median over blocks):")
    print(f"{'server':8} {'decisions/s':>12} {'p99 us':>8}")
    for name in ports:
        print(f"{name:8} {statistics.median(rates[name]):12.0f} {statistics.median(p99s[name]):8.0f}")
    if "shadow" in ports:
        ratio = statistics.median(s / b for s, b in zip(p99s["shadow"], p99s["bridge"]))
        print(f"with a shadow p99 / without, {clients} clients: median ratio {ratio:.2f}; goal <= 1.5: "
              f"{'met' if ratio <= 1.5 else 'NOT met'}")
    ratio = statistics.median(b / e for b, e in zip(rates["bridge"], rates["echo"]))
    rate = statistics.median(rates["bridge"])
    print(f"bridge / echo throughput: median ratio {ratio:.2f}; goal >= 5000/s: {'met' if rate >= 5000 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--block", type=int, default=400)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--shadow", action="store_true", help="also a bridge with a Staging model shadow-trading")
    parser.add_argument("--serve", choices=("echo", "bridge", "shadow", "deploy"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "echo":
        asyncio.run(echo_server())
        return
    if args.serve in ("bridge", "shadow"):
        asyncio.run(bridge_server(Path(args.work), "deploy" if args.serve == "bridge" else "deploy-shadow"))
        return
    if args.serve == "deploy":
        deploy(Path(args.work))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOGLEVEL": "WARNING", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as tmp:
        work = Path(tmp)
        print("deploying a policy (default settings, 162 inputs, 64x64) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--serve", "deploy", "--work", tmp], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        procs, ports = [], {}
        try:
            for name in ("echo", "bridge", *(("shadow",) if args.shadow else ())):
                proc = subprocess.Popen([sys.executable, __file__, "--serve", name, "--work", tmp], env=env,
                                        stdout=subprocess.PIPE, text=True)
                procs.append(proc)
                ports[name] = int(proc.stdout.readline())
            asyncio.run(measure(ports, args.blocks, args.block, args.clients))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
        buffer = work / "buffer"
        files = list(buffer.rglob("*.parquet"))
        print(f"\nthe bridge wrote {len(files)} buffer files under {buffer.name}/ during the run")


if __name__ == "__main__":
    main()
