"""Typed, validated run configuration.

One :class:`Config` per run, loaded from ``conf/*.yaml`` with command-line overrides on top
(``--set env.instrument=NQ``): the schema in :mod:`mlproject.config.schema`, the loading and the
error messages (key, file, line) in :mod:`mlproject.config.loading`.
"""

from mlproject.config.loading import config_from_dict, describe_validation_error, load_config
from mlproject.config.base import ConfigError
from mlproject.config.live import BridgeConfig, MonitoringConfig
from mlproject.config.schema import (
    AnnotationConfig,
    Config,
    ContinuousLearningConfig,
    DataChecksConfig,
    DataConfig,
    EnvConfig,
    GateMetric,
    InstrumentConfig,
    MlflowConfig,
    PromotionConfig,
    SplitConfig,
    SyntheticConfig,
    TrainConfig,
    flatten,
)
from mlproject.config.values import parse_duration

__all__ = ["AnnotationConfig", "BridgeConfig", "Config", "ConfigError", "ContinuousLearningConfig", "DataChecksConfig", "DataConfig", "EnvConfig",
           "GateMetric", "InstrumentConfig", "MlflowConfig", "MonitoringConfig", "PromotionConfig", "SplitConfig", "SyntheticConfig",
           "TrainConfig", "config_from_dict", "describe_validation_error", "flatten", "load_config", "parse_duration"]
