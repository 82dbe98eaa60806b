"""Tensor-parallel layers (Shoeybi et al. 2019, Megatron-LM) that replace `nn.Linear` / `nn.Embedding`.

Each holds only its rank's slice of the weight, with the parameter names of the layer it replaces, so a
sharded state dict is the full one sliced (see `sharding.py`). With `sequence_parallel`, activations
outside the tensor-parallel regions are split along the sequence, and the all-reduces become
all-gather + reduce-scatter (Korthikanti et al. 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_bloom.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    sequence_gathered_linear,
)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows: rank r computes outputs [r*n/tp, (r+1)*n/tp)."""

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False) -> None:
        super().__init__()
        tp = group_size(group)
        if out_features % tp:
            raise ValueError(f"{out_features} output features do not split over {tp} tensor-parallel ranks")
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features))
        self.bias = nn.Parameter(torch.empty(out_features // tp)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            y = sequence_gathered_linear(x, self.weight, self.bias, self.group)
        else:
            y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)
        return gather_from_tp_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns; the input is already split; partial sums are reduced.

    The bias is replicated and added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        tp = group_size(group)
        if in_features % tp:
            raise ValueError(f"{in_features} input features do not split over {tp} tensor-parallel ranks")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(partial, self.group)
        else:
            y = reduce_from_tp_region(partial, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary range; ids outside this rank's range contribute zeros, and the
    ranks' lookups are summed (reduce-scattered along the sequence with sequence parallelism)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group, sequence_parallel: bool = False) -> None:
        super().__init__()
        tp = group_size(group)
        if num_embeddings % tp:
            raise ValueError(f"a vocabulary of {num_embeddings} rows does not split over {tp} ranks")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        rows = num_embeddings // tp
        self.vocab_start = group_rank(group) * rows
        self.vocab_end = self.vocab_start + rows
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            output = F.embedding(input_ids, self.weight)
        else:
            outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
            local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
            output = F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_region(output, self.group)
        return reduce_from_tp_region(output, self.group)


class SequenceGatheredLinear(nn.Linear):
    """A replicated `nn.Linear` (a task head) fed from sequence-parallel activations: gathers first.

    Every rank computes the same head, so the backward splits the gradient instead of summing it.
    """

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(gather_from_sequence_region(x, self.group, grad_is_partial=False))
