"""The LM head and its loss when the vocabulary is split across tensor-parallel ranks.

The logits are never gathered: each rank holds `[batch, seq, padded_vocab / tp]`, and the cross-entropy
needs only three all-reduces of `[batch, seq]` tensors (the row max, the target's logit and the sum of
exponentials; Megatron-LM's vocab-parallel cross-entropy). Vocabulary padding columns are set to -inf,
so they are never predicted and receive no gradient, exactly as in the single-process model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_bloom.model.heads import IGNORE_INDEX
from megatron_bloom.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    group_size,
)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, real_columns, group):
        ctx.input_dtype = logits.dtype
        # One float32 copy, shifted in place: at [batch, seq, vocab / tp] this tensor dominates the cost.
        shifted = logits.to(torch.float32, copy=True)
        if real_columns < shifted.shape[-1]:
            shifted[..., real_columns:] = float("-inf")
        row_max = shifted.max(dim=-1).values
        _all_reduce(row_max, dist.ReduceOp.MAX, group)
        shifted.sub_(row_max.unsqueeze(-1))
        local_target = target - vocab_start
        on_this_rank = (local_target >= 0) & (local_target < real_columns)
        local_target = local_target.masked_fill(~on_this_rank, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~on_this_rank, 0.0)
        _all_reduce(target_logit, dist.ReduceOp.SUM, group)
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, on_this_rank, local_target)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, on_this_rank, local_target = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target), in place: the softmax is not needed afterwards
        grad = softmax
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -on_this_rank.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None, None


def _all_reduce(x: torch.Tensor, op, group) -> None:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 real_columns: int, group) -> torch.Tensor:
    """Per-token cross-entropy `[batch, seq]` from this rank's logits `[batch, seq, vocab_slice]`.

    `vocab_start` is the first vocabulary id of this rank's slice; its first `real_columns` columns are
    real tokens, the rest padding. Targets outside every slice (e.g. -100) give an arbitrary value that
    the caller masks out.
    """
    # Also at tp = 1: one float32 copy updated in place, and a backward that reuses it, is about twice as
    # fast as `F.cross_entropy(logits.float())` (which keeps the copy and the log-softmax both).
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, real_columns, group)


class VocabParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary slice from its slice of the (tied) embedding matrix."""

    def __init__(self, group, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, hidden_states: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            hidden_states = gather_from_sequence_region(hidden_states, self.group)
        else:
            hidden_states = copy_to_tp_region(hidden_states, self.group)
        return F.linear(hidden_states, embedding_weight)


class VocabParallelCausalLMLoss(nn.Module):
    """Mean next-token cross-entropy over the labels that are not -100, from vocab-parallel logits."""

    def __init__(self, group, vocab_start: int, real_columns: int) -> None:
        super().__init__()
        self.group, self.vocab_start, self.real_columns = group, vocab_start, real_columns

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        per_token = vocab_parallel_cross_entropy(logits, shifted, self.vocab_start, self.real_columns, self.group)
        counted = shifted != IGNORE_INDEX
        return (per_token * counted).sum() / counted.sum()


def gather_vocab_logits(logits: torch.Tensor, group, vocab_size: int) -> torch.Tensor:
    """The full `[batch, seq, vocab_size]` logits from the ranks' slices (for generation and inspection)."""
    return gather_from_tp_region(logits, group)[..., :vocab_size]
