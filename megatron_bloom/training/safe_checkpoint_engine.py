"""DeepSpeed's own checkpoint loads (an exact resume: model states, ZeRO partitions, pipeline layers) made
safe: DeepSpeed reads every file through its engine's checkpoint engine, whose `load` unpickles with
weights_only=False. Ours reads with weights_only=True and allows, by name, only the few DeepSpeed classes
its files hold (`fence/deepspeed.py`'s FILE_TYPES); saving stays DeepSpeed's."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from megatron_bloom.checkpoint.safe_load import load_checkpoint_file
from megatron_bloom.fence.deepspeed import FILE_TYPES, wrap_checkpoint_engine


def _deepspeed_class(qualified_name: str):
    module, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module), name)


# What DeepSpeed's optimizer files pickle besides tensors and plain values (a ZeRO stage, the addresses of
# parameter fragments, a loss scaler): resuming needs them as DeepSpeed's own objects.
DEEPSPEED_FILE_CLASSES = tuple((_deepspeed_class(name), name) for name in FILE_TYPES)


class SafeCheckpointLoads:
    """The engine's checkpoint engine with `load` reading safely; everything else is passed through."""

    def __init__(self, checkpoint_engine) -> None:
        self._wrapped = checkpoint_engine

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_checkpoint_file(Path(path), allowed=DEEPSPEED_FILE_CLASSES, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


def make_checkpoint_loads_safe(engine) -> None:
    """Route every checkpoint file DeepSpeed's `engine` loads through the safe reader."""
    wrap_checkpoint_engine(engine, lambda wrapped: wrapped if isinstance(wrapped, SafeCheckpointLoads)
                           else SafeCheckpointLoads(wrapped))
