from __future__ import annotations

import pytest

from conftest import ROOT
from mlproject.config import Config, ConfigError, load_config
from mlproject.instruments import resolve_instrument


def test_default_yaml_equals_embedded_defaults():
    assert load_config(ROOT / "conf" / "default.yaml") == Config()
    assert load_config(None) == Config()


def test_continuous_learning_seed_keys_and_defaults():
    cl = Config().continuous_learning
    assert (cl.retrain_frequency, cl.min_experiences, cl.evaluation_episodes) == (1000, 500, 10)
    assert (cl.min_annotated_for_finetune, cl.experience_buffer_size) == (100, 10000)
    assert cl.experience_storage == "data/experience_buffer"


def test_smoke_profile_is_tiny_and_valid():
    cfg = load_config(ROOT / "conf" / "smoke.yaml")
    assert cfg.data.synthetic.n_bars <= 5000
    assert resolve_instrument(cfg.env.instrument).symbol == "MES"


def test_overrides_are_typed_and_refine_presets():
    cfg = load_config(ROOT / "conf" / "default.yaml", ["env.window=16", "env.instrument.max_contracts=3",
                                                      "data.splits={train: 0.6, validation: 0.2, test: 0.2}"])
    assert cfg.env.window == 16
    spec = resolve_instrument(cfg.env.instrument)
    assert (spec.symbol, spec.max_contracts, spec.point_value) == ("ES", 3, 50.0)
    assert cfg.data.splits.train == 0.6
    assert resolve_instrument(load_config(None, ["env.instrument=NQ"]).env.instrument).point_value == 20.0


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nenv:\n  window: 8\n  windw: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line 4: key 'env\.windw': unknown key"):
        load_config(path)


def test_wrong_type_names_key_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("env:\n  window: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line 2: key 'env\.window': .*integer.*'many'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set env\.random_start: key 'env\.random_start'"):
        load_config(None, ["env.random_start=maybe"])


def test_bad_override_syntax_and_unknown_override_key():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["env.window"])
    with pytest.raises(ConfigError, match=r"--set data\.sorce: key 'data\.sorce': unknown key"):
        load_config(None, ["data.sorce=x.csv"])


def test_instrument_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown instrument preset 'ZZ'"):
        load_config(None, ["env.instrument=ZZ"])
    with pytest.raises(ConfigError, match="custom instrument needs point_value"):
        load_config(None, ["env.instrument={tick_size: 0.5}"])
    custom = load_config(None, ["env.instrument={symbol: X, tick_size: 0.5, point_value: 10, "
                                "commission_per_side: 1, slippage_ticks: 0, max_contracts: 2}"])
    assert resolve_instrument(custom.env.instrument).tick_value == 5.0


def test_split_fractions_must_sum_to_one(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("data:\n  splits: {train: 0.5, validation: 0.1, test: 0.1}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml line 2: key 'data\.splits'.*must be 1"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("env:\n  window: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml line \d+: not valid YAML"):
        load_config(path)


def test_flat_params_and_yaml_round_trip():
    cfg = load_config(None, ["env.window=8"])
    flat = cfg.flat()
    assert flat["env.window"] == 8 and flat["continuous_learning.min_experiences"] == 500
    import yaml

    from mlproject.config import config_from_dict

    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
