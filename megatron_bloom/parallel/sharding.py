"""How each BLOOM parameter is split across tensor-parallel ranks: the one table that initialization,
loading and checkpoint conversion all use.

    word_embeddings.weight            rows (vocabulary), re-padded to a multiple of 128 x tp
    self_attention.query_key_value.*  rows: BLOOM's [head, (q, k, v), head_dim] layout keeps whole heads
    self_attention.dense.weight       columns (row-parallel)
    mlp.dense_h_to_4h.*               rows
    mlp.dense_4h_to_h.weight          columns (row-parallel)
    everything else                   replicated (LayerNorms, row-parallel biases, task heads)
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from megatron_bloom.model import ModelConfig, TaskConfig, create_task_model, meta_device

StateDict = Dict[str, torch.Tensor]
EMBEDDING = "transformer.word_embeddings.weight"
_ROW_SPLIT = (".self_attention.query_key_value.weight", ".self_attention.query_key_value.bias",
              ".mlp.dense_h_to_4h.weight", ".mlp.dense_h_to_4h.bias", "word_embeddings.weight")
_COLUMN_SPLIT = (".self_attention.dense.weight", ".mlp.dense_4h_to_h.weight")


def partition_dim(name: str) -> Optional[int]:
    """The dimension along which parameter `name` is split, or None when every rank holds all of it."""
    if name.endswith(_ROW_SPLIT):
        return 0
    if name.endswith(_COLUMN_SPLIT):
        return 1
    return None


def repad_vocabulary(embedding: torch.Tensor, config: ModelConfig, rows: int) -> torch.Tensor:
    """The embedding with exactly `rows` rows: the real vocabulary, then zero padding."""
    real = embedding[: config.vocab_size]
    if rows == real.shape[0]:
        return real
    return torch.cat([real, real.new_zeros(rows - real.shape[0], real.shape[1])])


def shard_tensor(name: str, full: torch.Tensor, config: ModelConfig, tp: int, tp_rank: int) -> torch.Tensor:
    """Rank `tp_rank`'s part of a full (single-process) parameter."""
    if name.endswith("word_embeddings.weight"):
        full = repad_vocabulary(full, config, config.padded_vocab_size(tp))
    dim = partition_dim(name)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name} of shape {tuple(full.shape)} does not split over {tp} ranks along dim {dim}")
    return full.chunk(tp, dim=dim)[tp_rank].clone()


def shard_shape(name: str, full_shape: Sequence[int], config: ModelConfig, tp: int) -> torch.Size:
    """The shape of one tp rank's part of a parameter whose single-process shape is `full_shape`."""
    shape = list(full_shape)
    if name.endswith("word_embeddings.weight"):
        shape[0] = config.padded_vocab_size(tp)
    dim = partition_dim(name)
    if dim is not None:
        shape[dim] //= tp
    return torch.Size(shape)


def shard_state_dict(full: StateDict, config: ModelConfig, tp: int, tp_rank: int) -> StateDict:
    return {name: shard_tensor(name, tensor, config, tp, tp_rank) for name, tensor in full.items()}


def merge_state_dicts(shards: Sequence[StateDict], config: ModelConfig) -> StateDict:
    """The full single-process state dict from the state dicts of all tp ranks (in rank order).

    Replicated tensors must be identical on every rank (they are, unless training diverged).
    """
    merged: StateDict = {}
    for name, first in shards[0].items():
        parts = [shard[name] for shard in shards]
        dim = partition_dim(name)
        if dim is None or len(shards) == 1:
            for rank, part in enumerate(parts[1:], start=1):
                if not torch.equal(part, first):
                    raise ValueError(f"replicated tensor {name} differs between tp rank 0 and tp rank {rank}")
            merged[name] = first
        else:
            merged[name] = torch.cat(parts, dim=dim)
        if name.endswith("word_embeddings.weight"):
            merged[name] = repad_vocabulary(merged[name], config, config.padded_vocab_size(1))
    return merged


def full_shapes(config: ModelConfig, task: TaskConfig) -> Dict[str, torch.Size]:
    """Names and shapes of the single-process model's parameters, without allocating them."""
    with meta_device():
        model = create_task_model(config, task)
    return {name: param.shape for name, param in model.named_parameters()}


def split_for_ranks(full: StateDict, config: ModelConfig, tp: int) -> List[StateDict]:
    """The state dicts of every tp rank, in rank order."""
    return [shard_state_dict(full, config, tp, rank) for rank in range(tp)]
