"""Asynchronous checkpoint writes (`checkpoint.async_save=true`), through DeepSpeed's checkpoint-engine
interface: DeepSpeed hands every file of a save to its engine's `save(state_dict, path)`; ours copies the
state to host memory there and then, and one background thread writes and fsyncs the files while training
goes on (torch.save of the copy; the live tensors may change as soon as `save` returns).

Publishing is unchanged (checkpoint/layout.py): the files go to the hidden staging directory, and rank 0
moves `latest` only after every rank reports its files written (training/checkpointing.py's `PendingSave`),
so a kill at any moment of an async save leaves the previous complete checkpoint in place.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, List

import torch

from megatron_bloom.checkpoint.layout import fsync_file


def host_snapshot(value: Any) -> Any:
    """`value` with every tensor copied to (pinned, on CUDA) host memory: what the save will write."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return value.detach().clone()
        copy = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        copy.copy_(value.detach(), non_blocking=True)
        return copy
    if isinstance(value, dict):
        return type(value)((key, host_snapshot(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(host_snapshot(item) for item in value)
    return value


def write_file(state: Any, path: str) -> None:
    """torch.save, then fsync: a file reported written survives a crash of the machine."""
    torch.save(state, path)
    fsync_file(Path(path))


def lower_priority() -> None:
    """The writer thread yields the cores to training: on Linux a thread has its own nice value."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class AsyncCheckpointWrites:
    """A DeepSpeed checkpoint engine whose `save` returns once the state is on the host; loads and the rest
    go to the engine it wraps."""

    def __init__(self, checkpoint_engine) -> None:
        self._wrapped = checkpoint_engine
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mbloom-checkpoint-writer",
                                          initializer=lower_priority)
        self._writes: List[Future] = []

    def save(self, state_dict: Any, path: str) -> None:
        snapshot = host_snapshot(state_dict)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies to pinned memory have landed
        self._writes.append(self._writer.submit(write_file, snapshot, path))

    def save_file(self, state: Any, path: str) -> None:
        """A file of our own (a rank's RNG state) in the same queue."""
        self.save(state, path)

    def written(self) -> bool:
        """Whether every file given so far is on disk (raises the first write's error, if one failed)."""
        if all(write.done() for write in self._writes):
            self.wait()
            return True
        return False

    def wait(self) -> None:
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)
