"""Evaluation runs: backtest models on the same bars and windows, log comparable trading metrics,
curves, trades and figures to MLflow (the step behind ``python -m pipelines.evaluate`` and the
cycle's evaluation, :func:`evaluate_models`).

Default bars: the test split of ``data.source``. The bars are cut into
``continuous_learning.evaluation_episodes`` windows, played deterministically; every metric is
logged as its mean over windows (``eval/<metric>``) and spread (``eval/<metric>_std``), per
window (``eval_window/<metric>``, step = the bar the window starts at, counted from the first
evaluated bar), and against flat and buy-and-hold on the same windows (``baseline/flat/...``,
``baseline/buy_hold/...``). ``backtest/equity`` and ``backtest/drawdown_pct`` are the windows
played one after another, each window's return compounding (step = evaluated bar): the first
charts of the run's metric page (MLflow orders its sections by name). The metrics are linked to
the evaluated MLflow model and to the dataset. Several ``--model-uri``: one child run per model
on identical bars and a comparison table on the parent run.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlproject.config import Config
from mlproject.evaluation import LOWER_IS_BETTER, Evaluation, evaluate_policies, paired_comparison, psr_against
from mlproject.policy import LoadedPolicy, load_policy_model
from mlproject.preflight import warn_if_instrument_misfits
from mlproject.registry import model_id_of
from mlproject.tracking import (
    CURVE_POINTS,
    log_dataset,
    log_headline,
    log_metric_batch,
    pipeline_run,
    setup_tracking,
    thinned_index,
)

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    """Reports per model (and the baselines), the comparison table, the MLflow run."""

    run_id: str
    reports: dict[str, Any]
    baselines: dict[str, Any]
    table: pd.DataFrame


def session_gaps(times: pd.DatetimeIndex, factor: float = 3.0) -> np.ndarray:
    """Per bar: True where the step from the bar before is longer than ``factor`` x the median
    bar spacing (a session close, a weekend); the first bar is never a gap."""
    if len(times) < 3:
        return np.zeros(len(times), bool)
    steps = np.diff(times.asi8)
    return np.concatenate([[False], steps > factor * np.median(steps)])


def compressed_x(times: pd.DatetimeIndex, factor: float = 3.0) -> np.ndarray:
    """x positions of the bars at ``times`` on a time axis with the closed market cut out: a step
    counts as its length in median bar spacings, except a :func:`session_gaps` step (hours,
    a weekend), which counts as one bar. 0 for the first bar."""
    if len(times) < 2:
        return np.zeros(len(times))
    steps = np.diff(times.asi8).astype(float)
    units = steps / np.median(steps) if np.median(steps) > 0 else np.ones_like(steps)
    units[session_gaps(times, factor)[1:]] = 1.0
    return np.concatenate([[0.0], np.cumsum(units)])


def broken_line(x: np.ndarray, y: np.ndarray, gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` with a NaN point before every bar marked in ``gaps``, so that a line plot
    breaks at a session gap instead of joining the close to the next open."""
    at = np.flatnonzero(gaps)
    if not len(at):
        return x, y
    return np.insert(x, at, (x[at - 1] + x[at]) / 2), np.insert(y.astype(float), at, np.nan)


def _drawdown_pct(equity: np.ndarray) -> np.ndarray:
    peak = np.maximum.accumulate(equity)
    return 100.0 * (equity / np.where(peak > 0, peak, 1.0) - 1.0)


def _tick_bars(times: pd.DatetimeIndex, gaps: np.ndarray, most: int = 8) -> np.ndarray:
    """Bars that get a date/time label: the session opens when there are a few, else bars spread
    evenly."""
    opens = np.concatenate([[0], np.flatnonzero(gaps)])
    if 2 <= len(opens) <= most:
        return opens
    return np.unique(np.linspace(0, len(times) - 1, min(most, len(times))).round().astype(int))


def equity_drawdown_figure(report: Any, baselines: dict[str, Any] | None = None) -> Any:
    """Equity (top) and drawdown (bottom) of the agent and buy-and-hold on every evaluation
    window, flat (the starting equity) as a reference line. The x axis counts bars: a session gap
    (overnight, a weekend) takes one bar's room, where the curves break (marked by a thin dotted
    line when there are few); windows are shaded alternately; the legend sits above the plots,
    right of the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = pd.DatetimeIndex(sorted(set().union(*(w.equity.index for w in report.windows))))
    gaps, x = session_gaps(times), compressed_x(times)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, height_ratios=(2, 1), layout="constrained")
    _plot_windows(top, bottom, report, times, x, gaps, report.name, "C0", fill=True)
    if baselines and "buy_hold" in baselines:
        _plot_windows(top, bottom, baselines["buy_hold"], times, x, gaps, "buy & hold", "C1", fill=False)
    top.axhline(float(report.windows[0].equity.iloc[0]), color="0.4", lw=0.8, ls="--", label="flat")
    marked = _mark_windows_and_gaps((top, bottom), report, times, x, gaps)
    ticks = _tick_bars(times, gaps)
    fmt = "%m-%d %H:%M" if times[0].year == times[-1].year else "%Y-%m-%d %H:%M"
    bottom.set_xticks(x[ticks], [f"{t:{fmt}}" for t in times[ticks]], fontsize=7)
    bottom.set_xlabel(f"bars ({times[0]:%Y-%m-%d} .. {times[-1]:%Y-%m-%d}; a session gap takes one bar"
                      f"{', dotted' if marked else ''})", fontsize=8)
    top.set_ylabel("equity")
    bottom.set_ylabel("drawdown %")
    top.set_title(f"{report.name}: equity per evaluation window ({len(report.windows)}, shaded alternately)",
                  loc="left", fontsize=10)
    top.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=3, fontsize=8, frameon=False, borderaxespad=0.2)
    plt.close(fig)
    return fig


def _plot_windows(top: Any, bottom: Any, report: Any, times: pd.DatetimeIndex, x: np.ndarray, gaps: np.ndarray,
                  label: str, color: str, fill: bool) -> None:
    """One report's equity and drawdown, window by window, lines broken at session gaps."""
    for k, w in enumerate(report.windows):
        at = times.get_indexer(w.equity.index)
        breaks = gaps[at] & (np.arange(len(at)) > 0)  # a gap before a window's first bar is the last one's
        equity = w.equity.to_numpy(dtype=float)
        drawdown = _drawdown_pct(equity)
        top.plot(*broken_line(x[at], equity, breaks), color=color, lw=1.0 if fill else 0.8,
                 label=label if k == 0 else None)
        bottom.plot(*broken_line(x[at], drawdown, breaks), color=color, lw=0.6)
        if fill:
            bottom.fill_between(x[at], drawdown, 0, color=color, alpha=0.25, lw=0)


def _mark_windows_and_gaps(axes: tuple[Any, ...], report: Any, times: pd.DatetimeIndex, x: np.ndarray,
                           gaps: np.ndarray, most: int = 40) -> bool:
    """Shade every other window; a dotted line at each session gap when there are at most
    ``most`` (more would grey the whole chart; the curves still break). True if gaps were marked."""
    for w in report.windows[1::2]:
        first, last = times.get_indexer(w.equity.index[[0, -1]])
        for ax in axes:
            ax.axvspan(x[first], x[last], color="0.5", alpha=0.08, lw=0)
    marked = 0 < gaps.sum() <= most
    for g in np.flatnonzero(gaps) if marked else ():
        for ax in axes:
            ax.axvline((x[g - 1] + x[g]) / 2, color="0.6", lw=0.4, ls=":")
    return bool(marked)


def equity_drawdown_png(report: Any, baselines: dict[str, Any] | None = None) -> bytes:
    """:func:`equity_drawdown_figure` as PNG bytes."""
    buf = io.BytesIO()
    equity_drawdown_figure(report, baselines).savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _finite(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def log_report(report: Any, baselines: dict[str, Any], dataset: Any, model_uri: str) -> dict[str, float]:
    """Log one model's evaluation into the active run; returns the ``eval/...`` metrics."""
    import mlflow

    summary = report.summary()
    summary["psr_vs_buy_hold"] = psr_against(report, baselines["buy_hold"])
    for key, value in paired_comparison(report, baselines["buy_hold"]).items():
        summary[f"vs_buy_hold_{key}"] = value
    metrics = _finite(summary, "eval")
    mlflow.log_metrics(metrics, model_id=model_id_of(model_uri), dataset=dataset)
    log_headline(summary, model_id_of(model_uri))
    offset = 0
    for w in report.windows:
        mlflow.log_metrics(_finite(w.metrics, "eval_window"), step=offset)
        offset += len(w.equity)
    _log_curves(chained_curve(report))
    for name, base in baselines.items():
        mlflow.log_metrics(_finite({k: v for k, v in base.summary().items() if not k.endswith("_std")},
                                   f"baseline/{name}"))
    tags = {"model_uri": model_uri, "eval.windows": str(len(report.windows))}
    if report.stop_notes():  # accounts that hit the equity floor, said in words beside eval/stopped_out
        tags["eval.stopped_out"] = "; ".join(report.stop_notes())[:5000]
    mlflow.set_tags(tags)
    mlflow.log_image(_png_image(equity_drawdown_png(report, baselines)), "eval/equity_drawdown.png")
    mlflow.log_table(report.per_window().reset_index(), "eval/windows.json")
    trades = report.trades()
    if len(trades):
        _log_parquet(trades, "eval/trades.parquet")
        mlflow.log_table(trades.astype({"entry_time": str, "exit_time": str}), "eval/trades.json")
    positions = pd.concat([pd.DataFrame({"window": w.index, "equity": w.equity, "position": w.positions})
                           for w in report.windows])
    _log_parquet(positions.reset_index(), "eval/positions.parquet")
    return metrics


def chained_curve(report: Any, points: int = CURVE_POINTS) -> pd.DataFrame:
    """The windows played one after another from the first window's starting equity, each
    window's return compounding: ``equity`` and ``drawdown_pct`` (from the running peak, <= 0)
    indexed by evaluated bar (0 = the first bar of the first window), thinned to ``points``."""
    parts, level = [], None
    for w in report.windows:
        curve = w.equity.to_numpy(dtype=float)
        level = curve[0] if level is None else level
        parts.append(level * curve / curve[0])
        level = parts[-1][-1]
    equity = np.concatenate(parts) if parts else np.zeros(0)
    peak = np.maximum.accumulate(equity) if len(equity) else equity
    frame = pd.DataFrame({"equity": equity, "drawdown_pct": 100.0 * (equity / np.where(peak > 0, peak, 1.0) - 1.0)})
    return frame.iloc[thinned_index(len(frame), points)]


def _log_curves(curves: pd.DataFrame) -> None:
    """Log each column as ``backtest/<column>`` with the bar as step, in batches."""
    import mlflow

    log_metric_batch(mlflow.active_run().info.run_id,
                     [(f"backtest/{key}", value, step) for key in curves.columns for step, value in curves[key].items()])


def _png_image(data: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data))


def _log_parquet(frame: pd.DataFrame, artifact_file: str) -> None:
    import tempfile
    from pathlib import Path

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        frame.to_parquet(path)
        mlflow.log_artifact(str(path), str(Path(artifact_file).parent))


def evaluate_models(cfg: Config, model_uris: list[str], bars: pd.DataFrame, *, metric: str = "sharpe",
                    policies: list[LoadedPolicy] | None = None, evaluation: Evaluation | None = None) -> EvaluateResult:
    """Evaluate each model (and the baselines) on the same ``bars`` and windows; log to MLflow.

    Each model's observations are built from its own recorded settings (window, normalisation,
    contract size); the account comes from ``cfg``. The cycle hands on what it has: ``policies``
    (loaded models) and ``evaluation`` (an :class:`Evaluation` with baselines that covers these
    models: logged, not computed again; the gate then uses the same reports). Several models: one
    child run per model and a comparison table (best by ``metric``) on the parent run.
    """
    import mlflow

    if not model_uris:
        raise ValueError("give at least one --model-uri")
    setup_tracking(cfg)
    compare = len(model_uris) > 1
    policies = policies or [load_policy_model(uri) for uri in model_uris]
    with pipeline_run(cfg, "compare" if compare else "evaluate") as run:
        warn_if_instrument_misfits(bars, cfg)
        source = bars.attrs.get("path") or str(bars.attrs.get("source", ""))
        dataset = log_dataset(bars, "evaluation-bars", source, "evaluation")
        log.info("evaluating %s on %d bars (%s .. %s), %d windows", ", ".join(p.label for p in policies), len(bars),
                 bars.index[0], bars.index[-1], cfg.continuous_learning.evaluation_episodes)
        result = evaluation if evaluation is not None else evaluate_policies(policies, bars, cfg)
        mlflow.log_params(_params(result))
        rows = {policy.uri: _log_policy(policy, result, (bars, source, dataset), compare) for policy in policies}
        table = pd.DataFrame({uri: {k.removeprefix("eval/"): v for k, v in row.items()} for uri, row in rows.items()}).T
        table.index.name = "model"
        if compare:
            _log_comparison(table, metric)
        return EvaluateResult(run.info.run_id, result.reports, result.baselines, table)


def _params(result: Evaluation) -> dict[str, Any]:
    return {"periods_per_year": result.periods_per_year, "eval.first_bar": result.first_bar}


def _log_policy(policy: LoadedPolicy, result: Evaluation, data: tuple[pd.DataFrame, str, Any],
                compare: bool) -> dict[str, float]:
    """One model's report logged (in its own child run when comparing); its ``eval/...`` metrics."""
    import mlflow

    bars, source, dataset = data
    report = result.reports[policy.uri]
    if compare:
        with mlflow.start_run(run_name=f"evaluate {policy.uri}", nested=True):
            log_dataset(bars, "evaluation-bars", source, "evaluation")
            mlflow.log_params(_params(result))
            row = log_report(report, result.baselines, dataset, policy.uri)
    else:
        row = log_report(report, result.baselines, dataset, policy.uri)
    log.info("%s: %s", policy.label, ", ".join(f"{k}={report.summary()[k]:.4g}" for k in
                                               ("total_return", "sharpe", "max_drawdown", "win_rate", "n_trades")))
    return row


def _log_comparison(table: pd.DataFrame, metric: str) -> None:
    """The comparison table, and the best model by ``metric`` as tags."""
    import mlflow

    mlflow.log_table(table.reset_index(), "compare/table.json")
    values = table[metric] if metric in table else pd.Series(dtype=float)
    if values.notna().any():
        best = values.idxmin() if metric in LOWER_IS_BETTER else values.idxmax()
        mlflow.set_tags({"compare.metric": metric, "compare.best": str(best)})
        log.info("best by %s: %s", metric, best)
