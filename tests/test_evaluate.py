"""Evaluation: batched backtests, baselines, MLflow logging, comparison and selection."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, momentum_bars, run_module
from mlproject.backtest import constant_policy, play_episode
from mlproject.config import load_config
from mlproject.evaluation import (
    backtest,
    baselines,
    compare_models,
    paired_comparison,
    psr_against,
    select_best,
    window_starts,
)


def test_windows_are_consecutive_and_do_not_overlap():
    starts, length = window_starts(1000, 32, 4)
    assert length == (1000 - 1 - 32) // 4
    assert starts.tolist() == [32 + i * length for i in range(4)]
    assert starts[-1] + length <= 999
    with pytest.raises(ValueError, match="too few for 50 evaluation windows"):
        window_starts(100, 32, 50)


def test_batched_windows_equal_single_env_episodes(small_bars):
    """Each batched window is exactly a single-env episode over the same bars."""
    env = {"window": 8, "instrument": {"preset": "ES", "max_contracts": 2}}
    report = backtest(constant_policy(4), small_bars, env, n_windows=3)
    starts, length = window_starts(len(small_bars), 20, 3)  # t_min = max(window, vol_window)
    for window, start in zip(report.windows, starts):
        bars = small_bars.iloc[start - 20: start + length + 1]  # same history, same window
        single = play_episode(constant_policy(4), bars, env)
        np.testing.assert_allclose(window.equity.to_numpy(), single.equity.to_numpy(), rtol=0, atol=1e-6)
        assert window.equity.index.equals(single.equity.index)
        assert window.metrics["total_return"] == pytest.approx(single.metrics["total_return"], abs=1e-12)


def test_the_fast_backtest_path_gives_the_same_actions_trades_and_metrics(small_bars):
    """The backtest's speed-ups change no result: the policy through its plain torch layers acts
    as RLlib's forward_inference does, and the vectorised trades and metrics equal the fill-by-fill
    replay of the same positions (max_contracts 2: adds and partial exits take the loop)."""
    from envs.market import Market
    from mlproject.backtest import episode_metrics
    from mlproject.metrics import periods_per_year
    from mlproject.policy import fresh_module, greedy_actions, module_policy, plain_net
    from mlproject.trades import TRADE_COLUMNS, fills_from_positions, trades_from_fills

    for contracts in (1, 2):
        env = {"window": 8, "instrument": {"preset": "ES", "max_contracts": contracts}}
        module = fresh_module(8 * 5 + 2, 2 * contracts + 1, seed=contracts)
        assert plain_net(module) is not None  # the fast path is the one tested
        fast = backtest(module_policy(module), small_bars, env, n_windows=4)
        slow = backtest(lambda obs: greedy_actions(module, obs), small_bars, env, n_windows=4)
        market = Market.from_config({**env, "bars": small_bars})
        starts, _ = window_starts(len(small_bars), 20, 4)
        trades = 0
        for a, b, start in zip(fast.windows, slow.windows, starts):
            pd.testing.assert_series_equal(a.positions, b.positions)
            pd.testing.assert_frame_equal(a.trades, b.trades, check_exact=True)
            positions = a.positions.to_numpy()
            loop = pd.DataFrame(trades_from_fills(fills_from_positions(positions, start, market),
                                                  market.spec.point_value, market.spec.commission_per_side,
                                                  market.spec.slippage_cost), columns=list(TRADE_COLUMNS))
            np.testing.assert_array_equal(a.trades["pnl"].to_numpy(), loop["pnl"].to_numpy(np.float64))
            np.testing.assert_array_equal(a.trades["exit_price"].to_numpy(), loop["exit_price"].to_numpy(np.float64))
            assert (a.trades["entry_time"] == small_bars.index[loop["entry_time"].to_numpy(np.int64)]).all()
            assert (a.trades["size"].to_numpy() == loop["size"].to_numpy()).all()
            reference = episode_metrics(a.equity.to_numpy(), positions, loop, periods_per_year(small_bars.index),
                                        market.spec)
            for key, value in reference.items():
                assert value == a.metrics[key] or (math.isnan(value) and math.isnan(a.metrics[key])), key
            trades += len(loop)
        assert trades > 20


def test_the_logged_policy_model_acts_as_the_module_without_mlflow_per_call_checks(small_bars, tmp_path):
    """The pyfunc model training logs, loaded as evaluation loads it, gives forward_inference's
    actions through its fast path (its own layers, the batch checked against the signature by
    us), the same backtest as the module itself, and MLflow's schema error for a batch of the
    wrong width (tanh and relu stacks)."""
    from mlflow.models import infer_signature

    from mlproject.policy import _own_policy_model, fresh_module, greedy_actions, load_policy_model, module_policy
    from mlproject.training import POLICY_MODEL_FILE, pip_requirements

    env = {"window": 8, "instrument": {"preset": "ES", "max_contracts": 2}}
    rng = np.random.default_rng(1)
    for activation in ("tanh", "relu"):
        module = fresh_module(8 * 5 + 2, 5, activation=activation, seed=3)
        module.save_to_path(tmp_path / activation / "module")
        example = rng.normal(0.0, 2.0, (4, 42)).astype(np.float32)
        mlflow.pyfunc.save_model(tmp_path / activation / "model", python_model=str(POLICY_MODEL_FILE),
                                 artifacts={"rl_module": str(tmp_path / activation / "module")},
                                 signature=infer_signature(example, greedy_actions(module, example)),
                                 pip_requirements=pip_requirements())
        loaded = load_policy_model(str(tmp_path / activation / "model"))
        raw = mlflow.pyfunc.load_model(str(tmp_path / activation / "model"))
        assert _own_policy_model(raw, 42) is not None and raw.unwrap_python_model().steps is not None
        for rows in (1, 7, 256):
            obs = rng.normal(0.0, 2.0, (rows, 42)).astype(np.float32)
            assert np.array_equal(loaded.predict(obs), greedy_actions(module, obs))
        with pytest.raises(Exception, match=r"\(-1, 42\)"):
            loaded.predict(np.zeros((3, 40), np.float32))
        ours = backtest(module_policy(module), small_bars, env, n_windows=4)
        theirs = backtest(loaded.predict, small_bars, env, n_windows=4)
        for a, b in zip(ours.windows, theirs.windows, strict=True):
            pd.testing.assert_series_equal(a.positions, b.positions)
            assert a.metrics.keys() == b.metrics.keys()
            assert all(a.metrics[k] == b.metrics[k] or (math.isnan(a.metrics[k]) and math.isnan(b.metrics[k]))
                       for k in a.metrics)
        assert sum(len(w.trades) for w in ours.windows) > 20


def test_backtest_results_are_the_recorded_ones():
    """Fixed-seed backtests (a seeded 64x64 policy, 8 windows, 1 and 2 contracts) give the
    positions, trades and metrics recorded in tests/golden/backtest.json: a speed-up of the env,
    the policy path or the per-window results changes none of them. Positions and trades are
    compared exactly (hashes); metrics to 1e-9 (libm and BLAS may round last bits differently on
    another CPU)."""
    import json

    from backtest_golden import GOLDEN, fingerprint

    recorded, now = json.loads(GOLDEN.read_text()), fingerprint()
    assert now.keys() == recorded.keys()
    for case, expected in recorded.items():
        got = now[case]
        assert got["n_trades"] == expected["n_trades"], case
        assert got["positions_sha256"] == expected["positions_sha256"], f"{case}: positions changed"
        assert got["trades_sha256"] == expected["trades_sha256"], f"{case}: trades changed"
        for window, (a, b) in enumerate(zip(got["metrics"], expected["metrics"], strict=True)):
            assert a.keys() == b.keys()
            for key in b:
                assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), \
                    f"{case} window {window}: {key} {a[key]} != {b[key]}"


def test_vectorised_trades_equal_the_fill_loop_bit_for_bit(small_bars):
    from envs.market import Market
    from mlproject.trades import TRADE_COLUMNS, fills_from_positions, trade_columns, trades_from_fills

    rng = np.random.default_rng(0)
    for contracts in (1, 2):
        market = Market.from_config({"bars": small_bars, "window": 8,
                                     "instrument": {"preset": "ES", "max_contracts": contracts}})
        spec = market.spec
        for _ in range(100):
            n = int(rng.integers(2, 300))
            positions = rng.integers(-contracts, contracts + 1, n) * (rng.random(n) < 0.7)
            positions[0] = 0
            start = int(rng.integers(20, 2500))
            loop = trades_from_fills(fills_from_positions(positions, start, market), spec.point_value,
                                     spec.commission_per_side, spec.slippage_cost)
            fast = trade_columns(positions, start, market)
            for k, name in enumerate(TRADE_COLUMNS):
                expected = np.array([row[k] for row in loop])
                assert np.array_equal(fast[name], expected) and fast[name].dtype.kind == expected.dtype.kind or \
                    not loop, name


def test_flat_and_buy_hold_baselines(small_bars):
    env = {"window": 8}
    base = baselines(small_bars, env, n_windows=4)
    flat = base["flat"].summary()
    assert flat["total_return"] == 0.0 and flat["n_trades"] == 0.0 and flat["exposure"] == 0.0
    hold = base["buy_hold"]
    for w in hold.windows:  # long 1 ES from the first fill to the end of the window, never closed
        first_open = small_bars.loc[w.equity.index[1], "open"]  # bought at the next open + 1 tick
        last_close = small_bars.loc[w.equity.index[-1], "close"]
        expected = (last_close - first_open - 0.25) * 50 - 2.25  # ES $50/point, $2.25 commission
        assert w.equity.iloc[-1] - w.equity.iloc[0] == pytest.approx(expected, abs=1e-6)
        assert w.metrics["exposure"] == pytest.approx((len(w.equity) - 1) / len(w.equity))


def test_policy_errors_name_the_policy(small_bars):
    with pytest.raises(ValueError, match="bad: returned actions outside 0..2"):
        backtest(lambda obs: np.full(len(obs), 7), small_bars, {"window": 8}, 2, name="bad")
    with pytest.raises(ValueError, match="nan: returned NaN"):
        backtest(lambda obs: np.full(len(obs), np.nan), small_bars, {"window": 8}, 2, name="nan")


def test_psr_and_paired_comparison_prefer_the_better_policy():
    rising = momentum_bars(3000, seed=4, persist=0.5)  # coin-flip moves of ~0.6 point a bar ...
    rising[["open", "high", "low", "close"]] += np.linspace(0, 1500, len(rising))[:, None]  # ... on a 0.5/bar drift
    env = {"window": 4, "instrument": {"symbol": "T", "tick_size": 0.25, "point_value": 50,
                                       "commission_per_side": 0.0, "slippage_ticks": 0, "max_contracts": 1}}
    base = baselines(rising, env, n_windows=5)
    paired = paired_comparison(base["buy_hold"], base["flat"])
    assert paired["mean_return_diff"] > 0 and paired["t_stat"] > 0 and paired["p_value"] < 0.05
    assert paired["windows_won"] == 5.0
    assert psr_against(base["buy_hold"], 0.0) > 0.95
    assert math.isnan(psr_against(base["flat"], base["buy_hold"]))  # flat has no variance: undefined


def test_the_chained_curve_compounds_the_windows_and_measures_drawdown_from_the_running_peak():
    from types import SimpleNamespace

    from mlproject.reporting import chained_curve

    windows = [SimpleNamespace(equity=pd.Series(values)) for values in ([100.0, 110.0], [50.0, 45.0], [100.0, 120.0])]
    curve = chained_curve(SimpleNamespace(windows=windows))
    assert curve["equity"].tolist() == pytest.approx([100, 110, 110, 99, 99, 118.8])
    assert curve["drawdown_pct"].tolist() == pytest.approx([0, 0, 0, -10, -10, 0])
    thinned = chained_curve(SimpleNamespace(windows=windows), points=3)
    assert thinned.index.tolist()[0] == 0 and thinned.index.tolist()[-1] == 5 and len(thinned) == 3


def test_evaluate_logs_metrics_linked_to_the_model(trained_store):
    from mlproject.tracking import CURVE_POINTS
    from pipelines import evaluate

    _, result, cfg, _ = trained_store
    uri = f"models:/nt8-agent/{result.registered_version}"
    out = evaluate.main(cfg, [uri])
    run = mlflow.get_run(out.run_id)
    # Always defined for a policy that trades (profit factor and payoff may be inf/NaN, so not listed).
    for key in ("eval/sharpe", "eval/total_return", "eval/max_drawdown", "eval/n_trades", "eval/exposure",
                "eval/turnover", "eval/sharpe_std", "baseline/flat/total_return", "baseline/buy_hold/total_return",
                "eval/psr_vs_buy_hold", "eval/commissions"):
        assert key in run.data.metrics, key
    assert run.data.metrics["baseline/flat/total_return"] == 0.0
    assert run.data.tags["eval.windows"] == str(cfg.continuous_learning.evaluation_episodes)
    report = out.reports[uri]
    history = mlflow.MlflowClient().get_metric_history(out.run_id, "eval_window/total_return")
    starts = np.cumsum([0] + [len(w.equity) for w in report.windows[:-1]])  # the bar each window starts at
    assert sorted(m.step for m in history) == list(starts) and len(starts) == cfg.continuous_learning.evaluation_episodes
    curve = mlflow.MlflowClient().get_metric_history(out.run_id, "backtest/equity")
    assert len(curve) == min(CURVE_POINTS, sum(len(w.equity) for w in report.windows))
    assert curve[0].value == pytest.approx(report.windows[0].equity.iloc[0])
    assert curve[-1].value == pytest.approx(curve[0].value * np.prod([1 + w.metrics["total_return"] for w in report.windows]))
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(out.run_id, "eval")}
    assert {"eval/equity_drawdown.png", "eval/windows.json", "eval/positions.parquet"} <= artifacts
    from mlproject.registry import model_id_of

    model_id = model_id_of(uri)
    assert model_id and result.model_uri == f"models:/{model_id}"
    linked = {m.key for m in mlflow.get_logged_model(model_id).metrics}
    assert {"eval/total_return", "eval/max_drawdown"} <= linked
    assert run.inputs.dataset_inputs[0].dataset.name == "evaluation-bars"
    from mlproject.evaluation import default_bars
    from mlproject.metrics import periods_per_year

    assert float(run.data.params["periods_per_year"]) == pytest.approx(periods_per_year(default_bars(cfg).index))
    assert run.data.params["eval.first_bar"] == "20"  # max(window 16, vol_window 20)
    assert run.data.metrics["eval/total_return"] == pytest.approx(report.summary()["total_return"])


def test_compare_and_select_best(trained_store):
    from pipelines import evaluate, train

    _, result, cfg, _ = trained_store
    other = train.main(cfg.model_copy(update={"train": cfg.train.model_copy(update={"iterations": 1})}), seed=99)
    uris = [f"models:/nt8-agent/{result.registered_version}", f"models:/nt8-agent/{other.registered_version}"]
    table = compare_models(uris, cfg=cfg)
    assert list(table.index) == uris and "sharpe" in table and "sharpe_std" in table
    best = select_best(uris, "total_return", cfg=cfg)
    assert best == table["total_return"].astype(float).idxmax()
    assert select_best(uris, "max_drawdown", cfg=cfg) == table["max_drawdown"].astype(float).idxmin()
    with pytest.raises(ValueError, match="unknown metric 'sharp'"):
        select_best(uris, "sharp", cfg=cfg)
    out = evaluate.main(cfg, uris, metric="total_return")
    parent = mlflow.get_run(out.run_id)
    assert parent.data.tags["compare.best"] == best
    children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{out.run_id}'")
    assert {c.data.tags["model_uri"] for c in children} == set(uris)
    assert "compare/table.json" in {a.path for a in mlflow.MlflowClient().list_artifacts(out.run_id, "compare")}


def test_mlflow_run_evaluate_and_bad_uri(trained_store, tmp_path):
    uri, result, _, _ = trained_store
    model = f"models:/nt8-agent/{result.registered_version}"
    out = run_module(["mlflow", "run", str(ROOT), "-e", "evaluate", "--env-manager", "local",
                      "-P", f"model_uri={model}", "-P", "config=conf/smoke.yaml"], cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stderr[-3000:]
    bad = run_module(["python", "-m", "pipelines.evaluate", "--model-uri", "models:/nt8-agent/999",
                      "--config", str(ROOT / "conf" / "smoke.yaml")], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert bad.returncode == 2 and "models:/nt8-agent/999" in bad.stderr and "Traceback" not in bad.stderr


def test_evaluate_window_of_a_file(trained_store, tmp_path):
    from pipelines import evaluate

    _, result, cfg, _ = trained_store
    path = tmp_path / "bars.parquet"
    bars = momentum_bars(2000, seed=8)
    bars.to_parquet(path)
    start, end = str(bars.index[200]), str(bars.index[1500])
    out = evaluate.main(cfg, [f"models:/nt8-agent/{result.registered_version}"], data=str(path), start=start, end=end)
    report = next(iter(out.reports.values()))
    assert report.windows[0].equity.index[0] >= pd.Timestamp(start)
    assert report.windows[-1].equity.index[-1] <= pd.Timestamp(end)
    with pytest.raises(ValueError, match="no bars between 2030-01-01"):
        evaluate.main(cfg, ["models:/nt8-agent/1"], data=str(path), start="2030-01-01")
    assert load_config(ROOT / "conf" / "smoke.yaml").continuous_learning.evaluation_episodes == len(report.windows)


def test_the_equity_plot_compresses_session_gaps_and_shows_buy_and_hold_beside_the_agent(small_bars):
    """The PNG is drawn; its x axis counts bars (a session gap takes one bar's room and breaks
    the lines); buy-and-hold is drawn on the same windows as the agent, flat as a reference; the
    legend sits above the plot, covering no data."""
    from mlproject.reporting import compressed_x, equity_drawdown_figure, equity_drawdown_png, session_gaps

    env = {"window": 8, "instrument": {"preset": "ES", "max_contracts": 2}}
    report = backtest(constant_policy(4), small_bars, env, n_windows=3, name="agent")
    base = baselines(small_bars, env, n_windows=3, first_bar=20)
    assert equity_drawdown_png(report, base)[:8] == b"\x89PNG\r\n\x1a\n"
    fig = equity_drawdown_figure(report, base)
    top, bottom = fig.axes
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["agent", "buy & hold", "flat"]
    fig.canvas.draw()
    assert top.get_legend().get_window_extent().y0 >= top.get_window_extent().y1 - 1  # above the axes
    times = pd.DatetimeIndex(sorted(set().union(*(w.equity.index for w in report.windows))))
    gaps = session_gaps(times)
    assert gaps.sum() >= 2  # the synthetic bars have overnight gaps, as real RTH exports do
    curves = [line for line in top.get_lines() if len(line.get_xdata()) > 2]
    assert len(curves) == 2 * len(report.windows)  # the agent's and buy-and-hold's, window by window
    inside = sum(int(session_gaps(times)[times.get_indexer(w.equity.index)][1:].sum()) for w in report.windows)
    assert sum(int(np.isnan(line.get_ydata()).sum()) for line in curves) == 2 * inside > 0  # breaks at gaps
    xs = np.concatenate([line.get_xdata() for line in curves])
    assert np.nanmax(xs) == compressed_x(times)[-1] == len(times) - 1  # one bar per bar, gaps included
