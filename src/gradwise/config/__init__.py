"""The validated config tree (`schema`) and how it is loaded (`loading`); see docs/config.md.

    cfg = load_config("run.yaml", ["optim.lr=0.01", "train.steps=200"])
"""

from gradwise.config.loading import (apply_overrides, flatten, load_config, parse_override, read_yaml, validate,
                                     yaml_load)
from gradwise.config.schema import (
    Config,
    DataConfig,
    DiagnosticsConfig,
    EarlyStoppingConfig,
    LogConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    PSConfig,
    RegularizeConfig,
    ScalerConfig,
    ScheduleConfig,
    TrainConfig,
    parse_bytes,
)

__all__ = ["Config", "DataConfig", "DiagnosticsConfig", "EarlyStoppingConfig", "LogConfig", "MemoryConfig",
           "ModelConfig", "OptimConfig", "PSConfig", "RegularizeConfig", "ScalerConfig", "ScheduleConfig",
           "TrainConfig", "apply_overrides", "flatten", "load_config", "parse_bytes", "parse_override", "read_yaml",
           "validate", "yaml_load"]
