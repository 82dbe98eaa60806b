"""Run configuration: typed sections (`schema`) composed by Hydra from `configs/` (`loading`)."""

from megatron_bloom.config.loading import available_presets, compose_dictconfig, config_dir, load_config, to_yaml
from megatron_bloom.config.schema import TrainConfig

__all__ = ["TrainConfig", "available_presets", "compose_dictconfig", "config_dir", "load_config", "to_yaml"]
