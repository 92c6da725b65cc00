"""Pipeline configuration: schema (`schema.py`) and loading with overrides (`load.py`)."""

from posttrain.config.load import (
    ConfigError,
    apply_override,
    dump_config,
    load_config,
    validate_config,
)
from posttrain.config.schema import (
    DataConfig,
    EvalConfig,
    GRPOStage,
    ModelConfig,
    PipelineConfig,
    RewardSpec,
    RolloutConfig,
    SFTStage,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GRPOStage",
    "ModelConfig",
    "PipelineConfig",
    "RewardSpec",
    "RolloutConfig",
    "SFTStage",
    "apply_override",
    "dump_config",
    "load_config",
    "validate_config",
]
