"""Futures contract specifications: presets and the resolved spec the environment trades."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlproject.config import InstrumentConfig


@dataclass(frozen=True)
class InstrumentSpec:
    """Everything the environment needs to price fills and costs."""

    symbol: str
    tick_size: float
    point_value: float
    commission_per_side: float
    slippage_ticks: float
    max_contracts: int

    @property
    def tick_value(self) -> float:
        """Money per tick per contract."""
        return self.tick_size * self.point_value

    @property
    def slippage_price(self) -> float:
        """Price points every fill gives up to slippage."""
        return self.slippage_ticks * self.tick_size

    @property
    def slippage_cost(self) -> float:
        """Money every contract filled gives up to slippage."""
        return self.slippage_price * self.point_value


# CME contract specs (tick size, point value). Commission is a typical retail all-in rate per side
# (broker + exchange + NFA fees); slippage one tick. Override per account in config.
PRESETS: dict[str, InstrumentSpec] = {
    "ES": InstrumentSpec("ES", 0.25, 50.0, 2.25, 1.0, 1),
    "MES": InstrumentSpec("MES", 0.25, 5.0, 0.62, 1.0, 1),
    "NQ": InstrumentSpec("NQ", 0.25, 20.0, 2.25, 1.0, 1),
    "MNQ": InstrumentSpec("MNQ", 0.25, 2.0, 0.62, 1.0, 1),
    "CL": InstrumentSpec("CL", 0.01, 1000.0, 2.30, 1.0, 1),
    "MCL": InstrumentSpec("MCL", 0.01, 100.0, 0.72, 1.0, 1),
    "GC": InstrumentSpec("GC", 0.10, 100.0, 2.30, 1.0, 1),
}

_FIELDS = ("tick_size", "point_value", "commission_per_side", "slippage_ticks", "max_contracts")


def resolve_instrument(cfg: InstrumentConfig) -> InstrumentSpec:
    """Preset values overridden by the explicit fields of ``cfg``.

    Raises ValueError naming the missing fields when there is no preset and a field is unset.
    """
    if cfg.preset is not None:
        if cfg.preset.upper() not in PRESETS:
            raise ValueError(f"unknown instrument preset {cfg.preset!r}; presets: {', '.join(PRESETS)}")
        base = PRESETS[cfg.preset.upper()]
        changes = {f: getattr(cfg, f) for f in _FIELDS if getattr(cfg, f) is not None}
        return replace(base, symbol=cfg.symbol or base.symbol, **changes)
    missing = [f for f in _FIELDS if getattr(cfg, f) is None]
    if missing:
        raise ValueError(f"custom instrument needs {', '.join(missing)} (or a preset to start from)")
    return InstrumentSpec(cfg.symbol or "CUSTOM", *(getattr(cfg, f) for f in _FIELDS))
