"""One trading session (an account trading an instrument): bars in, decisions out, the book,
the risk guard, and the experiences it records. No I/O here: the server feeds it messages.

A bar is handled in two halves around the policy's inference (which the server batches across
sessions): :meth:`Session.prepare` takes the bar (completing the previous bar's experience) and
returns the observation, :meth:`Session.decide` applies the risk guard to the policy's action and
returns the decision.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, deque
from datetime import date
from typing import Any

import numpy as np
import pandas as pd

from mlproject.bridge.deployed import DeployedPolicy
from mlproject.bridge.observations import ObservationBuilder, replay_length
from mlproject.bridge.protocol import Bar, ProtocolError, check_price
from mlproject.config import BridgeConfig
from mlproject.trades import PositionBook

log = logging.getLogger(__name__)


def same_period(a: str, b: str | None) -> bool:
    """Whether two bar periods (``pandas.Timedelta`` texts) are the same; an unknown ``b`` fits."""
    if b is None:
        return True
    try:
        return pd.Timedelta(a) == pd.Timedelta(b)
    except ValueError:
        return False


class Session:
    """State of one ``account/instrument`` across connections (a reconnect resumes it)."""

    def __init__(self, account: str, instrument: str, bar_period: str, source: str, spec: dict[str, Any],
                 cfg: BridgeConfig, initial_equity: float) -> None:
        """``spec``: the instrument's ``InstrumentSpec`` fields (the deployed model's; the bridge
        configuration's while no model is deployed)."""
        self.account, self.instrument, self.bar_period, self.source = account, instrument, bar_period, source
        self.key = f"{account}/{instrument}"
        self.cfg = cfg
        self.spec = spec
        self.book = PositionBook(float(spec["point_value"]), float(spec["commission_per_side"]))
        self.tick_size = float(spec["tick_size"])
        self.anchor_price: float | None = None
        """The first accepted bar's close: later prices must stay within PRICE_RANGE_FACTOR of it."""
        self.initial_equity = initial_equity
        self.history: deque[Bar] = deque(maxlen=cfg.history_bars)
        self.builder: ObservationBuilder | None = None
        self.last_bar: Bar | None = None
        self.last_decision: dict[str, Any] | None = None
        self.pending: dict[str, Any] | None = None
        self.rows: list[dict[str, Any]] = []
        self.trade_id: str | None = None
        self.equity = initial_equity
        self.day: date | None = None
        self.day_start_equity = initial_equity
        self.stopped_day: date | None = None
        self.guards: Counter[str] = Counter()
        self.decisions = 0

    # -- a bar ---------------------------------------------------------------------------------

    def check_prices(self, ref: str, **prices: float) -> None:
        """Each price plausible for this instrument and session (``protocol.check_price``); the
        first accepted bar's close becomes the session's anchor."""
        for key, value in prices.items():
            check_price(key, value, self.tick_size, self.anchor_price, ref)

    def is_repeat(self, bar: Bar) -> bool:
        """The previous bar again (a resend after a reconnect); a bar before it is an error."""
        last = self.last_bar
        if last is None or bar.time > last.time:
            return False
        if bar.time == last.time and self.last_decision is not None:
            return True
        raise ProtocolError("bad_value", f"time {bar.time.isoformat()} is before the previous bar's "
                                         f"{last.time.isoformat()} (bars go in time order)", "bar")

    def prepare(self, bar: Bar, policy: DeployedPolicy | None) -> tuple[np.ndarray | None, str | None]:
        """Take a new bar: features, the equity at its close, the previous bar's experience
        completed. Returns (observation for the policy, None) or (None, the guard: warmup,
        historical, no_model: nothing is deployed, model_mismatch: the deployed model trades another
        instrument or bar period than this session)."""
        self.history.append(bar)
        if self.anchor_price is None:
            self.anchor_price = bar.close
        fits = policy is not None and self.fits(policy)
        if not fits:
            self.builder = None  # a model deployed later warms up on the history
        elif self.builder is None or self.builder.settings != policy.settings:
            self.builder = ObservationBuilder(policy.settings)  # a model with other windows: rebuild
            self.builder.replay(list(self.history)[-replay_length(policy.settings):])
        else:
            self.builder.push(bar)
        self.book.bar_closed()  # the open trade lasted one more bar (bars_in_trade)
        previous_equity = self.equity
        self.equity = self.initial_equity + self.book.realised + self.book.open_pnl(bar.close)
        if bar.time.date() != self.day:
            self.day, self.day_start_equity = bar.time.date(), previous_equity
        ready = self.builder is not None and self.builder.ready and not bar.historical
        obs = self.builder.observation(self.book, bar.close) if ready else None
        if self.pending is not None:
            self._complete(bar, obs)
        if bar.historical:
            return None, "historical"
        if not fits:
            return None, "no_model" if policy is None else "model_mismatch"
        if obs is None:
            return None, "warmup"
        return obs, None

    def _out_of_distribution(self, obs: np.ndarray | None, policy: DeployedPolicy | None) -> bool:
        """Whether the newest bar's features are beyond ``max_feature_z`` of the model's training
        bars (off without the setting, an observation or a model carrying a reference)."""
        limit = self.cfg.max_feature_z
        if limit is None or obs is None or policy is None or policy.reference is None:
            return False
        z, feature = policy.reference.largest_z(obs)
        if z <= limit:
            return False
        log.info("%s: out of distribution: %s at %.1f robust sd from %s's training bars (limit %g)", self.key,
                 feature, z, policy.label, limit)
        return True

    def fits(self, policy: DeployedPolicy) -> bool:
        """Whether ``policy`` trades this session's instrument on its bar period."""
        return str(policy.settings.instrument.get("symbol")) == self.instrument and same_period(
            self.bar_period, policy.settings.bar_period)

    def decide(self, bar: Bar, obs: np.ndarray | None, policy: DeployedPolicy | None, action: int | None,
               guard: str | None, *, killed: bool, stale: bool) -> dict[str, Any]:
        """The decision for ``bar``: the policy's target unless the risk guard intervenes; flat
        while no model is deployed (guard ``no_model``), held while the deployed one does not fit
        the session (``model_mismatch``)."""
        max_c = policy.settings.max_contracts if policy is not None else int(self.spec["max_contracts"])
        held = self.book.position
        wanted = int(action) - max_c if action is not None else None
        target = 0 if guard == "no_model" else held if wanted is None else wanted
        if guard in ("no_model", "model_mismatch") and killed:
            guard, target = "kill_switch", 0
        limit = self.cfg.max_position if self.cfg.max_position is not None else max_c
        limit = min(limit, max_c)
        if guard is None:
            day_loss = self.day_start_equity - self.equity
            if self.cfg.max_daily_loss is not None and day_loss >= self.cfg.max_daily_loss and self.stopped_day != self.day:
                self.stopped_day = self.day
                log.warning("%s: daily loss %.2f reached the limit %.2f: flat until the next day", self.key, day_loss,
                            self.cfg.max_daily_loss)
            if killed:
                guard, target = "kill_switch", 0
            elif self.stopped_day == self.day:
                guard, target = "daily_loss", 0
            elif self._out_of_distribution(obs, policy):
                guard, target = "ood", 0
            elif stale:
                guard, target = "stale_bar", held
            elif abs(target) > limit:
                guard, target = "max_position", max(-limit, min(limit, target))
        if guard is not None:
            self.guards[guard] += 1
            if guard not in ("warmup", "historical", "no_model"):  # no_model: the bridge logs when it stands down
                log.info("%s %s: guard %s: target %d (policy wanted %s)", self.key, bar.time.isoformat(), guard,
                         target, wanted)
        decision_id = uuid.uuid4().hex
        taken = max(-max_c, min(max_c, target)) + max_c
        name, version = (policy.name, policy.version) if policy is not None else (None, None)
        if obs is not None:
            self.pending = {
                "experience_id": decision_id, "time": bar.utc, "symbol": self.instrument, "bar_period": self.bar_period,
                "model_name": name, "model_version": version, "observation": obs, "action": taken,
                "source": self.source, "guard": guard,
                "policy_action": int(action) if guard is not None and action is not None else None,
                "reference_price": bar.close, "equity_before": self.equity, "realised_before": self.book.realised,
                "fills": [], "closed_trade": None}
        self.decisions += 1
        self.last_bar = bar
        self.last_decision = {
            "type": "decision", "decision_id": decision_id, "time": bar.time.isoformat(), "target_position": target,
            "action": taken, "model_name": name, "model_version": version,
            "reference_price": bar.close, "guard": guard,
            "policy_target": wanted if guard is not None and wanted is not None else None}
        return self.last_decision

    def _complete(self, bar: Bar, next_obs: np.ndarray | None) -> None:
        """The previous decision's experience, now that its step (fills at this bar's open, the
        move to this close) is over."""
        p = self.pending
        self.pending = None
        fills = p.pop("fills")
        closed = p.pop("closed_trade")
        ref = p.pop("reference_price")
        qty = sum(abs(q) for q, _ in fills)
        p.update(
            reward=self.equity - p.pop("equity_before"), next_observation=next_obs, terminated=False, truncated=False,
            position=self.book.position, equity=self.equity, realised_pnl=self.book.realised - p.pop("realised_before"),
            trade_id=closed or self.trade_id,
            fill_price=sum(abs(q) * price for q, price in fills) / qty if qty else None,
            slippage=sum((price - ref) * q for q, price in fills) * self.book.point_value if fills else None)
        self.rows.append(p)

    # -- the account -----------------------------------------------------------------------------

    def fill(self, quantity: int, price: float, commission: float | None) -> None:
        """An execution: into the book, and into the step of the decision being carried out."""
        before = self.book.position
        self.book.fill(quantity, price, commission)
        after = self.book.position
        if self.pending is not None:
            self.pending["fills"].append((quantity, price))
        if before != 0 and (after == 0 or (before > 0) != (after > 0)):  # closed (or flipped)
            if self.pending is not None:
                self.pending["closed_trade"] = self.trade_id
            self.trade_id = None
        if after != 0 and self.trade_id is None:
            self.trade_id = uuid.uuid4().hex

    def sync_position(self, position: int, avg_price: float) -> bool:
        """The broker's position; adopted (and logged) when the book disagrees. True if it did."""
        if position == self.book.position and (position == 0 or abs(avg_price - self.book.avg) < 1e-9):
            return False
        log.warning("%s: the account reports position %d @ %s, the book had %d @ %s: adopting the account's",
                    self.key, position, avg_price, self.book.position, self.book.avg)
        if (self.book.position == 0) != (position == 0) or (position and (position > 0) != (self.book.position > 0)):
            self.trade_id = uuid.uuid4().hex if position else None
        self.book.adopt(position, avg_price)
        self.guards["position_sync"] += 1
        return True

    def take_rows(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows

    def drop_pending(self) -> None:
        """The session ends: the last decision's step never completes (no next bar), so it is
        not an experience."""
        if self.pending is not None:
            log.info("%s: last decision at %s has no next bar; not recorded", self.key, self.pending["time"])
        self.pending = None

