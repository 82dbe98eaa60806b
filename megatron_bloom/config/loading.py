"""Composing a run's config from `configs/` and command-line overrides into a typed `TrainConfig`."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

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


def quoted_value(text: str) -> str:
    """`text` as a Hydra override value that reads back as exactly `text`: any script, commas, `=`, quotes,
    brackets, newlines. (Hydra's grammar escapes a backslash only before a quote or the closing quote, and
    OmegaConf reads `${` as an interpolation.)"""
    text = re.sub(r"(\\*)'", lambda match: match.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda match: match.group(1) * 2, text)
    return "'" + text.replace("${", "\\${") + "'"


def to_yaml(config: TrainConfig) -> str:
    """The fully resolved config as YAML (what a run writes to `run.dir/config.yaml`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


# Fragments of Hydra/OmegaConf messages that do not help here: the schema is typed, so "+key" cannot add
# a key, and the search path and object types are internals.
_NOISE = re.compile(r"To append to your config use \S+|Config search path:[\s\S]*$|full_key: \S+|"
                    r"(reference|object)_type=\S+")


def schema_fields(cls: type = TrainConfig, prefix: str = "") -> Iterator[Tuple[str, type, dataclasses.Field, bool]]:
    """Every field of the root config, depth first in the schema's order: (dotted key, the dataclass that
    declares it, the field, whether it is a section of its own). A section may extend another's dataclass
    (`train.eval_harness` is `eval.harness`'s and an interval): inherited fields are its base's."""
    hints = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            hints.update(inspect.get_annotations(base, eval_str=True))
    for item in dataclasses.fields(cls):
        section = dataclasses.is_dataclass(hints[item.name])
        owner = next(base for base in cls.__mro__ if item.name in inspect.get_annotations(base))
        yield prefix + item.name, owner, item, section
        if section:
            yield from schema_fields(hints[item.name], f"{prefix}{item.name}.")


@functools.lru_cache(maxsize=None)
def schema_keys() -> List[str]:
    """Every dotted key of the root config, sections (`train`) and leaves (`train.iters`), in schema order."""
    return [key for key, *_ in schema_fields()]


def unknown_keys(overrides: Sequence[str]) -> List[str]:
    """One sentence per override whose key the schema does not have, with the keys it may have meant."""
    known = schema_keys()
    sentences = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in known or "=" not in override:
            continue
        alike = [candidate for candidate in known if candidate.count(".") == key.count(".")]  # no section for a leaf
        close = difflib.get_close_matches(key, alike, n=3, cutoff=0.7)
        sentences.append(f"{key} is not a config key" + (f"; did you mean {' or '.join(close)}?" if close else "."))
    return sentences


def _explain(error: Exception, overrides: Optional[Sequence[str]]) -> str:
    unknown = unknown_keys(overrides or ())
    if unknown:
        return (f"invalid configuration: {' '.join(unknown)} The command's --help lists every key, with its "
                "default and meaning.")
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
