"""Point-to-point messages between pipeline stages, for the schedules that run outside DeepSpeed's engine
(evaluation and generation at pp > 1, `inference/pipeline.py`).

Each rank talks to the ranks of its own pipeline group (same tp rank, same dp rank): the next and the
previous stage, and, for generation's ring, the first and the last. Sends are asynchronous and at most
`max_in_flight` messages stay pending (default 2 pp): a stage runs ahead of the next by a bounded number of
micro-batches (the forward half of 1F1B), and its memory stays bounded however many micro-batches there are. Receives block: the receiver
knows each message's shape and dtype from the micro-batch it is working on, so no shapes are sent.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_bloom.parallel.state import ParallelState


class StageLinks:
    """This rank's neighbours in its pipeline (global ranks), and its pending sends."""

    def __init__(self, state: ParallelState, max_in_flight: Optional[int] = None) -> None:
        stride = state.tp * state.dp  # ranks between two stages of one pipeline (`state.py`'s rank order)
        self.stage, self.stages = state.pp_rank, state.pp
        self.device = state.device
        self.first_rank = state.rank % stride
        self.last_rank = self.first_rank + (state.pp - 1) * stride
        self.previous_rank = state.rank - stride if self.stage > 0 else None
        self.next_rank = state.rank + stride if self.stage < state.pp - 1 else None
        self.max_in_flight = max_in_flight or 2 * state.pp
        self._pending: Deque = deque()

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def send(self, tensor: torch.Tensor, to: int) -> None:
        """Send `tensor` to global rank `to` without waiting (it is kept alive until delivered)."""
        tensor = tensor.contiguous()
        self._pending.append((dist.isend(tensor, to), tensor))
        while len(self._pending) > self.max_in_flight:
            self._pending.popleft()[0].wait()

    def receive(self, shape: Sequence[int], dtype: torch.dtype, source: int) -> torch.Tensor:
        tensor = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        dist.recv(tensor, source)
        return tensor

    def flush(self) -> None:
        """Wait until every send has been delivered."""
        while self._pending:
            self._pending.popleft()[0].wait()
