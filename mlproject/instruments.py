"""Futures contract specifications: presets and the resolved spec the environment trades."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

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

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (what a logged model records)."""
        return asdict(self)


def _spec(symbol: str, tick_size: float, point_value: float, round_turn: float) -> InstrumentSpec:
    # Presets are quoted with a round-turn commission (how brokers publish it); the env charges
    # half of it per side. Slippage one tick, one contract: override per account in config.
    return InstrumentSpec(symbol, tick_size, point_value, round(round_turn / 2, 4), 1.0, 1)


# Exchange contract specs (CME Group / CBOT / NYMEX / COMEX contract pages): symbol, contract,
# tick size, point value (money per 1.0 of price) and a typical retail all-in round-turn
# commission (broker + exchange + NFA fees), per contract, in USD; your account's rate goes in config.
_CONTRACTS: tuple[tuple[str, str, float, float, float], ...] = (
    # equity indices
    ("ES", "E-mini S&P 500", 0.25, 50.0, 4.50),
    ("MES", "Micro E-mini S&P 500", 0.25, 5.0, 1.24),
    ("NQ", "E-mini Nasdaq-100", 0.25, 20.0, 4.50),
    ("MNQ", "Micro E-mini Nasdaq-100", 0.25, 2.0, 1.24),
    ("YM", "E-mini Dow", 1.0, 5.0, 4.50),
    ("MYM", "Micro E-mini Dow", 1.0, 0.5, 1.24),
    ("RTY", "E-mini Russell 2000", 0.10, 50.0, 4.50),
    ("M2K", "Micro E-mini Russell 2000", 0.10, 5.0, 1.24),
    # energy
    ("CL", "WTI crude oil", 0.01, 1000.0, 4.60),
    ("MCL", "Micro WTI crude oil", 0.01, 100.0, 1.44),
    ("NG", "Henry Hub natural gas", 0.001, 10000.0, 4.60),
    # metals
    ("GC", "Gold", 0.10, 100.0, 4.60),
    ("MGC", "Micro gold", 0.10, 10.0, 1.44),
    ("SI", "Silver", 0.005, 5000.0, 4.60),
    ("HG", "Copper", 0.0005, 25000.0, 4.60),
    # interest rates (prices in points; 1/32 = 0.03125)
    ("ZB", "30-year T-bond", 1 / 32, 1000.0, 3.80),
    ("ZN", "10-year T-note", 1 / 64, 1000.0, 3.60),  # half of 1/32
    ("ZF", "5-year T-note", 1 / 128, 1000.0, 3.40),  # quarter of 1/32
    # currencies
    ("6E", "Euro FX", 0.00005, 125000.0, 4.80),
    ("6J", "Japanese yen", 0.0000005, 12500000.0, 4.80),
    ("6B", "British pound", 0.0001, 62500.0, 4.80),
    ("6A", "Australian dollar", 0.00005, 100000.0, 4.80),
    ("6C", "Canadian dollar", 0.00005, 100000.0, 4.80),
    # crypto
    ("BTC", "Bitcoin (5 BTC)", 5.0, 5.0, 15.00),
    ("MBT", "Micro Bitcoin (0.1 BTC)", 5.0, 0.1, 5.00),
)

PRESETS: dict[str, InstrumentSpec] = {c[0]: _spec(c[0], *c[2:]) for c in _CONTRACTS}
"""The preset instruments by symbol (``env.instrument: ES``)."""

CONTRACT_NAMES: dict[str, str] = {c[0]: c[1] for c in _CONTRACTS}
"""Each preset's contract name, for the presets table of ``docs/configuration.md``."""

FIELDS: tuple[str, ...] = ("tick_size", "point_value", "commission_per_side", "slippage_ticks", "max_contracts")
"""The fields a custom (preset-less) instrument must give, besides an optional symbol."""


def resolve_instrument(cfg: InstrumentConfig) -> InstrumentSpec:
    """Preset values overridden by the explicit fields of ``cfg``.

    Raises ValueError naming the missing fields when there is no preset and a field is unset,
    when ``symbol`` names another preset than ``preset`` (its values would be the preset's), and
    when ``symbol`` is another instrument than the preset (or its contract month) and does not give
    every field.
    """
    return _from_preset(cfg) if cfg.preset is not None else _custom_instrument(cfg)


def _from_preset(cfg: InstrumentConfig) -> InstrumentSpec:
    """The preset ``cfg.preset`` with the fields ``cfg`` gives (see :func:`resolve_instrument`)."""
    name = cfg.preset.upper()
    if name not in PRESETS:
        raise ValueError(f"unknown instrument preset {cfg.preset!r}; presets: {', '.join(PRESETS)}")
    symbol = cfg.symbol.upper() if cfg.symbol else name
    if symbol != name and symbol in PRESETS:
        raise ValueError(f"symbol {cfg.symbol!r} with preset {cfg.preset!r} would trade {symbol} with "
                         f"{name}'s tick size and point value; use preset: {symbol}")
    base = PRESETS[name]
    changes = {f: getattr(cfg, f) for f in FIELDS if getattr(cfg, f) is not None}
    # Another instrument (not the preset, nor one of its contract months such as "ES 12-24")
    # on a preset would silently keep the preset's money values: it must give them all.
    missing = [f for f in FIELDS if f not in changes]
    if symbol.split()[0] != name and missing:
        raise ValueError(f"symbol {cfg.symbol!r} is not {name} (preset {cfg.preset!r}) but would keep {name}'s "
                         f"{', '.join(missing)}; give those too, or use its own preset if it has one")
    return replace(base, symbol=cfg.symbol or base.symbol, **changes)


def _custom_instrument(cfg: InstrumentConfig) -> InstrumentSpec:
    """A preset-less instrument: every field of :data:`FIELDS` given."""
    missing = [f for f in FIELDS if getattr(cfg, f) is None]
    if missing:
        given = [f for f in ("symbol", *FIELDS) if getattr(cfg, f) is not None]
        symbol = (cfg.symbol or "").upper()
        hint = f"preset: {symbol}" if symbol in PRESETS else "a preset to start from (env.instrument.preset)"
        raise ValueError(f"incomplete custom instrument: {', '.join(given) or 'nothing'} given, missing "
                         f"{', '.join(missing)}; give every field or {hint}")
    return InstrumentSpec(cfg.symbol or "CUSTOM", *(getattr(cfg, f) for f in FIELDS))
