"""A model carries its own settings: evaluate and the gate build each model's observations from
them, compare models with different windows on the same windows, and say clearly (model
version, setting) when a model cannot run on the given bars."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from conftest import ROOT, fresh_store, run_module, visit_store
from mlproject.config import load_config
from mlproject.policy import ModelMismatch, find_module_dir, load_policy_model


@pytest.fixture(scope="module")
def two_windows(ray_session, tmp_path_factory):
    """nt8-agent v1 trained with the smoke profile (MES, window 16) and v2 with window 32, in a
    store of their own. Yields (store uri, cfg16, cfg32, folder)."""
    from pipelines import train

    tmp = tmp_path_factory.mktemp("two_windows")
    cfg16 = load_config(ROOT / "conf" / "smoke.yaml", ["train.iterations=1", f"promotion.deploy_dir={tmp / 'deploy'}"])
    cfg32 = load_config(ROOT / "conf" / "smoke.yaml", ["train.iterations=1", "env.window=32",
                                                      f"promotion.deploy_dir={tmp / 'deploy'}"])
    with fresh_store(tmp) as uri:
        assert train.main(cfg16).registered_version == "1"
        assert train.main(cfg32).registered_version == "2"
    yield uri, cfg16, cfg32, tmp


@pytest.fixture
def store(two_windows, monkeypatch):
    yield from visit_store(monkeypatch, two_windows[0], two_windows[3], two_windows)


def test_logged_policy_records_its_settings(store):
    from mlproject.registry import model_id_of

    policy = load_policy_model("models:/nt8-agent/1")
    s = policy.settings
    assert policy.label == "nt8-agent v1"
    assert (s.window, s.vol_window, s.norm_window, s.max_contracts) == (16, 20, 100, 2)
    assert s.features == ("ret_z", "range_z", "volume_z", "tod_sin", "tod_cos") and s.feature_set_version == 1
    assert s.instrument["symbol"] == "MES" and s.instrument["point_value"] == 5.0
    assert s.bar_period == "0 days 00:01:00" and s.obs_size == 16 * 5 + 2 == policy.input_size
    # Visible in the UI: the MLmodel file's metadata and the logged model's params.
    info = mlflow.models.get_model_info("models:/nt8-agent/1")
    assert info.metadata["nt8_policy"]["window"] == 16
    reference = info.metadata["nt8_feature_reference"]  # the training bars' features: the bridge's ood guard
    assert reference["features"] == ["ret_z", "range_z", "volume_z"] and all(v > 0 for v in reference["scale"])
    assert reference["n_bars"] > 100 and all(abs(m) < 3 for m in reference["median"])
    params = mlflow.get_logged_model(model_id_of("models:/nt8-agent/1")).params
    assert params["policy.window"] == "16" and params["policy.instrument.symbol"] == "MES"
    assert load_policy_model("models:/nt8-agent/2").settings.window == 32


def test_window_16_and_32_models_compare_on_the_same_windows(store):
    """Evaluated with either config, both models run on their own windows over the same bars
    and trading windows (the first window starts after the longest history either needs)."""
    from mlproject.evaluation import backtest, default_bars, evaluate_policies, policy_env_config

    _, cfg16, cfg32, _ = store
    policies = [load_policy_model("models:/nt8-agent/1"), load_policy_model("models:/nt8-agent/2")]
    bars = default_bars(cfg32)
    for cfg in (cfg16, cfg32):
        result = evaluate_policies(policies, bars, cfg)
        assert result.first_bar == 32
        r16, r32 = (result.reports[p.uri] for p in policies)
        for w16, w32, flat in zip(r16.windows, r32.windows, result.baselines["flat"].windows):
            assert w16.equity.index.equals(w32.equity.index) and w16.equity.index.equals(flat.equity.index)
    # v1 really saw window-16 observations: the same as a backtest built from its own settings.
    env16 = policy_env_config(policies[0], cfg32.env, bars)
    assert env16["window"] == 16 and env16["instrument"]["max_contracts"] == 2
    direct = backtest(policies[0].predict, bars, env16, cfg32.continuous_learning.evaluation_episodes, first_bar=32)
    np.testing.assert_array_equal(direct.returns(), r16.returns())


def test_promote_compares_models_with_different_windows(store):
    from pipelines import promote

    _, cfg16, cfg32, _ = store
    first = promote.main(cfg32, "1")  # window-16 candidate under a window-32 config: no schema error
    assert first.decision == "promoted"
    second = promote.main(cfg16, "2")  # window-32 candidate against the window-16 Production
    # Seeded, so pinned: compared on the same windows, the window-32 model is not shown better.
    assert second.decision == "refused" and len(second.reasons) == 3
    assert second.reasons[0].startswith("PSR vs Production's Sharpe 0.29")
    assert second.reasons[1:] == ["Deflated Sharpe vs Production 0.178 < min_dsr 0.5 (2 candidates tried for this model)",
                                  "beat Production in 1 of 3 evaluation windows, < min_window_share 0.6"]
    assert "gate/psr" in second.metrics and second.metrics["gate/trials"] == 2.0
    run = mlflow.get_run(second.run_id)
    assert run.data.params["eval.first_bar"] == "32" and float(run.data.params["periods_per_year"]) > 0


def test_a_model_on_another_instrument_is_named_with_the_setting(store):
    from mlproject.evaluation import default_bars, evaluate_policies

    _, cfg16, _, _ = store
    es = cfg16.model_copy(update={"env": cfg16.env.model_copy(update={"instrument": load_config(
        None, ["env.instrument=ES"]).env.instrument})})
    with pytest.raises(ModelMismatch, match=r"nt8-agent v1 trades MES .* configured as ES .* by env\.instrument"):
        evaluate_policies([load_policy_model("models:/nt8-agent/1")], default_bars(es), es)


def test_a_candidate_that_cannot_run_here_is_an_error_and_marked_refused(store):
    """The error names the version and the setting; the version is tagged refused (cleanup takes
    it first) instead of staying an ordinary registered version."""
    from pipelines import promote

    _, cfg16, _, _ = store
    es = cfg16.model_copy(update={"env": cfg16.env.model_copy(update={"instrument": load_config(
        None, ["env.instrument=ES"]).env.instrument})})
    with pytest.raises(ModelMismatch, match=r"nt8-agent v2 trades MES"):
        promote.main(es, "2")
    tags = mlflow.MlflowClient().get_model_version("nt8-agent", "2").tags
    assert tags["gate.decision"] == "refused" and "cannot run on these bars" in tags["gate.reasons"]
    assert mlflow.get_run(tags["gate.run_id"]).data.tags["decision"] == "refused"


def test_a_model_on_another_bar_period_is_named_with_the_setting(store):
    from mlproject.data import synthetic_bars
    from mlproject.evaluation import evaluate_policies

    _, cfg16, _, _ = store
    five = synthetic_bars(1500, seed=2, bar_minutes=5)
    with pytest.raises(ModelMismatch, match=r"nt8-agent v1 was trained on 1min bars; the bars of .* are 5min bars"):
        evaluate_policies([load_policy_model("models:/nt8-agent/1")], five, cfg16)


def test_too_few_bars_for_a_model_names_the_model_and_its_window(store):
    from mlproject.evaluation import default_bars, evaluate_policies

    _, cfg16, _, _ = store
    short = default_bars(cfg16).iloc[:45]  # enough for window 16 (20 + 1 + 2*3 = 27), not for 32
    policies = [load_policy_model("models:/nt8-agent/1"), load_policy_model("models:/nt8-agent/2")]
    evaluate_policies(policies[:1], short, cfg16)
    with pytest.raises(ModelMismatch, match=r"nt8-agent v2 needs at least 39 bars: 32 bars of history \(window=32, "
                                            r"vol_window=20\) and 3 evaluation windows .* has 38"):
        evaluate_policies(policies, short.iloc[:38], cfg16)


def test_promote_cli_on_another_config_says_what_differs(store):
    """The issue's case: a smoke-trained version promoted with the default config. No MLflow
    schema dump: an error naming the version and the setting, and with the instrument set
    right the window-16 model is evaluated under the window-32 default config."""
    uri, _, _, folder = store
    out = run_module(["python", "-m", "pipelines.promote", "--candidate", "2", "--dry-run"], cwd=folder,
                     env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "nt8-agent v2 trades MES" in out.stderr and "env.instrument" in out.stderr
    assert "Failed to enforce schema" not in out.stderr and "Traceback" not in out.stderr
    ok = run_module(["python", "-m", "pipelines.promote", "--candidate", "2", "--dry-run", "--set", "env.instrument=MES",
                     "--set", "env.instrument.max_contracts=2", "--set", "data.synthetic.n_bars=3000"], cwd=folder,
                    env={"MLFLOW_TRACKING_URI": uri})
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_model_without_settings_is_checked_by_its_input_size(store, tmp_path):
    """Models logged before settings were recorded: the config's window must make their input."""
    from mlproject.evaluation import default_bars, evaluate_policies
    from mlproject import training

    _, cfg16, cfg32, _ = store
    run_id = mlflow.MlflowClient().get_model_version("nt8-agent", "1").run_id
    ckpt = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/checkpoint", dst_path=str(tmp_path))
    bars = default_bars(cfg16)
    with mlflow.start_run():
        example = training.example_observations(bars, cfg16, 4)
        legacy = training.log_policy_model(find_module_dir(tmp_path / "checkpoint"), example, None).model_uri
    policy = load_policy_model(legacy)
    assert policy.settings is None and policy.input_size == 82
    evaluate_policies([policy], bars, cfg16)  # the config that trained it: fine
    with pytest.raises(ModelMismatch, match=r"records no settings .* takes 82 observation values; env.window=32 "
                                            r"makes 162: evaluate it with --set env.window=16"):
        evaluate_policies([policy], bars, cfg32)
    assert ckpt


def test_a_model_is_backtested_with_the_feature_set_it_recorded(small_bars):
    """A multi_timeframe model (feature set v2) runs with its own set under a base config, its
    observations the size it takes; a set this code does not compute is refused by name."""
    import dataclasses

    from mlproject.config import EnvConfig
    from mlproject.evaluation import backtest, policy_env_config
    from mlproject.policy import LoadedPolicy, PolicySettings

    settings = PolicySettings.from_env(EnvConfig(window=4, feature_set="multi_timeframe"), small_bars)
    seen = []

    def predict(obs):
        seen.append(obs.shape[1])
        return np.full(len(obs), 1, np.int64)

    policy = LoadedPolicy("runs:/x/model", "model x", settings, settings.obs_size, predict)
    played = policy_env_config(policy, load_config(None).env, small_bars)
    assert (played["feature_set"], played["window"]) == ("multi_timeframe", 4)
    backtest(policy.predict, small_bars, played, 2)
    assert set(seen) == {4 * 5 + 3 + 2}
    unknown = LoadedPolicy("runs:/y/model", "model y", dataclasses.replace(settings, feature_set_version=3),
                           settings.obs_size, predict)
    with pytest.raises(ModelMismatch, match=r"model y was trained on feature set v3 .*this code computes base v1"):
        policy_env_config(unknown, load_config(None).env, small_bars)
