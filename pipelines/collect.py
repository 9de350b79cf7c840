"""Paper trading: replay bars through the bridge, filled as NinjaTrader's simulator would.

    python -m pipelines.collect [--data bars.csv] [--bars 2000] [--config conf/default.yaml]
    mlflow run . -e collect --env-manager local

Connects to the bridge at ``bridge.host:bridge.port`` when one runs there (with the token of
``bridge.token_env``), else starts one in this process for the session (a fresh token, the model in
``promotion.deploy_dir``). Replays the bars (default: the held-out test split of
``data.source``), fills each decision at the next bar's open with the instrument's slippage and
commission (``env.instrument``), and reports the fills, so the bridge records experiences
(source ``paper``) exactly as it does live. One MLflow run per session: PnL, trades,
decisions/s and the model version(s) that decided.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mlproject.bridge.paper import PaperError, PaperResult, paper_trade
from mlproject.bridge.listening import token_from_env
from mlproject.bridge.server import Bridge, BridgeThread
from mlproject.cli import base_parser, optional_int, run_cli
from mlproject.config import Config, load_config
from mlproject.data import load_bars
from mlproject.evaluation import default_bars
from mlproject.experience import ExperienceBuffer
from mlproject.instruments import InstrumentSpec, resolve_instrument
from mlproject.metrics import win_rate
from mlproject.tracking import log_buffer_stats, log_dataset, pipeline_run, setup_tracking

log = logging.getLogger(__name__)


@dataclass
class CollectResult:
    run_id: str
    paper: PaperResult
    address: str
    own_bridge: bool


def _bridge_running(host: str, port: int) -> bool:
    if port == 0:
        return False
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


_TRADES = re.compile(r"^(?P<model>.+) trades (?P<symbol>\S+); this client sends (?P<sent>\S+)$")
"""The bridge's instrument mismatch (``mlproject.bridge.server``): the model, what it trades, what was sent."""


def configs_trading(symbol: str) -> list[str]:
    """The files in ``conf/`` whose ``env.instrument`` is ``symbol`` (as ``conf/<name>.yaml``)."""
    found = []
    for path in sorted((Path(__file__).resolve().parents[1] / "conf").glob("*.yaml")):
        try:
            if resolve_instrument(load_config(path).env.instrument).symbol == symbol:
                found.append(f"conf/{path.name}")
        except ValueError:  # a file that does not load is no advice
            continue
    return found


def refusal(cfg: Config, exc: PaperError, address: str, own: bool) -> str | None:
    """One line naming the fix when the bridge refused the session at hello (a wrong token, a
    model of another instrument, nothing deployed); None for any other error."""
    where = "the bridge this run started" if own else f"the bridge at {address}"
    if exc.code == "unauthorized":
        name = cfg.bridge.token_env
        return (f"{where} refused the token: the collecting shell needs the same {name} as the running bridge "
                f"(export {name} here with the value the bridge was started with, or stop that bridge and "
                "collect starts one of its own)")
    if exc.code == "mismatch" and (m := _TRADES.match(exc.detail)):
        fixes = [f"add --config {c}" for c in configs_trading(m["symbol"])] + [f"--set env.instrument={m['symbol']}"]
        return (f"the deployed model {m['model']} trades {m['symbol']}; this run is configured for {m['sent']}: "
                + " or ".join(fixes))
    if exc.code == "no_model":
        return (f"{where} refused the session: {exc.detail}: promote a model and deploy it "
                "(python -m registry_hooks.reconcile), or set promotion.deploy_dir to where one is deployed")
    if exc.code in ("mismatch", "protocol", "session_busy", "server_busy"):
        return f"{where} refused the session: {exc.detail}"
    return None


def _bars(cfg: Config, data: str | None, limit: int | None) -> pd.DataFrame:
    bars = load_bars(data, tick_period=cfg.data.tick_period, tz=cfg.data.tz) if data else default_bars(cfg)
    if limit is not None:
        if limit < 2:
            raise ValueError(f"--bars {limit}: at least 2 bars")
        bars = bars.iloc[:limit]
    return bars


def main(cfg: Config, data: str | None = None, bars_limit: int | None = None, account: str | None = None) -> CollectResult:
    """One paper session through the bridge; an MLflow run with its results."""
    bars = _bars(cfg, data, bars_limit)
    spec = resolve_instrument(cfg.env.instrument)
    bridge = _connect(cfg)
    setup_tracking(cfg)
    try:
        with pipeline_run(cfg, "collect") as run:
            account = account or f"paper-{run.info.run_id[:8]}"
            _log_session(bars, account, bridge)
            paper = _paper_session(cfg, bridge, bars, spec, account)
            bridge.stop()  # writes every experience before the buffer stats below
            _log_paper(cfg, paper)
            log_buffer_stats(ExperienceBuffer(cfg.continuous_learning.experience_storage))
            log.info("paper session %s: %d decisions (%.0f/s) by model version(s) %s, %d trades, PnL %.2f",
                     account, paper.decisions, paper.decisions_per_s, dict(paper.model_versions), len(paper.trades),
                     paper.realised_pnl)
            return CollectResult(run.info.run_id, paper, bridge.address, bridge.own)
    finally:
        bridge.stop()


@dataclass
class _Endpoint:
    """The bridge a session talks to: where, with which token, and its thread when this run
    started it (``own``)."""

    host: str
    port: int
    token: str
    own: bool
    thread: BridgeThread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop the bridge this run started (once; nothing for one that was already running)."""
        if self.thread is not None:
            self.thread.stop()
            self.thread = None


def _connect(cfg: Config) -> _Endpoint:
    """The bridge at ``bridge.host:bridge.port`` when one runs there, else one started in this
    process for the session (a fresh token, any free port)."""
    host, port = cfg.bridge.host, cfg.bridge.port
    if _bridge_running(host, port):
        return _Endpoint(host, port, token_from_env(cfg), own=False)
    token = secrets.token_urlsafe(24)
    thread = BridgeThread(Bridge(cfg, token=token, port=0))
    host, port = thread.start()
    log.info("no bridge at %s:%d: started one for this session on port %d", cfg.bridge.host, cfg.bridge.port, port)
    return _Endpoint(host, port, token, own=True, thread=thread)


def _log_session(bars: pd.DataFrame, account: str, bridge: _Endpoint) -> None:
    """The replayed bars (a dataset input) and the session's params."""
    import mlflow

    log_dataset(bars, "paper-bars", bars.attrs.get("path") or str(bars.attrs.get("source", "")), "paper")
    mlflow.log_params({"collect.account": account, "collect.bars": len(bars),
                       "collect.bridge": bridge.address, "collect.own_bridge": bridge.own})


def _paper_session(cfg: Config, bridge: _Endpoint, bars: pd.DataFrame, spec: InstrumentSpec,
                   account: str) -> PaperResult:
    """Replay ``bars`` through the bridge; a refusal the user fixes is a one-line ValueError."""
    try:
        return asyncio.run(paper_trade(bridge.host, bridge.port, bridge.token, bars, spec, account=account,
                                       initial_equity=cfg.env.initial_equity, progress=_progress(len(bars))))
    except PaperError as exc:  # a refusal the user fixes: one line (run_cli), not a traceback
        message = refusal(cfg, exc, bridge.address, bridge.own)
        if message is None:
            raise
        raise ValueError(message) from exc


def _progress(n_bars: int) -> Callable[[int, int], None]:
    """A progress callback that logs every tenth of the replay and its end."""
    step = max(1, n_bars // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            log.info("paper: %d/%d bars", done, total)

    return progress


def _log_paper(cfg: Config, paper: PaperResult) -> None:
    """The session's metrics (``collect/...``), the deciding model versions and the trades table."""
    import mlflow

    mlflow.log_metrics(_paper_metrics(cfg, paper))
    mlflow.set_tag("collect.model_versions", ",".join(sorted(paper.model_versions)))
    if len(paper.trades):
        mlflow.log_table(paper.trades.astype({"entry_time": str, "exit_time": str}), "collect/trades.json")


def _paper_metrics(cfg: Config, paper: PaperResult) -> dict[str, float]:
    """PnL, costs, decisions and guard counts of a paper session; win rate only with trades."""
    trades = paper.trades
    metrics = {"collect/realised_pnl": paper.realised_pnl, "collect/equity": paper.equity,
               "collect/return": paper.equity / cfg.env.initial_equity - 1.0,
               "collect/trades": float(len(trades)), "collect/commission": paper.commission,
               "collect/decisions": float(paper.decisions), "collect/decisions_per_s": paper.decisions_per_s,
               "collect/kills": float(paper.kills)}
    if len(trades):
        metrics["collect/win_rate"] = float(win_rate(trades["pnl"].to_numpy()))
    metrics.update({f"collect/guard_{k}": float(v) for k, v in paper.guards.items()})
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--data", default="", help="bar file to replay (default: the test split of data.source)")
    parser.add_argument("--bars", type=optional_int, default=None, help="replay only the first N bars")
    parser.add_argument("--account", default="", help="session account name (default: paper-<run id>)")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, args: main(cfg, args.data or None, args.bars, args.account or None))
