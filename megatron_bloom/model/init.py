"""Building a model and giving it initial weights that do not depend on how it is later split.

Every parameter draws from its own random generator, seeded by the run seed and the parameter's model
name (its name in the single-process model, e.g. `transformer.h.3.mlp.dense_4h_to_h.weight`). A pipeline
stage that owns only some layers, or a tensor-parallel rank that owns a slice, therefore gets exactly the
values the full model would have: it generates the full tensor of its names and keeps its part.

The scheme is Megatron-LM's: normal(0, init_std) for weights, with the two projections that write into
the residual stream scaled by 1/sqrt(2 * num_layers) (GPT-2, Radford et al. 2019, section 2.3); biases 0,
LayerNorm weight 1 and bias 0; the vocabulary padding rows of the embedding 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from megatron_bloom.model.config import ModelConfig
from megatron_bloom.model.heads import TASK_MODELS, TaskConfig

_RESIDUAL_OUTPUT_WEIGHTS = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from the run seed and a parameter name (stable across processes and runs)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def initial_value(name: str, shape: Sequence[int], config: ModelConfig, seed: int) -> torch.Tensor:
    """The full initial float32 tensor of parameter `name` (its model name and full, unsplit shape)."""
    leaf = name.rsplit(".", 1)[-1]
    is_layer_norm = "layernorm." in name or name.startswith("ln_f.") or ".ln_f." in name
    if leaf == "bias":
        return torch.zeros(shape)
    if is_layer_norm:
        return torch.ones(shape)
    std = config.init_std
    if name.endswith(_RESIDUAL_OUTPUT_WEIGHTS):
        std = config.init_std / math.sqrt(2.0 * config.num_layers)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    if name.endswith("word_embeddings.weight"):
        # Draw only the real vocabulary rows, so the values do not depend on the padding (which grows with tp).
        value = torch.zeros(shape)
        value[: config.vocab_size].normal_(0.0, std, generator=generator)
        return value
    return torch.empty(shape).normal_(0.0, std, generator=generator)


@torch.no_grad()
def initialize_weights(model: nn.Module, config: ModelConfig, seed: int) -> None:
    """Give every parameter of a single-process model its layout-independent initial value."""
    for name, param in model.named_parameters():
        param.copy_(initial_value(name, param.shape, config, seed))


def build_model(config: ModelConfig, task: Optional[TaskConfig] = None, seed: int = 1234,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Construct the model for `task` (default: causal LM) on `device`, initialized from `seed`.

    The modules are created on the meta device first, so nothing is allocated or initialized twice.
    """
    task = task or TaskConfig()
    with meta_device():
        model = create_task_model(config, task)
    model.to_empty(device=device)
    initialize_weights(model, config, seed)
    return model.to(dtype)


class _SkipInitializationOfMetaTensors(TorchFunctionMode):
    """`torch.nn.init`'s in-place initializers (`uniform_`, `kaiming_uniform_`, ...) leave meta tensors as they
    are: there is nothing to fill."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        name = getattr(func, "__name__", "")
        if (getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_") and not name.startswith("_")
                and isinstance(tensor, torch.Tensor) and tensor.is_meta):
            return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Modules built in this context are created on the meta device, without torch's default initialization.

    Every parameter gets its value later (`initialize_weights`, a checkpoint, or its tensor-parallel slice), so
    the modules' own `reset_parameters` would be wasted work. On meta tensors it costs start-up time as well:
    their random fills (`uniform_`, `normal_`) run as Python decompositions (torch._refs), whose first call
    imports torch._dynamo, about 2 s of CPU in every process that builds a model.
    """
    with torch.device("meta"), _SkipInitializationOfMetaTensors():
        yield


def create_task_model(config: ModelConfig, task: TaskConfig) -> nn.Module:
    """The (uninitialized) module for a task; builds on whatever device is current."""
    model_class = TASK_MODELS[task.name]
    if task.name == "sequence_classification":
        return model_class(config, num_labels=task.num_labels, problem_type=task.problem_type)
    if task.name == "token_classification":
        return model_class(config, num_labels=task.num_labels)
    return model_class(config)
