"""Out-of-distribution abstention: how far a live bar's features are from the training split's.

A policy model carries, beside its settings, the reference of the bars it was trained on (in the
MLflow model's metadata under :data:`REFERENCE_KEY`): per feature of the newest bar (not the time
of day, which is bounded by construction), the median and a robust spread (half the distance
between the 15.9% and 84.1% quantiles: one standard deviation for a normal feature, not inflated
by the fat tails of returns). The bridge measures each observation's largest robust z-score
against it; beyond ``bridge.max_feature_z`` the decision is flat (guard ``ood``): the market of
that bar is not one the policy has seen.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from mlproject.features import FEATURE_NAMES, bar_features, latest_features

log = logging.getLogger(__name__)
REFERENCE_KEY = "nt8_feature_reference"
OOD_FEATURES = tuple(name for name in FEATURE_NAMES if not name.startswith("tod_"))
"""The features measured: every bar feature but the time of day."""
_MIN_SCALE = 1e-6


def feature_reference(train_bars: pd.DataFrame, vol_window: int, norm_window: int) -> dict[str, Any]:
    """The reference a model carries: per :data:`OOD_FEATURES` feature of the training bars, the
    median and the robust spread (JSON-ready lists)."""
    feats = bar_features(train_bars, vol_window=vol_window, norm_window=norm_window).astype(np.float64)
    cols = feats[:, [FEATURE_NAMES.index(n) for n in OOD_FEATURES]]
    cols = cols[np.isfinite(cols).all(axis=1)]
    if len(cols) < 2:
        raise ValueError(f"{len(train_bars)} training bars give {len(cols)} complete feature rows: too few for a "
                         "feature reference")
    low, median, high = np.quantile(cols, [0.159, 0.5, 0.841], axis=0)
    scale = np.maximum((high - low) / 2, _MIN_SCALE)
    return {"features": list(OOD_FEATURES), "median": median.tolist(), "scale": scale.tolist(), "n_bars": len(cols)}


def reference_or_none(train_bars: pd.DataFrame, vol_window: int, norm_window: int) -> dict[str, Any] | None:
    """:func:`feature_reference` for a model being logged; None, with a warning, when the training
    bars are too few for one (the model then trades without the out-of-distribution guard)."""
    try:
        return feature_reference(train_bars, vol_window, norm_window)
    except ValueError as exc:
        log.warning("no feature reference logged with the model (the bridge's ood guard will not judge it): %s", exc)
        return None


class Reference:
    """A model's reference, ready to score observations."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        names = list(raw["features"])
        self.index = np.array([FEATURE_NAMES.index(n) for n in names])
        self.names = names
        self.median = np.asarray(raw["median"], dtype=np.float64)
        self.scale = np.asarray(raw["scale"], dtype=np.float64)

    @classmethod
    def of(cls, raw: Mapping[str, Any] | None) -> Reference | None:
        return cls(raw) if raw else None

    def largest_z(self, observation: np.ndarray) -> tuple[float, str]:
        """(largest absolute robust z-score of the newest bar's features, its feature)."""
        newest = latest_features(np.asarray(observation, dtype=np.float64))[self.index]
        z = np.abs(newest - self.median) / self.scale
        k = int(np.nanargmax(z)) if np.isfinite(z).any() else 0
        return float(z[k]) if np.isfinite(z[k]) else float("inf"), self.names[k]
