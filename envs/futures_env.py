"""Single-instrument futures trading environment."""

from __future__ import annotations

import math
from collections.abc import Mapping
from operator import index as _index
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd

from envs.market import DSR_MIN_VARIANCE, OPEN_PNL_CLIP, Market
from mlproject.features import bars_in_trade, state_names
from mlproject.trades import TRADE_COLUMNS, trades_from_fills

class FuturesTradingEnv(gym.Env):
    """Trade one futures contract bar by bar: the action is the target position.

    ## Description
    At the close of bar ``t`` the agent picks a target position in contracts. The order fills at
    the open of bar ``t+1`` plus slippage against the trader, and pays commission per contract
    per side. Equity is marked to market at every close; the reward is its change in money.

    ## Action Space
    ``Discrete(2 * max_contracts + 1)``: action ``a`` targets ``a - max_contracts`` contracts
    (0 = fully short, ``max_contracts`` = flat, ``2 * max_contracts`` = fully long).

    ## Observation Space
    ``Box(float32, shape=(obs_size(window),))``, ``mlproject.features.obs_size``: ``window * 5 + 2``;
    bars ``t-window+1 .. t``, oldest first, then the account. Every entry uses bars up to ``t`` only.

    | index                  | entry          | meaning                                                  | range  |
    |------------------------|----------------|----------------------------------------------------------|--------|
    | ``5k``                 | ``ret_z``      | log return / trailing std of log returns (norm_window)   | +-10   |
    | ``5k+1``               | ``range_z``    | log(high/low) / the same std                             | +-10   |
    | ``5k+2``               | ``volume_z``   | volume z-score over vol_window bars                      | +-10   |
    | ``5k+3``, ``5k+4``     | ``tod_sin/cos``| time of day of the bar stamp on the unit circle          | +-1    |
    | ``5*window``           | ``position``   | current position / max_contracts                         | +-1    |
    | ``5*window+1``         | ``open_pnl``   | open trade's move from its average entry, % of entry     | +-10   |

    ``feature_set: multi_timeframe`` puts the newest bar's ``ret5_z``, ``ret15_z``, ``vol_regime``
    between the rows and the account; ``trader`` puts ``bars_in_trade`` after those (the closes
    the open trade has lasted, the fill bar's being 1, capped at 100, over 100; 0 while flat).

    ## Rewards
    ``reward_scale * (equity change - risk_penalty * drawdown increase)`` (``reward: money``). The
    equity change over a step from ``p`` to ``q`` contracts is
    ``p*(open[t+1]-close[t])*pv + q*(close[t+1]-open[t+1])*pv - |q-p|*(slippage_ticks*tick*pv + commission)``.
    ``reward: differential_sharpe``: ``reward_scale * D_t``, Moody and Saffell's differential
    Sharpe ratio of the step's return ``R = change / equity before``, with moving moments
    ``A += eta*(R - A)``, ``B += eta*(R^2 - B)`` (0 at reset) and
    ``D = (B*(R - A) - A*(R^2 - B)/2) / (B - A^2)^1.5`` from the moments before the step (0 while
    ``B - A^2`` is not above 1e-18).

    ## Starting State
    Flat, equity ``initial_equity``, at a start bar drawn from ``self.np_random`` (``random_start``)
    or the first bar with a full window of history; ``reset(options={"start": i})`` fixes it.

    ## Episode End
    Terminated only when equity falls below ``equity_floor_fraction * initial_equity`` (the
    account is finished). Truncated at the last bar of the data, at the end of an
    ``episode_bars`` window and after ``max_episode_steps`` steps: the market goes on after
    each, so a learner bootstraps the value there. An open position stays open at the end;
    :meth:`trades_frame` lists closed trades. An action outside the action space (``-1``,
    ``2 * max_contracts + 1``, ``1.5``) raises ``ValueError``.

    ## Arguments
    One mapping (RLlib passes ``env_config``): ``bars`` (a DataFrame from
    ``mlproject.data.load_bars`` or a path to a bar file) plus the keys of
    ``mlproject.config.EnvConfig``. An unknown key or a wrong type raises ``ConfigError``.

    ``info``: ``equity``, ``position``, ``trades`` (closed trades so far), ``realised_pnl`` (net of
    commission), ``bar`` (index of the current bar).

    ## Version History
    * v0: initial version. The end of the data is a truncation, not a termination; actions
      outside the action space raise (both since the hardening of issue 8).
    """

    metadata = {"render_modes": []}

    def __init__(self, config: Mapping[str, Any] | None = None, render_mode: str | None = None) -> None:
        self.market = Market.from_config(config or {})
        self.observation_space = self.market.observation_space()
        self.action_space = self.market.action_space()
        self.render_mode = render_mode
        m, cfg, spec = self.market, self.market.cfg, self.market.spec
        # Python lists: scalar indexing of a list of floats is several times faster than numpy's.
        self._open = m.open_.tolist()
        self._close = m.close.tolist()
        self._windows = m.windows
        # q / max_contracts for q in -max..max, read as _pos_frac[q] (negative q counts from the end).
        self._pos_frac = [q / spec.max_contracts for q in range(spec.max_contracts + 1)] + [
            q / spec.max_contracts for q in range(-spec.max_contracts, 0)]
        # _max, _pv, _slip_px, _slip_cost, _commission, _floor. setattr, not vars(self).update:
        # the latter turns the instance dict into a plain dict and slows every attribute read.
        for name, value in m.step_constants().items():
            setattr(self, name, value)
        self._amax = 2 * spec.max_contracts
        self._scale = cfg.reward_scale
        self._risk = cfg.risk_penalty
        self._dsr = cfg.reward == "differential_sharpe"
        self._eta = cfg.dsr_eta
        self._hold = bool(state_names(cfg.feature_set))
        self._last_bar = m.n_bars - 1
        self._index = m.bars.index
        self._t = self._stop = m.t_min
        self._reset_account()

    # -- gymnasium API -------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._t, end = self.market.episode_bounds(self.np_random, options)
        max_steps = self.market.cfg.max_episode_steps
        # One bound for both truncations: the window end and the step limit.
        self._stop = end if max_steps is None else min(end, self._t + max_steps)
        self._reset_account()
        return self._observe(), self._info()

    def step(self, action):
        # Hot path: plain Python floats from lists, no numpy scalars, no helper calls unless a
        # fill happens (benchmarks/env_throughput.py measures it).
        m = self._max
        try:
            q = _index(action) - m  # ints and numpy integers; a float raises (no silent int(1.5) == 1)
        except TypeError:
            q = self._integral(action) - m
        if not -m <= q <= m:
            self._reject(action)
        p = self._pos
        t = self._t + 1
        self._t = t
        o1 = self._open[t]
        c1 = self._close[t]
        pv = self._pv
        delta = p * (o1 - self._close[t - 1]) * pv + q * (c1 - o1) * pv
        if q != p:
            # The fill, inlined (a method call costs a fifth of a step); _resize documents the accounting.
            d = q - p
            if d > 0:
                fill, size = o1 + self._slip_px, d
            else:
                fill, size = o1 - self._slip_px, -d
            commission = size * self._commission
            self._fills.append((t, q, fill))
            if p == 0:  # open from flat
                self._avg = fill
                self._realised = self._realised - commission
                self._entry = t
            elif q == 0 or (p > 0) != (q > 0):  # close, or flip: close all and open the rest
                side_p = 1 if p > 0 else -1
                self._realised = self._realised + (fill - self._avg) * side_p * (p * side_p) * pv - commission
                self._avg = fill if q else 0.0
                self._n_closed += 1
                self._entry = t
            else:
                self._resize(p, q, fill, size, commission)
            delta = -(size * self._slip_cost + commission) + delta
            self._pos = q
        eq_old = self._equity
        eq = self._equity = eq_old + delta
        reward = delta
        if self._risk:
            reward = delta - self._risk_penalty(eq_old, eq)
        elif self._dsr:  # the step's return; an account at or below 0 (no floor) has none
            reward = self._differential_sharpe(delta / eq_old if eq_old > 0.0 else 0.0)
        if t < self._stop and eq >= self._floor:  # the common case: one test (stop <= last bar)
            terminated = truncated = False
        else:
            # Only the equity floor ends the account. The last bar of the data, an episode
            # window's end and the step limit are truncations: the market goes on, so the value
            # target bootstraps there instead of being zeroed at the newest bars.
            terminated = eq < self._floor
            truncated = not terminated
        obs = self._windows[t].copy()  # the two spare slots are overwritten below
        obs[-2] = self._pos_frac[q]
        if q:
            avg = self._avg
            pnl = (c1 - avg) / avg * 100.0 * (1.0 if q > 0 else -1.0)  # = _open_pnl, inlined
            obs[-1] = OPEN_PNL_CLIP if pnl > OPEN_PNL_CLIP else (-OPEN_PNL_CLIP if pnl < -OPEN_PNL_CLIP else pnl)
        else:
            obs[-1] = 0.0
        if self._hold:  # feature set trader: bars_in_trade before the account
            obs[-3] = bars_in_trade(t - self._entry + 1) if q else 0.0
        info = {"equity": eq, "position": q, "trades": self._n_closed, "realised_pnl": self._realised, "bar": t}
        return obs, self._scale * reward, terminated, truncated, info

    def _integral(self, action: Any) -> int:
        """A float or one-element array holding an integer (2.0) as its int, as the vector env
        takes it; anything fractional or non-numeric (1.5, "1") is rejected."""
        arr = np.asarray(action)
        if arr.size == 1 and arr.dtype.kind in "iuf" and float(arr.reshape(())).is_integer():
            return int(arr.reshape(()))
        self._reject(action)

    def _reject(self, action: Any) -> None:
        """Outside Discrete(2 * max_contracts + 1), or not an integer, is an error: int(-1) would
        open a short past max_contracts and int(1.5) would trade a guess."""
        raise ValueError(f"action {action!r} is outside the action space {self.action_space} "
                         f"(integers 0 = {self._max} short .. {self._amax} = {self._max} long)")

    def _risk_penalty(self, eq_old: float, eq: float) -> float:
        """risk_penalty * (increase of the drawdown from the equity peak), 0 if it shrank."""
        peak = self._peak
        new_peak = eq if eq > peak else peak
        self._peak = new_peak
        grow = (new_peak - eq) - (peak - eq_old)
        return self._risk * grow if grow > 0.0 else 0.0

    def _differential_sharpe(self, r: float) -> float:
        """The differential Sharpe ratio of return ``r``; moves the moments (see Rewards)."""
        a, b = self._mom_a, self._mom_b
        da, db = r - a, r * r - b
        var = b - a * a
        d = (b * da - 0.5 * a * db) / (var * math.sqrt(var)) if var > DSR_MIN_VARIANCE else 0.0
        self._mom_a = a + self._eta * da
        self._mom_b = b + self._eta * db
        return d

    def _open_pnl(self, close: float) -> float:
        """Open trade's move from its average entry in % of the entry, signed by side, clipped."""
        pnl = (close - self._avg) / self._avg * 100.0 * (1.0 if self._pos > 0 else -1.0)
        return OPEN_PNL_CLIP if pnl > OPEN_PNL_CLIP else (-OPEN_PNL_CLIP if pnl < -OPEN_PNL_CLIP else pnl)

    # -- accounting ----------------------------------------------------------------------------

    def _reset_account(self) -> None:
        cfg = self.market.cfg
        self._pos = 0
        self._avg = 0.0
        self._entry = 0  # the bar the open trade was filled on (opened or flipped)
        self._equity = self._peak = cfg.initial_equity
        self._mom_a = self._mom_b = 0.0
        self._realised = 0.0
        self._n_closed = 0
        self._fills: list[tuple[int, int, float]] = []

    def _resize(self, p: int, q: int, fill: float, size: int, commission: float) -> None:
        """Add to or reduce a position without changing side (step() handles open, close, flip).

        Average-price accounting: adding moves the average entry; reducing realises
        ``(fill - avg) * side * qty * point_value``; a close or flip (in step) realises the whole
        position and opens the rest at the fill. Commission is realised on every fill. The
        arithmetic mirrors ``FuturesTradingVectorEnv._fill`` operation for operation, so the two
        agree bit for bit.
        """
        if abs(q) > abs(p):
            self._avg = (self._avg * abs(p) + fill * size) / abs(q)
            self._realised = self._realised - commission
        else:
            self._realised = self._realised + (fill - self._avg) * (1 if p > 0 else -1) * size * self._pv - commission

    # -- observation and info ------------------------------------------------------------------

    def _observe(self) -> np.ndarray:
        obs = self._windows[self._t].copy()  # the two spare slots are overwritten below
        obs[-2] = self._pos / self._max
        obs[-1] = self._open_pnl(self._close[self._t]) if self._pos else 0.0
        if self._hold:
            obs[-3] = bars_in_trade(self._t - self._entry + 1) if self._pos else 0.0
        return obs

    def _info(self) -> dict[str, Any]:
        return {"equity": self._equity, "position": self._pos, "trades": self._n_closed,
                "realised_pnl": self._realised, "bar": self._t}

    # -- for metrics ---------------------------------------------------------------------------

    def trades_frame(self) -> pd.DataFrame:
        """Closed trades of the current episode, one row per trade, columns TRADE_COLUMNS.

        A trade runs from leaving flat (or a flip) to the next flat (or flip); partial exits
        accumulate into it. ``pnl`` is net of the commissions of its entries and exits;
        ``slippage`` (already inside the fill prices) is reported as money for cost analysis.
        """
        spec = self.market.spec
        rows = trades_from_fills(self._fills, spec.point_value, spec.commission_per_side, spec.slippage_cost)
        frame = pd.DataFrame(rows, columns=list(TRADE_COLUMNS))
        for col in ("entry_time", "exit_time"):
            frame[col] = self._index[frame[col].to_numpy(np.int64)] if len(frame) else pd.Series(dtype="datetime64[ns]")
        return frame

    @property
    def fills(self) -> list[tuple[int, int, float]]:
        """(bar index, new position, fill price) of every position change this episode."""
        return list(self._fills)

    @property
    def timestamp(self) -> pd.Timestamp:
        """Timestamp of the current bar."""
        return self._index[self._t]
