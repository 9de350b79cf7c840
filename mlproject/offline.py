"""The retrain's optional offline pass: RLlib MARWIL on the experience buffer's export.

MARWIL with ``beta`` 0 is behaviour cloning; with ``beta`` 1 each experience is weighted by
``exp(advantage)``, so trades that went better than the value function expected pull harder. It
trains the same RLModule as PPO (RLlib's ``DefaultPPOTorchRLModule``), so it starts from the
Production policy and PPO starts from its result. High-value experiences (annotated as such)
are written ``continuous_learning.high_value_weight`` times into the export, so they are sampled
that much more often. Only experiences whose observations have this config's size take part
(a model with another window recorded the others).

Needs a running Ray (the cycle runs the offline pass and training in one Ray session). The
offline settings are those of shared/API-NOTES.md: without them offline RLlib hangs on 2 CPUs.
:func:`export_rllib` writes the buffer in the layout RLlib's offline API reads (no Ray needed).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlproject.atomic import atomic_write
from mlproject.config import Config
from mlproject.experience import ExperienceBuffer, ExperienceError, Query
from mlproject.experience_schema import vector_array
from mlproject.policy import MODULE_SUBDIR
from mlproject.quiet import quiet_rllib

log = logging.getLogger(__name__)

BETA = {"bc": 0.0, "marwil": 1.0}
"""MARWIL's advantage exponent per ``continuous_learning.offline_pass``."""
LEARNER_MODULE = "learner/rl_module/default_policy"
"""The policy inside an algorithm's learner group (``restore_from_path`` component)."""


@dataclass
class OfflineResult:
    """What the offline pass produced: the RLModule checkpoint PPO starts from, and its record."""

    module_dir: Path
    experiences: int
    high_value: int
    rows: int
    """Rows exported (high-value experiences repeated)."""
    history: list[dict[str, float]] = field(default_factory=list)


def export_rllib(buffer: ExperienceBuffer, path: str | os.PathLike[str], query: Query | None = None, *,
                 obs_size: int | None = None, repeat: Mapping[str, int] | None = None) -> Path:
    """The buffer's experiences as a Parquet file in the column layout RLlib's offline API reads
    (``eps_id, obs, actions, rewards, new_obs, terminateds, truncateds, t``: one single-step
    episode per experience), for offline BC/MARWIL; returns the file. ``obs_size``: only
    experiences whose observation has this length (a model with another window recorded the
    others). ``repeat``: experience id -> times it is written (weighting, e.g. high-value ones;
    the copies get ids ``<id>#2``, ``<id>#3``, ...)."""
    frame = _exportable(buffer, query, obs_size)
    ids, frame = _repeated(frame, repeat)
    table = _rllib_table(ids, frame)
    return atomic_write(Path(path), lambda p: pq.write_table(table, p))


def _exportable(buffer: ExperienceBuffer, query: Query | None, obs_size: int | None) -> pd.DataFrame:
    """The experiences to export (those with observations of ``obs_size`` when given);
    ``ExperienceError`` when there are none."""
    frame = buffer.query(query, ["experience_id", "observation", "action", "reward", "next_observation",
                                 "terminated", "truncated"])
    if obs_size is not None and not frame.empty:
        sizes = frame["observation"].map(lambda v: -1 if v is None else len(v)).to_numpy()
        if (sizes != obs_size).any():
            log.info("export: %d of %d experiences have observations of another size than %d: left out",
                     int((sizes != obs_size).sum()), len(frame), obs_size)
        frame = frame[sizes == obs_size]
    if frame.empty:
        raise ExperienceError(f"{buffer.root}: no experiences to export" + (f" for {query}" if query else "")
                              + (f" with observations of size {obs_size}" if obs_size is not None else ""))
    return frame


def _repeated(frame: pd.DataFrame, repeat: Mapping[str, int] | None) -> tuple[list[str], pd.DataFrame]:
    """(episode ids, rows): each experience as many times as ``repeat`` says (copies ``<id>#k``)."""
    ids = frame["experience_id"].tolist()
    if not repeat:
        return ids, frame
    times = np.array([max(1, int(repeat.get(i, 1))) for i in ids])
    ids = [i if k == 0 else f"{i}#{k + 1}" for i, n in zip(ids, times) for k in range(n)]
    return ids, frame.iloc[np.repeat(np.arange(len(frame)), times)]


def _rllib_table(ids: list[str], frame: pd.DataFrame) -> pa.Table:
    """The rows in RLlib's offline columns (a missing next observation: the observation)."""
    next_obs = frame["next_observation"].where(frame["next_observation"].notna(), frame["observation"])
    return pa.table({
        "eps_id": pa.array(ids, pa.string()),
        "obs": vector_array(frame["observation"]),
        "actions": pa.array(frame["action"].astype(np.int64)),
        "rewards": pa.array(frame["reward"].astype(np.float64)),
        "new_obs": vector_array(next_obs),
        "terminateds": pa.array(frame["terminated"].fillna(False).astype(bool)),
        "truncateds": pa.array(frame["truncated"].fillna(True).astype(bool)),
        "t": pa.array(np.zeros(len(frame), np.int64)),
    })


def offline_algorithm(cfg: Config, export: Path, observation_space: Any, action_space: Any) -> Any:
    """The MARWIL algorithm for ``continuous_learning.offline_pass`` on ``export``."""
    import ray
    from ray.rllib.algorithms.marwil import MARWILConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    quiet_rllib()
    ray.data.DataContext.get_current().enable_progress_bars = False
    t = cfg.train
    return (
        MARWILConfig()
        .environment(observation_space=observation_space, action_space=action_space)
        .learners(num_learners=0)
        .env_runners(num_env_runners=0)
        .training(train_batch_size_per_learner=t.minibatch_size, lr=t.lr, gamma=t.gamma,
                  beta=BETA[cfg.continuous_learning.offline_pass])
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(t.hiddens), fcnet_activation=t.activation))
        .offline_data(input_=[str(export)], dataset_num_iters_per_learner=5,
                      map_batches_kwargs={"compute": ray.data.ActorPoolStrategy(size=1), "num_cpus": 1})
        .debugging(seed=cfg.seed, log_sys_usage=False)
    ).build_algo()


def offline_pass(cfg: Config, buffer: ExperienceBuffer, parent_module: Path | None, observation_space: Any,
                 action_space: Any, work: Path) -> OfflineResult:
    """Export the buffer (this config's observation size, high-value experiences repeated), train
    MARWIL for ``continuous_learning.offline_iterations`` starting from ``parent_module`` (an
    RLModule checkpoint; None: fresh weights) and save the result under ``work``."""
    cl = cfg.continuous_learning
    export, experiences, high, rows = _export_weighted(cfg, buffer, int(observation_space.shape[0]), work)
    log.info("offline pass (%s): %d experiences (%d high-value, each x%d): %d rows, %d iterations%s",
             cl.offline_pass, experiences, high, cl.high_value_weight, rows, cl.offline_iterations,
             ", from the Production policy" if parent_module else ", from fresh weights")
    algo = offline_algorithm(cfg, export, observation_space, action_space)
    try:
        history = _train(algo, parent_module, cl.offline_iterations)
        algo.save_to_path(str(work / "offline-checkpoint"))
    finally:
        algo.stop()
        # The learner's Ray Data iterator is a generator in a reference cycle: collected later,
        # after Ray has shut down, it prints "Ray is not initialized" with a traceback.
        del algo
        gc.collect()
    return OfflineResult(work / "offline-checkpoint" / MODULE_SUBDIR, experiences, high, rows, history)


def _export_weighted(cfg: Config, buffer: ExperienceBuffer, obs_size: int, work: Path) -> tuple[Path, int, int, int]:
    """Export the experiences with observations of ``obs_size``, high-value ones
    ``continuous_learning.high_value_weight`` times; (file, experiences, high-value ones, rows)."""
    cl = cfg.continuous_learning
    high = set(buffer.high_value(cl.high_value_min_quality, columns=["experience_id"])["experience_id"])
    repeat = dict.fromkeys(high, cl.high_value_weight) if cl.high_value_weight > 1 else None
    export = export_rllib(buffer, work / "offline-export.parquet", obs_size=obs_size, repeat=repeat)
    ids = pq.read_table(export, columns=["eps_id"]).column("eps_id").to_pylist()
    high &= set(ids)  # the high-value experiences that were exported (the right observation size)
    rows = len(ids)
    return export, rows - len(high) * (cl.high_value_weight - 1), len(high), rows


def _train(algo: Any, parent_module: Path | None, iterations: int) -> list[dict[str, float]]:
    """``iterations`` of ``algo`` from ``parent_module`` (None: its own weights); the losses of each."""
    if parent_module is not None:
        algo.learner_group.restore_from_path(str(parent_module), component=LEARNER_MODULE)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for it in range(1, iterations + 1):
        learner = algo.train().get("learners", {}).get("default_policy", {})
        metrics = {f"offline/{k}": float(learner[k]) for k in ("policy_loss", "vf_loss", "total_loss")
                   if k in learner and math.isfinite(float(learner[k]))}
        history.append(metrics)
        log.info("offline iter %d/%d policy_loss=%.4g (%.0fs)", it, iterations,
                 metrics.get("offline/policy_loss", math.nan), time.perf_counter() - started)
    return history
