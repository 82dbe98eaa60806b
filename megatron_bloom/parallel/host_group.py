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

Each call is guarded. A rank publishes what it reduces (element count, dtype, op) beside its barrier
counter, and the first barrier compares them: ranks that disagree get an error naming them, as gloo gives,
instead of each other's stale bytes. A waiting rank notices a peer that has exited within 0.1 s and names it;
one that is alive but absent is named after `timeout_s` (`parallel.shared_memory_timeout_s`).

The buffer is a file in /dev/shm, one per job and group: a random name, created exclusively, readable by
its owner only, its pages reserved up front (a sparse file would die of SIGBUS mid-training when /dev/shm
fills up). It is removed as soon as every rank has mapped it (within `create`), so a run killed later leaves
nothing behind. The ranks then prove that they map the same memory: each writes a random nonce into its
slot and reads everyone's back. Ranks of containers that share a hostname but not /dev/shm fail that proof.
`SharedMemoryGroup.create` decides together on all ranks. Where the ranks are on several hosts, /dev/shm is
missing, too small or not shared, or the barrier cannot be built, it returns None and gloo is used.
"""

from __future__ import annotations

import functools
import mmap
import os
import socket
import sys
import uuid
import warnings
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_bloom.model.cpu_kernels import announce_build

SHM_DIR = Path("/dev/shm")
SLOT_BYTES = 8 << 20  # a larger tensor goes through in chunks of this size
COUNTER_BYTES = 64  # each rank's barrier counter and header on a cache line of its own
NONCE_BYTES = 16
DEFAULT_TIMEOUT_S = 600.0
REDUCE_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max"}
OP_CODES = {dist.ReduceOp.SUM: 1, dist.ReduceOp.MAX: 2}
DTYPE_CODES = {dtype: code for code, dtype in enumerate(
    (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
     torch.int8, torch.uint8), start=1)}
PASSED, HEADERS_DIFFER, PEER_EXITED, TIMED_OUT = range(4)  # what the barrier returns (csrc/shm_barrier.cpp)


class CollectiveError(RuntimeError):
    """A shared-memory all-reduce that cannot complete: ranks that disagree, a peer gone or hung."""


@functools.lru_cache(maxsize=None)
def barrier_available() -> bool:
    """Builds (once a machine, cached under TORCH_EXTENSIONS_DIR) and loads the barrier operator."""
    from torch.utils.cpp_extension import load

    try:
        with announce_build("the shared-memory barrier"):
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
                 timeout_s: float, pids: List[int]) -> None:
        self.process_group = process_group
        self.world, self.rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        self.global_ranks = dist.get_process_group_ranks(process_group)
        self.counters = buffer[: self.world * COUNTER_BYTES]
        data = buffer[self.world * COUNTER_BYTES:]
        self.slot_bytes = slot_bytes
        self.slots = data[: self.world * slot_bytes].view(self.world, slot_bytes)
        self.result = data[self.world * slot_bytes:]
        self.timeout_s = timeout_s
        self.pids = pids  # empty where the ranks see different pid namespaces: only the timeout applies
        self.generation = 0  # barriers passed; every rank counts the same
        # It touches a buffer outside any graph: a compiled region calls it eagerly. (Wrapped here rather than
        # decorated: the decorator would import torch._dynamo with this module, 1.3 s in every process.)
        self.all_reduce_ = torch.compiler.disable(self._all_reduce)

    @staticmethod
    def create(process_group: dist.ProcessGroup, timeout_s: float = DEFAULT_TIMEOUT_S,
               slot_bytes: int = SLOT_BYTES) -> Optional["SharedMemoryGroup"]:
        """Collective over `process_group`: a SharedMemoryGroup on every rank, or None on every rank.
        `timeout_s`: how long a rank waits for a live peer at a barrier before naming it."""
        ranks = dist.get_process_group_ranks(process_group)
        leader = dist.get_rank() == ranks[0]
        usable = len(ranks) > 1 and SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) and barrier_available()
        processes = _gather((socket.gethostname(), usable, os.getpid(), _pid_namespace()), process_group)
        if len({host for host, *_ in processes}) != 1 or not all(ok for _, ok, *_ in processes):
            return None  # several hosts (or no usable /dev/shm): gloo, as expected, without a word
        size = len(ranks) * (COUNTER_BYTES + slot_bytes) + slot_bytes
        path, problem = _gather(_create_buffer(size) if leader else (None, None), process_group)[0]
        problem = problem if leader else None  # the leader's reason, said once
        buffer = None
        if path is not None:
            buffer, problem = _map_buffer(path, size)
        try:
            problems = _gather(problem, process_group)
            if not any(problems):
                problems = _prove_shared(buffer, len(ranks), slot_bytes, process_group)
        finally:
            if leader and path is not None:
                Path(path).unlink(missing_ok=True)  # the mappings stay valid
        dist.barrier(group=process_group)  # on return, on every rank, the file is gone
        if any(problems):
            if leader:
                reasons = "; ".join(f"rank {rank}: {problem}" for rank, problem in zip(ranks, problems) if problem)
                print(f"warning: megatron_bloom: the tensor-parallel ranks {ranks} all-reduce through gloo, not "
                      f"shared memory ({reasons}).", file=sys.stderr, flush=True)
            return None
        pids = [pid for _, _, pid, _ in processes] if len({ns for *_, ns in processes}) == 1 else []
        return SharedMemoryGroup(process_group, buffer, slot_bytes, timeout_s, pids)

    def _barrier(self, header: List[int]) -> None:
        self.generation += 1
        outcome, peer = torch.ops.mbloom_shm.barrier(self.counters, self.rank, self.world, self.generation,
                                                     self.timeout_s, header, self.pids)
        if outcome == HEADERS_DIFFER:
            message = self._describe_disagreement()
            self._barrier([])  # no rank writes its next header before every rank has read this call's
            raise CollectiveError(message)
        if outcome != PASSED:
            raise CollectiveError(self._describe_loss(outcome, peer))

    def _all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        """Reduce the contiguous CPU tensor `x` over the group, in place (SUM or MAX)."""
        reduce = REDUCE_OPS[op]
        flat = x.view(-1)
        per_slot = self.slot_bytes // x.element_size()
        # what every rank must agree on, checked at the first barrier: count (2 words), dtype, op
        header = [flat.numel() & 0xFFFFFFFF, flat.numel() >> 32, DTYPE_CODES[x.dtype], OP_CODES[op]]
        for start in range(0, max(flat.numel(), 1), per_slot):
            chunk = flat[start: start + per_slot]
            count = chunk.numel()
            slots = self.slots[:, : count * x.element_size()].view(x.dtype)
            result = self.result[: count * x.element_size()].view(x.dtype)
            slots[self.rank].copy_(chunk)
            self._barrier(header if start == 0 else [])
            mine = slice(count * self.rank // self.world, count * (self.rank + 1) // self.world)
            self._reduce(slots[:, mine], result[mine], reduce)
            self._barrier([])
            chunk.copy_(result)

    @staticmethod
    def _reduce(slots: torch.Tensor, out: torch.Tensor, reduce: str) -> None:
        # Pairwise in rank order: `torch.add` is 8x faster than `torch.sum(dim=0)` on a [2, n] bf16 view.
        combine = torch.add if reduce == "sum" else torch.maximum
        combine(slots[0], slots[1], out=out)
        for rank in range(2, slots.shape[0]):
            combine(out, slots[rank], out=out)

    def _describe_loss(self, outcome: int, peer: int) -> str:
        rank = self.global_ranks[peer]
        if outcome == PEER_EXITED:
            return (f"shared-memory all-reduce: rank {rank} (pid {self.pids[peer]}) of the group "
                    f"{self.global_ranks} exited while rank {self.global_ranks[self.rank]} waited for it.")
        return (f"shared-memory all-reduce: rank {rank} of the group did not arrive within {self.timeout_s:g} s "
                "(did it stop? parallel.shared_memory_timeout_s sets the wait).")

    def _describe_disagreement(self) -> str:
        names = {code: name for name, code in DTYPE_CODES.items()}
        ops = {code: REDUCE_OPS[op] for op, code in OP_CODES.items()}
        headers = self.counters.view(torch.int32).view(self.world, COUNTER_BYTES // 4)[:, 1:5].tolist()
        calls = "; ".join(
            f"rank {self.global_ranks[r]}: {low % 2**32 + (high % 2**32 << 32)} elements of "
            f"{names.get(dtype, dtype)}, op {ops.get(op, op)}" for r, (low, high, dtype, op) in enumerate(headers))
        return (f"shared-memory all-reduce: the ranks of the group disagree on what to reduce ({calls}). "
                "Every rank of a group must all-reduce the same number of elements, of one dtype, with one op.")


def _gather(value, process_group: dist.ProcessGroup) -> list:
    values = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(values, value, group=process_group)
    return values


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return f"unknown-{uuid.uuid4().hex}"  # cannot tell: count it as different from every other


def _create_buffer(size: int):
    """The leader's part: (path, None), or (None, why not). A new file of `size` bytes whose pages are
    reserved, in a name no other job can hold, readable by this user only."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError as error:
        return None, f"{SHM_DIR} cannot be read ({error.strerror})"
    free = stat.f_bavail * stat.f_frsize
    if free < size:
        return None, f"the buffer needs {size / 2**20:.1f} MB and {SHM_DIR} has {free / 2**20:.1f} MB free"
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "local"
    path = SHM_DIR / f"mbloom-tp-{os.getuid()}-{job}-{uuid.uuid4().hex}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        return None, f"{path} could not be created ({error.strerror})"
    try:
        os.posix_fallocate(fd, 0, size)  # zero-filled (every counter starts at 0) and backed now, not at SIGBUS
    except OSError as error:
        os.close(fd)
        path.unlink(missing_ok=True)
        return None, f"{size / 2**20:.1f} MB could not be reserved in {SHM_DIR} ({error.strerror})"
    os.close(fd)
    return str(path), None


def _map_buffer(path: str, size: int):
    """(a uint8 tensor over the file's shared mapping, None), or (None, why not). Opens, never creates: a
    rank that does not see the leader's /dev/shm finds no file."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as error:
        return None, f"it cannot open the buffer ({error.strerror}); it does not share {SHM_DIR} with the others"
    try:
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
    except (OSError, ValueError) as error:
        return None, f"it cannot map the buffer ({error})"
    finally:
        os.close(fd)  # the mapping keeps the file
    return torch.frombuffer(mapping, dtype=torch.uint8), None  # the tensor keeps the mapping alive


def _prove_shared(buffer: torch.Tensor, world: int, slot_bytes: int, process_group) -> List[Optional[str]]:
    """Each rank writes a random nonce at the start of its slot, and checks everyone's: one problem (or None)
    per rank, the same list on every rank."""
    slots = buffer[world * COUNTER_BYTES: world * (COUNTER_BYTES + slot_bytes)].view(world, slot_bytes)
    nonce = os.urandom(NONCE_BYTES)
    slots[dist.get_rank(process_group), :NONCE_BYTES] = torch.frombuffer(bytearray(nonce), dtype=torch.uint8)
    nonces = _gather(nonce, process_group)  # returns once every rank has written its own
    unseen = [rank for rank, other in enumerate(nonces) if bytes(slots[rank, :NONCE_BYTES].tolist()) != other]
    ranks = dist.get_process_group_ranks(process_group)
    return [f"it does not see the writes of ranks {[ranks[r] for r in missing]}, so the buffer is not shared"
            if missing else None for missing in _gather(unseen, process_group)]


def supports(group, x: torch.Tensor, op) -> bool:
    """Whether `group` all-reduces `x` through shared memory (a CPU tensor, SUM or MAX)."""
    return isinstance(group, SharedMemoryGroup) and x.device.type == "cpu" and op in REDUCE_OPS \
        and x.dtype in DTYPE_CODES and x.is_contiguous()


def process_group_of(group):
    """The torch process group behind a group the layers hold (None, a ProcessGroup, a SharedMemoryGroup)."""
    return group.process_group if isinstance(group, SharedMemoryGroup) else group
