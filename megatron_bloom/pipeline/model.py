"""The model a training run holds: DeepSpeed pipeline stages (pp > 1) or the same layers stacked (pp = 1)."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import List, Optional

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_bloom.fence.deepspeed import PipelineModuleChoices, pipeline_topology
from megatron_bloom.model import ModelConfig, TaskConfig
from megatron_bloom.parallel import ParallelState
from megatron_bloom.parallel.parallelize import SequenceParallelGradSum
from megatron_bloom.parallel.sharding import full_shapes
from megatron_bloom.pipeline.layers import (
    Activations,
    BlockPipe,
    EmbeddingPipe,
    LanguageModelLoss,
    LayerNormPipe,
    lm_head_forward,
)
from megatron_bloom.pipeline.names import TIED_EMBEDDING
from megatron_bloom.pipeline.partition import stage_layers
from megatron_bloom.pipeline.task_head import TaskHeadPipe, TaskLoss


def layer_specs(config: ModelConfig, state: ParallelState, seed: int, task: TaskConfig,
                sequence_parallel: bool = False) -> List[LayerSpec]:
    """The language model's layers end in the LM head, a tied copy of the embedding on the last stage; a
    fine-tuning task's end in its own head (and the embedding is an ordinary layer of the first stage)."""
    shapes = full_shapes(config, task)
    common, sp = (config, state, shapes, seed), {"sequence_parallel": sequence_parallel}
    if task.name == "causal_lm":
        embedding = TiedLayerSpec(TIED_EMBEDDING, EmbeddingPipe, *common, **sp,
                                  tied_weight_attr="word_embeddings.weight")
        head = TiedLayerSpec(TIED_EMBEDDING, EmbeddingPipe, *common, **sp, forward_fn=lm_head_forward,
                             tied_weight_attr="word_embeddings.weight")
    else:
        embedding, head = LayerSpec(EmbeddingPipe, *common, **sp), LayerSpec(TaskHeadPipe, *common, task, **sp)
    return [
        embedding,
        LayerSpec(LayerNormPipe, *common, "word_embeddings_layernorm"),
        *[LayerSpec(BlockPipe, *common, layer, **sp) for layer in range(config.num_layers)],
        LayerSpec(LayerNormPipe, *common, "ln_f"),
        head,
    ]


def task_loss(config: ModelConfig, state: ParallelState, task: TaskConfig) -> torch.nn.Module:
    return LanguageModelLoss(config, state) if task.name == "causal_lm" else TaskLoss(task)


class BloomPipeline(PipelineModuleChoices, PipelineModule):
    """DeepSpeed's pipeline module, split as `stage_layers` says and recomputing transformer blocks only
    (not the embedding or the norms)."""

    recomputed_type = BlockPipe

    def __init__(self, *args, stages: List[range], **kwargs) -> None:
        self.stages = stages  # read while DeepSpeed's __init__ partitions the layers
        super().__init__(*args, **kwargs)
        self.gradient_sum: Optional[SequenceParallelGradSum] = None  # with sequence parallelism (training)

    def forward(self, forward_input):
        with self.gradient_sum.summed() if self.gradient_sum is not None else nullcontext():
            return super().forward(forward_input)


def build_pipeline(config: ModelConfig, state: ParallelState, seed: int, activation_checkpointing: bool = False,
                   task: Optional[TaskConfig] = None, partition: str = "flops",
                   sequence_parallel: bool = False) -> PipelineModule:
    """This rank's pipeline stage; `partition` is how the stages split the layers (`pipeline.partition`)."""
    task = task or TaskConfig()
    topology = pipeline_topology(state.pp, state.tp, state.dp)
    return BloomPipeline(layers=layer_specs(config, state, seed, task, sequence_parallel),
                         loss_fn=task_loss(config, state, task),
                         topology=topology, stages=stage_layers(config, state.pp, task.name, partition),
                         activation_checkpoint_interval=1 if activation_checkpointing else 0,
                         activation_checkpoint_func=partial(checkpoint, use_reentrant=False))


class StackedModel(nn.Module):
    """The pipeline layers run one after the other in one process: what pp = 1 trains, with no schedule.
    (Its attribute names are what `names.from_stacked_model` maps back to model names.)"""

    def __init__(self, config: ModelConfig, state: ParallelState, seed: int, activation_checkpointing: bool = False,
                 task: Optional[TaskConfig] = None, sequence_parallel: bool = False) -> None:
        super().__init__()
        task = task or TaskConfig()
        shapes, sp = full_shapes(config, task), sequence_parallel
        self.embedding = EmbeddingPipe(config, state, shapes, seed, sp)
        self.embedding_norm = LayerNormPipe(config, state, shapes, seed, "word_embeddings_layernorm")
        self.blocks = nn.ModuleList(BlockPipe(config, state, shapes, seed, i, sp) for i in range(config.num_layers))
        self.final_norm = LayerNormPipe(config, state, shapes, seed, "ln_f")
        self.head = TaskHeadPipe(config, state, shapes, seed, task, sp) if task.name != "causal_lm" else None
        self.loss_fn = task_loss(config, state, task)
        self.activation_checkpointing = activation_checkpointing
        self.gradient_sum: Optional[SequenceParallelGradSum] = None  # with sequence parallelism (training)

    def outputs(self, inputs: Activations) -> torch.Tensor:
        """`inputs`: token ids, or (token ids, attention mask) -> the head's per-position logits (the LM
        head's: this rank's vocabulary slice)."""
        hidden = self.embedding_norm(self.embedding(inputs))
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                hidden = checkpoint(block, hidden, use_reentrant=False)
            else:
                hidden = block(hidden)
        hidden = self.final_norm(hidden)
        return self.head(hidden) if self.head is not None else lm_head_forward(self.embedding, hidden)

    def forward(self, inputs: Activations, labels) -> torch.Tensor:
        """The task's loss; `labels` are what it takes (`pipeline.task_head`, or the shifted token ids)."""
        with self.gradient_sum.summed() if self.gradient_sum is not None else nullcontext():
            return self.loss_fn(self.outputs(inputs), labels)
