"""The Production model a retrain continues: downloaded once per cycle (the warm start, the offline
pass's start and the gate's comparison all read that one copy), whether this config can go on
training it, and the plan the retrain says before it starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlproject.config import Config
from mlproject.features import obs_size
from mlproject.policy import (
    PolicySettings,
    continue_differences,
    find_module_dir,
    load_module,
    network_settings,
    read_settings,
    set_items,
)
from mlproject.registry import production_version


@dataclass
class ProductionModel:
    """The Production version, downloaded once per cycle: the warm start, the offline pass's
    start and the gate's comparison all read this one copy."""

    version: str
    uri: str
    local: Path
    warm_start: bool
    """It reads this config's observations (and is the model this config trains), so training
    goes on from it; otherwise training starts fresh (``why_not`` says why)."""
    why_not: str = ""
    """Why there is no warm start, and how to get one (empty when ``warm_start``)."""

    def tags(self) -> dict[str, str]:
        return {"parent_uri": self.uri, "parent_version": self.version}


def production_model(cfg: Config) -> ProductionModel | None:
    """The Production version of ``promotion.model_name`` downloaded, or None when there is none."""
    import mlflow

    name = cfg.promotion.model_name
    version = production_version(name)
    if version is None:
        return None
    uri = f"models:/{name}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    why_not = (f"is {name}, this config trains {cfg.train.register_model}" if cfg.train.register_model != name
               else _why_not_warm(local, cfg))
    return ProductionModel(str(version), uri, local, not why_not, why_not)


def _why_not_warm(local: Path, cfg: Config) -> str:
    """Empty when the downloaded policy can go on training with this config, else why not."""
    settings = read_settings(local) if (local / "MLmodel").is_file() else None
    module = load_module(find_module_dir(local))
    if settings is None:
        shape = tuple(module.observation_space.shape)
        size = obs_size(cfg.env.window, cfg.env.feature_set)
        if shape != (size,):
            return (f"takes observations of shape {shape}, this config makes {size} "
                    f"(window {cfg.env.window})")
    return settings_mismatch(settings, cfg, network_settings(module))


MISMATCH_KEYS = ("vol_window", "norm_window", "max_contracts")
"""Observation settings named beside the instrument and window when they differ."""


def settings_mismatch(theirs: PolicySettings | None, cfg: Config, network: dict[str, Any] | None = None) -> str:
    """Empty when a policy of ``theirs`` settings (and ``network``) can go on training with ``cfg``
    (:func:`mlproject.policy.continue_differences`, the rule ``train --init-from`` follows); else
    what differs (the instrument and window always named) and the ``--set`` that continues it."""
    differ, wanted = continue_differences(theirs, network, cfg)
    if not differ:
        return ""
    ours = PolicySettings.from_env(cfg.env)
    if theirs is None:
        return f"was trained with another network ({'; '.join(differ)}). To continue it use {set_items(wanted)}"
    named = [k for k in MISMATCH_KEYS if getattr(theirs, k) != getattr(ours, k)]

    def describe(s: PolicySettings) -> str:
        return f"{s.instrument['symbol']} with window {s.window}" + "".join(f", {k} {getattr(s, k)}" for k in named)

    text = f"trades {describe(theirs)}; this config is {describe(ours)}"
    text += "".join(f"; {d} (model vs config)" for d in differ if d.startswith("train."))
    if (theirs.features, theirs.feature_set_version) != (ours.features, ours.feature_set_version):
        return (f"{text}, and it reads other features (feature set v{theirs.feature_set_version} vs "
                f"v{ours.feature_set_version}): this code cannot continue it")
    return f"{text}. To continue the deployed model use the config it was trained with, e.g. {set_items(wanted)}"


def retrain_plan(cfg: Config, production: ProductionModel | None) -> str:
    """What the training is about to do and why, said before it starts (it may take hours)."""
    n = cfg.train.iterations
    budget = f"{n} iteration{'s' if n != 1 else ''} of {cfg.train.train_batch_size:,} steps"
    if production is None:
        return f"nothing in Production: training a first model from scratch ({budget})"
    label = f"Production {cfg.promotion.model_name} v{production.version}"
    if production.warm_start:
        return f"warm start from {label} ({budget})"
    text, to, fix = production.why_not.partition(". To continue")
    return f"{label} {text}: training a NEW model from scratch ({budget}), not a warm start{to}{fix}"
