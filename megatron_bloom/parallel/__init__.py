"""Parallelism: process groups (`state`), tensor-parallel collectives and layers, and how a plain BLOOM
model is split (`sharding`, `parallelize`). Nothing here holds global state: groups live in `ParallelState`."""

from megatron_bloom.parallel.distributed import init_distributed
from megatron_bloom.parallel.parallelize import (
    sum_sequence_parallel_grads,
    build_parallel_model,
    check_tensor_parallel,
    parallelize_bloom,
)
from megatron_bloom.parallel.sharding import merge_state_dicts, partition_dim, shard_state_dict, shard_tensor
from megatron_bloom.parallel.state import ParallelState

__all__ = [
    "ParallelState", "sum_sequence_parallel_grads", "build_parallel_model", "check_tensor_parallel",
    "init_distributed", "merge_state_dicts", "parallelize_bloom", "partition_dim", "shard_state_dict",
    "shard_tensor",
]
