"""Numpy vector twin of :class:`envs.futures_env.FuturesTradingEnv`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.market import DSR_MIN_VARIANCE, OPEN_PNL_CLIP, Market
from mlproject.features import HOLD_CAP, state_names


class FuturesTradingVectorEnv(VectorEnv):
    """``num_envs`` copies of ``FuturesTradingEnv`` stepped together with numpy.

    It gives exactly what ``gymnasium.vector.SyncVectorEnv`` over ``num_envs`` single envs gives,
    step for step and bit for bit: observations, rewards, terminations, truncations and the
    info arrays (``equity``, ``position``, ``trades``, ``realised_pnl``, ``bar``, each with its
    ``_key`` mask). Sub-env ``i`` is seeded with ``seed + i`` and autoresets on the step after
    it ends (``AutoresetMode.NEXT_STEP``, gymnasium's default), with reward 0 on that step.

    ``reset(options={"start": s})`` starts every sub-env at bar ``s``, or sub-env ``i`` at
    ``s[i]`` when ``s`` is a sequence (batched backtests over several windows).
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int, config: Mapping[str, Any] | None = None) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.market = m = Market.from_config(config or {})
        self.num_envs = num_envs
        self.single_observation_space = m.observation_space()
        self.single_action_space = m.action_space()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        # _max, _pv, _slip_px, _slip_cost, _commission, _floor. setattr, not vars(self).update:
        # the latter turns the instance dict into a plain dict and slows every attribute read.
        for name, value in m.step_constants().items():
            setattr(self, name, value)
        self._rngs: list[np.random.Generator] = [seeding.np_random(None)[0] for _ in range(num_envs)]
        self._hold = bool(state_names(m.cfg.feature_set))
        self._allocate_accounts(num_envs, m.t_min)

    def _allocate_accounts(self, n: int, t_min: int) -> None:
        """Per-sub-env state arrays (set for real by the first reset)."""
        self._t = np.full(n, t_min, np.int64)
        self._end = np.full(n, t_min, np.int64)
        self._pos = np.zeros(n, np.int64)
        self._avg = np.zeros(n)
        self._entry = np.zeros(n, np.int64)
        self._equity = np.zeros(n)
        self._peak = np.zeros(n)
        self._mom_a = np.zeros(n)
        self._mom_b = np.zeros(n)
        self._realised = np.zeros(n)
        self._n_closed = np.zeros(n, np.int64)
        self._steps = np.zeros(n, np.int64)
        self._needs_reset = np.zeros(n, bool)

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        seeds = seed if isinstance(seed, list) else [None if seed is None else seed + i for i in range(self.num_envs)]
        for i, s in enumerate(seeds):
            if s is not None:
                self._rngs[i] = seeding.np_random(s)[0]
        self._reset_envs(np.arange(self.num_envs), options)
        return self._observe(), self._info()

    def _reset_envs(self, idx: np.ndarray, options: Mapping[str, Any] | None) -> None:
        starts = options.get("start") if options else None
        per_env = starts is not None and np.ndim(starts) == 1
        if per_env and len(starts) != self.num_envs:
            raise ValueError(f"reset option start has {len(starts)} entries for {self.num_envs} envs")
        for i in idx.tolist():
            env_options = {**options, "start": int(starts[i])} if per_env else options
            self._t[i], self._end[i] = self.market.episode_bounds(self._rngs[i], env_options)
        initial = self.market.cfg.initial_equity
        self._pos[idx] = 0
        self._avg[idx] = 0.0
        self._entry[idx] = 0
        self._equity[idx] = initial
        self._peak[idx] = initial
        self._mom_a[idx] = 0.0
        self._mom_b[idx] = 0.0
        self._realised[idx] = 0.0
        self._n_closed[idx] = 0
        self._steps[idx] = 0
        self._needs_reset[idx] = False

    def step(self, actions):
        obs, reward, terminated, truncated = self.step_arrays(actions)
        return obs, reward, terminated, truncated, self._info()

    def step_arrays(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`step` without the info dict: (obs, reward, terminated, truncated). The
        account after the step is :attr:`equity` and :attr:`position` (batched backtests read
        those two and skip the info copies)."""
        m = self.market
        p, t = self._pos, self._t
        resetting = self._needs_reset
        q = self._checked(actions) - self._max
        if resetting.any():
            q = np.where(resetting, p, q)  # envs that reset this step do not trade
        nxt = np.minimum(t + 1, m.n_bars - 1)  # ended envs may sit on the last bar; they reset below
        delta = self._equity_change(p, q, t, nxt)
        if self._hold:  # a trade opened or flipped is filled on bar nxt (the single env's _entry)
            self._entry = np.where((q != 0) & (np.sign(q) != np.sign(p)), nxt, self._entry)
        eq_old = self._equity
        eq = eq_old + delta
        reward = self._reward(delta, eq_old, eq)
        self._t, self._pos, self._equity = nxt, q, eq
        self._steps = self._steps + 1
        terminated, truncated = self._episode_ends(nxt, eq)
        if resetting.any():
            self._autoreset(np.flatnonzero(resetting), reward, terminated, truncated)
        self._needs_reset = terminated | truncated
        return self._observe(), reward, terminated, truncated

    def _equity_change(self, p: np.ndarray, q: np.ndarray, t: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """The step's equity change from bar ``t`` to ``nxt`` when ``p`` becomes ``q`` contracts:
        marked to market, less the fill's slippage and commission (booked by :meth:`_fill`)."""
        m = self.market
        o1 = m.open_[nxt]
        pv = self._pv
        delta = p * (o1 - m.close[t]) * pv + q * (m.close[nxt] - o1) * pv
        return self._fill(p, q, o1) + delta

    def _reward(self, delta: np.ndarray, eq_old: np.ndarray, eq: np.ndarray) -> np.ndarray:
        """reward_scale * (equity change - risk_penalty * drawdown increase); moves the peaks."""
        cfg = self.market.cfg
        reward = delta
        if cfg.risk_penalty:
            new_peak = np.maximum(self._peak, eq)
            grow = (new_peak - eq) - (self._peak - eq_old)
            reward = delta - np.where(grow > 0.0, cfg.risk_penalty * grow, 0.0)
            self._peak = new_peak
        elif cfg.reward == "differential_sharpe":
            returns = np.divide(delta, eq_old, out=np.zeros_like(delta), where=eq_old > 0.0)  # as the single env
            reward = self._differential_sharpe(returns, cfg.dsr_eta)
        return cfg.reward_scale * reward

    def _differential_sharpe(self, r: np.ndarray, eta: float) -> np.ndarray:
        """The single env's differential Sharpe ratio, per sub-env, the same operations in the same
        order (bit for bit); moves the moments."""
        a, b = self._mom_a, self._mom_b
        da, db = r - a, r * r - b
        var = b - a * a
        ok = var > DSR_MIN_VARIANCE
        safe = np.where(ok, var, 1.0)
        d = np.where(ok, (b * da - 0.5 * a * db) / (safe * np.sqrt(safe)), 0.0)
        self._mom_a = a + eta * da
        self._mom_b = b + eta * db
        return d

    def _episode_ends(self, nxt: np.ndarray, eq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(terminated, truncated) after a step to bar ``nxt`` with equity ``eq``."""
        # As in the single env: only the equity floor terminates; the end of the data (where
        # _end stops every episode at the latest) is a truncation.
        max_steps = self.market.cfg.max_episode_steps
        terminated = eq < self._floor
        truncated = ~terminated & (nxt >= self._end)
        if max_steps is not None:
            truncated |= ~terminated & (self._steps >= max_steps)
        return terminated, truncated

    def _autoreset(self, idx: np.ndarray, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray) -> None:
        """Reset the sub-envs ``idx`` that ended last step: this step is their reset (reward 0, not ended)."""
        self._reset_envs(idx, None)
        reward[idx] = 0.0
        terminated[idx] = False
        truncated[idx] = False

    @property
    def equity(self) -> np.ndarray:
        """Every sub-env's equity now (the array itself, not a copy: read, do not modify; the
        next step replaces it)."""
        return self._equity

    @property
    def position(self) -> np.ndarray:
        """Every sub-env's position now, in contracts (read-only use, as :attr:`equity`)."""
        return self._pos

    def _checked(self, actions: Any) -> np.ndarray:
        """Actions as int64; anything outside Discrete(2 * max_contracts + 1), or fractional,
        raises ValueError naming the first bad sub-env."""
        raw = np.asarray(actions)
        if raw.shape != (self.num_envs,):
            raise ValueError(f"expected {self.num_envs} actions, got an array of shape {raw.shape}")
        out = raw.astype(np.int64)
        if raw.dtype.kind in "iu" and out.min() >= 0 and out.max() <= 2 * self._max:
            return out  # the hot path: two reductions, no temporary masks
        bad = (out < 0) | (out > 2 * self._max) | (out != raw)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"action {raw[i]!r} of sub-env {i} is outside the action space "
                             f"{self.single_action_space} (0 = {self._max} short .. {2 * self._max} = {self._max} long)")
        return out

    def _fill(self, p: np.ndarray, q: np.ndarray, o1: np.ndarray) -> np.ndarray:
        """Book every position change; returns minus the costs.

        Mirrors ``FuturesTradingEnv.step`` and ``_resize`` operation for operation. Where nothing
        changed (or nothing closed) the terms below are exact zeros, and x + 0.0 == x, so no
        masking is needed to leave those envs' accounts bit-for-bit untouched.
        """
        d = q - p
        size = np.abs(d)
        fill = o1 + np.sign(d) * self._slip_px
        commission = size * self._commission
        sgn_p, abs_p, abs_q = np.sign(p), np.abs(p), np.abs(q)
        same_side = sgn_p == np.sign(q)
        adding = same_side & (abs_q > abs_p)
        closed = np.where(same_side, np.where(adding, 0, size), abs_p)  # 0 when p == 0
        self._realised = self._realised + (fill - self._avg) * sgn_p * closed * self._pv - commission
        self._n_closed = self._n_closed + (~same_side & (sgn_p != 0))
        added = (self._avg * abs_p + fill * size) / np.maximum(abs_q, 1)
        self._avg = np.where(same_side, np.where(adding, added, self._avg), np.where(q == 0, 0.0, fill))
        return -(size * self._slip_cost + commission)

    def _observe(self) -> np.ndarray:
        m = self.market
        # Gather whole rows as opaque records (one memcpy each), then view them as float32.
        obs = m.window_records[self._t].view(np.float32).reshape(self.num_envs, -1)
        p = self._pos
        obs[:, -2] = p / self._max
        safe_avg = np.where(p != 0, self._avg, 1.0)
        pnl = (m.close[self._t] - safe_avg) / safe_avg * 100.0 * np.sign(p)  # 0 where flat
        # np.clip's values, without its Python-level wrapper (a third of this method's time).
        np.minimum(np.maximum(pnl, -OPEN_PNL_CLIP, out=pnl), OPEN_PNL_CLIP, out=obs[:, -1])
        if self._hold:  # bars_in_trade: mlproject.features.bars_in_trade, per sub-env
            obs[:, -3] = np.where(p != 0, np.minimum(self._t - self._entry + 1, HOLD_CAP) / HOLD_CAP, 0.0)
        return obs

    def _info(self) -> dict[str, Any]:
        mask = np.ones(self.num_envs, bool)
        info: dict[str, Any] = {}
        for key, value in (("equity", self._equity), ("position", self._pos), ("trades", self._n_closed),
                           ("realised_pnl", self._realised), ("bar", self._t)):
            info[key] = value.copy()
            info[f"_{key}"] = mask.copy()
        return info
