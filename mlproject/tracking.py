"""MLflow tracking helpers shared by the pipelines (no MLflow import at module level)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlproject.config import Config
from mlproject.experience import COLUMNS, ExperienceBuffer, Query
from mlproject.quiet import quiet_dataset_source
from mlproject.signals import Stopped

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def setup_tracking(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI.

    ``MLFLOW_TRACKING_URI`` in the environment (set by ``mlflow run`` or by the user) wins over
    ``mlflow.tracking_uri``; with neither, MLflow's default sqlite:///mlflow.db is used.
    Under ``mlflow run`` the experiment is already chosen (``MLFLOW_EXPERIMENT_ID``).
    """
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow draws a tqdm "Downloading artifacts" bar for every model it loads, local copies
    # included: pages of bars around the pipeline's own log lines, saying nothing to the user.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if cfg.mlflow.tracking_uri and "MLFLOW_TRACKING_URI" not in os.environ:
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    # Under `mlflow run` (MLFLOW_RUN_ID set) the run and its experiment already exist. Not
    # MLFLOW_EXPERIMENT_ID: mlflow.set_experiment itself exports it, so it proves nothing.
    # Inside an active run (a step of the cycle) the child runs belong to the parent's
    # experiment: MLflow unsets MLFLOW_RUN_ID once it resumed that run, so without this check the
    # steps of `mlflow run . -e main` landed in another experiment than their parent.
    if "MLFLOW_RUN_ID" not in os.environ and mlflow.active_run() is None:
        mlflow.set_experiment(cfg.mlflow.experiment)
    return mlflow.get_tracking_uri()


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""Without this tag MLflow 3.17's UI opens a new experiment in its GenAI view (an empty traces
page); with it, in the model-training view that lists the runs."""


def experiment_id(name: str) -> str:
    """The id of the experiment ``name``, created (tagged as model development) when missing."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(
        name, tags={EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]})


def log_metric_batch(run_id: str, points: list[tuple[str, float, int]]) -> None:
    """Log ``(key, value, step)`` points on ``run_id`` (not the active run), the finite ones, at
    most 1,000 a request (MLflow's limit)."""
    import math
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(step)) for k, v, step in points if v is not None and math.isfinite(v)]
    for start in range(0, len(metrics), 1000):
        MlflowClient().log_batch(run_id, metrics=metrics[start:start + 1000])


CURVE_POINTS = 500
"""At most this many points per curve logged by :func:`log_curves` (every k-th point, the last
one always): the UI draws a few hundred points as well as a million, and loads them faster."""


def log_curves(run_id: str, curves: dict[str, Any], points: int = CURVE_POINTS) -> None:
    """Log each curve (key -> 1-d array) as step metrics on ``run_id``: step = index in the
    curve, thinned evenly to ``points`` (first and last kept)."""
    import numpy as np

    batch = []
    for key, values in curves.items():
        values = np.asarray(values, dtype=float)
        batch += [(key, float(values[i]), int(i)) for i in thinned_index(len(values), points)]
    log_metric_batch(run_id, batch)


def thinned_index(n: int, points: int = CURVE_POINTS) -> Any:
    """Positions of at most ``points`` evenly spaced items of ``n`` (first and last kept; all
    of them when ``n <= points``): how every logged curve is thinned."""
    import numpy as np

    if n <= points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, points).round().astype(int))


def mark_model_training(experiment_id: str) -> None:
    """Tag the experiment as model development (once: a tagged one is left alone)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    key, value = EXPERIMENT_KIND
    if client.get_experiment(experiment_id).tags.get(key) != value:
        client.set_experiment_tag(experiment_id, key, value)


HEADLINE = ("sharpe", "total_return", "max_drawdown", "n_trades")
"""The quantities users compare across steps; every run that has them logs them under these
same names (train: the selected checkpoint on validation; evaluate: the test split; promote: the
challenger), so the UI's run comparison lines them up instead of showing NaN."""


def log_headline(metrics: Any, model_id: str | None = None) -> None:
    """Log the :data:`HEADLINE` values found in ``metrics`` (unprefixed keys), linked to the model."""
    import math

    import mlflow

    picked = {k: float(metrics[k]) for k in HEADLINE if k in metrics and math.isfinite(float(metrics[k]))}
    if picked:
        mlflow.log_metrics(picked, model_id=model_id)


def git_commit() -> str | None:
    """Commit of the working tree this code runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def log_config(cfg: Config) -> None:
    """The resolved config as ``config.yaml`` and as flattened params."""
    import mlflow

    mlflow.log_text(cfg.to_yaml(), "config.yaml")
    params = {k: _param_value(v) for k, v in cfg.flat().items()}
    # `mlflow run` logs the entry point's parameters first (e.g. seed=''); MLflow forbids
    # changing a param, so a resolved value that differs goes in as "resolved.<key>".
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({(f"resolved.{k}" if k in existing and existing[k] != v else k): v
                       for k, v in params.items() if existing.get(k) != v})


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 3] + "..."


@contextlib.contextmanager
def pipeline_run(cfg: Config, step: str, *, nested: bool | None = None) -> Iterator[Any]:
    """An MLflow run for one pipeline step, with config, git commit and step tags logged.

    Under ``mlflow run`` it resumes the run that ``mlflow run`` created; called inside another
    run (a step of the cycle) it is a child run (``nested`` None: whenever a run is active). A
    failure tags the run with the error message (``error``); leaving the ``with`` block by an
    exception marks it FAILED, a stop signal (:class:`mlproject.signals.Stopped`, Ctrl-C) KILLED.
    """
    import mlflow

    nested = mlflow.active_run() is not None if nested is None else nested
    with mlflow.start_run(run_name=step, nested=nested) as run:
        mark_model_training(run.info.experiment_id)
        mlflow.set_tags({"pipeline.step": step, "mlflow.source.git.commit": git_commit() or "unknown"})
        log_config(cfg)
        try:
            yield run
        except (Stopped, KeyboardInterrupt) as exc:
            # Stopped by a signal (the CLI's handler) or Ctrl-C: KILLED, not FAILED (nothing
            # went wrong). Ended here, the run is off the stack, so start_run's exit leaves it so.
            mlflow.set_tag("error", str(exc) if isinstance(exc, Stopped) else "stopped by SIGINT (KeyboardInterrupt)")
            mlflow.end_run("KILLED")
            raise
        except BaseException as exc:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            raise


def log_dataset(bars: Any, name: str, source: str, context: str) -> Any:
    """Log ``bars`` (a bar DataFrame) as an MLflow run input (digest, schema, profile) and return
    the dataset."""
    import mlflow

    with quiet_dataset_source():
        dataset = mlflow.data.from_pandas(bars.reset_index(), source=source, name=name)
    mlflow.log_input(dataset, context=context)
    return dataset


def log_buffer_stats(buffer: ExperienceBuffer) -> dict[str, float]:
    """The buffer's :meth:`~mlproject.experience.ExperienceBuffer.stats` as ``buffer/...``
    metrics of the active MLflow run; returns them."""
    import mlflow

    metrics = {f"buffer/{k}": v for k, v in buffer.stats().items()}
    mlflow.log_metrics(metrics)
    return metrics


def experience_dataset(buffer: ExperienceBuffer, query: Query | None = None, name: str = "experience-buffer") -> Any:
    """The buffer's experiences (without observations) as an MLflow dataset with a digest, to log
    as a run input: every retrain run shows which experiences it learned from."""
    import mlflow

    columns = [c for c in COLUMNS if c not in ("observation", "next_observation")]
    frame = buffer.query(query, columns)
    frame["time"] = frame["time"].astype(str)
    frame["tags"] = frame["tags"].map(lambda t: ",".join(t) if t is not None else "")
    with quiet_dataset_source():
        return mlflow.data.from_pandas(frame, source=buffer.root, name=name)
