"""What a user of ``pipelines.evaluate`` hits: a model whose window differs from the config's
(the demo's window-16 models under the default window-32 config), and the x axis of the
evaluation chart."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlproject.config import load_config


def _policy(env_overrides: list[str], bars: pd.DataFrame, seed: int = 0):
    """A ``LoadedPolicy`` as evaluation loads one, trained with ``env_overrides`` on ``bars``: a
    numpy rule on its observations (no torch: seconds matter) that checks it is given
    observations of its own window."""
    from mlproject.instruments import resolve_instrument
    from mlproject.policy import LoadedPolicy, PolicySettings

    env = load_config(None, env_overrides).env
    settings = PolicySettings.from_env(env, bars)
    flat = resolve_instrument(env.instrument).max_contracts

    def predict(obs: np.ndarray) -> np.ndarray:
        assert obs.shape[1] == settings.obs_size, f"window-{settings.window} model given {obs.shape[1]} values"
        return np.where(obs[:, -7] > 0, flat + 1, flat - 1).astype(np.int64)  # with the last bar's return

    return LoadedPolicy(f"models:/nt8-agent/{seed}", f"nt8-agent v{seed}", settings, settings.obs_size, predict)


def test_a_model_with_a_shorter_window_than_the_config_is_evaluated_with_its_baselines(small_bars):
    """The demo trains window-16 models; evaluating one under the default config (window 32)
    starts the windows after the model's history (bar 20 = its vol_window), and flat and
    buy-and-hold, which read no observations, are played on those same windows with the
    config's account: the same results as with the model's window."""
    from mlproject.evaluation import baselines, evaluate_policies

    bars = small_bars.iloc[:1200]  # two sessions and a half: 10 windows of 100+ bars
    cfg = load_config(None, ["env.instrument=MES"])
    assert (cfg.env.window, cfg.env.vol_window) == (32, 20)
    policy = _policy(["env.instrument=MES", "env.window=16"], bars, seed=1)
    result = evaluate_policies([policy], bars, cfg)
    assert result.first_bar == 20
    report = result.reports[policy.uri]
    assert len(report.windows) == cfg.continuous_learning.evaluation_episodes
    for name in ("flat", "buy_hold"):
        for model_w, base_w in zip(report.windows, result.baselines[name].windows, strict=True):
            assert model_w.equity.index.equals(base_w.equity.index)
    assert result.baselines["flat"].summary()["total_return"] == 0.0
    with_16 = baselines(bars, {**cfg.env.model_dump(), "window": 16}, len(report.windows), first_bar=20)
    for a, b in zip(result.baselines["buy_hold"].windows, with_16["buy_hold"].windows, strict=True):
        pd.testing.assert_series_equal(a.equity, b.equity)
    # A longer-window model still sets the start for everyone, models and baselines alike.
    longer = _policy(["env.instrument=MES", "env.window=40"], bars, seed=2)
    both = evaluate_policies([policy, longer], bars, cfg)
    assert both.first_bar == 40
    starts = {r.windows[0].equity.index[0] for r in (*both.reports.values(), *both.baselines.values())}
    assert starts == {bars.index[40]}


def test_compressed_x_gives_a_session_gap_one_bar_of_room():
    """Overnight (17.5 h) and weekend gaps take one bar on the chart's x axis; a missing minute
    inside a session keeps its two minutes; the gaps are where the lines break."""
    from mlproject.reporting import broken_line, compressed_x, session_gaps

    times = pd.to_datetime(["2024-01-04 15:58", "2024-01-04 15:59", "2024-01-05 09:30", "2024-01-05 09:31",
                            "2024-01-05 09:33", "2024-01-05 09:34", "2024-01-08 09:30", "2024-01-08 09:31"])
    x = compressed_x(pd.DatetimeIndex(times))
    assert x.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert np.diff(x).max() <= 2 and np.diff(x)[[1, 5]].tolist() == [1, 1]  # the gaps: one bar each
    gaps = session_gaps(pd.DatetimeIndex(times))
    assert gaps.tolist() == [False, False, True, False, False, False, True, False]
    bx, by = broken_line(x, np.arange(8.0), gaps)
    assert np.isnan(by).tolist() == [False, False, True, False, False, False, False, True, False, False]
    assert bx[2] == 1.5 and np.all(np.diff(bx) > 0)
    assert compressed_x(pd.DatetimeIndex([])).tolist() == []
    assert compressed_x(pd.DatetimeIndex(times[:1])).tolist() == [0]


def test_evaluate_as_the_readme_says_after_the_demo(trained_store, tmp_path):
    """``python -m pipelines.evaluate --model-uri models:/nt8-agent/N --set env.instrument=MES``
    (the default config, window 32) on a model the smoke profile trained (window 16): it runs,
    logs the baselines and the chart, and the windows start after the model's 20 bars."""
    import time

    import mlflow

    from conftest import run_module

    uri, result, _, _ = trained_store
    model, started = f"models:/nt8-agent/{result.registered_version}", int(time.time() * 1000)
    out = run_module(["python", "-m", "pipelines.evaluate", "--model-uri", model, "--set", "env.instrument=MES"],
                     cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stderr[-3000:]
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.model_uri = '{model}' and attributes.start_time >= {started}")
    assert run.data.params["eval.first_bar"] == "20"
    assert "baseline/buy_hold/total_return" in run.data.metrics
    assert "eval/equity_drawdown.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "eval")}
