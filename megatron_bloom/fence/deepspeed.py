"""Every use megatron_bloom makes of DeepSpeed beyond its public API, in one place.

DeepSpeed's public API (`deepspeed.initialize`, the engine's `backward`/`step`/`train_batch`/
`save_checkpoint`/`load_checkpoint`, `deepspeed.pipe`, `deepspeed.utils.safe_set_full_*`) is used where it
is needed. What it does not offer is done here, and only here: the attributes we set or read, the methods we
override, the modules outside its public packages we import, and the names of its checkpoint files and of
the keys inside them. `INTERNALS` lists each one; tests/test_deepspeed_internals.py checks that each still
exists and still does what we rely on, so that a DeepSpeed upgrade fails in CI rather than in a run.

Tested with `TESTED_DEEPSPEED` (setup.py pins it). DeepSpeed is imported inside the functions: the file
names serve readers (to-hf, eval, reshape) that must not pay DeepSpeed's import.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable, Dict, List, Sequence

import torch

TESTED_DEEPSPEED = ">=0.19,<0.20"

# --- Checkpoint files: what `engine.save_checkpoint` writes, which our readers open without DeepSpeed ----

BF16_OPTIMIZER_PREFIX = "bf16_"  # the BF16 optimizer's partition files
MODULE = "module"  # model states: the module's state dict
OPTIMIZER = "optimizer"  # model states without ZeRO: the optimizer's state dict
OPTIMIZER_STATE = "optimizer_state_dict"  # ZeRO partitions (and the fp16/bf16 wrapper's): the partition's state
BASE_OPTIMIZER_STATE = "base_optimizer_state"  # ZeRO 1/2 and BF16: the torch optimizer's state of the partition
PARAM_SLICE_MAPPINGS = "param_slice_mappings"  # ZeRO 1/2 and BF16: parameter name -> fragment address
PARAM_SHAPES = "param_shapes"  # ZeRO 3's model states: every parameter's shape, in partition order
ZERO3_FLAT_GROUPS = "fp32_flat_groups"  # ZeRO 3's partitions: the fp32 flat run of each sub-group
# the non-tensor objects its files pickle, by the name the pickle gives them (0.14 to 0.19)
FILE_TYPES = ("deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
              "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum")


def module_states(module: Dict[str, torch.Tensor], global_steps: int, global_samples: int, mp_world_size: int) -> dict:
    """A model-states file that `load_checkpoint(load_module_only=True)` reads: the module and the
    MODULE_ONLY_KEYS."""
    return {MODULE: module, "global_steps": global_steps, "global_samples": global_samples, "skipped_steps": 0,
            "dp_world_size": 1, "mp_world_size": mp_world_size}


# the keys besides `module` that `load_checkpoint(load_module_only=True)` reads from a model-states file
MODULE_ONLY_KEYS = tuple(key for key in module_states({}, 0, 0, 1) if key != MODULE)


def model_states_file(mp_rank: int) -> str:
    """Model states of one model-parallel rank (the module, and without ZeRO the optimizer)."""
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def pipeline_layer_file(layer: int, tp_rank: int) -> str:
    """One pipeline layer of one tensor-parallel rank (`PipelineModule.ckpt_layer_path`)."""
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def zero_optimizer_file(dp_rank: int, mp_rank: int, prefix: str = "") -> str:
    """One data-parallel rank's optimizer partition (`prefix`: BF16_OPTIMIZER_PREFIX for the BF16 optimizer)."""
    return f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def zero_model_states_file(dp_rank: int, mp_rank: int) -> str:
    """ZeRO 3's per-rank model states (holding PARAM_SHAPES)."""
    return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_model_states.pt"


# --- The engine --------------------------------------------------------------------------------------

def switch_off_gradient_all_reduce(engine) -> None:
    """The flags DeepSpeed's `backward` reads before all-reducing gradients over data-parallel ranks: the
    engine's, and the pipeline engine's own (which leaves tied weights to their separate reduction)."""
    engine.enable_backward_allreduce = False
    engine.pipeline_enable_backward_allreduce = False


def clip_fp32_gradients_with(engine, clip: Callable[[], torch.Tensor]) -> None:
    """Replace how the engine clips in fp32 without ZeRO (its `clip_fp32_gradients`, called by `step`) by
    `clip`, which clips in place and returns the norm; that norm is what `get_global_grad_norm()` reports
    (the engine's `_global_grad_norm`, which DeepSpeed leaves unset on this path)."""
    def clip_and_keep_norm() -> None:
        engine._global_grad_norm = clip()

    engine.clip_fp32_gradients = clip_and_keep_norm


def wrap_checkpoint_engine(engine, wrap: Callable) -> None:
    """Put `wrap(engine.checkpoint_engine)` in its place: every file the engine saves or loads goes through
    its checkpoint engine. (The config's pluggable engines are for storage backends, not for reading.)"""
    if engine.checkpoint_engine is not None:
        engine.checkpoint_engine = wrap(engine.checkpoint_engine)


def is_bf16_optimizer(optimizer) -> bool:
    """Whether DeepSpeed wrapped the optimizer in its BF16 optimizer (bf16 without ZeRO, and with ZeRO 1)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(optimizer, BF16_Optimizer)


# --- Its optimizer wrappers --------------------------------------------------------------------------

def torch_optimizer(wrapper) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrapper (or the optimizer itself without one)."""
    return getattr(wrapper, "optimizer", wrapper)


def fp32_masters_by_parameter(wrapper) -> Dict[int, torch.Tensor]:
    """id(low-precision parameter) -> its fp32 master, for DeepSpeed's fp16/bf16 wrapper without ZeRO."""
    groups = zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", []))
    return {id(low): high for lows, highs in groups for low, high in zip(lows, highs)}


def zero3_flat_partitions(wrapper) -> List[torch.Tensor]:
    """ZeRO 3's fp32 flat partitions, which it hands to the torch optimizer one sub-group at a time."""
    return list(getattr(wrapper, "fp32_partitioned_groups_flat", []))


def low_precision_groups(wrapper) -> Sequence[List[torch.Tensor]]:
    """The bf16/fp16 parameters of each group under ZeRO 1/2 (`bit16_groups`) or the BF16 optimizer
    (`bf16_groups`); empty for other optimizers."""
    return getattr(wrapper, "bit16_groups", None) or getattr(wrapper, "bf16_groups", None) or []


def has_fragment_mapping(param: torch.Tensor) -> bool:
    """Whether DeepSpeed maps the parameter to an optimizer partition (ZeRO 3's `ds_id`, ZeRO 1/2's and the
    BF16 optimizer's `_hp_mapping`): then `deepspeed.utils.safe_set_full_*` sets its state."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


# --- Its pipeline module -----------------------------------------------------------------------------

class PipelineModuleChoices:
    """Mixed into DeepSpeed's `PipelineModule` (before it):
    - the stages are the `self.stages` ranges given, not one of DeepSpeed's partition methods. DeepSpeed's
      `__init__` calls `_partition_layers`, which must set `parts` and this stage's bounds (`_set_bounds`);
      `_topo` and `global_rank` say which stage this is;
    - activation checkpointing recomputes only layers of `self.recomputed_type` (`_is_checkpointable`)."""

    stages: List[range]
    recomputed_type: type

    def _partition_layers(self, method: str = "") -> None:
        self.parts = [stage.start for stage in self.stages] + [self.stages[-1].stop]
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    def _is_checkpointable(self, funcs) -> bool:
        return all(isinstance(f, self.recomputed_type) for f in funcs)


def partition_balanced(weights: Sequence[float], parts: int) -> List[int]:
    """DeepSpeed's balanced split of `weights` into `parts` contiguous runs: the `parts + 1` bounds."""
    from deepspeed.runtime.utils import partition_balanced as deepspeed_partition_balanced

    return [int(bound) for bound in deepspeed_partition_balanced(weights=list(weights), num_parts=parts)]


def pipeline_topology(pp: int, tp: int, dp: int):
    """DeepSpeed's rank grid for a pipeline of `pp` stages, `tp` model-parallel and `dp` data-parallel ranks."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)


# --- Start-up ----------------------------------------------------------------------------------------------

MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"


def defer_muon_compilation() -> None:
    """Import DeepSpeed's Muon kernels with each `torch.compile` put off until the kernel's first call.

    DeepSpeed's ZeRO and BF16 optimizers import its Muon optimizer on every run, to ask whether the optimizer
    they wrap is one, and that module decorates its kernels with `torch.compile` when it is imported. The
    decorator imports torch._dynamo and torch._inductor: about 2 s of CPU in every rank's start-up, for an
    optimizer we do not use. `torch.compile` compiles on a function's first call anyway; this defers its
    imports to that call too. Call it before `deepspeed.initialize`; once the module is imported it does
    nothing.
    """
    if MUON_MODULE in sys.modules:
        return
    from deepspeed.runtime import compiler

    compile_now = compiler.compile
    compiler.compile = lambda: _compiled_on_first_call  # what the module's `@compiler.compile()` applies
    try:
        importlib.import_module(MUON_MODULE)
    finally:
        compiler.compile = compile_now


def _compiled_on_first_call(function: Callable) -> Callable:
    compiled = None

    @functools.wraps(function)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(function)
        return compiled(*args, **kwargs)

    return call


# Each internal, where it lives in DeepSpeed, and what we rely on (checked by tests/test_deepspeed_internals.py).
INTERNALS = {
    "DeepSpeedEngine.enable_backward_allreduce": "False: `backward` does not all-reduce the gradients",
    "PipelineEngine.pipeline_enable_backward_allreduce": "False: the pipeline's `backward` does not either",
    "DeepSpeedEngine.clip_fp32_gradients": "`step` calls it to clip in fp32 without ZeRO",
    "DeepSpeedEngine._global_grad_norm": "what `get_global_grad_norm()` returns",
    "DeepSpeedEngine.checkpoint_engine": "every `save`/`load` of a checkpoint file goes through it",
    "deepspeed.runtime.bf16_optimizer.BF16_Optimizer": "the class of the BF16 optimizer",
    "optimizer wrapper .optimizer": "the torch optimizer inside",
    "FP16_Optimizer / BF16_Optimizer .fp16_groups, .fp32_groups": "low-precision parameters and their masters",
    "DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat": "ZeRO 3's flat fp32 partitions",
    "DeepSpeedZeroOptimizer.bit16_groups, BF16_Optimizer.bf16_groups": "the low-precision parameters per group",
    "parameter .ds_id / ._hp_mapping": "ZeRO 3's and ZeRO 1/2's (and BF16's) fragment mappings",
    "PipelineModule._partition_layers, ._set_bounds, ._topo, .global_rank, .parts": "how stages are split",
    "PipelineModule._is_checkpointable": "which layers activation checkpointing recomputes",
    "deepspeed.runtime.utils.partition_balanced": "the balanced split of layer weights",
    "deepspeed.runtime.pipe.topology.PipeModelDataParallelTopology": "the pipeline's rank grid",
    "checkpoint file names and keys": "model_states_file ... MODULE_ONLY_KEYS above",
    "FILE_TYPES": "the only non-tensor objects its checkpoint files pickle",
    "deepspeed.runtime.compiler.compile, MUON_MODULE": "the module decorates its kernels with `@compiler.compile()`",
}
