"""Splitting a plain BLOOM model across tensor-parallel ranks (what torchtitan's `parallelize_*` does).

The model code stays as it is: `parallelize_bloom` swaps its `nn.Linear`/`nn.Embedding` layers, the tied
LM head and the loss for tensor-parallel ones of the same names, and narrows each attention module to its
heads (and their ALiBi slopes: each rank must use the slopes of its own heads, not the first ones).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from megatron_bloom.errors import ConfigError
from megatron_bloom.model import BloomForCausalLM, ModelConfig, TaskConfig, create_task_model, initial_value, meta_device
from megatron_bloom.model.alibi import alibi_slopes
from megatron_bloom.model.heads import TASK_HEAD_NAMES
from megatron_bloom.parallel.cross_entropy import VocabParallelCausalLMLoss, VocabParallelLMHead
from megatron_bloom.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceGatheredLinear,
    VocabParallelEmbedding,
)
from megatron_bloom.parallel.mappings import all_reduce_
from megatron_bloom.parallel.sharding import StateDict, full_shapes, partition_dim, shard_tensor
from megatron_bloom.parallel.state import ParallelState


def check_tensor_parallel(config: ModelConfig, tp: int, sequence_parallel: bool = False) -> None:
    if config.num_heads % tp or config.hidden_size % tp:
        raise ConfigError(
            f"model.num_heads ({config.num_heads}) and model.hidden_size ({config.hidden_size}) must both be "
            f"divisible by parallel.tp ({tp}): each tensor-parallel rank holds whole heads."
        )
    if sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1: it shards along tp ranks.")


def parallelize_bloom(model: nn.Module, state: ParallelState, sequence_parallel: bool = False) -> nn.Module:
    """Replace the layers of a plain BLOOM task model by tensor-parallel ones, in place.

    Build the model on the meta device: the new layers are created empty, and `materialize` fills them
    (as `build_parallel_model` does).
    """
    config: ModelConfig = model.config
    tp, group = state.tp, state.tp_comm
    check_tensor_parallel(config, tp, sequence_parallel)
    if tp == 1:
        return model
    trunk = model.transformer
    trunk.word_embeddings = parallel_embedding(config, state, sequence_parallel)
    for block in trunk.h:
        parallelize_block(block, config, state, sequence_parallel)
    if isinstance(model, BloomForCausalLM):
        model.lm_head = VocabParallelLMHead(group, sequence_parallel=sequence_parallel)
        model.loss_fn = VocabParallelCausalLMLoss(group, *vocab_slice(config, state), fused=config.fused_kernels)
    elif sequence_parallel:
        for name in TASK_HEAD_NAMES.values():  # a replicated head reads the whole sequence
            if hasattr(model, name):
                setattr(model, name, sequence_gathered_head(getattr(model, name), group))
    return model


def parallel_embedding(config: ModelConfig, state: ParallelState, sequence_parallel: bool = False
                       ) -> VocabParallelEmbedding:
    """The vocab-parallel embedding that replaces `word_embeddings` (vocabulary padded for this tp)."""
    return VocabParallelEmbedding(config.padded_vocab_size(state.tp), config.hidden_size, state.tp_comm,
                                  sequence_parallel=sequence_parallel)


def vocab_slice(config: ModelConfig, state: ParallelState) -> tuple:
    """(first vocabulary id, number of real, non-padding ids) of this rank's embedding rows."""
    rows = config.padded_vocab_size(state.tp) // state.tp
    start = state.tp_rank * rows
    return start, max(0, min(config.vocab_size - start, rows))


def parallelize_block(block: nn.Module, config: ModelConfig, state: ParallelState,
                      sequence_parallel: bool = False) -> nn.Module:
    """Swap one transformer block's linears for column/row-parallel ones and narrow it to its heads."""
    h, group, sp = config.hidden_size, state.tp_comm, sequence_parallel
    attention = block.self_attention
    attention.query_key_value = ColumnParallelLinear(h, 3 * h, group, sequence_parallel=sp)
    attention.dense = RowParallelLinear(h, h, group, sequence_parallel=sp)
    local_heads = config.num_heads // state.tp
    first_head = state.tp_rank * local_heads
    attention.num_heads = local_heads
    attention.alibi_slopes = alibi_slopes(config.num_heads)[first_head: first_head + local_heads]
    block.mlp.dense_h_to_4h = ColumnParallelLinear(h, config.ffn_hidden_size, group, sequence_parallel=sp)
    block.mlp.dense_4h_to_h = RowParallelLinear(config.ffn_hidden_size, h, group, sequence_parallel=sp)
    return block


def is_sequence_parallel_parameter(name: str) -> bool:
    """Whether a parameter is applied to sequence-sharded activations, so that each rank's gradient covers
    its part of the sequence only and the gradients are summed over the tp group: the LayerNorms and the
    row-parallel biases (added after the reduce-scatter)."""
    return "layernorm" in name or "ln_f" in name or name.endswith(("self_attention.dense.bias",
                                                                   "mlp.dense_4h_to_h.bias"))


def sum_sequence_parallel_grads(model: nn.Module, state: ParallelState) -> None:
    """Make every backward pass sum the gradients of the sequence-parallel parameters over the tp group
    (Korthikanti et al. 2022, sec. 4.2.2), one all-reduce per parameter: a hook reduces each gradient as
    autograd produces it, before it is accumulated. For models whose forward `SequenceParallelGradSum`
    cannot wrap (the plain model, ZeRO 3's partitioned parameters, which are only whole inside each
    layer's forward)."""
    if state.tp == 1:
        return
    group = state.tp_comm

    def summed(grad: torch.Tensor) -> torch.Tensor:
        return summed_in_float32([grad], group)[0]

    for name, param in model.named_parameters():
        if is_sequence_parallel_parameter(name):
            param.register_hook(summed)


def summed_in_float32(grads: List[torch.Tensor], group) -> List[torch.Tensor]:
    """`grads` summed over the group in one all-reduce of a flat float32 buffer, each back in its dtype (one
    rounding to a bf16 parameter's dtype, as without sequence parallelism)."""
    flat = torch.cat([grad.reshape(-1).to(torch.float32) for grad in grads])
    all_reduce_(flat, group)
    return [part.view_as(grad).to(grad.dtype) for part, grad in zip(flat.split([g.numel() for g in grads]), grads)]


class _SumGradsOverTP(torch.autograd.Function):
    """The identity on several tensors, whose backward sums all their gradients over tp in one all-reduce
    (in float32: one rounding to the parameters' dtype, as without SP). Autograd runs it once every use of
    its outputs has its gradient: at the end of the micro-batch's backward."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(tensor.view_as(tensor) for tensor in tensors)

    @staticmethod
    def backward(ctx, *grads):
        present = [grad for grad in grads if grad is not None]
        summed = iter(summed_in_float32(present, ctx.group) if present else [])
        return (None, *(None if grad is None else next(summed) for grad in grads))


class SequenceParallelGradSum:
    """The sequence-parallel parameters of a module (a pipeline stage, or the stacked layers of pp = 1) and
    a context for its forward that routes them through one `_SumGradsOverTP`: each micro-batch's backward
    then sums all their gradients over tp in one all-reduce, before they are accumulated, so that
    whatever runs the step sees whole gradients (DeepSpeed's ZeRO 1 and 2 hooks, its pipeline engine, its
    clipping). Megatron-LM sums them once per step instead; DeepSpeed's engines have no place between the
    last backward and their own gradient handling. One all-reduce per micro-batch, not one per parameter:
    bloom-tiny at tp 2 x pp 2 on 2 CPU cores trains 2.4x faster so."""

    def __init__(self, module: nn.Module, state: ParallelState) -> None:
        self.group = state.tp_comm
        self.owners = [(owner, local) for owner_name, owner in module.named_modules()
                       for local, param in owner.named_parameters(recurse=False)
                       if is_sequence_parallel_parameter(f"{owner_name}.{local}")]

    @contextmanager
    def summed(self) -> Iterator[None]:
        if not torch.is_grad_enabled() or not self.owners:
            yield
            return
        # Each module reads the identity's output in place of its parameter for this forward: the swap
        # `torch.func.functional_call` makes, without calling the module again (DeepSpeed's engine hooks
        # its forward). Recomputation (non-reentrant) runs on the parameters themselves, with the same
        # values, and its saved tensors serve the graph built here.
        originals = [owner._parameters[name] for owner, name in self.owners]
        for (owner, name), tensor in zip(self.owners, _SumGradsOverTP.apply(self.group, *originals)):
            owner._parameters[name] = tensor
        try:
            yield
        finally:
            for (owner, name), param in zip(self.owners, originals):
                owner._parameters[name] = param


def sequence_gathered_head(head: nn.Linear, group) -> SequenceGatheredLinear:
    """A replicated head (a fine-tuning task's) that reads sequence-parallel activations: it gathers the
    sequence first. Made on the meta device, like the layer it replaces."""
    return SequenceGatheredLinear(head.in_features, head.out_features, group, bias=head.bias is not None)


def materialize(module: nn.Module, config: ModelConfig, state: ParallelState, shapes: Dict[str, torch.Size],
                seed: int, prefix: str = "", full_state_dict: Optional[StateDict] = None) -> nn.Module:
    """Allocate a (meta) module on this rank's device and give each parameter its slice of the full value.

    `prefix` + a parameter's name is its model name (its name in the single-process model); the full
    value comes from `full_state_dict` when given, else from the layout-independent initialization.
    """
    module.to_empty(device=state.device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            model_name = prefix + name
            if full_state_dict is not None:
                if model_name not in full_state_dict:
                    raise KeyError(f"the state dict has no {model_name}")
                full = full_state_dict[model_name]
            else:
                full = initial_value(model_name, shapes[model_name], config, seed)
            param.copy_(shard_tensor(model_name, full, config, state.tp, state.tp_rank))
            # Sharded parameters count on every tp rank in a gradient norm; replicated ones only once
            # (the attribute Megatron-LM and DeepSpeed read).
            param.tensor_model_parallel = state.tp > 1 and partition_dim(model_name) is not None
    return module


def build_parallel_model(config: ModelConfig, state: ParallelState, task: Optional[TaskConfig] = None,
                         seed: int = 1234, full_state_dict: Optional[StateDict] = None,
                         sequence_parallel: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """This rank's part of the model: from `full_state_dict` (single-process weights) when given, else
    initialized from `seed` with exactly the values the single-process model would have."""
    task = task or TaskConfig()
    with meta_device():
        model = parallelize_bloom(create_task_model(config, task), state, sequence_parallel)
    materialize(model, config, state, full_shapes(config, task), seed, full_state_dict=full_state_dict)
    return model.to(dtype)
