"""The optimizer state in DeepSpeed's checkpoint files, read back per parameter under model names.

DeepSpeed stores Adam's state in the shape of its optimizer, not of the model: flat buffers partitioned
over the data-parallel ranks (ZeRO) or a torch state dict keyed by position (no ZeRO). Reading one
pipeline stage of one tensor-parallel rank, over all its data-parallel files, gives for every parameter
of that stage its fp32 master weight and both moments in the parameter's (tp-shard) shape: a state that
no longer depends on dp, the ZeRO stage or the pipeline split, which is what a reshape carries over.

The formats, as DeepSpeed 0.1x writes them:
- ZeRO 1/2 and DeepSpeed's BF16 optimizer: `[bf16_]zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt`,
  one flat fp32 partition per param group and data-parallel rank, with `param_slice_mappings` saying where
  in the partition each parameter's fragment lies (a parameter may span ranks).
- ZeRO 3: the same file names, `fp32_flat_groups`; every parameter is split over the data-parallel ranks
  on its own (ceil(numel / dp) elements each, the last rank padded), in the order of `param_shapes`
  (saved in `zero_pp_rank_<dp>_mp_rank_<mp>_model_states.pt`).
- No ZeRO: the torch optimizer's `state_dict()` in `mp_rank_<mp>_model_states.pt` (DeepSpeed's fp16 /
  bf16 wrapper adds per-parameter fp32 copies); parameters are numbered in optimizer-group order, which
  `training.optimizer.build_optimizer` fixes (matrices first, then the 1-D weights).
`mp` is the tensor-parallel rank at pp = 1 and `stage * tp + tp_rank` in a pipeline (DeepSpeed's
model-parallel rank spans both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megatron_bloom.checkpoint.layout import CheckpointMetadata
from megatron_bloom.checkpoint.safe_load import load_checkpoint_file
from megatron_bloom.errors import UserError
from megatron_bloom.fence.deepspeed import (
    BASE_OPTIMIZER_STATE,
    BF16_OPTIMIZER_PREFIX,
    MODULE,
    OPTIMIZER,
    OPTIMIZER_STATE,
    PARAM_SHAPES,
    PARAM_SLICE_MAPPINGS,
    ZERO3_FLAT_GROUPS,
    model_states_file,
    pipeline_layer_file,
    zero_model_states_file,
    zero_optimizer_file,
)
from megatron_bloom.parallel.sharding import full_shapes, shard_shape
from megatron_bloom.pipeline import names
from megatron_bloom.pipeline.partition import stage_layers

# Per parameter: the fp32 master weight and Adam's first and second moments (DeepSpeed's key names).
MASTER, MOMENTS = "fp32", ("exp_avg", "exp_avg_sq")
STATE_KEYS = (MASTER, *MOMENTS)


@dataclass
class ParameterStates:
    """One stage of one tensor-parallel rank: state key -> model name (`pipeline/names.py`) -> tensor of
    the parameter's shard shape, and Adam's step count."""

    tensors: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=lambda: {key: {} for key in STATE_KEYS})
    step: int = 0

    def add(self, name: str, values: Dict[str, torch.Tensor]) -> None:
        for key in STATE_KEYS:
            self.tensors[key][name] = values[key]


def read_optimizer_states(directory: Path, metadata: CheckpointMetadata, stage: int, tp_rank: int) -> ParameterStates:
    """The optimizer state of pipeline stage `stage` of tensor-parallel rank `tp_rank`, over all dp files."""
    mp_rank = stage * metadata.tp + tp_rank if metadata.pp > 1 else tp_rank
    zero_files = _zero_files(directory, metadata.dp, mp_rank)
    try:
        if zero_files is None:
            return _read_unpartitioned(directory, metadata, stage, tp_rank, mp_rank)
        partitions = [_load(path)[OPTIMIZER_STATE] for path in zero_files]
        if PARAM_SLICE_MAPPINGS in partitions[0]:
            return _read_sliced(partitions, metadata)
        if ZERO3_FLAT_GROUPS in partitions[0]:
            shapes = _load(directory / zero_model_states_file(0, mp_rank))[PARAM_SHAPES]
            return _read_zero3(partitions, shapes, metadata)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise UserError(f"checkpoint {directory}: DeepSpeed's optimizer files of pipeline stage {stage}, "
                        f"tensor-parallel rank {tp_rank} are not in a format this version reads ({error!r}).") from None
    raise UserError(f"checkpoint {directory}: {zero_files[0].name} holds an optimizer state of a kind this "
                    "version does not read (neither ZeRO 1/2/3 nor DeepSpeed's BF16 optimizer).")


def _zero_files(directory: Path, dp: int, mp_rank: int) -> Optional[List[Path]]:
    """The data-parallel partitions of the optimizer state, in dp-rank order (None without ZeRO files)."""
    for prefix in (BF16_OPTIMIZER_PREFIX, ""):
        files = [directory / zero_optimizer_file(dp_rank, mp_rank, prefix) for dp_rank in range(dp)]
        if files[0].is_file():
            missing = [path.name for path in files if not path.is_file()]
            if missing:
                raise UserError(f"checkpoint {directory} misses {', '.join(missing)}.")
            return files
    return None


def _read_sliced(partitions: List[dict], metadata: CheckpointMetadata) -> ParameterStates:
    """ZeRO 1/2 or the BF16 optimizer: each rank's fragment of a parameter, concatenated in rank order."""
    fragments: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    steps = []
    for partition in partitions:
        base_state = partition[BASE_OPTIMIZER_STATE]["state"]
        for group, mapping in enumerate(partition[PARAM_SLICE_MAPPINGS]):
            flat = {MASTER: partition["single_partition_of_fp32_groups"][group]}
            flat.update((key, base_state[group][key]) for key in MOMENTS)
            steps.append(base_state[group].get("step", 0))
            for name, address in mapping.items():
                pieces = fragments.setdefault(name, {key: [] for key in STATE_KEYS})
                for key in STATE_KEYS:
                    pieces[key].append(flat[key].narrow(0, address.start, address.numel))
    shapes = _shapes_by_name(metadata, fragments)
    states = ParameterStates(step=_step(steps))
    for name, pieces in fragments.items():
        states.add(_model_name(name, metadata),
                   {key: torch.cat(pieces[key]).view(shapes[name]).clone() for key in STATE_KEYS})
    return states


def _shapes_by_name(metadata: CheckpointMetadata, fragments: Dict) -> Dict[str, torch.Size]:
    """The flat fragments only know their lengths; the shapes come from the model's shard shapes."""
    full = full_shapes(metadata.model, metadata.task)
    shapes = {}
    for name, pieces in fragments.items():
        model_name = _model_name(name, metadata)
        shape = shard_shape(model_name, full[model_name], metadata.model, metadata.tp)
        numel = sum(piece.numel() for piece in pieces[MASTER])
        if math.prod(shape) != numel:
            raise ValueError(f"{name} has {numel} elements in the optimizer state, its shape {tuple(shape)} holds "
                             f"{math.prod(shape)}")
        shapes[name] = shape
    return shapes


def _read_zero3(partitions: List[dict], param_shapes: List[Dict[str, torch.Size]],
                metadata: CheckpointMetadata) -> ParameterStates:
    """ZeRO 3: every parameter split on its own over the dp ranks, all sub-groups one flat run per rank."""
    dp = len(partitions)
    flats = []
    steps = []
    for partition in partitions:
        sub_groups = partition[OPTIMIZER_STATE]["state"]
        flat = {MASTER: torch.cat(list(partition[ZERO3_FLAT_GROUPS]))}
        flat.update((key, torch.cat([sub_groups[i][key] for i in sorted(sub_groups)])) for key in MOMENTS)
        steps += [sub_groups[i].get("step", 0) for i in sub_groups]
        flats.append(flat)
    states = ParameterStates(step=_step(steps))
    offset = 0
    for group in param_shapes:
        for name, shape in group.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / dp)
            states.add(_model_name(name, metadata), {
                key: torch.cat([flat[key].narrow(0, offset, per_rank) for flat in flats])[:numel].view(shape).clone()
                for key in STATE_KEYS})
            offset += per_rank
    if offset != flats[0][MASTER].numel():
        raise ValueError(f"the parameters hold {offset} elements per rank, the flat fp32 groups "
                         f"{flats[0][MASTER].numel()}")
    return states


def _read_unpartitioned(directory: Path, metadata: CheckpointMetadata, stage: int, tp_rank: int,
                        mp_rank: int) -> ParameterStates:
    """No ZeRO: the torch optimizer's state dict, parameters numbered in `build_optimizer`'s group order."""
    saved = _load(directory / model_states_file(mp_rank))[OPTIMIZER]
    if saved is None:
        raise ValueError("the model file holds no optimizer state")
    wrapped = OPTIMIZER_STATE in saved  # DeepSpeed's fp16/bf16 wrapper: fp32 copies of its own
    torch_state = saved[OPTIMIZER_STATE] if wrapped else saved
    parameters = _stage_parameters(directory, metadata, stage, tp_rank)
    groups = [[p for p in parameters if p[1].ndim >= 2], [p for p in parameters if p[1].ndim < 2]]
    groups = [group for group in groups if group]  # DeepSpeed drops empty groups
    states = ParameterStates()
    steps = []
    for index, (group, saved_group) in enumerate(zip(groups, torch_state["param_groups"], strict=True)):
        for position, ((name, weight), param_id) in enumerate(zip(group, saved_group["params"], strict=True)):
            adam = torch_state["state"][param_id]
            master = saved["fp32_groups"][index][position] if wrapped else weight
            if adam["exp_avg"].shape != weight.shape or master.shape != weight.shape:
                raise ValueError(f"optimizer entry {param_id} has shape {tuple(adam['exp_avg'].shape)}, "
                                 f"expected {name}'s {tuple(weight.shape)}")
            steps.append(adam.get("step", 0))
            states.add(name, {MASTER: master.float().clone(), **{key: adam[key] for key in MOMENTS}})
    states.step = _step(steps)
    return states


def _stage_parameters(directory: Path, metadata: CheckpointMetadata, stage: int,
                      tp_rank: int) -> List[Tuple[str, torch.Tensor]]:
    """The weights of one stage in the order the stage's module lists its parameters (which is the
    optimizer's order): the stacked model's own order at pp = 1; in a pipeline of the language model the
    tied embedding first (DeepSpeed registers tied modules before the layers), then each layer's weights."""
    if metadata.pp == 1:
        module = _load(directory / model_states_file(tp_rank))[MODULE]
        return [(names.from_stacked_model(name), tensor) for name, tensor in module.items()]
    layers = stage_layers(metadata.model, metadata.pp, metadata.task.name, metadata.pipeline_partition)[stage]
    prefixes = names.layer_prefixes(metadata.model, metadata.task.name)
    order = list(layers)
    if metadata.task.name == "causal_lm":  # the last layer is the tied embedding (layer 0), listed first
        last = len(prefixes) - 1
        order = ([0] if 0 in layers or last in layers else []) + [i for i in layers if i not in (0, last)]
    return [(prefixes[layer] + name, tensor) for layer in order
            for name, tensor in _load(directory / pipeline_layer_file(layer, tp_rank)).items()]


def _model_name(name: str, metadata: CheckpointMetadata) -> str:
    return names.from_deepspeed_module(name, metadata.model, metadata.task.name, metadata.pp)


def _step(steps: List) -> int:
    """Adam's step count (one per group or parameter, all equal)."""
    return int(max((float(step) for step in steps), default=0))


def _load(path: Path):
    # DeepSpeed's optimizer files pickle a few of its own objects (fragment addresses, a stage enum, a loss
    # scaler): read as inert records, never unpickled as code (checkpoint/safe_load.py).
    return load_checkpoint_file(path)
