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
from typing import Dict, List, Optional, Set, Tuple

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
from megatron_bloom.model import ModelConfig, TaskConfig, create_task_model, meta_device
from megatron_bloom.parallel import ParallelState, check_tensor_parallel, parallelize_bloom
from megatron_bloom.parallel.parallelize import materialize
from megatron_bloom.parallel.stage import PipelineStage
from megatron_bloom.parallel.distributed import launch_rank
from megatron_bloom.parallel.sharding import merge_state_dicts
from megatron_bloom.pipeline import names
from megatron_bloom.pipeline.partition import stage_layers


def load_model_shard(directory: Path, metadata: CheckpointMetadata, tp_rank: int,
                     wanted: Optional[Set[str]] = None) -> Dict[str, torch.Tensor]:
    """The weights of one tensor-parallel rank under their model names, from the checkpoint in `directory`
    (a tag dir whose `metadata` was read and verified by `read_metadata`); only the names in `wanted` when
    given (a pipeline stage's: of a checkpoint saved at pp > 1, only the files of those layers are read)."""
    if metadata.contents == WEIGHTS:
        shard = _torch_load(directory / model_states_file(tp_rank))[MODULE]
    elif metadata.contents == TRAINING and metadata.zero_stage == 3:
        masters = read_optimizer_states(directory, metadata, 0, tp_rank).tensors[MASTER]
        shard = {name: master.to(PRECISION_DTYPES[metadata.precision]) for name, master in masters.items()}
    elif metadata.contents == TRAINING and metadata.pp == 1:
        module = _torch_load(directory / model_states_file(tp_rank))[MODULE]
        shard = {names.from_stacked_model(name): tensor for name, tensor in module.items()}
    else:
        layers = None if wanted is None else {names.layer_of(name, metadata.model)[0] for name in wanted}
        shard = {}
        for layer, prefix in enumerate(names.layer_prefixes(metadata.model, metadata.task.name)):
            if prefix is not None and (layers is None or layer in layers):
                layer_state = _torch_load(directory / pipeline_layer_file(layer, tp_rank))
                shard.update((prefix + name, tensor) for name, tensor in layer_state.items())
    return shard if wanted is None else {name: tensor for name, tensor in shard.items() if name in wanted}


def load_model_state_dict(checkpoint: Path, wanted: Optional[Set[str]] = None
                          ) -> Tuple[CheckpointMetadata, Dict[str, torch.Tensor]]:
    """The full single-process model weights of a checkpoint of any tp/pp layout (those named in `wanted`,
    when given), with its metadata."""
    directory = resolve_checkpoint(checkpoint)
    metadata = read_metadata(directory)
    shards = []
    with Progress(total=metadata.tp, unit="tensor-parallel shards read", label=f"reading {directory}",
                  enabled=launch_rank()[0] == 0) as progress:  # every rank of eval or generate reads them
        for rank in range(metadata.tp):
            shards.append(load_model_shard(directory, metadata, rank, wanted))
            progress.update(rank + 1)
    return metadata, merge_state_dicts(shards, metadata.model)


def load_model(checkpoint: Path, state: ParallelState, dtype: torch.dtype = torch.float32,
               sequence_parallel: bool = False, run_model: Optional[ModelConfig] = None,
               partition: str = "flops") -> Tuple[nn.Module, CheckpointMetadata]:
    """This rank's model with the checkpoint's weights (weights only: no optimizer state is read): the task
    model at pp = 1, else a `PipelineStage` of it, holding the blocks `partition` gives this stage
    (`pipeline/partition.py`, as training splits them).

    When the checkpoint has this run's tp, each rank reads only its own file (at pp > 1, only its stage's
    part of it); otherwise the full weights are assembled and sliced for this rank. `run_model` (the run's
    `config.model`) supplies how the model computes (attention, fused kernels), which a checkpoint does not
    record.
    """
    directory = resolve_checkpoint(checkpoint)
    metadata = read_metadata(directory)
    if run_model is not None:
        metadata.model = metadata.model.with_runtime_choices(run_model)
    config = metadata.model
    check_tensor_parallel(config, state.tp, sequence_parallel)
    if config.num_layers < state.pp:
        raise UserError(f"parallel.pp={state.pp} needs a block per stage, and the model of {directory} has "
                        f"{config.num_layers}: use parallel.pp={config.num_layers} or fewer.")
    model = meta_rank_model(config, metadata.task, state, sequence_parallel, partition)
    task_model = model.model if state.pp > 1 else model  # its parameters have the model names
    wanted = set(task_model.state_dict().keys())
    if metadata.tp == state.tp:
        task_model.load_state_dict(load_model_shard(directory, metadata, state.tp_rank, wanted), strict=True,
                                   assign=True)
        model.to(device=state.device, dtype=dtype)
    else:
        _, full = load_model_state_dict(directory, wanted)
        materialize(task_model, config, state, {}, seed=0, full_state_dict=full)
        model.to(dtype)
    return model, metadata


def meta_rank_model(config: ModelConfig, task: TaskConfig, state: ParallelState, sequence_parallel: bool = False,
                    partition: str = "flops") -> nn.Module:
    """This rank's part of the task model, on the meta device (no memory yet): the tensor-parallel model at
    pp = 1, else its `PipelineStage` with the blocks `partition` gives this stage (as training splits them).
    Its parameters, under their model names, are to be assigned (a checkpoint's, or a training run's)."""
    with meta_device():
        model = parallelize_bloom(create_task_model(config, task), state, sequence_parallel)
        if state.pp > 1:
            blocks = stage_blocks(config, state.pp, task.name, partition)[state.pp_rank]
            model = PipelineStage(model, blocks, state.pp_rank == 0, state.pp_rank == state.pp - 1,
                                  state.tp if sequence_parallel else 1)
    return model


def stage_blocks(config: ModelConfig, pp: int, task_name: str, partition: str = "flops") -> List[range]:
    """The transformer blocks of each of `pp` stages: the layers training's stages hold
    (`pipeline.partition.stage_layers`), less the embedding, the LayerNorms and the head."""
    offset = 2  # the layer specs start with the embedding and its LayerNorm
    return [range(max(layers.start - offset, 0), min(layers.stop - offset, config.num_layers))
            for layers in stage_layers(config, pp, task_name, partition)]


def _torch_load(path: Path):
    # DeepSpeed's model files hold tensors and plain values (and, with ZeRO, its stage enum): read safely.
    return load_checkpoint_file(path)
