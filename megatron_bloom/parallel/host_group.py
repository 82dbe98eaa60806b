"""A process group whose ranks share one host, with an all-reduce of CPU tensors through shared memory.

Tensor parallelism all-reduces activations twice a block each way. On CPU that goes through gloo, which
sends over TCP even between processes on one machine. On the 2-core benchmark machine a 1 MB bf16
all-reduce of 2 ranks takes 2.6 ms through gloo, and 0.15 ms here. For bloom-small at tp 2 that is 0.65 s
of a 4.2 s step. DeepSpeed's CPU shared-memory all-reduce serves only the whole world, not a tp group.
oneCCL is not on PyPI.

All ranks map one buffer: a slot per rank, a result area, and a line of barrier counters per rank
(csrc/shm_barrier.cpp). One all-reduce of a chunk goes:
    1. each rank copies its chunk into its slot; barrier
    2. each rank reduces its 1/n of the slots into the result area; barrier
    3. each rank copies the whole result back.
The next call's barrier 1 comes after every rank's step 3, so one result area is enough. Each element is
reduced by one rank only, so every rank gets the same bits. With 2 ranks that is gloo's own result,
a + b rounded once.

The buffer is a file in /dev/shm, removed as soon as every rank has mapped it (within `create`), so a
run killed later leaves nothing behind. `SharedMemoryGroup.create` decides together on all ranks. Where
the ranks are on several hosts, there is no /dev/shm, or the barrier cannot be built, it returns None and
gloo is used.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
SLOT_BYTES = 8 << 20  # a larger tensor goes through in chunks of this size
COUNTER_BYTES = 64  # each rank's barrier counter on a cache line of its own
REDUCE_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max"}


@functools.lru_cache(maxsize=None)
def barrier_available() -> bool:
    """Builds (once a machine, cached under TORCH_EXTENSIONS_DIR) and loads the barrier operator."""
    from torch.utils.cpp_extension import load

    try:
        load(name="mbloom_shm_barrier", sources=[str(Path(__file__).parent / "csrc" / "shm_barrier.cpp")],
             extra_cflags=["-O2"], is_python_module=False)
    except Exception as error:  # no compiler or ninja
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"megatron_bloom: the shared-memory barrier could not be built ({first_line}); "
                      "tensor-parallel all-reduces on CPU go through gloo instead (slower).")
        return False
    return True


class SharedMemoryGroup:
    """`process_group` plus a buffer all its ranks map. The tensor-parallel layers hand it to
    `parallel.mappings`, which all-reduces CPU tensors through the buffer and does the rest through
    `process_group`."""

    def __init__(self, process_group: dist.ProcessGroup, buffer: torch.Tensor, slot_bytes: int,
                 timeout_s: float) -> None:
        self.process_group = process_group
        self.world, self.rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        self.counters = buffer[: self.world * COUNTER_BYTES]
        data = buffer[self.world * COUNTER_BYTES:]
        self.slot_bytes = slot_bytes
        self.slots = data[: self.world * slot_bytes].view(self.world, slot_bytes)
        self.result = data[self.world * slot_bytes:]
        self.timeout_s = timeout_s
        self.generation = 0  # barriers passed; every rank counts the same
        # It touches a buffer outside any graph: a compiled region calls it eagerly. (Wrapped here rather than
        # decorated: the decorator would import torch._dynamo with this module, 1.3 s in every process.)
        self.all_reduce_ = torch.compiler.disable(self._all_reduce)

    @staticmethod
    def create(process_group: dist.ProcessGroup, timeout_s: float = 1800.0,
               slot_bytes: int = SLOT_BYTES) -> Optional["SharedMemoryGroup"]:
        """Collective over `process_group`: a SharedMemoryGroup on every rank, or None on every rank.
        `timeout_s`: how long a rank waits for the others at a barrier (as gloo's default timeout)."""
        ranks = dist.get_process_group_ranks(process_group)
        leader = ranks[0]
        usable = len(ranks) > 1 and SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) and barrier_available()
        if not _all_ranks_agree((socket.gethostname(), usable), process_group,
                                lambda answers: len({host for host, _ in answers}) == 1
                                and all(ok for _, ok in answers)):
            return None
        path = [str(SHM_DIR / f"mbloom-tp-{uuid.uuid4().hex}") if dist.get_rank() == leader else None]
        dist.broadcast_object_list(path, src=leader, group=process_group)
        size = len(ranks) * (COUNTER_BYTES + slot_bytes) + slot_bytes
        created = True
        if dist.get_rank() == leader:
            try:
                with open(path[0], "wb") as file:
                    file.truncate(size)  # zero-filled: every counter starts at 0
            except OSError:
                created = False
        buffer = None
        if _all_ranks_agree(created, process_group, all):
            try:
                buffer = torch.from_file(path[0], shared=True, size=size, dtype=torch.uint8)
            except (OSError, RuntimeError):
                pass
        mapped = _all_ranks_agree(buffer is not None, process_group, all)
        if dist.get_rank() == leader:
            Path(path[0]).unlink(missing_ok=True)  # the mappings stay valid
        dist.barrier(group=process_group)  # on return, on every rank, the file is gone
        return SharedMemoryGroup(process_group, buffer, slot_bytes, timeout_s) if mapped else None

    def _barrier(self) -> None:
        self.generation += 1
        torch.ops.mbloom_shm.barrier(self.counters, self.rank, self.world, self.generation, self.timeout_s)

    def _all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        """Reduce the contiguous CPU tensor `x` over the group, in place (SUM or MAX)."""
        reduce = REDUCE_OPS[op]
        flat = x.view(-1)
        per_slot = self.slot_bytes // x.element_size()
        for start in range(0, flat.numel(), per_slot):
            chunk = flat[start: start + per_slot]
            count = chunk.numel()
            slots = self.slots[:, : count * x.element_size()].view(x.dtype)
            result = self.result[: count * x.element_size()].view(x.dtype)
            slots[self.rank].copy_(chunk)
            self._barrier()
            mine = slice(count * self.rank // self.world, count * (self.rank + 1) // self.world)
            self._reduce(slots[:, mine], result[mine], reduce)
            self._barrier()
            chunk.copy_(result)

    @staticmethod
    def _reduce(slots: torch.Tensor, out: torch.Tensor, reduce: str) -> None:
        # Pairwise in rank order: `torch.add` is 8x faster than `torch.sum(dim=0)` on a [2, n] bf16 view.
        combine = torch.add if reduce == "sum" else torch.maximum
        combine(slots[0], slots[1], out=out)
        for rank in range(2, slots.shape[0]):
            combine(out, slots[rank], out=out)


def _all_ranks_agree(answer, process_group: dist.ProcessGroup, decide) -> bool:
    answers = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(answers, answer, group=process_group)
    return bool(decide(answers))


def supports(group, x: torch.Tensor, op) -> bool:
    """Whether `group` all-reduces `x` through shared memory (a CPU tensor, SUM or MAX)."""
    return isinstance(group, SharedMemoryGroup) and x.device.type == "cpu" and op in REDUCE_OPS \
        and x.is_contiguous()


def process_group_of(group):
    """The torch process group behind a group the layers hold (None, a ProcessGroup, a SharedMemoryGroup)."""
    return group.process_group if isinstance(group, SharedMemoryGroup) else group
