"""Asynchronous checkpoint writes (`checkpoint.async_save=true`), through DeepSpeed's checkpoint-engine
interface: DeepSpeed hands every file of a save to its engine's `save(state_dict, path)`. Ours copies the
file's tensors into a shared-memory staging buffer there and then, and a writer process of the rank's own
does `torch.save` and fsync while training goes on (the live tensors may change as soon as `save` returns).

Why a process, not a thread: torch.save holds the GIL for much of its work, so a writer thread slows every
Python step of training (measured: a spinning thread ran at 0.43 of its speed during a save); the writer
process also runs at nice 19 and so takes only the cores training leaves idle. Why reused buffers: copying
into memory already mapped costs a memcpy, where a fresh copy also pays a page fault per 4 kB (0.06 s
against 0.35 s for 640 MB here). At most one save is in flight, so a buffer is free again once its file is
written; the buffers settle at one host copy of the rank's checkpoint files.

Publishing is unchanged (checkpoint/layout.py): the files go to the hidden staging directory, and rank 0
moves `latest` only after every rank reports its files written (training/checkpointing.py's `PendingSave`),
so a kill at any moment of an async save leaves the previous complete checkpoint in place. The writer dies
with its rank (a kill -9 of the rank leaves an unpublished staging dir, nothing else).
"""

from __future__ import annotations

import math
import os
import pickle
import queue
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.multiprocessing

from megatron_bloom.checkpoint.layout import fsync_file
from megatron_bloom.parallel.distributed import die_with_parent

ALIGNMENT = 64  # bytes: every staged tensor starts on a cache line, so any dtype can view it
WRITER_POLL_S = 5.0  # how often a wait for the writer checks that it is still alive


@dataclass(frozen=True)
class StagedTensor:
    """Where a tensor of a file lies in the file's staging buffer (what the writer process is sent)."""
    offset: int
    dtype: torch.dtype
    shape: Tuple[int, ...]


def _map_tensors(value: Any, fn: Callable[[Any], Any], leaf_type: type) -> Any:
    """`value` with every `leaf_type` inside its dicts, lists and tuples replaced by `fn(leaf)`."""
    if isinstance(value, leaf_type):
        return fn(value)
    if isinstance(value, dict):
        return type(value)((key, _map_tensors(item, fn, leaf_type)) for key, item in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_map_tensors(item, fn, leaf_type) for item in value)
    return value


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def staged_size(state: Any) -> int:
    """The bytes `StagingBuffer.stage` needs for `state`."""
    sizes: List[int] = []
    _map_tensors(state, lambda tensor: sizes.append(_aligned(tensor.numel() * tensor.element_size())), torch.Tensor)
    return sum(sizes)


class StagingBuffer:
    """Shared memory (pinned for the GPU's copies on CUDA) that one file's tensors are copied into."""

    def __init__(self, nbytes: int) -> None:
        self.bytes = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        self.pinned = torch.cuda.is_available() and torch.cuda.cudart().cudaHostRegister(
            self.bytes.data_ptr(), nbytes, 0) == 0

    @property
    def nbytes(self) -> int:
        return self.bytes.numel()

    def stage(self, state: Any) -> Any:
        """Copy `state`'s tensors in; returns `state` with a `StagedTensor` in place of each."""
        offset = 0

        def copy_in(tensor: torch.Tensor) -> StagedTensor:
            nonlocal offset
            nbytes = tensor.numel() * tensor.element_size()
            staged = StagedTensor(offset, tensor.dtype, tuple(tensor.shape))
            if nbytes:
                view = self.bytes[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
                view.copy_(tensor.detach(), non_blocking=self.pinned)
            offset += _aligned(nbytes)
            return staged

        return _map_tensors(state, copy_in, torch.Tensor)

    def release(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())


def unstage(skeleton: Any, staged_bytes: torch.Tensor) -> Any:
    """The writer's side of `StagingBuffer.stage`: each tensor a view of the shared memory with a storage of
    its own (so torch.save writes each tensor's bytes, not the whole buffer), nothing copied."""
    memory = staged_bytes.numpy()

    def view(staged: StagedTensor) -> torch.Tensor:
        numel = math.prod(staged.shape)
        if numel == 0:
            return torch.empty(staged.shape, dtype=staged.dtype)
        return torch.frombuffer(memory, dtype=staged.dtype, count=numel, offset=staged.offset).view(staged.shape)

    return _map_tensors(skeleton, view, StagedTensor)


def write_file(state: Any, path: str) -> None:
    """torch.save, then fsync: a file reported written survives a crash of the machine."""
    torch.save(state, path)
    fsync_file(Path(path))


def serve_writes(requests, replies) -> None:
    """The writer process: write each requested file, reply with its number and the error, if any."""
    die_with_parent()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)  # the cores training leaves idle
    except (AttributeError, OSError):
        pass
    # SIGTERM/SIGINT reach the rank's whole process group; the rank stops cleanly and waits for its save
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    while True:
        request = requests.get()
        if request is None:
            return
        number, path, skeleton, staged_bytes = request
        try:
            write_file(unstage(pickle.loads(skeleton), staged_bytes), path)
            error = None
        except Exception as failure:  # reported to the rank, which raises it
            error = f"{type(failure).__name__}: {failure}"
        del staged_bytes
        replies.put((number, error))


class CheckpointWriteError(RuntimeError):
    pass


class CheckpointWriter:
    """A rank's writer process and its staging buffers: `submit` a file, then `written` or `wait`.

    Forked, so it starts at once with every module the files' objects need already imported (a spawned
    writer imports torch and DeepSpeed again, seconds of CPU per rank). It only unpickles, torch.saves and
    fsyncs: no CUDA, no lock another thread of the rank may hold. Start it before the model is built: a fork
    shares the rank's memory of that moment copy-on-write, which the rank's later writes would duplicate.
    """

    def __init__(self) -> None:
        context = torch.multiprocessing.get_context(
            "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn")
        self._requests, self._replies = context.Queue(), context.Queue()
        self._process = context.Process(target=serve_writes, args=(self._requests, self._replies),
                                        name="mbloom-checkpoint-writer", daemon=True)
        self._process.start()
        self._buffers: List[StagingBuffer] = []
        self._pending: Dict[int, Tuple[str, StagingBuffer]] = {}
        self._submitted = 0

    def _free_buffer(self, nbytes: int) -> StagingBuffer:
        busy = {id(buffer) for _, buffer in self._pending.values()}
        free = [buffer for buffer in self._buffers if id(buffer) not in busy]
        fitting = [buffer for buffer in free if buffer.nbytes >= nbytes]
        if fitting:
            return min(fitting, key=lambda buffer: buffer.nbytes)
        for buffer in free:  # too small for any file of this size: give the memory back
            buffer.release()
            self._buffers.remove(buffer)
        self._buffers.append(StagingBuffer(nbytes))
        return self._buffers[-1]

    def submit(self, state: Any, path: str) -> None:
        """Copy `state`'s tensors to host memory, then have the file written; returns once copied."""
        buffer = self._free_buffer(max(staged_size(state), 1))
        skeleton = pickle.dumps(buffer.stage(state))  # the non-tensor values, as they are now
        if buffer.pinned:
            torch.cuda.synchronize()  # the copies from the GPU have landed
        self._submitted += 1
        self._pending[self._submitted] = (path, buffer)
        self._requests.put((self._submitted, path, skeleton, buffer.bytes))

    def _collect(self, timeout: Optional[float]) -> None:
        """Take the writer's replies: every one waiting, or (`timeout`) at least one."""
        block = timeout is not None
        while self._pending:
            try:
                number, error = self._replies.get(block=block, timeout=timeout)
            except queue.Empty:
                if block and not self._process.is_alive():
                    raise CheckpointWriteError(
                        f"the checkpoint writer process died (exit code {self._process.exitcode}) with "
                        f"{len(self._pending)} file(s) of the save in flight unwritten, e.g. "
                        f"{next(iter(self._pending.values()))[0]}; the checkpoint was not published. Look for "
                        "an out-of-memory kill in the system log.") from None
                return
            path, _ = self._pending.pop(number)
            if error is not None:
                raise CheckpointWriteError(f"writing the checkpoint file {path} failed: {error}; the checkpoint "
                                           "was not published")
            block = False

    def written(self) -> bool:
        """Whether every file submitted so far is on disk (raises the first failed write's error)."""
        self._collect(None)
        return not self._pending

    def wait(self) -> None:
        while self._pending:
            self._collect(WRITER_POLL_S)

    def close(self) -> None:
        """Stop the writer: at once if a save is still in flight (an error stopped the run), otherwise once
        it has taken its last request."""
        if self._process.is_alive():
            if not self._pending:
                self._requests.put(None)
                self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        for buffer in self._buffers:
            buffer.release()
        self._buffers = []


class AsyncCheckpointWrites:
    """A DeepSpeed checkpoint engine whose `save` hands the file to a `CheckpointWriter` (returning once the
    state is in host memory); loads and the rest go to the engine it wraps."""

    def __init__(self, checkpoint_engine, writer: CheckpointWriter) -> None:
        self._wrapped = checkpoint_engine
        self.writer = writer

    def save(self, state_dict: Any, path: str) -> None:
        self.writer.submit(state_dict, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)
