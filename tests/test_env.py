from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.futures_env import FuturesTradingEnv
from envs.futures_vector_env import FuturesTradingVectorEnv
from mlproject.config import ConfigError
from mlproject.data import DataError

CUSTOM = {"symbol": "T", "tick_size": 0.25, "point_value": 50.0, "commission_per_side": 2.0,
          "slippage_ticks": 1.0, "max_contracts": 1}


def scripted_bars() -> pd.DataFrame:
    opens = [100, 100, 101, 103, 104, 102, 100, 99]
    closes = [100, 101, 102, 104, 103, 101, 99, 98]
    index = pd.date_range("2024-01-02 09:31", periods=len(opens), freq="1min", name="timestamp")
    frame = pd.DataFrame({"open": opens, "close": closes}, index=index, dtype=float)
    frame["high"] = frame[["open", "close"]].max(axis=1) + 0.5
    frame["low"] = frame[["open", "close"]].min(axis=1) - 0.5
    frame["volume"] = 100.0
    return frame[["open", "high", "low", "close", "volume"]]


def test_check_env_passes_without_warnings(small_bars):
    env = FuturesTradingEnv({"bars": small_bars, "instrument": "MES", "window": 8, "episode_bars": 200})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)
        made = gym.make(envs.ENV_ID, config={"bars": small_bars, "window": 8})
        made.reset(seed=1)
        made.step(made.action_space.sample())


def test_hand_computed_equity_long_flip_short_flat():
    """Long 1 at the open of bar 3, hold, flip to short at bar 5, flat at bar 6 (ES-like contract:
    tick 0.25, $50/point, $2/side, 1 tick slippage). Every number below is worked by hand."""
    env = FuturesTradingEnv({"bars": scripted_bars(), "instrument": CUSTOM, "window": 2, "vol_window": 2,
                             "random_start": False, "initial_equity": 10_000.0})
    obs, info = env.reset()
    assert info["bar"] == 2 and info["position"] == 0 and obs[-2] == 0.0
    expected = [  # (action, reward, equity, realised, trades)
        (2, 35.5, 10_035.5, -2.0, 0),   # buy 1 @ 103 + 0.25; close 104: +0.75*50 - 2 commission
        (2, -50.0, 9_985.5, -2.0, 0),   # hold: close 104 -> 103
        (0, -29.0, 9_956.5, -81.0, 1),  # sell 2 @ 102 - 0.25: gap -50, short leg +50, costs 2*(12.5+2)
        (1, 35.5, 9_992.0, -8.0, 2),    # buy 1 @ 100 + 0.25: short gap +50, costs 14.5
    ]
    for action, reward, equity, realised, trades in expected:
        obs, r, terminated, truncated, info = env.step(action)
        assert r == pytest.approx(reward, abs=1e-9)
        assert info["equity"] == pytest.approx(equity, abs=1e-9)
        assert info["realised_pnl"] == pytest.approx(realised, abs=1e-9)
        assert info["trades"] == trades
        assert not terminated and not truncated
    trades_frame = env.trades_frame()
    assert trades_frame["side"].tolist() == [1, -1]
    assert trades_frame["entry_price"].tolist() == [103.25, 101.75]
    assert trades_frame["exit_price"].tolist() == [101.75, 100.25]
    assert trades_frame["pnl"].tolist() == pytest.approx([-79.0, 71.0])
    assert trades_frame["commission"].tolist() == [4.0, 4.0]
    assert trades_frame["slippage"].tolist() == [25.0, 25.0]
    assert trades_frame["bars_held"].tolist() == [2, 1]
    assert trades_frame["entry_time"].iloc[0] == scripted_bars().index[3]
    _, _, terminated, truncated, info = env.step(1)
    assert truncated and not terminated and info["bar"] == 7  # last bar of the data: the market goes on


def test_open_pnl_and_position_in_observation():
    env = FuturesTradingEnv({"bars": scripted_bars(), "instrument": {**CUSTOM, "max_contracts": 2},
                             "window": 2, "vol_window": 2, "random_start": False})
    env.reset()
    obs, *_ = env.step(4)  # long 2 @ 103.25, close 104
    assert obs[-2] == 1.0
    assert obs[-1] == pytest.approx((104 - 103.25) / 103.25 * 100, rel=1e-6)
    obs, *_ = env.step(3)  # reduce to 1
    assert obs[-2] == 0.5
    assert env.observation_space.contains(obs)


def _rollout_pair(config, n_envs, n_steps, seed):
    vec = FuturesTradingVectorEnv(n_envs, config)
    ref = gym.vector.SyncVectorEnv([lambda: FuturesTradingEnv(config) for _ in range(n_envs)])
    rng = np.random.default_rng(seed)
    out_v, out_r = vec.reset(seed=seed), ref.reset(seed=seed)
    resets = 0
    for step in range(n_steps):
        for a, b in zip(out_v[:-1], out_r[:-1]):
            np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
        assert set(out_v[-1]) == set(out_r[-1])
        for key in out_r[-1]:
            np.testing.assert_array_equal(out_v[-1][key], out_r[-1][key], err_msg=f"step {step} info {key}")
        if len(out_v) == 5:
            resets += int(np.sum(out_v[2] | out_v[3]))
        actions = rng.integers(0, vec.single_action_space.n, n_envs)
        out_v, out_r = vec.step(actions), ref.step(actions)
    return resets


@pytest.mark.parametrize("extra", [
    {},
    {"instrument": {"preset": "ES", "max_contracts": 3}, "risk_penalty": 0.5, "reward_scale": 0.01},
    {"max_episode_steps": 37},
    {"reward": "differential_sharpe", "dsr_eta": 0.05, "reward_scale": 2.0},
    {"reward": "differential_sharpe", "initial_equity": 3_000.0, "equity_floor_fraction": 0.0},  # accounts end below 0
    {"feature_set": "multi_timeframe", "window": 3},
    {"feature_set": "trader", "window": 3, "instrument": {"preset": "ES", "max_contracts": 2}},  # adds, flips
    {"initial_equity": 3_000.0, "equity_floor_fraction": 0.9, "instrument": {"preset": "ES", "max_contracts": 2}},
])
def test_vector_env_equals_sync_vector_of_single_envs(small_bars, extra):
    config = {"bars": small_bars, "window": 8, "episode_bars": 120, **extra}
    resets = _rollout_pair(config, n_envs=5, n_steps=400, seed=11)
    assert resets > 5  # the comparison covered autoresets


def test_the_differential_sharpe_reward_follows_moody_and_saffell(small_bars):
    """reward: differential_sharpe gives, per step, D = (B dA - A dB / 2) / (B - A^2)^1.5 of the
    step's return on the moments before it (Moody and Saffell, 2001), moments from 0 at reset;
    equity and fills are the money env's; the risk penalty cannot be combined with it."""
    from mlproject.config import EnvConfig

    config = {"bars": small_bars, "window": 8, "episode_bars": 300}
    actions = np.random.default_rng(5).integers(0, 3, 200).tolist()
    money, dsr = FuturesTradingEnv(config), FuturesTradingEnv({**config, "reward": "differential_sharpe",
                                                               "dsr_eta": 0.1})
    money.reset(options={"start": 50})
    dsr.reset(options={"start": 50})
    a = b = 0.0
    expected, got = [], []
    for action in actions:
        _, delta, _, _, info = money.step(action)
        equity_before = info["equity"] - delta
        _, reward, _, _, info_dsr = dsr.step(action)
        assert info_dsr["equity"] == info["equity"]
        r = delta / equity_before
        var = b - a * a
        expected.append((b * (r - a) - 0.5 * a * (r * r - b)) / var**1.5 if var > 1e-18 else 0.0)
        a, b = a + 0.1 * (r - a), b + 0.1 * (r * r - b)
        got.append(reward)
    assert expected[0] == 0.0 and np.count_nonzero(expected) > 150
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="risk_penalty"):
        EnvConfig(reward="differential_sharpe", risk_penalty=0.5)


@pytest.mark.parametrize("feature_set", ["base", "multi_timeframe", "trader"])
def test_no_look_ahead(small_bars, feature_set):
    """Change every bar after t: the observations up to t do not change."""
    t_cut = 400
    later = small_bars.copy()
    later.iloc[t_cut + 1:, :4] *= 1.1
    later.iloc[t_cut + 1:, 4] *= 3.0
    actions = np.random.default_rng(0).integers(0, 3, t_cut - 100).tolist()

    def observations(bars):
        env = FuturesTradingEnv({"bars": bars, "window": 16, "feature_set": feature_set})
        obs, _ = env.reset(options={"start": 100})
        seen = [obs]
        for action in actions:
            seen.append(env.step(action)[0])
        return np.array(seen), env

    before, env_a = observations(small_bars)
    after, env_b = observations(later)
    assert env_a.timestamp == small_bars.index[t_cut]
    np.testing.assert_array_equal(before, after)
    assert not np.array_equal(env_a.step(2)[0], env_b.step(2)[0])  # the change is visible from t+1 on


def test_same_seed_same_episode(small_bars):
    config = {"bars": small_bars, "window": 8, "episode_bars": 300}

    def rollout(seed):
        env = FuturesTradingEnv(config)
        obs, info = env.reset(seed=seed)
        rng = np.random.default_rng(0)
        rewards = [env.step(int(a))[1] for a in rng.integers(0, 3, 50)]
        return info["bar"], obs, rewards

    a, b, c = rollout(5), rollout(5), rollout(6)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert a[0] != c[0]


def test_episode_ends(small_bars):
    env = FuturesTradingEnv({"bars": small_bars, "window": 8, "max_episode_steps": 10})
    env.reset(options={"start": 50})
    flags = [env.step(1)[2:4] for _ in range(10)]
    assert flags[-1] == (False, True) and all(f == (False, False) for f in flags[:-1])
    env = FuturesTradingEnv({"bars": small_bars, "window": 8, "episode_bars": 5})
    env.reset(options={"start": 50})
    assert [env.step(1)[3] for _ in range(5)] == [False] * 4 + [True]
    env = FuturesTradingEnv({"bars": small_bars, "window": 8})
    env.reset(options={"start": len(small_bars) - 3})
    # The newest bar is a truncation, not a termination: a learner bootstraps the value there.
    assert [env.step(1)[2:4] for _ in range(2)] == [(False, False), (False, True)]
    env = FuturesTradingEnv({"bars": small_bars, "window": 8, "initial_equity": 1_000.0,
                             "equity_floor_fraction": 0.99, "instrument": {"preset": "ES", "max_contracts": 5}})
    env.reset(options={"start": 50})
    _, _, terminated, _, info = env.step(10)  # 5 contracts: costs alone break the floor
    assert terminated and info["equity"] < 990.0


def test_trade_log_agrees_with_the_account(small_bars):
    env = FuturesTradingEnv({"bars": small_bars, "window": 8, "instrument": {"preset": "MES", "max_contracts": 3}})
    env.reset(options={"start": 20})
    rng = np.random.default_rng(4)
    for action in rng.integers(0, 7, 2000):
        env.step(int(action))
    _, _, _, _, info = env.step(3)  # go flat: every trade is closed
    trades = env.trades_frame()
    assert len(trades) == info["trades"] > 100
    assert trades["pnl"].sum() == pytest.approx(info["realised_pnl"], abs=1e-6)
    assert info["equity"] == pytest.approx(100_000.0 + info["realised_pnl"], abs=1e-6)
    assert (trades["exit_time"] > trades["entry_time"]).all()
    assert (trades["bars_held"] >= 1).all()


def test_bad_config_errors(small_bars):
    with pytest.raises(ConfigError, match="key 'bars' is required"):
        FuturesTradingEnv({"window": 8})
    with pytest.raises(ConfigError, match="key 'windw': unknown key"):
        FuturesTradingEnv({"bars": small_bars, "windw": 8})
    with pytest.raises(ConfigError, match="key 'window'.*integer"):
        FuturesTradingEnv({"bars": small_bars, "window": "8"})
    with pytest.raises(ConfigError, match="unknown instrument preset 'XYZ'"):
        FuturesTradingEnv({"bars": small_bars, "instrument": "XYZ"})
    with pytest.raises(ConfigError, match="too few"):
        FuturesTradingEnv({"bars": small_bars.iloc[:20], "window": 32})
    with pytest.raises(ConfigError, match="must be a DataFrame or a file path"):
        FuturesTradingEnv({"bars": [1, 2, 3]})
    env = FuturesTradingEnv({"bars": small_bars, "window": 8})
    with pytest.raises(ValueError, match="start=5 outside"):
        env.reset(options={"start": 5})


def test_bad_data_errors(small_bars, tmp_path):
    bad = small_bars.copy()
    bad.iloc[10, bad.columns.get_loc("high")] = bad.iloc[10]["low"] - 1
    with pytest.raises(DataError, match="row 10"):
        FuturesTradingEnv({"bars": bad})
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        FuturesTradingEnv({"bars": tmp_path / "nope.txt"})


def test_env_reads_a_bar_file(small_bars, tmp_path):
    path = tmp_path / "bars.parquet"
    small_bars.to_parquet(path)
    env = FuturesTradingEnv({"bars": str(path), "window": 8})
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (8 * 5 + 2,)
    assert len(env.market.feature_names()) == obs.shape[0]


def test_observation_layout_has_one_definition(small_bars):
    """obs_size, window_of, feature_rows and latest_features describe the env's own observations."""
    from mlproject.features import ACCOUNT_FIELDS, feature_rows, latest_features, obs_size, window_of

    assert obs_size(8) == 8 * 5 + 2 and [window_of(obs_size(w)) for w in (1, 8, 32)] == [1, 8, 32]
    assert obs_size(8, "multi_timeframe") == 8 * 5 + 3 + 2  # the newest bar's context after the rows
    assert [window_of(obs_size(w, "multi_timeframe")) for w in (1, 8, 32)] == [1, 8, 32]
    env = FuturesTradingEnv({"bars": small_bars, "window": 8})
    obs, _ = env.reset(seed=0, options={"start": 300})
    assert env.market.obs_size == obs_size(8) == obs.shape[0]
    assert env.market.feature_names()[-len(ACCOUNT_FIELDS):] == list(ACCOUNT_FIELDS)
    rows = feature_rows(obs)
    assert rows.shape == (8, 5) and np.array_equal(latest_features(obs), rows[-1])
    assert np.array_equal(rows[-1], env.market.windows[300][-5 - 2:-2])
    multi = FuturesTradingEnv({"bars": small_bars, "window": 8, "feature_set": "multi_timeframe"})
    obs_m, _ = multi.reset(seed=0, options={"start": 300})
    assert obs_m.shape == (obs_size(8, "multi_timeframe"),) == multi.observation_space.shape
    assert np.array_equal(feature_rows(obs_m), rows) and np.array_equal(latest_features(obs_m), rows[-1])
    assert multi.market.feature_names()[-5:] == ["ret5_z", "ret15_z", "vol_regime", *ACCOUNT_FIELDS]
    assert obs_size(8, "trader") == 8 * 5 + 3 + 1 + 2 and window_of(obs_size(8, "trader")) == 8
    trader = FuturesTradingEnv({"bars": small_bars, "window": 8, "feature_set": "trader"})
    obs_t, _ = trader.reset(seed=0, options={"start": 300})
    assert obs_t.shape == trader.observation_space.shape and np.array_equal(obs_t[:-3], obs_m[:-2])
    assert trader.market.feature_names()[-3:] == ["bars_in_trade", *ACCOUNT_FIELDS]


def test_bars_in_trade_counts_the_closes_of_the_open_trade(small_bars):
    """feature set trader: the fill bar's close is 1 bar in the trade; adding or reducing keeps
    counting, a flip starts again, flat is 0; the observation is bars / 100, at most 1."""
    env = FuturesTradingEnv({"bars": small_bars, "window": 8, "feature_set": "trader",
                             "instrument": {"preset": "ES", "max_contracts": 2}})
    env.reset(options={"start": 100})
    # actions: 2 = flat, 3 = +1, 4 = +2, 0 = -2
    seen = [env.step(a)[0][-3] for a in (2, 3, 3, 4, 3, 0, 0, 2, 3)]
    assert seen == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04, 0.01, 0.02, 0.0, 0.01], abs=0)
    for _ in range(150):
        obs = env.step(3)[0]
    assert obs[-3] == 1.0 and env.observation_space.contains(obs)


def test_registered_with_gymnasium_and_rllib(small_bars):
    assert envs.ENV_ID in gym.registry
    vec = gym.make_vec(envs.ENV_ID, num_envs=3, vectorization_mode="vector_entry_point",
                       config={"bars": small_bars, "window": 8})
    assert isinstance(vec, FuturesTradingVectorEnv) and vec.reset(seed=0)[0].shape == (3, 42)
    from ray.tune.registry import ENV_CREATOR, _global_registry

    envs.register_rllib()
    assert _global_registry.contains(ENV_CREATOR, envs.ENV_ID)
    env = _global_registry.get(ENV_CREATOR, envs.ENV_ID)({"bars": small_bars, "window": 8})
    assert isinstance(env, FuturesTradingEnv)


def test_vector_env_per_env_starts(small_bars):
    """Batched windows: sub-env i starts at start[i] and matches a single env started there."""
    from mlproject.trades import fills_from_positions

    config = {"bars": small_bars, "window": 8, "episode_bars": 150,
              "instrument": {"preset": "ES", "max_contracts": 2}}
    starts = [40, 300, 900, 1500]
    vec = FuturesTradingVectorEnv(len(starts), config)
    _, info = vec.reset(seed=0, options={"start": starts})
    assert info["bar"].tolist() == starts
    singles = [FuturesTradingEnv(config) for _ in starts]
    for env, start in zip(singles, starts):
        env.reset(options={"start": start})
    rng = np.random.default_rng(2)
    positions = [[0] for _ in starts]
    for _ in range(150):
        actions = rng.integers(0, 5, len(starts))
        vec_out = vec.step(actions)
        single_out = [env.step(int(a)) for env, a in zip(singles, actions)]
        np.testing.assert_array_equal(vec_out[4]["equity"], [o[4]["equity"] for o in single_out])
        for held, position in zip(positions, vec_out[4]["position"]):
            held.append(int(position))
    assert vec_out[3].all()  # every window ended (truncated) on the same step
    for env, start, held in zip(singles, starts, positions):
        fills = fills_from_positions(np.array(held), start, env.market)
        assert fills == env.fills and len(fills) > 20
    with pytest.raises(ValueError, match="start has 2 entries for 4 envs"):
        vec.reset(options={"start": [40, 300]})


def test_end_of_data_truncates_in_the_vector_env_too(small_bars):
    """The vector twin: the last bar truncates; only the equity floor terminates."""
    n = len(small_bars)
    vec = FuturesTradingVectorEnv(2, {"bars": small_bars, "window": 8})
    vec.reset(options={"start": [n - 3, n - 2]})
    _, _, terminated, truncated, _ = vec.step(np.array([1, 1]))
    assert terminated.tolist() == [False, False] and truncated.tolist() == [False, True]
    _, _, terminated, truncated, _ = vec.step(np.array([1, 1]))
    assert terminated.tolist() == [False, False] and truncated.tolist() == [True, False]  # env 1 autoreset


@pytest.mark.parametrize("action", [-1, 3, 1.5, np.int64(-1), np.float64(2.5)])
def test_action_outside_the_action_space_is_an_error(small_bars, action):
    """step(-1) on Discrete(3) used to open a 2-contract short past max_contracts."""
    env = FuturesTradingEnv({"bars": small_bars, "window": 8})
    env.reset(options={"start": 50})
    with pytest.raises(ValueError, match="outside the action space Discrete\\(3\\)"):
        env.step(action)
    assert env.step(np.int64(2))[4]["position"] == 1  # a valid numpy action still works
    assert env.step(0.0)[4]["position"] == -1 and env.step(np.array([1]))[4]["position"] == 0  # integral values too
    vec = FuturesTradingVectorEnv(3, {"bars": small_bars, "window": 8})
    vec.reset(seed=0)
    with pytest.raises(ValueError, match="of sub-env 1 is outside the action space Discrete\\(3\\)"):
        vec.step(np.array([1, action, 1]))
    with pytest.raises(ValueError, match="expected 3 actions"):
        vec.step(np.array([1, 1]))
