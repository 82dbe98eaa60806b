"""The model a training run holds: DeepSpeed pipeline stages (pp > 1) or the same layers stacked (pp = 1)."""

from __future__ import annotations

from functools import partial
from typing import List

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.runtime.utils import partition_balanced
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_bloom.model import ModelConfig, TaskConfig
from megatron_bloom.parallel import ParallelState
from megatron_bloom.parallel.sharding import full_shapes
from megatron_bloom.pipeline.layers import BlockPipe, EmbeddingPipe, LanguageModelLoss, LayerNormPipe, lm_head_forward

TIED_EMBEDDING = "embed"
PARTITION_METHOD = "type:BlockPipe"  # `stage_layers` computes the same partition offline


def layer_specs(config: ModelConfig, state: ParallelState, seed: int) -> List[LayerSpec]:
    shapes = full_shapes(config, TaskConfig())
    common = (config, state, shapes, seed)
    return [
        TiedLayerSpec(TIED_EMBEDDING, EmbeddingPipe, *common, tied_weight_attr="word_embeddings.weight"),
        LayerSpec(LayerNormPipe, *common, "word_embeddings_layernorm"),
        *[LayerSpec(BlockPipe, *common, layer) for layer in range(config.num_layers)],
        LayerSpec(LayerNormPipe, *common, "ln_f"),
        TiedLayerSpec(TIED_EMBEDDING, EmbeddingPipe, *common, forward_fn=lm_head_forward,
                      tied_weight_attr="word_embeddings.weight"),
    ]


def stage_layers(config: ModelConfig, pp: int) -> List[range]:
    """The `layer_specs` indices each pipeline stage holds: DeepSpeed's `type:BlockPipe` partition (blocks
    balanced over the stages), computed without building the module."""
    is_block = [0, 0] + [1] * config.num_layers + [0, 0]
    bounds = [int(bound) for bound in partition_balanced(weights=is_block, num_parts=pp)]
    return [range(bounds[stage], bounds[stage + 1]) for stage in range(pp)]


class BloomPipeline(PipelineModule):
    """DeepSpeed's pipeline module, recomputing transformer blocks only (not the embedding or the norms)."""

    def _is_checkpointable(self, funcs) -> bool:
        return all(isinstance(f, BlockPipe) for f in funcs)


def build_pipeline(config: ModelConfig, state: ParallelState, seed: int,
                   activation_checkpointing: bool = False) -> PipelineModule:
    """This rank's pipeline stage; stages are balanced by transformer blocks (DeepSpeed's `type:` method)."""
    topology = PipeModelDataParallelTopology(num_pp=state.pp, num_mp=state.tp, num_dp=state.dp)
    return BloomPipeline(layers=layer_specs(config, state, seed), loss_fn=LanguageModelLoss(config, state),
                         topology=topology, partition_method=PARTITION_METHOD,
                         activation_checkpoint_interval=1 if activation_checkpointing else 0,
                         activation_checkpoint_func=partial(checkpoint, use_reentrant=False))


class StackedModel(nn.Module):
    """The pipeline layers run one after the other in one process: what pp = 1 trains, with no schedule.
    (Its attribute names are what `stacked_canonical_name` maps back to single-process names.)"""

    def __init__(self, config: ModelConfig, state: ParallelState, seed: int,
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        shapes = full_shapes(config, TaskConfig())
        self.embedding = EmbeddingPipe(config, state, shapes, seed)
        self.embedding_norm = LayerNormPipe(config, state, shapes, seed, "word_embeddings_layernorm")
        self.blocks = nn.ModuleList(BlockPipe(config, state, shapes, seed, i) for i in range(config.num_layers))
        self.final_norm = LayerNormPipe(config, state, shapes, seed, "ln_f")
        self.loss_fn = LanguageModelLoss(config, state)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding_norm(self.embedding(input_ids))
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                hidden = checkpoint(block, hidden, use_reentrant=False)
            else:
                hidden = block(hidden)
        return self.loss_fn(lm_head_forward(self.embedding, self.final_norm(hidden)), labels)
