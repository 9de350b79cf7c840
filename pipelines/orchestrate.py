"""Run the learning cycle.

    python -m pipelines.orchestrate --mode all [--config conf/smoke.yaml]
    mlflow run . --env-manager local                       # the `main` entry point

What exists today (``--mode all``): ingest the configured bars (synthetic by default), train
the agent with RLlib PPO (warm-started from the Production policy when there is one) and
register it as a new ``nt8-agent`` version, evaluate it against
flat and buy-and-hold on the held-out test split, then run the promotion gate against the
current Production version (promote + deploy, or refuse with reasons), all under one parent
MLflow run with a child run per step. Experience collection and fine-tuning join this cycle as
their pipelines land; until then the run says so in its ``cycle.pending`` tag and in the log.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from mlproject.cli import base_parser, run_cli
from mlproject.config import Config
from mlproject.features import FEATURE_NAMES
from mlproject.policy import PolicySettings, load_module, resolve_init_from
from mlproject.registry import production_version
from mlproject.tracking import pipeline_run, setup_tracking
from pipelines import evaluate, ingest, promote, train

log = logging.getLogger(__name__)

MODES = ("all",)
PENDING_STEPS = ("collect", "annotate", "finetune")


def warm_start_uri(cfg: Config) -> str | None:
    """``models:/<name>/Production`` when a Production policy exists that reads this config's
    observations (continuous learning goes on from the deployed policy), else None (fresh)."""
    name = cfg.promotion.model_name
    if cfg.train.register_model != name or production_version(name) is None:
        return None
    uri = f"models:/{name}/Production"
    module_dir, _, settings = resolve_init_from(uri)
    if settings is not None:
        differ = settings.observation_differences(PolicySettings.from_env(cfg.env))
        if differ:
            log.warning("the Production policy was trained with other observation settings (Production vs this "
                        "config: %s): training from scratch", "; ".join(differ))
            return None
        return uri
    shape = tuple(load_module(module_dir).observation_space.shape)
    if shape != (cfg.env.window * len(FEATURE_NAMES) + 2,):
        log.warning("Production policy takes observations of shape %s, this config makes %d: training from scratch",
                    shape, cfg.env.window * len(FEATURE_NAMES) + 2)
        return None
    return uri


def main(cfg: Config, mode: str = "all") -> dict[str, Any]:
    """Run ``mode`` of the cycle; returns what each step produced."""
    import mlflow

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; available now: {', '.join(MODES)}")
    setup_tracking(cfg)
    with pipeline_run(cfg, f"cycle-{mode}") as run:
        mlflow.set_tag("cycle.pending", ",".join(PENDING_STEPS))
        ingested = ingest.main(cfg)
        data_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(ingested.path)})})
        trained = train.main(data_cfg, init_from=warm_start_uri(cfg))
        model_uri = (f"models:/{cfg.train.register_model}/{trained.registered_version}"
                     if trained.registered_version else trained.model_uri)
        evaluated = evaluate.main(data_cfg, [model_uri])
        decision = promote.main(data_cfg, model_uri) if trained.registered_version else None
        log.info("cycle done (run %s): trained and evaluated %s, promotion %s. Steps not built yet, so not run: %s",
                 run.info.run_id, model_uri, decision.decision if decision else "skipped (not registered)",
                 ", ".join(PENDING_STEPS))
        return {"run_id": run.info.run_id, "ingest": ingested, "train": trained, "model_uri": model_uri,
                "evaluate": evaluated, "promote": decision}


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--mode", default="all", choices=MODES, help="which part of the cycle to run")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), lambda cfg, args: main(cfg, args.mode))
