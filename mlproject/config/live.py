"""The live-trading sections of the configuration: the drift monitor and the NT8 bridge."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlproject.config.base import _Strict
from mlproject.config.values import check_time_zone, parse_duration


class MonitoringConfig(_Strict):
    """The drift monitor (``pipelines.monitor``): the Production version's live and paper results
    against its own evaluation, and its live inputs against the training split."""

    action: Literal["alert", "rollback", "pause"] = "alert"
    """What a confirmed breach does: alert (logged, tagged on the version, ``pipelines.status``
    exits 1), rollback (the audited registry rollback), pause (the bridge's kill switch)."""
    window_bars: int = Field(default=2000, ge=10)
    """The newest this many live/paper steps of the Production version are judged."""
    min_trades: int = Field(default=20, ge=1)
    """Closed trades needed before any check may breach."""
    min_bars: int = Field(default=200, ge=2)
    """Steps needed before any check may breach."""
    max_win_rate_drop: float = Field(default=0.15, ge=0)
    """Breach when the live win rate is this much (absolute) below the evaluation's."""
    max_sharpe_drop: float = Field(default=1.5, ge=0)
    """Breach when the live Sharpe is this much below the evaluation's."""
    min_profit_factor_ratio: float = Field(default=0.5, ge=0)
    """Breach when the live profit factor is below this fraction of the evaluation's."""
    max_drawdown_ratio: float = Field(default=2.0, gt=0)
    """Breach when the live max drawdown exceeds this multiple of the evaluation's."""
    max_consecutive_losses: int = Field(default=8, ge=1)
    """Breach at this many losing trades in a row."""
    max_slippage_ratio: float = Field(default=2.0, gt=0)
    """Breach when the average slippage per fill exceeds this multiple of the instrument's assumed
    slippage per contract (``slippage_ticks`` x tick value); no check when that is 0."""
    max_psi: float = Field(default=0.25, gt=0)
    """Breach when a feature's population-stability index (live vs training split) exceeds this."""
    confirm_passes: int = Field(default=3, ge=1)
    """Monitor passes in a row that must breach before the action (hysteresis)."""
    clear_passes: int = Field(default=3, ge=1)
    """Good passes in a row after an action before the monitor may act again."""
    max_model_age: str | None = None
    """Model expiry: a Production version whose training data ended longer ago than this
    (``90d``, ``12w``; None: never) breaches ``model_age`` whatever its trades (it needs no live
    sample); the action is ``alert`` or ``pause`` (with ``rollback``, an expiry alone alerts: the
    version before is older still)."""

    @field_validator("max_model_age")
    @classmethod
    def _age(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) < 1.0:
            raise ValueError(f"{value!r}: at least 1 s")
        return value


class BridgeConfig(_Strict):
    """The NT8 bridge (``pipelines.bridge``) and the paper trader (``pipelines.collect``);
    ``nt8/PROTOCOL.md`` describes what they speak."""

    host: str = Field(default="127.0.0.1", min_length=1)
    """Address the bridge listens on; 127.0.0.1 (this machine only) unless NinjaTrader runs elsewhere."""
    port: int = Field(default=5555, ge=0, le=65535)
    """TCP port (0: any free port, printed at start)."""
    token_env: str = Field(default="NT8_BRIDGE_TOKEN", min_length=1)
    """Environment variable holding the shared secret (at least 16 characters) every client sends in hello."""
    tls_cert: str | None = None
    """PEM certificate: serve TLS (needed when the bridge listens beyond this machine)."""
    tls_key: str | None = None
    """PEM private key of tls_cert."""
    max_message_bytes: int = Field(default=65536, ge=512)
    """Longest message line accepted; a longer one is answered with an error and skipped."""
    heartbeat_timeout_s: float = Field(default=30.0, gt=0)
    """A client that sends nothing for this long is dropped (clients send a heartbeat every third of it)."""
    hello_timeout_s: float = Field(default=5.0, gt=0)
    """Time a new connection has to authenticate (send hello); then it is dropped."""
    reload_poll_s: float = Field(default=0.5, gt=0)
    """How often the bridge looks at deploy_dir/reload.json for a newly deployed model."""
    flush_every: int = Field(default=256, ge=1)
    """Experiences collected before they are written to the buffer ..."""
    flush_interval_s: float = Field(default=1.0, gt=0)
    """... or this long after the first unwritten one (a crash loses at most this much)."""
    history_bars: int = Field(default=1024, ge=16)
    """Bars kept per session, to rebuild observations when a model with other windows deploys."""
    max_sessions: int = Field(default=64, ge=1)
    """Sessions (authenticated connections) served at once; one more is refused (server_busy)."""
    max_pending: int = Field(default=256, ge=1)
    """Connections waiting for their hello; beyond this the oldest of them is dropped, so idle or
    hostile connections never take a session's place nor shut a real client out."""
    max_position: int | None = Field(default=None, ge=0)
    """Risk guard: largest position in contracts (null: the model's max_contracts)."""
    max_daily_loss: float | None = Field(default=None, gt=0)
    """Risk guard: a day's loss (money, realised and open) that flattens and stops new entries until
    the next day (null: no limit)."""
    max_bar_age_s: float | None = Field(default=120.0, gt=0)
    """Risk guard: a live bar whose end time is older than this gets no decision (the position is held)."""
    max_feature_z: float | None = Field(default=None, gt=0)
    """Risk guard, out of distribution: a decision whose newest bar has a feature more than this
    many robust standard deviations from the training bars' median (the reference the model
    carries, :mod:`mlproject.ood`) is flat (guard ``ood``). null: off (models logged without a
    reference are never judged)."""
    kill_file: str | None = None
    """Risk guard: while this file exists every decision is flat (null: KILL in promotion.deploy_dir).
    ``python -m pipelines.bridge kill`` creates it, ``... resume`` removes it."""
    timezone: str | None = None
    """Time zone of bar stamps sent without an offset, for the stale-bar check (null: this machine's)."""

    @field_validator("timezone")
    @classmethod
    def _time_zone(cls, value: str | None) -> str | None:
        return check_time_zone(value, "timezone")

    @model_validator(mode="after")
    def _tls_needs_both(self) -> BridgeConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("bridge.tls_cert and bridge.tls_key go together (a certificate and its key)")
        return self
