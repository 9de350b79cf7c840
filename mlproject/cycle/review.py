"""The seed's monthly task: every live version evaluated on the same recent bars, then old and
refused versions archived."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlproject.config import Config
from mlproject.cycle.retrain import step
from mlproject.evaluation import default_bars
from mlproject.registry import cleanup, production_version, rollback_target
from mlproject.reporting import EvaluateResult, evaluate_models


@dataclass
class Review:
    """What the review compared and archived."""

    versions: list[str] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)
    archived_reasoner: list[str] = field(default_factory=list)
    evaluate: EvaluateResult | None = None


def _registered(model: str) -> bool:
    from mlflow import MlflowClient

    return bool(MlflowClient().search_registered_models(filter_string=f"name='{model}'"))


def live_versions(name: str, most: int = 10) -> list[str]:
    """The versions not archived, plus Production and its rollback target; the newest ``most``."""
    from mlflow import MlflowClient

    versions = sorted(MlflowClient().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version),
                      reverse=True)
    protected = {production_version(name), rollback_target(name)}
    return [str(v.version) for v in versions if v.current_stage != "Archived" or str(v.version) in protected][:most]


def review(cfg: Config) -> Review:
    """Every live version (:func:`live_versions`) evaluated on the same recent bars (a comparison
    table and plot: the compare run), then old and refused versions archived, the reasoning
    model's adapters too (never Production nor its rollback target;
    ``continuous_learning.keep_versions`` kept)."""
    import mlflow

    name, keep, lock = cfg.promotion.model_name, cfg.continuous_learning.keep_versions, cfg.promotion.lock_file
    out = Review()
    if _registered(name):
        out.versions = live_versions(name)
        if out.versions:
            out.evaluate = step("evaluate", evaluate_models, cfg, [f"models:/{name}/{v}" for v in out.versions],
                                default_bars(cfg))
        out.archived = step("cleanup", cleanup, name, keep, lock_file=lock)
    if _registered(cfg.finetune.register_model):
        out.archived_reasoner = step("cleanup", cleanup, cfg.finetune.register_model, keep, lock_file=lock)
    mlflow.set_tags({"cycle.review.versions": ",".join(out.versions) or "none",
                     "cycle.review.archived": ",".join(out.archived) or "none",
                     "cycle.review.archived_reasoner": ",".join(out.archived_reasoner) or "none"})
    return out
