"""The walk-forward report's pieces: the crossover rule (no look-ahead), regret, the table, the plot."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mlproject.cycle.sim_report import (
    Promotion,
    figure,
    ma_crossover_actions,
    periods_won,
    regret_lines,
    regret_share,
    scripted_policy,
    table,
)


def test_the_crossover_rule_reads_no_later_bar_and_goes_long_short_flat():
    rng = np.random.default_rng(0)
    close = pd.Series(100 + np.cumsum(rng.normal(0, 1, 400)))
    actions = ma_crossover_actions(close, max_contracts=2, fast=5, slow=20)
    assert (actions[:19] == 2).all()  # flat until the slow mean exists
    assert set(actions[19:].tolist()) <= {0, 4} and {0, 4} <= set(actions[19:].tolist())
    fast, slow = close.rolling(5).mean(), close.rolling(20).mean()
    assert (actions[19:] == np.where(fast[19:] > slow[19:], 4, 0)).all()
    for t in (25, 100, 399):  # a different future changes nothing up to t
        changed = close.copy()
        changed.iloc[t + 1:] *= 1.5
        assert np.array_equal(ma_crossover_actions(changed, 2, 5, 20)[:t + 1], actions[:t + 1])


def test_a_scripted_policy_answers_in_order_and_refuses_more():
    policy = scripted_policy(np.array([2, 0, 1]))
    assert [int(policy(np.zeros((1, 4)))[0]) for _ in range(3)] == [2, 0, 1]
    with pytest.raises(ValueError, match="ran out of actions"):
        policy(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="one window"):
        scripted_policy(np.array([1, 1]))(np.zeros((2, 4)))


def test_regret_counts_promotions_that_did_worse_than_what_they_replaced():
    promotions = [Promotion(1, "1", None, 0.02, 0.0), Promotion(3, "2", "1", -0.01, 0.005),
                  Promotion(4, "3", "2", 0.01, 0.01)]
    assert [p.regret for p in promotions] == [False, True, False]  # a tie is no regret
    assert regret_share(promotions) == pytest.approx(1 / 3) and math.isnan(regret_share([]))
    assert promotions[0].describe() == "period 1: v1 replaced flat: +2.00% vs +0.00%"
    assert promotions[1].describe() == "period 3: v2 replaced v1: -1.00% vs +0.50% (regret by 1.5 points)"
    lines = regret_lines(promotions, {"p_value": 0.123, "mean_return_diff": 1e-4})
    assert lines[0].startswith("promotion regret: 1 of 3 promotions (33%): period 1: v1 replaced flat")
    assert "p = 0.123" in lines[1] and "H1: learning better" in lines[1]
    assert regret_lines([], {"p_value": math.nan})[0] == "promotion regret: 0 of 0 promotions"
    assert "no difference to test" in regret_lines([], {"p_value": math.nan})[1]


def test_the_table_has_a_row_per_agent_with_periods_won():
    returns = {"learning": [0.01, -0.02, 0.03], "never_retrained": [0.0, -0.01, 0.01], "buy_hold": [0.02, 0.0, 0.0]}
    metrics = {a: {"total_return": sum(r), "sharpe": 0.5, "max_drawdown": 0.1, "n_trades": 7.0, "costs": 0.0012}
               for a, r in returns.items()}
    assert periods_won(returns, "learning", "never_retrained") == 2
    text = table(metrics, returns).splitlines()
    assert len(text) == 2 + 3 and text[0].startswith("| agent | total return | Sharpe | max drawdown | trades | costs")
    assert text[2] == "| learning | +2.00% | 0.50 | 10.0% | 7 | 0.12% | 2/3 | 1/3 |"
    assert text[3].startswith("| never retrained |") and text[3].endswith("| 0/3 | 1/3 |")
    metrics["never_retrained"]["sharpe"] = math.nan  # flat all along: no variance
    assert table(metrics, returns).splitlines()[3].startswith("| never retrained | +0.00% | - | 10.0% |")


def test_the_plot_has_dates_and_a_labelled_line_per_decision_point():
    times = pd.date_range("2020-01-01", periods=11, freq="D")
    fig = figure({"learning": np.linspace(1, 2, 11), "buy_hold": np.ones(11)}, times, [times[0], times[5]],
                 ["promoted: v1", "refused: v1"])
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()[:2]] == ["learning", "buy hold"]
    assert [t.get_text().strip() for t in ax.texts] == ["promoted: v1", "refused: v1"]
    assert ax.get_xlabel() == "date (out of sample)"


def test_a_missing_data_file_fails_before_any_run(tmp_path, mlflow_store):
    """--data naming no file: one error naming it, exit 2, no cycle-simulate run left behind."""
    import mlflow
    from conftest import run_module

    out = run_module(["python", "-m", "pipelines.simulate", "--data", str(tmp_path / "nope.csv"), "--instrument", "ES"],
                     cwd=tmp_path)
    assert out.returncode == 2 and f"no such file: {tmp_path / 'nope.csv'}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_the_seed_table_gives_the_spread_and_how_often_learning_was_ahead():
    from types import SimpleNamespace

    from mlproject.cycle.sim_report import seed_table

    def result(learning, never, sharpe, promotions=()):
        return SimpleNamespace(metrics={"learning": {"total_return": learning, "sharpe": sharpe},
                                        "never_retrained": {"total_return": never, "sharpe": math.nan}},
                               promotions=list(promotions))

    results = [result(0.10, 0.05, 0.5, [Promotion(2, "2", "1", -0.01, 0.01)]), result(-0.10, -0.05, -0.1),
               result(0.0, 0.0, 0.3, [Promotion(1, "1", None, 0.02, 0.0)])]
    text = seed_table([0, 1, 2], results).splitlines()
    assert text[0] == "over 3 seeds (0, 1, 2):"
    assert text[1].endswith("| mean Sharpe (seeds that traded) |")
    assert text[3] == "| learning | +0.00% | 10.00% | -10.00% | +10.00% | 0.23 |"
    assert text[4] == "| never retrained | +0.00% | 5.00% | -5.00% | +5.00% | - |"
    assert text[-1] == ("learning vs never retrained: ahead in 1, behind in 1, equal in 1 of 3 seeds; "
                        "promotion regret 1 of 2 promotions")


def test_seeds_below_one_fail_before_any_run(tmp_path, mlflow_store):
    import mlflow
    from conftest import run_module

    out = run_module(["python", "-m", "pipelines.simulate", "--seeds", "0"], cwd=tmp_path)
    assert out.returncode == 2 and "--seeds must be >= 1 (got 0)" in out.stderr, out.stderr
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
