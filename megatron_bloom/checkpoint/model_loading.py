"""Loading a checkpoint's weights into this rank's part of a model, whatever layout the checkpoint has."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from megatron_bloom.checkpoint.layout import (
    CheckpointMetadata,
    load_model_shard,
    load_model_state_dict,
    read_metadata,
    resolve_checkpoint,
)
from megatron_bloom.errors import UserError
from megatron_bloom.model import ModelConfig, create_task_model
from megatron_bloom.parallel import ParallelState, build_parallel_model, check_tensor_parallel, parallelize_bloom


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
