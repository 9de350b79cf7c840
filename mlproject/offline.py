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
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mlproject.config import Config
from mlproject.experience import ExperienceBuffer
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
    obs_size = int(observation_space.shape[0])
    high = set(buffer.high_value(cl.high_value_min_quality, columns=["experience_id"])["experience_id"])
    repeat = dict.fromkeys(high, cl.high_value_weight) if cl.high_value_weight > 1 else None
    export = buffer.export_rllib(work / "offline-export.parquet", obs_size=obs_size, repeat=repeat)
    ids = pq.read_table(export, columns=["eps_id"]).column("eps_id").to_pylist()
    high &= set(ids)  # the high-value experiences that were exported (the right observation size)
    rows = len(ids)
    experiences = rows - len(high) * (cl.high_value_weight - 1)
    log.info("offline pass (%s): %d experiences (%d high-value, each x%d): %d rows, %d iterations%s",
             cl.offline_pass, experiences, len(high), cl.high_value_weight, rows, cl.offline_iterations,
             ", from the Production policy" if parent_module else ", from fresh weights")
    algo = offline_algorithm(cfg, export, observation_space, action_space)
    history: list[dict[str, float]] = []
    try:
        if parent_module is not None:
            algo.learner_group.restore_from_path(str(parent_module), component=LEARNER_MODULE)
        started = time.perf_counter()
        for it in range(1, cl.offline_iterations + 1):
            learner = algo.train().get("learners", {}).get("default_policy", {})
            metrics = {f"offline/{k}": float(learner[k]) for k in ("policy_loss", "vf_loss", "total_loss")
                       if k in learner and math.isfinite(float(learner[k]))}
            history.append(metrics)
            log.info("offline iter %d/%d policy_loss=%.4g (%.0fs)", it, cl.offline_iterations,
                     metrics.get("offline/policy_loss", math.nan), time.perf_counter() - started)
        algo.save_to_path(str(work / "offline-checkpoint"))
    finally:
        algo.stop()
        # The learner's Ray Data iterator is a generator in a reference cycle: collected later,
        # after Ray has shut down, it prints "Ray is not initialized" with a traceback.
        del algo
        gc.collect()
    return OfflineResult(work / "offline-checkpoint" / MODULE_SUBDIR, experiences, len(high), rows, history)
