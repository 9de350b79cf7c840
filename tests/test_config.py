from __future__ import annotations

import pytest
import yaml

from conftest import ROOT
from mlproject.config import Config, ConfigError, flatten, load_config
from mlproject.instruments import resolve_instrument

DELIBERATE_DEFAULTS = {
    "env.instrument.preset": "so that --set env.instrument.<field>=... refines ES: an instrument given "
                             "by --set fields alone is a custom contract that must give every field",
}
"""Keys conf/default.yaml sets to their schema default on purpose, and why."""


def test_default_yaml_holds_only_overrides_and_deliberate_defaults():
    """The schema is the one home of the defaults: conf/default.yaml sets a key only to change it,
    or to its default for a reason listed in DELIBERATE_DEFAULTS (a copied default drifts)."""
    path = ROOT / "conf" / "default.yaml"
    written, defaults = flatten(yaml.safe_load(path.read_text()) or {}), Config().flat()
    copies = sorted(k for k, v in written.items() if defaults.get(k) == v and k not in DELIBERATE_DEFAULTS)
    assert not copies, f"conf/default.yaml repeats schema defaults (docs/configuration.md lists them): {copies}"
    assert set(DELIBERATE_DEFAULTS) <= set(written)
    loaded = load_config(path).flat()
    assert {k for k in defaults if loaded[k] != defaults[k]} == set(written) - set(DELIBERATE_DEFAULTS)
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


def test_floats_without_a_dot_are_numbers_in_files_and_overrides(tmp_path):
    """1e-4 is a number (YAML 1.2), not the string PyYAML's YAML 1.1 makes of it, which the strict
    schema refused: --set train.lr=1e-4 was an error. 6E stays an instrument."""
    conf = tmp_path / "lr.yaml"
    conf.write_text("train:\n  lr: 5e-5\nenv:\n  instrument: 6E\n")
    cfg = load_config(conf, ["train.entropy_coeff=1E-3"])
    assert (cfg.train.lr, cfg.train.entropy_coeff, cfg.env.instrument.preset) == (5e-5, 1e-3, "6E")
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4


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
    with pytest.raises(ConfigError, match="incomplete custom instrument: tick_size given, missing point_value"):
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


NT8_SYMBOLS = ("ES MES NQ MNQ YM MYM RTY M2K CL MCL NG GC MGC SI HG ZB ZN ZF 6E 6J 6B 6A 6C BTC MBT").split()


@pytest.mark.parametrize("symbol", NT8_SYMBOLS)
def test_presets_for_the_contracts_nt8_users_trade(symbol):
    spec = resolve_instrument(load_config(None, [f"env.instrument={symbol}"]).env.instrument)
    assert spec.symbol == symbol and spec.tick_size > 0 and spec.point_value > 0
    assert 0 < spec.commission_per_side * 2 <= 20  # a typical round turn, in USD


def test_preset_tick_values_match_the_exchange_specs():
    """Hand-checked money per tick (CME Group contract specs)."""
    from mlproject.instruments import PRESETS

    expected = {"ES": 12.5, "MES": 1.25, "NQ": 5.0, "MNQ": 0.5, "YM": 5.0, "MYM": 0.5, "RTY": 5.0, "M2K": 0.5,
                "CL": 10.0, "MCL": 1.0, "NG": 10.0, "GC": 10.0, "MGC": 1.0, "SI": 25.0, "HG": 12.5, "ZB": 31.25,
                "ZN": 15.625, "ZF": 7.8125, "6E": 6.25, "6J": 6.25, "6B": 6.25, "6A": 5.0, "6C": 5.0, "BTC": 25.0,
                "MBT": 0.5}
    assert set(PRESETS) == set(expected)
    for symbol, tick_value in expected.items():
        assert PRESETS[symbol].tick_value == pytest.approx(tick_value), symbol


def test_partial_instrument_without_preset_is_an_error_naming_the_missing_fields():
    """--set env.instrument.symbol=6E --set env.instrument.tick_size=... used to keep ES's point value."""
    with pytest.raises(ConfigError, match=r"--set env\.instrument.*symbol, tick_size given, missing point_value, "
                                          r"commission_per_side, slippage_ticks, max_contracts; give every field or "
                                          r"preset: 6E"):
        load_config(None, ["env.instrument.symbol=6E", "env.instrument.tick_size=0.00005"])
    with pytest.raises(ConfigError, match="missing tick_size"):
        load_config(None, ["env.instrument.max_contracts=2"])  # the default ES is not a silent base
    refined = load_config(None, ["env.instrument.preset=6E", "env.instrument.max_contracts=2"])
    spec = resolve_instrument(refined.env.instrument)
    assert (spec.symbol, spec.point_value, spec.max_contracts) == ("6E", 125000.0, 2)


def test_partial_instrument_in_a_file_is_an_error_with_its_line(tmp_path):
    path = tmp_path / "fx.yaml"
    path.write_text("env:\n  window: 8\n  instrument:\n    symbol: EURUSD\n    tick_size: 0.00005\n")
    with pytest.raises(ConfigError, match=r"fx\.yaml line 3: key 'env\.instrument': incomplete custom instrument"):
        load_config(path)
    path.write_text("env:\n  instrument: {preset: ES, symbol: NQ}\n")
    with pytest.raises(ConfigError, match="use preset: NQ"):
        load_config(path)


def test_another_symbol_on_a_files_preset_must_give_every_field(tmp_path):
    """The file names preset ES; --set symbol=EURUSD and a tick size used to keep ES's point value."""
    path = tmp_path / "conf.yaml"
    path.write_text("env:\n  instrument: {preset: ES}\n")
    with pytest.raises(ConfigError, match=r"symbol 'EURUSD' is not ES .* would keep ES's point_value, "
                                          r"commission_per_side, slippage_ticks, max_contracts"):
        load_config(path, ["env.instrument.symbol=EURUSD", "env.instrument.tick_size=0.00005"])
    month = load_config(path, ["env.instrument.symbol=ES 12-24"])  # a contract month of the preset
    assert resolve_instrument(month.env.instrument).point_value == 50.0
    full = load_config(path, ["env.instrument.symbol=EURUSD", "env.instrument.tick_size=0.00005",
                              "env.instrument.point_value=100000", "env.instrument.commission_per_side=2",
                              "env.instrument.slippage_ticks=1", "env.instrument.max_contracts=1"])
    assert resolve_instrument(full.env.instrument).point_value == 100000.0


@pytest.mark.parametrize("override, message", [
    ("promotion.metric=sharp", r"key 'promotion\.metric': Input should be 'sharpe', 'sortino'"),
    ("train.val_metric=sortino_ratio", r"key 'train\.val_metric': Input should be"),
    ("train.activation=gelu", r"key 'train\.activation': Input should be 'tanh', 'relu' or 'silu'"),
    ("data.tick_period=5 minutes", r"key 'data\.tick_period': tick_period '5 minutes' is not a pandas offset"),
    ("data.tz=Mars/Olympus", r"key 'data\.tz': tz 'Mars/Olympus' is not an IANA time zone"),
    ("bridge.timezone=EST5", r"key 'bridge\.timezone': timezone 'EST5' is not an IANA time zone"),
    ("mlflow.experiment=", r"key 'mlflow\.experiment'"),
])
def test_fixed_choices_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
