"""The layout-independent training checkpoint that `mbloom-convert reshape` writes (contents `universal`).

    global_step<N>/
      layer_<idx>-model_<tp>-model_states.pt   one pipeline layer's weights on tp rank <tp>, under the layer's
                                               own names (DeepSpeed's pipeline-layer files, read the same way)
      layer_<idx>-model_<tp>-optim_states.pt   {"step": Adam's step, "state": {name: {"fp32": master weight,
                                               "exp_avg": ..., "exp_avg_sq": ...}}} for the same weights
      mbloom.json                              contents "universal", the tp it is sliced for, the progress

The optimizer state is kept per parameter, as DeepSpeed's universal checkpoints do, not in the flat
buffers of one ZeRO partitioning: a run of any dp, ZeRO stage, precision and pipeline split loads it, each
stage reading only its own layers; a run of another tp re-slices what it reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron_bloom.checkpoint.deepspeed_optimizer import MASTER, STATE_KEYS
from megatron_bloom.checkpoint.layout import CheckpointMetadata
from megatron_bloom.checkpoint.safe_load import load_checkpoint_file
from megatron_bloom.fence.deepspeed import pipeline_layer_file
from megatron_bloom.model import ModelConfig
from megatron_bloom.parallel.sharding import merge_state_dicts, shard_tensor
from megatron_bloom.pipeline import names

StateTensors = Dict[str, Dict[str, torch.Tensor]]  # state key ("fp32", "exp_avg", "exp_avg_sq") -> name -> tensor


def optimizer_layer_file(layer: int, tp_rank: int) -> str:
    return pipeline_layer_file(layer, tp_rank).replace("-model_states.pt", "-optim_states.pt")


def write_layers(directory: Path, full: StateTensors, step: int, config: ModelConfig, tp: int,
                 weight_dtype: torch.dtype) -> List[int]:
    """Write the layers whose parameters `full` holds (model names, full tensors), sliced for `tp`
    ranks: weights (the fp32 masters in `weight_dtype`, as the run held them) and optimizer state. Returns
    the layers written."""
    layers: Dict[int, List[Tuple[str, str]]] = {}  # layer -> (model name, name inside the layer)
    for name in full[MASTER]:
        layer, local = names.layer_of(name, config)
        layers.setdefault(layer, []).append((name, local))
    for tp_rank in range(tp):
        for layer, members in layers.items():
            weights, optimizer = {}, {}
            for name, local in members:
                shard = {key: shard_tensor(name, full[key][name], config, tp, tp_rank) for key in STATE_KEYS}
                weights[local] = shard[MASTER].to(weight_dtype)
                optimizer[local] = shard
            torch.save(weights, directory / pipeline_layer_file(layer, tp_rank))
            torch.save({"step": step, "state": optimizer}, directory / optimizer_layer_file(layer, tp_rank))
    return sorted(layers)


def read_layers(directory: Path, metadata: CheckpointMetadata, layers: Iterable[int],
                tp_rank: Optional[int] = None) -> Tuple[StateTensors, int]:
    """The optimizer state of the given layers and Adam's step count: of one tp rank's files (as written,
    `tp_rank`) or, by default, merged over all of them (model names, full shapes)."""
    prefixes = names.layer_prefixes(metadata.model, metadata.task.name)
    ranks = range(metadata.tp) if tp_rank is None else [tp_rank]
    states: StateTensors = {key: {} for key in STATE_KEYS}
    step = 0
    for layer in layers:
        if prefixes[layer] is None:
            continue  # the LM head is the tied embedding (layer 0)
        per_rank = [load_checkpoint_file(directory / optimizer_layer_file(layer, rank), allowed=())
                    for rank in ranks]
        step = max(step, *(saved["step"] for saved in per_rank))
        for key in STATE_KEYS:
            shards = [{prefixes[layer] + name: values[key] for name, values in saved["state"].items()}
                      for saved in per_rank]
            states[key].update(shards[0] if tp_rank is not None else merge_state_dicts(shards, metadata.model))
    return states, step


def read_rank_states(directory: Path, metadata: CheckpointMetadata, parameters: Iterable[str], tp: int,
                     tp_rank: int) -> Tuple[StateTensors, int]:
    """One rank's slices (of `tp` ranks) of the optimizer state of `parameters` (model names): its own files
    when the checkpoint was sliced for `tp`, else all of them merged and sliced anew."""
    parameters = list(parameters)
    layers = sorted({names.layer_of(name, metadata.model)[0] for name in parameters})
    if metadata.tp == tp:
        states, step = read_layers(directory, metadata, layers, tp_rank)
        return {key: {name: states[key][name] for name in parameters} for key in STATE_KEYS}, step
    full, step = read_layers(directory, metadata, layers)
    return {key: {name: shard_tensor(name, full[key][name], metadata.model, tp, tp_rank) for name in parameters}
            for key in STATE_KEYS}, step
