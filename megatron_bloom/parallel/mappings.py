"""The tensor-parallel collectives, each an autograd function with a known backward (Megatron-LM's mappings).

Tensors are `[batch, seq, hidden]`: "last dim" regions split the hidden/vocab features across tp ranks,
"sequence" regions (sequence parallelism, Korthikanti et al. 2022) split dim 1. `group=None` or a group of
one rank makes every function the identity, so the same code runs in a single process. A group is a torch
process group, or a `SharedMemoryGroup` (CPU ranks of one host), whose all-reduces go through shared memory.

    copy_to_tp_region            forward: identity          backward: all-reduce
    reduce_from_tp_region        forward: all-reduce        backward: identity
    gather_from_tp_region        forward: all-gather last   backward: split last
    scatter_to_sequence_region   forward: split seq         backward: all-gather seq
    gather_from_sequence_region  forward: all-gather seq    backward: reduce-scatter seq (or split, see below)
    reduce_scatter_to_sequence_region  forward: reduce-scatter seq  backward: all-gather seq
    sequence_gathered_linear     forward: all-gather seq, matmul    backward: all-gather seq again,
                                 matmuls, reduce-scatter seq (only 1/tp of the input is stored)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_bloom.parallel.host_group import process_group_of, supports

SEQUENCE_DIM = 1


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(process_group_of(group))


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(process_group_of(group))


# --- the raw collectives (no autograd) ---------------------------------------------------------------
#
# `_through_shared_memory`: the CPU ranks of one host have a shared-memory all-reduce (`host_group.py`) that
# is many times faster than gloo's collectives, whose all-gather and reduce-scatter go through TCP (bloom-tiny
# with sequence parallelism at tp 2 on gloo: 4x slower steps). There, sequence parallelism's all-gather is
# an all-reduce of a zero buffer holding this rank's part, and its reduce-scatter an all-reduce keeping this
# rank's part: twice the bytes of the dedicated collectives, at memory speed.

def all_reduce_(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    """Reduce `x` over the group in place (through shared memory where the group has it)."""
    if group_size(group) == 1:
        return
    if supports(group, x, op):
        group.all_reduce_(x, op)
    else:
        dist.all_reduce(x, op=op, group=process_group_of(group))


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)  # never modify an input that autograd may have saved
    all_reduce_(x, group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {size} tensor-parallel ranks")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if supports(group, x, dist.ReduceOp.SUM):  # one host's CPU ranks: see `_through_shared_memory`
        shape = list(x.shape)
        shape[dim] *= size
        full = x.new_zeros(shape)
        full.narrow(dim, group_rank(group) * x.shape[dim], x.shape[dim]).copy_(x)
        all_reduce_(full, group)  # the other ranks' parts are zero here: the sum is the concatenation, exactly
        return full
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=process_group_of(group))
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {size} tensor-parallel ranks")
    if supports(group, x, dist.ReduceOp.SUM):  # one host's CPU ranks: see `_through_shared_memory`
        total = x.clone(memory_format=torch.contiguous_format)
        all_reduce_(total, group)
        return total.chunk(size, dim=dim)[group_rank(group)].contiguous()
    parts = [part.contiguous() for part in x.chunk(size, dim=dim)]
    output = torch.empty_like(parts[0])
    dist.reduce_scatter(output, parts, group=process_group_of(group))
    return output


# --- autograd regions --------------------------------------------------------------------------------

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQUENCE_DIM, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grad_is_partial):
        ctx.group, ctx.grad_is_partial = group, grad_is_partial
        return _gather(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _reduce_scatter(grad, SEQUENCE_DIM, ctx.group), None, None
        return _split(grad, SEQUENCE_DIM, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQUENCE_DIM, ctx.group), None


class _SequenceGatheredLinear(torch.autograd.Function):
    """x W^T + b of the all-gathered sequence, keeping only this rank's part of x for the backward, which
    gathers it again: with sequence parallelism a column-parallel linear then stores 1/tp of its input
    (Korthikanti et al. 2022, sec. 4.2.2; Megatron-LM's linear with sequence parallelism does the same)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return torch.nn.functional.linear(_gather(x, SEQUENCE_DIM, ctx.group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        full = _gather(x, SEQUENCE_DIM, ctx.group)
        grad_input = _reduce_scatter(grad.matmul(weight), SEQUENCE_DIM, ctx.group)
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_rows.t().matmul(full.reshape(-1, full.shape[-1]))
        grad_bias = grad_rows.sum(dim=0) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias, None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel computation with a replicated input (its gradient is summed over ranks)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Sum the partial results of the ranks (after a row-parallel matmul or a vocab-parallel lookup)."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the ranks' slices of the last dimension."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the sequence."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence_region(x: torch.Tensor, group, grad_is_partial: bool = True) -> torch.Tensor:
    """All-gather the sequence. `grad_is_partial`: the consumer is tensor-parallel, so each rank's gradient
    is a partial sum and the backward reduce-scatters; otherwise (a replicated consumer) it just splits."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group, grad_is_partial)


def sequence_gathered_linear(x: torch.Tensor, weight: torch.Tensor, bias, group) -> torch.Tensor:
    """`linear(gather_from_sequence_region(x), weight, bias)` for a tensor-parallel consumer, storing only
    this rank's part of the sequence for the backward."""
    if group_size(group) == 1:
        return torch.nn.functional.linear(x, weight, bias)
    return _SequenceGatheredLinear.apply(x, weight, bias, group)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    """Sum the ranks' partial results and keep this rank's slice of the sequence."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)
