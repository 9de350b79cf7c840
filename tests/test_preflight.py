"""Real data fails early and clearly: split sizes checked before training, stop-outs reported
as such, prices that do not fit the instrument warned about."""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from mlproject.config import load_config
from mlproject.data import DataError, load_bars, split_bars


def _monthly_csv(path, n=156, seed=0):
    """``n`` monthly ES-like bars as a CSV file, the way a user exports them."""
    rng = np.random.default_rng(seed)
    close = 1500.0 + np.cumsum(rng.normal(0, 40, n)).round() / 4 * 4
    index = pd.date_range("2012-01-31", periods=n, freq="ME")
    frame = pd.DataFrame({"Date": index.strftime("%Y-%m-%d"), "Open": close - 2, "High": close + 30,
                          "Low": close - 30, "Close": close, "Volume": 1_000_000})
    frame.to_csv(path, index=False)
    return path


def test_training_on_too_few_bars_fails_before_any_iteration(tmp_path, mlflow_store):
    """A 156-bar monthly file used to train 5 iterations and then fail at the first validation."""
    from pipelines import train

    path = _monthly_csv(tmp_path / "ES_monthly.csv")
    cfg = load_config(ROOT / "conf" / "default.yaml", [f"data.source={path}"])
    with pytest.raises(DataError, match=r"ES_monthly\.csv: the validation split has 23 bars "
                                        r"\(data\.splits\.validation=0\.15 of 156\); it needs at least 49: 32 bars of "
                                        r"history \(env\.window=32, env\.vol_window=20\) and 8 validation windows"):
        train.main(cfg)
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "FAILED" and "validation split has 23 bars" in run.data.tags["error"]
    assert not mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/env_steps")  # nothing trained


def test_split_checks_name_the_split_and_warn_below_norm_window(tmp_path, caplog):
    from mlproject.preflight import check_splits

    bars = load_bars(_monthly_csv(tmp_path / "m.csv"))
    cfg = load_config(None, ["env.window=8", "env.vol_window=8", "continuous_learning.evaluation_episodes=10",
                             "train.val_windows=4"])
    splits = split_bars(bars, 0.7, 0.15, 0.15)
    with pytest.raises(DataError, match=r"the test split has 24 bars .* needs at least 29: 8 bars of history .* "
                                        r"10 evaluation windows of 2\+ bars \(continuous_learning\.evaluation_episodes"):
        check_splits(splits, cfg, "m.csv")
    cfg = load_config(None, ["env.window=8", "env.vol_window=8", "continuous_learning.evaluation_episodes=3",
                             "train.val_windows=4"])
    with caplog.at_level(logging.WARNING):
        warnings = check_splits(splits, cfg, "m.csv")
    assert len(warnings) == 2 and "the validation split has 23 bars, fewer than env.norm_window=100" in warnings[0]
    assert "env.norm_window=100" in caplog.text
    no_test = load_config(None, ["env.window=8", "env.vol_window=8", "train.val_windows=4",
                                 "data.splits={train: 0.85, validation: 0.15, test: 0.0}"])
    check_splits(split_bars(bars, 0.85, 0.15, 0.0), no_test, "m.csv")  # an unused split is not checked


def test_model_input_example_survives_a_short_validation_split(small_bars):
    """39 validation bars used to crash with IndexError building the model's input example."""
    from mlproject.training import example_observations

    cfg = load_config(ROOT / "conf" / "smoke.yaml")
    short = small_bars.iloc[:22]  # 20 bars of history, 2 to trade
    rows = example_observations(short, cfg, 8)
    assert rows.shape == (2, 16 * 5 + 2)


def _btc_bars(n=2400, seed=5):
    """BTC-like minute bars: ~40,000 with moves of tens of dollars a minute, on a 5-dollar grid."""
    rng = np.random.default_rng(seed)
    close = np.round((40_000 + np.cumsum(rng.normal(0, 60, n))) / 5) * 5
    open_ = np.r_[close[0], close[:-1]]
    index = pd.date_range("2024-03-01 00:01", periods=n, freq="1min", name="timestamp")
    return pd.DataFrame({"open": open_, "high": np.maximum(open_, close) + 5, "low": np.minimum(open_, close) - 5,
                         "close": close, "volume": 10.0}, index=index)


def test_equity_floor_windows_are_reported_as_stopped_out_and_compared_honestly():
    """An ES spec on BTC prices: buy-and-hold hits the equity floor. Those windows are reported
    (bar, equity), keep their length, and the paired comparison still runs."""
    from mlproject.evaluation import baselines, paired_comparison

    bars = _btc_bars()
    base = baselines(bars, {"window": 8, "instrument": "ES"}, n_windows=4)
    hold, flat = base["buy_hold"], base["flat"]
    stopped = [w for w in hold.windows if w.stopped_at is not None]
    assert stopped, "the ES spec on BTC prices should hit the floor"
    for w, f in zip(hold.windows, flat.windows):
        assert w.equity.index.equals(f.equity.index)  # full length: comparable bar by bar
    w = stopped[0]
    k = w.equity.index.get_loc(w.stopped_at)
    assert w.equity.iloc[k] < 50_000 and (w.equity.iloc[k:] == w.equity.iloc[k]).all()
    assert (w.positions.iloc[k + 1:] == 0).all() and w.positions.iloc[k] == 1
    assert w.metrics["stopped_out"] == 1.0 and w.metrics["commissions"] == 2.25  # one entry, no fake exit
    assert w.stop_note() == f"window {w.index} stopped out at {w.stopped_at} (equity {w.equity.iloc[k]:,.2f})"
    assert hold.summary()["stopped_out"] == len(stopped) / 4
    paired = paired_comparison(hold, flat)
    assert paired["windows"] == 4.0


def test_the_gate_refuses_a_challenger_that_hit_the_equity_floor():
    from mlproject.evaluation import baselines
    from mlproject.gate import gate

    base = baselines(_btc_bars(), {"window": 8, "instrument": "ES"}, n_windows=4)
    verdict = gate(base["buy_hold"], base["flat"], load_config(None, ["promotion.max_drawdown=1.0"]).promotion)
    assert not verdict.passed and any(r.startswith("hit the equity floor: window ") for r in verdict.reasons)
    assert verdict.metrics["gate/stopped_out_windows"] >= 1


def test_the_gate_deflates_by_the_candidates_tried_and_wants_most_windows(small_bars):
    """Against Production the gate counts tries: the same challenger that passes as the only
    candidate is refused as the best of many (Deflated Sharpe), and one that wins too few of the
    evaluation windows is refused however good its mean."""
    from mlproject.evaluation import baselines
    from mlproject.gate import gate

    base = baselines(small_bars, {"window": 8, "instrument": "ES"}, n_windows=4)
    reports = (base["buy_hold"], base["flat"])  # challenger: long; Production: flat
    p = load_config(None, ["promotion.min_trades=0", "promotion.max_drawdown=1.0", "promotion.beat_flat=false",
                           "promotion.min_psr=0", "promotion.min_dsr=0", "promotion.min_window_share=0"]).promotion
    one, many = gate(*reports, p, trials=1), gate(*reports, p, trials=10_000)
    assert one.metrics["gate/trials"] == 1.0 and many.metrics["gate/trials"] == 10_000.0
    assert one.metrics["gate/dsr"] == pytest.approx(one.metrics["gate/psr"], abs=1e-12)
    assert many.metrics["gate/dsr"] < one.metrics["gate/dsr"]
    between = (one.metrics["gate/dsr"] + many.metrics["gate/dsr"]) / 2
    strict = p.model_copy(update={"min_dsr": between})
    assert gate(*reports, strict, trials=1).passed
    refused = gate(*reports, strict, trials=10_000)
    assert not refused.passed and refused.reasons[0].startswith("Deflated Sharpe vs Production")
    assert "10000 candidates tried" in refused.reasons[0]
    won = int(one.metrics["gate/windows_won"])
    all_windows = gate(*reports, p.model_copy(update={"min_window_share": 1.0}), trials=1)
    assert all_windows.passed == (won == 4)
    if won < 4:
        assert all_windows.reasons == [f"beat Production in {won} of 4 evaluation windows, < min_window_share 1"]
    none = gate(*reports, p.model_copy(update={"min_window_share": (won + 0.5) / 4}), trials=1)
    assert not none.passed and f"beat Production in {won} of 4" in none.reasons[0]


def test_the_first_candidate_is_held_to_every_check_against_flat_unless_the_floor_is_psr(small_bars):
    """With nothing in Production the floor (beat_flat_by: all, the default) asks the candidate
    the Deflated Sharpe over its tries and a majority of windows against flat, as a retrain is
    asked against Production; beat_flat_by: psr is the older floor (the PSR vs flat only)."""
    from mlproject.evaluation import baselines
    from mlproject.gate import gate

    long = baselines(small_bars, {"window": 8, "instrument": "ES"}, n_windows=4)["buy_hold"]
    p = load_config(None, ["promotion.min_trades=0", "promotion.max_drawdown=1.0", "promotion.min_psr=0", "promotion.min_window_share=0"]).promotion
    assert p.beat_flat and p.beat_flat_by == "all"
    one = gate(long, None, p, trials=1)
    assert one.metrics["gate/dsr_vs_flat"] == pytest.approx(one.metrics["gate/psr_vs_flat"], abs=1e-12)
    many = gate(long, None, p, trials=10_000)
    assert many.metrics["gate/dsr_vs_flat"] < one.metrics["gate/dsr_vs_flat"]
    strict = p.model_copy(update={"min_dsr": (one.metrics["gate/dsr_vs_flat"] + many.metrics["gate/dsr_vs_flat"]) / 2})
    dsr_reasons = [r for r in gate(long, None, strict, trials=1).reasons if r.startswith("Deflated Sharpe")]
    assert dsr_reasons == []
    refused = gate(long, None, strict, trials=10_000)
    assert (f"Deflated Sharpe vs flat {refused.metrics['gate/dsr_vs_flat']:.3f} < min_dsr {strict.min_dsr:g} "
            "(10000 candidates tried for this model)") in refused.reasons
    won = int(one.metrics["gate/windows_won_vs_flat"])
    assert won == sum(w.metrics["total_return"] > 0 for w in long.windows)
    most = gate(long, None, p.model_copy(update={"min_window_share": (won + 0.5) / 4}), trials=1)
    assert f"beat flat in {won} of 4 evaluation windows, < min_window_share {(won + 0.5) / 4:g}" in most.reasons
    old = strict.model_copy(update={"beat_flat_by": "psr", "min_window_share": 1.0})
    before = gate(long, None, old, trials=10_000)  # the older floor: neither check against flat
    assert "gate/dsr_vs_flat" not in before.metrics
    assert not [r for r in before.reasons if "Deflated" in r or "evaluation windows" in r]


def test_instrument_fit_warnings(small_bars):
    from mlproject.instruments import PRESETS
    from mlproject.preflight import instrument_fit_warnings

    checks = load_config(None).data.checks
    assert instrument_fit_warnings(small_bars, PRESETS["ES"], 100_000, checks, "es.txt") == []
    btc = _btc_bars()
    found = instrument_fit_warnings(btc, PRESETS["ES"], 100_000, checks, "btc.txt")
    assert len(found) == 1 and "btc.txt: a typical day moves" in found[0] and "env.instrument" in found[0]
    cents = btc.assign(close=btc["close"] + 0.37, high=btc["high"] + 0.37)
    off = instrument_fit_warnings(cents, PRESETS["BTC"], 1_000_000, checks, "btc.txt")
    assert any("off BTC's tick grid of 5" in w for w in off)
    tick = instrument_fit_warnings(small_bars, PRESETS["ES"], 5_000, checks, "es.txt")
    assert any("one tick on 1 ES is worth 12.50, 0.25% of env.initial_equity=5,000" in w for w in tick)


def test_fit_warnings_are_tagged_on_the_run(tmp_path, mlflow_store):
    from mlproject.preflight import warn_if_instrument_misfits

    bars = _btc_bars()
    bars.attrs["path"] = "btc.parquet"
    with mlflow.start_run() as run:
        warn_if_instrument_misfits(bars, load_config(None))
    assert "btc.parquet: a typical day moves" in mlflow.get_run(run.info.run_id).data.tags["data.warnings"]


def test_ingest_warns_when_the_prices_do_not_fit_the_instrument(tmp_path, mlflow_store):
    """BTC minute bars exported from NT8, ingested with the default ES instrument."""
    from pipelines import ingest

    bars = _btc_bars(600)
    path = tmp_path / "BTC 03-24.Last.txt"
    path.write_text("".join(f"{ts:%Y%m%d %H%M%S};{r.open:g};{r.high:g};{r.low:g};{r.close:g};{int(r.volume)}\n"
                            for ts, r in zip(bars.index, bars.itertuples())))
    result = ingest.main(load_config(None, [f"data.source={path}", f"data.output_dir={tmp_path / 'out'}"]))
    tags = mlflow.get_run(result.run_id).data.tags
    assert "BTC 03-24.Last.txt: a typical day moves" in tags["data.warnings"] and "ES prices" in tags["data.warnings"]
    quiet = ingest.main(load_config(None, [f"data.source={path}", f"data.output_dir={tmp_path / 'out'}",
                                           "env.instrument=MBT"]))
    assert "data.warnings" not in mlflow.get_run(quiet.run_id).data.tags  # the right contract: no warning
