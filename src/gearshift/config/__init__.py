"""Typed configuration: schema, YAML loading, layered overrides, validation and audit."""

from gearshift.config.loader import (
    Layer,
    Resolved,
    build_layers,
    config_to_yaml,
    default_config_dict,
    load_config,
    parse_set_overrides,
    read_config_file,
    resolve,
    validate,
)
from gearshift.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    LoraConfig,
    ModelBuild,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainingConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "Layer",
    "LoggingConfig",
    "LoraConfig",
    "ModelBuild",
    "ModelConfig",
    "OptimConfig",
    "Resolved",
    "ScheduleConfig",
    "TrainingConfig",
    "build_layers",
    "config_to_yaml",
    "default_config_dict",
    "load_config",
    "parse_set_overrides",
    "read_config_file",
    "resolve",
    "validate",
]
