"""Micro-batches through the model at any pipeline depth: evaluation's forward-only schedule.

At pp = 1 each micro-batch runs through the whole model. At pp > 1 each rank holds one `PipelineStage`;
every stage walks the same micro-batches in the same order (they are built from data every rank reads),
the first embeds the token ids, each sends its output to the next stage without waiting for it to be
received, and the last runs the head. So stage s works on micro-batch m while stage s + 1 works on
m - 1: the forward half of the 1F1B schedule (Narayanan et al. 2021), with the same bound on the
micro-batches in flight (`StageLinks`). Results exist on the last stage and are shared from there
(`from_last_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_bloom.parallel import ParallelState
from megatron_bloom.parallel.p2p import StageLinks


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [batch, seq], on every stage
    attention_mask: torch.Tensor
    head_arguments: Dict[str, Any] = field(default_factory=dict)  # what the head takes besides (labels)


def has_outputs(state: ParallelState) -> bool:
    """Whether this rank holds the head's outputs: every rank at pp = 1, the last stage's ranks at pp > 1."""
    return state.pp_rank == state.pp - 1


def run_micro_batches(model, state: ParallelState, micro_batches: Iterable[MicroBatch]
                      ) -> Iterator[Tuple[MicroBatch, Any]]:
    """(micro-batch, the head's output) for each micro-batch, on the ranks that have outputs; the other
    stages yield nothing but must still exhaust the iterator (it runs their part)."""
    if state.pp == 1:
        for batch in micro_batches:
            yield batch, model(batch.input_ids.to(state.device), attention_mask=batch.attention_mask.to(state.device),
                               **_on(batch.head_arguments, state.device))
        return
    links = StageLinks(state)
    dtype = next(model.parameters()).dtype
    for batch in micro_batches:
        input_ids, mask = batch.input_ids.to(state.device), batch.attention_mask.to(state.device)
        inputs = input_ids if links.is_first else links.receive(model.hidden_shape(*input_ids.shape), dtype,
                                                                links.previous_rank)
        if links.is_last:
            yield batch, model(inputs, input_ids, mask, **_on(batch.head_arguments, state.device))
        else:
            links.send(model(inputs, input_ids, mask), links.next_rank)
    links.flush()


def from_last_stage(value: Optional[Any], state: ParallelState) -> Any:
    """`value` as the last pipeline stage has it, on every stage of this rank's pipeline (a tensor, or any
    picklable object)."""
    if state.pp == 1:
        return value
    last = StageLinks(state).last_rank
    if isinstance(value, torch.Tensor):
        dist.broadcast(value, src=last, group=state.pp_group)
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=last, group=state.pp_group)
    return holder[0]


def _on(arguments: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in arguments.items()}
