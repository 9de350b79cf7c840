"""The NT8 bridge: the deployed Production policy answers NinjaTrader's bars; every bar an experience.

    python -m pipelines.bridge [serve] [--config conf/default.yaml] [--port 5555]
    python -m pipelines.bridge kill [--reason "news"]      # kill switch on: flatten and hold
    python -m pipelines.bridge resume                      # kill switch off
    mlflow run . -e bridge --env-manager local

Serves ``nt8/PROTOCOL.md`` on ``bridge.host:bridge.port`` (127.0.0.1 unless configured) with the
model in ``promotion.deploy_dir`` (switching models when ``registry_hooks.reconcile`` deploys a
new one), writing experiences to ``continuous_learning.experience_storage``. The shared secret is
read from the environment variable ``bridge.token_env`` (NT8_BRIDGE_TOKEN). Ctrl-C or SIGTERM
stops it and writes what it holds. An MLflow run records the session's counts every minute.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from mlproject.atomic import atomic_write_text
from mlproject.bridge.killswitch import kill_file_of
from mlproject.bridge.listening import token_from_env
from mlproject.bridge.server import Bridge, tune_process
from mlproject.cli import base_parser, optional_int, run_cli
from mlproject.config import Config
from mlproject.tracking import pipeline_run, setup_tracking

log = logging.getLogger(__name__)

METRICS_EVERY_S = 60.0


def _metrics(bridge: Bridge) -> dict[str, float]:
    out = {f"bridge/{k}": float(v) for k, v in bridge.stats.items()}
    out["bridge/experiences_written"] = float(bridge.written)
    out["bridge/connections"] = float(len(bridge.connections))
    return out


async def serve(cfg: Config, port: int | None = None, host: str | None = None) -> None:
    """Run the bridge until SIGINT/SIGTERM; then stop it cleanly (every experience written)."""
    import mlflow

    bridge = Bridge(cfg, token=token_from_env(cfg), host=host, port=port)
    tune_process()
    setup_tracking(cfg)
    with pipeline_run(cfg, "bridge"):
        address = await bridge.start()
        mlflow.set_tags({"bridge.address": f"{address[0]}:{address[1]}",
                         "bridge.model": bridge.policy.label if bridge.policy else "none"})
        print(f"bridge listening on {address[0]}:{address[1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), METRICS_EVERY_S)
                except asyncio.TimeoutError:
                    mlflow.log_metrics(_metrics(bridge))
        finally:
            await bridge.stop()
            mlflow.log_metrics(_metrics(bridge))


def kill(cfg: Config, reason: str) -> Path:
    """Turn the kill switch on (the file a running bridge checks at every bar)."""
    path = kill_file_of(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, f"{reason or 'pipelines.bridge kill'}\n")
    return path


def resume(cfg: Config) -> Path:
    path = kill_file_of(cfg)
    path.unlink(missing_ok=True)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "kill", "resume"))
    parser.add_argument("--port", type=optional_int, default=None, help="TCP port (default bridge.port; 0: any free)")
    parser.add_argument("--host", default=None, help="listen address (default bridge.host)")
    parser.add_argument("--reason", default="", help="kill: why (logged, sent to the clients)")
    return parser


def _cli(cfg: Config, args: argparse.Namespace) -> None:
    if args.command == "kill":
        print(f"kill switch ON: {kill(cfg, args.reason)} (every decision is flat until `resume`)")
    elif args.command == "resume":
        print(f"kill switch off: {resume(cfg)} removed")
    else:
        asyncio.run(serve(cfg, args.port, args.host or None))


if __name__ == "__main__":
    run_cli(build_parser(), _cli)
