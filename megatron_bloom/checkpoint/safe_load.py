"""Reading checkpoint files without running code from them.

Users receive checkpoints from anywhere, and unpickling a file can run any code the file names. So every
`.pt`/`.bin` file is read with `torch.load(weights_only=True)`: tensors, numbers, strings and containers,
plus the few other types each reader allows by name. DeepSpeed pickles three of its own objects into its
files (a ZeRO stage enum, fragment addresses, a loss scaler). Readers that only want the tensors read
those as inert records of their fields; DeepSpeed's own resume allows its real classes
(`training/safe_checkpoint_engine.py`). A file that names any other type is refused: one paragraph that
names the file and the type.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Callable, Sequence, Tuple, Union

import torch

from megatron_bloom.errors import UserError
from megatron_bloom.fence.deepspeed import FILE_TYPES

AllowedGlobal = Union[Callable, Tuple[Callable, str]]


class DeepSpeedRecord:
    """A DeepSpeed object from a checkpoint file, read as its fields only (a fragment address's `start` and
    `numel`, a loss scaler's `cur_scale`): no DeepSpeed code is involved."""


def _enum_value(value):
    """A DeepSpeed enum member from a file, read as its plain value (ZeRO's stage: an int)."""
    return value


# The globals DeepSpeed's checkpoint files name (`fence/deepspeed.py`), each read as an inert stand-in: enums
# as their value, the rest as records. DeepSpeed's own resume allows the real classes of the same names
# (training/safe_checkpoint_engine.py).
DEEPSPEED_RECORDS: Sequence[AllowedGlobal] = tuple(
    (_enum_value if name.endswith("Enum") else DeepSpeedRecord, name) for name in FILE_TYPES)


class UnsafeCheckpointFile(UserError):
    """A checkpoint file names a type that reading it would have to import and run."""


def load_checkpoint_file(path: Path, allowed: Sequence[AllowedGlobal] = DEEPSPEED_RECORDS,
                         map_location: Any = "cpu") -> Any:
    """`torch.load(path)` with weights_only=True, `allowed` added to torch's safe types."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise unsafe_file_error(path, error) from None


def unsafe_file_error(path: Path, error: Exception) -> UnsafeCheckpointFile:
    """The one-paragraph refusal of `path`, naming the type torch's safe unpickler stopped at."""
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"the type {named.group(1)}" if named else "an object that is not a tensor or plain data"
    return UnsafeCheckpointFile(
        f"{path} holds {what}, which a checkpoint file has no reason to hold. It was not loaded: unpickling it "
        "could run code from the file. Checkpoints written by megatron_bloom and DeepSpeed hold tensors and "
        "plain values only; get this one again from its source, or re-save its tensors alone.")
