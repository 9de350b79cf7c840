"""Drift monitor: the Production model's live and paper results against its own evaluation, and
its live inputs against the training split; acts (alert, rollback, pause) on a confirmed breach.

    python -m pipelines.monitor [--config conf/default.yaml] [--loop --every 15m]
    mlflow run . -e monitor --env-manager local

One pass: the newest ``monitoring.window_bars`` live/paper experiences of the Production version
(from the experience buffer) give win rate, Sharpe, profit factor, max drawdown, the losing streak
and the average slippage (``mlproject.monitor.live_stats``); the reference is the version's own
evaluation (the ``eval/...`` metrics on its logged model, else the metrics recorded at its
promotion); the latest bar's features of each live observation are compared with the training
split's (population-stability index per feature, with the configured feature settings; not the
time-of-day features, which a few live hours never spread like the training split). Nothing
breaches before ``min_trades`` closed trades and ``min_bars`` steps, except model expiry: with
``max_model_age`` set, a version whose training data ended longer ago breaches ``model_age``
(alert, or pause; with ``rollback`` an expiry alone alerts). A breach acts only after
``confirm_passes`` breaching passes in a row and once per episode (``clear_passes`` good passes
re-arm it): ``alert`` tags the version ``monitor.alert`` (``pipelines.status`` then exits 1),
``rollback`` rolls back through the registry (its lock, the reason and the metrics in the
history) and redeploys (with no earlier version to go back to it stands Production down: nothing
deployed, the bridge trades flat), ``pause`` switches the bridge's kill switch on (flat and hold). A rollback
finds Production moved meanwhile (a person promoted another version): it is skipped, the run says
so (``monitor.last_action``: ``rollback skipped: Production moved from vX to vY meanwhile``) and the
version's alert becomes ``monitor.alert_stale``.

Every pass is logged as ``monitor/...`` metrics (live values, the evaluation's as
``monitor/eval_...``, ``monitor/psi/<feature>``, ``monitor/breaches``) on one long-running MLflow
run per Production version (``monitor <model> v<N>``), so the UI shows the live curve beside the
evaluation; the hysteresis state is kept in ``<state_dir>/monitor.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlproject.atomic import atomic_write_text, read_json_state
from mlproject.bridge.server import kill_file_of
from mlproject.cli import base_parser, parse_every, run_cli
from mlproject.config import Config, parse_duration
from mlproject.config.live import MonitoringConfig
from mlproject.data import load_source, split_bars
from mlproject.deploy import check_version_deployable, reconcile
from mlproject.experience import ExperienceBuffer, Query
from mlproject.features import FEATURE_NAMES, bar_features, latest_features, obs_size
from mlproject.instruments import resolve_instrument
from mlproject.locks import file_lock
from mlproject.metrics import periods_per_year
from mlproject.monitor import ALERT_TAG, STALE_ALERT_TAG, Hysteresis, feature_psi, live_stats
from mlproject.registry import (
    production_version,
    registry_lock,
    rollback,
    rollback_target,
    stand_down,
    version_model_id,
)
from mlproject.tracking import experiment_id, log_metric_batch, setup_tracking
from mlproject.signals import StopRequest, run_turns
from mlproject.staging import staging_version

log = logging.getLogger(__name__)

STATE_FILE = "monitor.json"
LIVE_COLUMNS = ["time", "model_name", "source", "trade_id", "position", "realised_pnl", "equity", "slippage",
                "observation"]


@dataclass
class MonitorResult:
    """One pass: the version judged, its live stats and reference, the breaches (check -> text),
    whether the sample was big enough, and the action taken (None, alert, rollback, pause, or
    ``rollback skipped: Production moved from vX to vY meanwhile``)."""

    version: str | None
    stats: dict[str, float] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    psi: dict[str, float] = field(default_factory=dict)
    breaches: dict[str, str] = field(default_factory=dict)
    enough: bool = False
    action: str | None = None
    run_id: str | None = None
    shadow: MonitorResult | None = None
    """The Staging version's shadow, reported beside Production in its own run (no action: the
    live comparison of ``mlproject.shadow_verdict`` decides it)."""


def reference_metrics(name: str, version: str) -> dict[str, float]:
    """The version's own evaluation: the metrics recorded at its promotion, overlaid with the
    ``eval/...`` metrics on its logged model (unprefixed names)."""
    import mlflow
    from mlflow import MlflowClient

    mv = MlflowClient().get_model_version(name, version)
    out = {k: float(v) for k, v in json.loads(mv.tags.get("promotion_metrics", "{}") or "{}").items()
           if "/" not in k}
    model_id = version_model_id(mv)
    if model_id:
        for m in mlflow.get_logged_model(model_id).metrics or []:
            if m.key.startswith("eval/") and m.key.count("/") == 1:
                out[m.key.removeprefix("eval/")] = float(m.value)
    return out


def model_age_breach(name: str, version: str, max_age: str | None, now: pd.Timestamp | None = None) -> str | None:
    """Why ``version`` expired (its training data ended more than ``max_age`` before ``now``), or
    None: not expired, no ``max_age``, or a version whose training run does not say when its data
    ended (tag ``data.train_window``, ``start .. end``)."""
    if max_age is None:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient()
        run_id = client.get_model_version(name, version).run_id
        window = client.get_run(run_id).data.tags.get("data.train_window", "") if run_id else ""
        end = pd.Timestamp(window.rpartition(" .. ")[2]) if " .. " in window else None
    except (MlflowException, ValueError):
        end = None
    if end is None:
        log.info("monitor: %s v%s: its training run does not say when its data ended: no expiry check", name, version)
        return None
    end = end.tz_localize("UTC") if end.tzinfo is None else end
    age = (now or pd.Timestamp.now(tz="UTC")) - end
    if age.total_seconds() <= parse_duration(max_age):
        return None
    return (f"model age: trained on data up to {end:%Y-%m-%d %H:%M} UTC, {age.days} days ago "
            f"> monitoring.max_model_age {max_age}")


def breaches_of(stats: dict[str, float], ref: dict[str, float], cfg: Config) -> dict[str, str]:
    """Each check that fails, with the numbers; checks without a reference value are skipped."""
    m, out = cfg.monitoring, {}

    def have(*values: float) -> bool:
        return all(v is not None and math.isfinite(v) for v in values)

    if have(stats["win_rate"], ref.get("win_rate", math.nan)) and stats["win_rate"] < ref["win_rate"] - m.max_win_rate_drop:
        out["win_rate"] = f"win rate {stats['win_rate']:.2f} < evaluation {ref['win_rate']:.2f} - {m.max_win_rate_drop}"
    if have(stats["sharpe"], ref.get("sharpe", math.nan)) and stats["sharpe"] < ref["sharpe"] - m.max_sharpe_drop:
        out["sharpe"] = f"Sharpe {stats['sharpe']:.2f} < evaluation {ref['sharpe']:.2f} - {m.max_sharpe_drop}"
    pf, ref_pf = stats["profit_factor"], ref.get("profit_factor", math.nan)
    if have(pf, ref_pf) and pf < m.min_profit_factor_ratio * ref_pf:
        out["profit_factor"] = f"profit factor {pf:.2f} < {m.min_profit_factor_ratio} x evaluation {ref_pf:.2f}"
    dd, ref_dd = stats["max_drawdown"], ref.get("max_drawdown", math.nan)
    if have(dd, ref_dd) and ref_dd > 0 and dd > m.max_drawdown_ratio * ref_dd:
        out["max_drawdown"] = f"drawdown {dd:.2%} > {m.max_drawdown_ratio} x evaluation {ref_dd:.2%}"
    if stats["consecutive_losses"] >= m.max_consecutive_losses:
        out["consecutive_losses"] = f"{stats['consecutive_losses']:.0f} losing trades in a row (limit {m.max_consecutive_losses})"
    assumed = resolve_instrument(cfg.env.instrument).slippage_cost
    if have(stats["avg_slippage"]) and assumed > 0 and stats["avg_slippage"] > m.max_slippage_ratio * assumed:
        out["slippage"] = (f"average slippage {stats['avg_slippage']:.2f} per contract > {m.max_slippage_ratio} x "
                           f"the assumed {assumed:.2f}")
    return out


def reference_features(cfg: Config) -> np.ndarray:
    """Features of the training split of ``data.source`` (the configured feature settings)."""
    bars = load_source(cfg)
    sp = cfg.data.splits
    train = split_bars(bars, sp.train, sp.validation, sp.test, gap=sp.gap).train
    feats = bar_features(train, vol_window=cfg.env.vol_window, norm_window=cfg.env.norm_window)
    return feats[max(cfg.env.window, cfg.env.vol_window):]


DRIFT_FEATURES = [name for name in FEATURE_NAMES if not name.startswith("tod_")]
"""The features whose drift is watched: not the time of day (a few live hours are never spread
over the session like the training split, whatever the market does)."""


def live_features(observations: pd.Series) -> np.ndarray:
    """The latest bar's features of each observation (the slots before position and open PnL)."""
    rows = [latest_features(np.asarray(o, dtype=float)) for o in observations if o is not None and len(o) >= obs_size(1)]
    return np.vstack(rows) if rows else np.zeros((0, len(FEATURE_NAMES)))


class MonitorState:
    """``<state_dir>/monitor.json``: per version, the hysteresis and the monitor run's id."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / STATE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = read_json_state(self.path, "monitor", "move it aside to start afresh")

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2))


MONITOR_NOTE = (
    "Live and paper results of {name} v{version} while it is in Production: one point per monitor pass "
    "(step = pass), from every maintenance cycle and from `python -m pipelines.monitor`, beside its own "
    "evaluation (`monitor/eval_...`). One run for the version's whole time in Production, so it sits at top "
    "level; the cycle runs that made a pass link it (tag `cycle.monitor_run`).")
"""The monitor run's description (shown on its page in the MLflow UI)."""


def _monitor_run(cfg: Config, name: str, version: str, state: dict[str, Any], role: str = "") -> str:
    """The long-running monitor run of this version (created on its first pass); ``role``
    ``shadow``: its shadow trading while in Staging."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if state.get("run_id"):
        return state["run_id"]
    # Top level on purpose: the passes of every maintenance cycle and of `pipelines.monitor --loop`
    # make one curve (step = pass) over the version's time in Production; nested under one cycle it
    # would be a point per run. Each cycle run links it instead (tag cycle.monitor_run).
    run = client.create_run(experiment_id(cfg.mlflow.experiment),
                            run_name=f"monitor {name} v{version}{f' ({role})' if role else ''}",
                            tags={"pipeline.step": "monitor", "model_name": name, "model_version": version,
                                  "monitor.role": role or "production",
                                  "mlflow.note.content": MONITOR_NOTE.format(name=name, version=version)})
    state["run_id"] = run.info.run_id
    return run.info.run_id


def _log_pass(run_id: str, step: int, result: MonitorResult) -> None:
    from mlflow import MlflowClient

    values = {**{f"monitor/{k}": v for k, v in result.stats.items()},
              **{f"monitor/eval_{k}": v for k, v in result.reference.items()
                 if k in ("win_rate", "sharpe", "profit_factor", "max_drawdown")},
              **{f"monitor/psi/{k}": v for k, v in result.psi.items()},
              "monitor/breaches": float(len(result.breaches)), "monitor/enough_sample": float(result.enough)}
    log_metric_batch(run_id, [(k, v, step) for k, v in values.items()])
    client = MlflowClient()
    client.set_terminated(run_id)  # FINISHED between passes (its end time: the latest pass); the next pass logs on
    if result.action:
        why = "; ".join(result.breaches.values())
        text = f"{result.action}: {why}" if result.action in ACTIONS else f"{result.action} (breaches: {why})"
        client.set_tag(run_id, "monitor.last_action", text[:5000])


ACTIONS = typing.get_args(MonitoringConfig.model_fields["action"].annotation)
"""What ``monitoring.action`` may ask for (alert, rollback, pause)."""


def _act(cfg: Config, name: str, version: str, result: MonitorResult) -> str:
    """Take ``monitoring.action`` on ``version``; returns what was done: the action, or why the
    rollback was skipped (Production moved meanwhile: the version's alert then becomes stale)."""
    from mlflow import MlflowClient

    p, why = cfg.promotion, "; ".join(result.breaches.values())
    action, client = cfg.monitoring.action, MlflowClient()
    if action == "rollback" and set(result.breaches) == {"model_age"}:
        action = "alert"  # expiry alone: the version before it is older still
    client.set_model_version_tag(name, version, ALERT_TAG, f"{action}: {why}"[:5000])
    if action == "rollback":
        metrics = {f"monitor/{k}": v for k, v in result.stats.items() if v is not None and math.isfinite(v)}
        with registry_lock(p.lock_file):
            now = production_version(name)
            if now != version:  # another writer (a person, a promote) moved Production meanwhile
                moved_to = f"v{now}" if now else "none"
                skipped = f"rollback skipped: Production moved from v{version} to {moved_to} meanwhile"
                client.set_model_version_tag(name, version, STALE_ALERT_TAG, f"{skipped}; the alert was: "
                                             f"{action}: {why}"[:5000])
                client.delete_model_version_tag(name, version, ALERT_TAG)
                log.warning("monitor: %s %s (its alert is now %s)", name, skipped, STALE_ALERT_TAG)
                return skipped
            if rollback_target(name) is None:  # nothing to go back to: no model trades rather than this one
                stand_down(name, reason=f"drift monitor: {why} (nothing to roll back to: flat)", metrics=metrics,
                           lock_file=p.lock_file)
            else:
                rollback(name, reason=f"drift monitor: {why}", lock_file=p.lock_file, metrics=metrics,
                         check=check_version_deployable)
            reconcile(name, p.deploy_dir, p.keep_releases, lock_file=p.lock_file)
    elif action == "pause":
        kill = kill_file_of(cfg)
        kill.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(kill, f"drift monitor, v{version}: {why}\n")
    log.warning("monitor: %s v%s: %s (%s)", name, version, action, why)
    return action


def _live_rows(buffer: ExperienceBuffer, name: str, version: str, sources: list[str], window: int) -> pd.DataFrame:
    rows = buffer.query(Query(model_version=version), LIVE_COLUMNS)
    return rows[(rows["model_name"] == name) & rows["source"].isin(sources)].tail(window)


def _with_stats(result: MonitorResult, rows: pd.DataFrame) -> MonitorResult:
    if len(rows) >= 2:
        index = pd.DatetimeIndex(rows["time"])
        result.stats = live_stats(rows, periods_per_year(index) if len(index) > 2 else 252.0)
    return result


def _shadow_pass(cfg: Config, name: str, buffer: ExperienceBuffer) -> MonitorResult | None:
    """The Staging version's shadow trading so far, logged to its own monitor run (no action)."""
    version = staging_version(name)
    if version is None:
        return None
    rows = _live_rows(buffer, name, version, ["shadow"], cfg.monitoring.window_bars)
    result = _with_stats(MonitorResult(version, reference=reference_metrics(name, version)), rows)
    with file_lock(Path(cfg.continuous_learning.state_dir) / "monitor.lock", 600, "another monitor pass"):
        state = MonitorState(cfg.continuous_learning.state_dir)
        entry = state.data.setdefault(f"{name}/{version}/shadow", {"passes": 0})
        entry["passes"] += 1
        result.run_id = _monitor_run(cfg, name, version, entry, "shadow")
        state.save()
        _log_pass(result.run_id, entry["passes"], result)
    return result


def check(cfg: Config) -> MonitorResult:
    """One monitor pass over the Production version (see the module doc), and the Staging
    version's shadow beside it."""
    name, m = cfg.promotion.model_name, cfg.monitoring
    buffer = ExperienceBuffer(cfg.continuous_learning.experience_storage)
    shadow = _shadow_pass(cfg, name, buffer)
    version = production_version(name)
    if version is None:
        log.info("monitor: nothing in Production")
        return MonitorResult(None, shadow=shadow)
    rows = _live_rows(buffer, name, version, ["live", "paper"], m.window_bars)
    result = _with_stats(MonitorResult(version, reference=reference_metrics(name, version), shadow=shadow), rows)
    if len(rows) >= 2:
        result.breaches = breaches_of(result.stats, result.reference, cfg)
        live = live_features(rows["observation"])
        if len(live) >= m.min_bars:
            keep = [FEATURE_NAMES.index(name) for name in DRIFT_FEATURES]
            result.psi = feature_psi(reference_features(cfg)[:, keep], live[:, keep], DRIFT_FEATURES)
            for feature, value in result.psi.items():
                if math.isfinite(value) and value > m.max_psi:
                    result.breaches[f"psi/{feature}"] = f"{feature} drifted: PSI {value:.2f} > {m.max_psi}"
    expired = model_age_breach(name, version, m.max_model_age)
    if expired:
        result.breaches["model_age"] = expired
    result.enough = result.stats.get("n_trades", 0) >= m.min_trades and result.stats.get("n_bars", 0) >= m.min_bars
    # One monitor at a time reads, updates and writes the hysteresis (a --loop beside maintenance).
    with file_lock(Path(cfg.continuous_learning.state_dir) / "monitor.lock", 600, "another monitor pass"):
        state = MonitorState(cfg.continuous_learning.state_dir)
        entry = state.data.setdefault(f"{name}/{version}", {"passes": 0})
        watch = Hysteresis.from_dict(entry, m.confirm_passes, m.clear_passes)
        due = watch.update((result.enough and bool(result.breaches)) or bool(expired))  # age needs no sample
        entry.update(watch.to_dict())
        entry["passes"] += 1
        result.run_id = _monitor_run(cfg, name, version, entry)
        if due:  # acted first, recorded after: a crash in between acts again at the next pass
            result.action = _act(cfg, name, version, result)
        state.save()
        _log_pass(result.run_id, entry["passes"], result)
    log.info("monitor: %s v%s: %d steps, %d trades, %s%s", name, version, len(rows),
             int(result.stats.get("n_trades", 0)), "; ".join(result.breaches.values()) or "no breach",
             "" if result.enough else f" (sample below min_trades {m.min_trades} / min_bars {m.min_bars}: no action)")
    return result


def main(cfg: Config, loop: bool = False, every: str = "15m", max_rounds: int | None = None) -> list[MonitorResult]:
    """One pass, or with ``loop`` a pass every ``every`` until SIGTERM/SIGINT (between passes)
    or ``max_rounds`` passes; in the loop a failed pass is logged and the next one runs on
    time. Returns the passes."""
    setup_tracking(cfg)
    if not loop:
        return [check(cfg)]

    def one_pass(stop: StopRequest) -> MonitorResult:
        try:
            return check(cfg)
        except Exception:  # noqa: BLE001 - the loop outlives a failed pass; the log says why
            log.exception("monitor: pass failed; the next one runs in %s", every)
            return MonitorResult(None)

    results = run_turns("monitor", parse_duration(every), one_pass, max_rounds)
    log.info("monitor: stopped after %d passes", len(results))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--loop", action="store_true", help="run a pass every --every until stopped")
    parser.add_argument("--every", default="15m", help="time between passes with --loop (e.g. 60s, 15m, 1h)")
    return parser


def _cli(cfg: Config, args: argparse.Namespace) -> None:
    parse_every(args.every)  # refused before any work, with or without --loop
    main(cfg, args.loop, args.every)


if __name__ == "__main__":
    run_cli(build_parser(), _cli)
