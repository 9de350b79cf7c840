"""Observations built bar by bar, equal bit for bit to ``FuturesTradingEnv``'s.

The env computes the features of all bars at once (``mlproject.features.bar_features``) and reads
row ``t`` of a zero-padded window view; here :class:`~mlproject.features.FeatureStream` computes
each new bar's row with the same operations, the last ``window`` rows are kept, and the account
entries use the env's formulas (``mlproject.trades.PositionBook``). A model's own settings
(window, vol_window, norm_window, max_contracts) decide, whatever the config says.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from envs.market import OPEN_PNL_CLIP, Market
from mlproject.bridge.protocol import Bar
from mlproject.features import FEATURE_NAMES, FeatureStream, bars_in_trade, context_names, obs_size, state_names
from mlproject.policy import PolicySettings
from mlproject.trades import PositionBook


def bars_needed(settings: PolicySettings) -> int:
    """Bars before the first decision: the env's first bar with a full window of history, plus one."""
    return bars_needed_for(settings.window, settings.vol_window)


def bars_needed_for(window: int, vol_window: int) -> int:
    """:func:`bars_needed` of observation settings ``window`` and ``vol_window``."""
    return Market.first_bar({"window": window, "vol_window": vol_window}) + 1


def replay_length(settings: PolicySettings) -> int:
    """Bars that rebuild the last ``window`` feature rows (and the context) exactly (a log return
    needs the close before it; each row needs its norm and volume windows)."""
    longest = 15 if context_names(settings.feature_set or "base") else 0  # the 15-bar return of the context
    return settings.window + max(settings.norm_window, settings.vol_window, longest) + 1


class ObservationBuilder:
    """The observation of the newest bar for one model's settings."""

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self.window = settings.window
        self.max_contracts = settings.max_contracts
        self.needed = bars_needed(settings)
        self.feature_set = settings.feature_set or "base"
        self.state = bool(state_names(self.feature_set))
        self._stream = FeatureStream(vol_window=settings.vol_window, norm_window=settings.norm_window,
                                     context=bool(context_names(self.feature_set)))
        self._n = len(FEATURE_NAMES)
        # The observation without its account entries: the last `window` feature rows, oldest
        # first, zeros in front while fewer (as the env's zero-padded window view).
        self._features = np.zeros(self.window * self._n, np.float32)
        self.bars = 0

    def push(self, bar: Bar) -> None:
        t = bar.time
        row = self._stream.push(t.hour, t.minute, t.second, bar.high, bar.low, bar.close, bar.volume)
        self._features[:-self._n] = self._features[self._n:]
        self._features[-self._n:] = row
        self.bars += 1

    def replay(self, bars: Iterable[Bar]) -> None:
        for bar in bars:
            self.push(bar)

    @property
    def ready(self) -> bool:
        return self.bars >= self.needed

    def observation(self, book: PositionBook, close: float) -> np.ndarray:
        """float32 (``obs_size(window)``,): the features of the last ``window`` bars (zeros in
        front while fewer), then ACCOUNT_FIELDS: position / max_contracts, open PnL % of the entry (clipped)."""
        obs = np.empty(obs_size(self.window, self.feature_set), np.float32)
        rows = len(self._features)
        obs[:rows] = self._features
        context = self._stream.context_row  # the newest bar's context (none for base)
        obs[rows:rows + len(context)] = context
        if self.state:  # feature set trader: bars_in_trade
            obs[-3] = bars_in_trade(book.bars_held) if book.position else 0.0
        obs[-2] = max(-1.0, min(1.0, book.position / self.max_contracts))  # a broker position beyond the model's
        obs[-1] = book.open_pnl_pct(close, OPEN_PNL_CLIP)
        return obs
