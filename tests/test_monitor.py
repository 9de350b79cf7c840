"""The drift monitor's computations: live results as evaluation metrics, the feature-drift
statistic (PSI) and the hysteresis that keeps one bad day from flapping the deployment."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mlproject.monitor import Hysteresis, consecutive_losses, feature_psi, live_stats, psi, trade_pnls


def rows_of(steps: list[tuple[str | None, int, float, float]]) -> pd.DataFrame:
    """Experience rows from (trade_id, position after, realised pnl, equity) per bar."""
    return pd.DataFrame({"time": pd.date_range("2024-01-02 09:31", periods=len(steps), freq="1min", tz="UTC"),
                         "trade_id": [s[0] for s in steps], "position": [s[1] for s in steps],
                         "realised_pnl": [s[2] for s in steps], "equity": [s[3] for s in steps],
                         "slippage": [12.5 if s[0] else None for s in steps]})


def test_trades_win_rate_profit_factor_and_the_losing_streak():
    rows = rows_of([(None, 0, 0, 1000), ("a", 1, 0, 1010), ("a", 0, 50, 1050),  # win 50
                    ("b", -1, 0, 1040), ("b", 1, -30, 1020),  # reversal: b closes -30, c opens
                    ("c", 1, 0, 1000), ("c", 0, -20, 1000),  # loss 20
                    ("d", 1, 0, 990)])  # still open: left out
    assert trade_pnls(rows).to_dict() == {"a": 50, "b": -30, "c": -20}
    stats = live_stats(rows, periods_per_year=390 * 252)
    assert stats["n_trades"] == 3 and stats["win_rate"] == pytest.approx(1 / 3)
    assert stats["profit_factor"] == pytest.approx(50 / 50) and stats["consecutive_losses"] == 2
    assert stats["max_drawdown"] == pytest.approx(60 / 1050) and stats["avg_slippage"] == 12.5
    assert stats["n_bars"] == 8 and math.isfinite(stats["sharpe"])
    assert consecutive_losses(np.array([-1.0, 2.0, -1.0, -3.0])) == 2 and consecutive_losses(np.array([])) == 0


def test_psi_crosses_its_threshold_on_a_shifted_series_and_not_on_an_unshifted_one():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, 20000)
    same = rng.normal(0, 1, 2000)
    shifted = rng.normal(0.8, 1.3, 2000)
    assert psi(train, same) < 0.05
    assert psi(train, shifted) > 0.25
    assert psi(np.ones(100), np.ones(50)) == 0 and psi(np.ones(100), same) > 0.25  # a flat feature that moves
    assert math.isnan(psi(train, np.array([]))) and math.isnan(psi(train, np.array([np.nan])))
    drift = feature_psi(np.c_[train, train], np.c_[same, shifted], ["ret_1", "vol_z"])
    assert drift["ret_1"] < 0.05 < 0.25 < drift["vol_z"]
    with pytest.raises(ValueError, match="2 columns"):
        feature_psi(np.c_[train], np.c_[same], ["ret_1", "vol_z"])


def test_hysteresis_holds_through_a_short_dip_acts_once_and_rearms_after_clear_passes():
    watch = Hysteresis(confirm=3, clear=2)
    assert [watch.update(b) for b in (True, True, False, True, True)] == [False] * 5  # a dip, then recovery
    assert watch.update(True) is True  # the third bad pass in a row: act
    assert [watch.update(b) for b in (True, True, False, True)] == [False] * 4  # acted: no flapping
    assert [watch.update(b) for b in (False, False)] == [False, False] and not watch.acted  # clear again
    assert [watch.update(True) for _ in range(3)] == [False, False, True]
    again = Hysteresis.from_dict(watch.to_dict(), confirm=3, clear=2)
    assert again == watch
