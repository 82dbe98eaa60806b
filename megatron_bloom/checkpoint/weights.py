"""A checkpoint's weights, whatever wrote it: one tensor-parallel rank's shard, the full state dict, or this
rank's part of a ready model. Weights only: the optimizer state is `deepspeed_optimizer.py`'s and
`universal.py`'s.

What a checkpoint holds (`mbloom.json`'s `contents`) decides where its weights are:
* `weights` (from-hf): one model file per tp rank, under model names already;
* `training` at pp = 1: DeepSpeed's model file of the stacked layers (under ZeRO 3 it holds no weights:
  they are the fp32 masters of its optimizer files);
* `training` at pp > 1, and `universal` (reshape): one file per pipeline layer and tp rank, the LM head's
  tied copy of the embedding skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from megatron_bloom.checkpoint.deepspeed_optimizer import MASTER, read_optimizer_states
from megatron_bloom.checkpoint.layout import (
    PRECISION_DTYPES,
    TRAINING,
    WEIGHTS,
    CheckpointMetadata,
    read_metadata,
    resolve_checkpoint,
)
from megatron_bloom.checkpoint.safe_load import load_checkpoint_file
from megatron_bloom.data.progress import Progress
from megatron_bloom.errors import UserError
from megatron_bloom.fence.deepspeed import MODULE, model_states_file, pipeline_layer_file
from megatron_bloom.model import ModelConfig, create_task_model
from megatron_bloom.parallel import ParallelState, build_parallel_model, check_tensor_parallel, parallelize_bloom
from megatron_bloom.parallel.distributed import launch_rank
from megatron_bloom.parallel.sharding import merge_state_dicts
from megatron_bloom.pipeline import names


def load_model_shard(directory: Path, metadata: CheckpointMetadata, tp_rank: int) -> Dict[str, torch.Tensor]:
    """The weights of one tensor-parallel rank under their model names, from the checkpoint in `directory`
    (a tag dir whose `metadata` was read and verified by `read_metadata`)."""
    if metadata.contents == WEIGHTS:
        return _torch_load(directory / model_states_file(tp_rank))[MODULE]
    if metadata.contents == TRAINING and metadata.zero_stage == 3:
        masters = read_optimizer_states(directory, metadata, 0, tp_rank).tensors[MASTER]
        return {name: master.to(PRECISION_DTYPES[metadata.precision]) for name, master in masters.items()}
    if metadata.contents == TRAINING and metadata.pp == 1:
        module = _torch_load(directory / model_states_file(tp_rank))[MODULE]
        return {names.from_stacked_model(name): tensor for name, tensor in module.items()}
    shard = {}
    for layer, prefix in enumerate(names.layer_prefixes(metadata.model, metadata.task.name)):
        if prefix is not None:
            layer_state = _torch_load(directory / pipeline_layer_file(layer, tp_rank))
            shard.update((prefix + name, tensor) for name, tensor in layer_state.items())
    return shard


def load_model_state_dict(checkpoint: Path) -> Tuple[CheckpointMetadata, Dict[str, torch.Tensor]]:
    """The full single-process model weights of a checkpoint of any tp/pp layout, with its metadata."""
    directory = resolve_checkpoint(checkpoint)
    metadata = read_metadata(directory)
    shards = []
    with Progress(total=metadata.tp, unit="tensor-parallel shards read", label=f"reading {directory}",
                  enabled=launch_rank()[0] == 0) as progress:  # every rank of eval or generate reads them
        for rank in range(metadata.tp):
            shards.append(load_model_shard(directory, metadata, rank))
            progress.update(rank + 1)
    return metadata, merge_state_dicts(shards, metadata.model)


def load_model(checkpoint: Path, state: ParallelState, dtype: torch.dtype = torch.float32,
               sequence_parallel: bool = False,
               run_model: Optional[ModelConfig] = None) -> Tuple[nn.Module, CheckpointMetadata]:
    """This rank's model with the checkpoint's weights (weights only: no optimizer state is read).

    When the checkpoint has this run's tp, each rank reads only its own file; otherwise the full weights
    are assembled and sliced for this rank. `run_model` (the run's `config.model`) supplies how the model
    computes (attention, fused kernels), which a checkpoint does not record.
    """
    directory = resolve_checkpoint(checkpoint)
    metadata = read_metadata(directory)
    if run_model is not None:
        metadata.model = metadata.model.with_runtime_choices(run_model)
    if state.pp != 1:
        raise UserError("evaluation runs the whole model on each tensor-parallel group: use parallel.pp=1 "
                        "(a checkpoint of any pp layout loads).")
    check_tensor_parallel(metadata.model, state.tp, sequence_parallel)
    if metadata.tp == state.tp:
        with torch.device("meta"):
            model = parallelize_bloom(create_task_model(metadata.model, metadata.task), state, sequence_parallel)
        model.load_state_dict(load_model_shard(directory, metadata, state.tp_rank), strict=True, assign=True)
        model.to(device=state.device, dtype=dtype)
    else:
        _, full = load_model_state_dict(directory)
        model = build_parallel_model(metadata.model, state, metadata.task, full_state_dict=full,
                                     sequence_parallel=sequence_parallel, dtype=dtype)
    return model, metadata


def _torch_load(path: Path):
    # DeepSpeed's model files hold tensors and plain values (and, with ZeRO, its stage enum): read safely.
    return load_checkpoint_file(path)
