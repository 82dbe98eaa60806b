"""The process groups of a tp x dp x pp layout, held in one object that is passed to whoever needs them.

Ranks are ordered tp fastest, then dp, then pp (Megatron-DeepSpeed's order, so that the ranks of a
tensor-parallel group share a node and its fast links):

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_bloom.errors import ConfigError
from megatron_bloom.parallel.host_group import DEFAULT_TIMEOUT_S, SharedMemoryGroup


@dataclass(frozen=True)
class ParallelState:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    device: torch.device = torch.device("cpu")
    tp_shared_memory: Optional[SharedMemoryGroup] = None  # CPU ranks of one host: the tp group's buffer

    @property
    def tp_comm(self):
        """What the tensor-parallel layers communicate through: the tp group with its shared-memory
        all-reduce where it has one (`host_group.py`), else the tp group."""
        return self.tp_shared_memory or self.tp_group

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    @staticmethod
    def single(device: torch.device | str = "cpu") -> "ParallelState":
        """One process, no groups: what the plain model needs."""
        return ParallelState(device=torch.device(device))

    @staticmethod
    def create(tp: int = 1, pp: int = 1, dp: Optional[int] = None, device: Optional[torch.device] = None,
               shared_memory_timeout_s: float = DEFAULT_TIMEOUT_S) -> "ParallelState":
        """Build every group of the layout; all ranks of the initialized default group must call this.
        `shared_memory_timeout_s`: how long a rank waits for a live peer in a shared-memory all-reduce."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call init_distributed() first")
        world_size, rank = dist.get_world_size(), dist.get_rank()
        dp = dp if dp is not None else world_size // (tp * pp)
        if tp * pp * dp != world_size:
            raise ConfigError(
                f"the world size ({world_size} processes) must equal parallel.tp x parallel.pp x parallel.dp "
                f"({tp} x {pp} x {dp} = {tp * pp * dp})."
            )
        groups = {}
        for kind, members in (("tp", tp_groups(tp, pp, dp)), ("dp", dp_groups(tp, pp, dp)),
                              ("pp", pp_groups(tp, pp, dp))):
            for ranks in members:  # every rank creates every group, in the same order
                group = dist.new_group(ranks)
                if rank in ranks:
                    groups[kind] = group
        device = device or default_device()
        shared_memory = None
        if tp > 1 and device.type == "cpu" and dist.get_backend(groups["tp"]) == "gloo":
            shared_memory = SharedMemoryGroup.create(groups["tp"], timeout_s=shared_memory_timeout_s)
        return ParallelState(tp=tp, pp=pp, dp=dp, rank=rank, tp_group=groups["tp"], dp_group=groups["dp"],
                             pp_group=groups["pp"], device=device, tp_shared_memory=shared_memory)


def tp_groups(tp: int, pp: int, dp: int) -> List[List[int]]:
    return [list(range(start, start + tp)) for start in range(0, tp * pp * dp, tp)]


def dp_groups(tp: int, pp: int, dp: int) -> List[List[int]]:
    return [[p * dp * tp + d * tp + t for d in range(dp)] for p in range(pp) for t in range(tp)]


def pp_groups(tp: int, pp: int, dp: int) -> List[List[int]]:
    return [[p * dp * tp + d * tp + t for p in range(pp)] for d in range(dp) for t in range(tp)]


def default_device() -> torch.device:
    """This process's CUDA device (by LOCAL_RANK, as set by init_distributed) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
