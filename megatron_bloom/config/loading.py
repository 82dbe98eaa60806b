"""Composing a run's config from `configs/` and command-line overrides into a typed `TrainConfig`."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_bloom.config.schema import TrainConfig
from megatron_bloom.errors import ConfigError, UserError
from megatron_bloom.model.config import ModelConfig

SCHEMA_NAME = "train_schema"
CONFIG_DIR_ENV = "MBLOOM_CONFIG_DIR"


def register_schemas() -> None:
    """Make the typed root schema known to Hydra; `configs/train.yaml` lists it first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def config_dir() -> Path:
    """`$MBLOOM_CONFIG_DIR`, else the source tree's `configs/`, else the copy installed under `share/`."""
    candidates = [
        os.environ.get(CONFIG_DIR_ENV),
        Path(__file__).resolve().parents[2] / "configs",
        Path(sys.prefix) / "share" / "megatron_bloom" / "configs",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train.yaml").is_file():
            return Path(candidate).resolve()
    raise UserError(
        "cannot find the config tree (configs/train.yaml): set MBLOOM_CONFIG_DIR to the project's configs/ "
        "directory, or install megatron_bloom with pip so that it is copied under share/megatron_bloom."
    )


def compose_dictconfig(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Hydra composition only (no validation beyond types); errors become one-paragraph `ConfigError`s."""
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_explain(error, overrides)) from None


def load_config(overrides: Sequence[str] = (), config_name: str = "train",
                model: Optional[ModelConfig] = None) -> TrainConfig:
    """Compose, resolve interpolations and validate: the `TrainConfig` a command runs with.

    `model`: the model of a checkpoint, which replaces the `model` section (evaluation and generation run
    the checkpoint's model, so the layout is checked against it); how it is computed (attention, fused
    kernels) stays the run's choice.
    """
    cfg = compose_dictconfig(overrides, config_name)
    if model is not None:
        cfg.model = OmegaConf.structured(model.with_runtime_choices(cfg.model))
    try:
        return OmegaConf.to_object(cfg)  # builds the dataclasses, which runs their __post_init__ checks
    except OmegaConfBaseException as error:
        raise ConfigError(_explain(error, overrides)) from None


def to_yaml(config: TrainConfig) -> str:
    """The fully resolved config as YAML (what a run writes to `run.dir/config.yaml`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


# Fragments of Hydra/OmegaConf messages that do not help here: the schema is typed, so "+key" cannot add
# a key, and the search path and object types are internals.
_NOISE = re.compile(r"To append to your config use \S+|Config search path:[\s\S]*$|full_key: \S+|"
                    r"(reference|object)_type=\S+")


def _explain(error: Exception, overrides: Optional[Sequence[str]]) -> str:
    message = str(error)
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause) and str(cause) not in message:
        message += " " + str(cause)
    message = " ".join(_NOISE.sub(" ", message).split())
    hint = ""
    if "not in" in message:
        hint = f" The keys of each section are defined in megatron_bloom/config/schema.py; see {config_dir()}."
    given = f" (overrides: {' '.join(overrides)})" if overrides else ""
    return f"invalid configuration{given}: {message}{hint}"


def available_presets(group: str) -> list:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
