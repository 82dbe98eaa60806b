"""The BLOOM model as a sequence of pipeline layers, each a view of the plain model's modules.

    EmbeddingPipe (tied)  ->  LayerNormPipe  ->  BlockPipe x L  ->  LayerNormPipe  ->  lm_head (tied)
                                                                                     or a task head

Every layer holds the same modules (and parameter names) as the single-process model, split across
tensor-parallel ranks by the same `parallelize_*` functions, and initializes itself from its parameters'
model names (`names.py`), so any layout starts from the same full weights. Between layers flows the
hidden states alone when batches have no padding (pre-training: each block derives ALiBi positions and
the causal mask from the shape), or the pair (hidden states, 0/1 attention mask) for the padded batches
of fine-tuning, which the pipeline carries from stage to stage (an integer tensor: it gets no gradient).

With sequence parallelism (Korthikanti et al. 2022) the hidden states between layers are this tp rank's
1/tp of the sequence: the embedding reduce-scatters, the LM head (or a task head) gathers, and pipeline
stages send each other the sharded activations, 1/tp of the bytes.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from megatron_bloom.model.block import BloomBlock
from megatron_bloom.model.config import ModelConfig
from megatron_bloom.model.init import meta_device
from megatron_bloom.model.transformer import attention_inputs
from megatron_bloom.parallel.cross_entropy import VocabParallelLMHead, vocab_parallel_cross_entropy
from megatron_bloom.parallel.parallelize import materialize, parallel_embedding, parallelize_block, vocab_slice
from megatron_bloom.parallel.state import ParallelState
from megatron_bloom.pipeline import names


# What flows between pipeline layers: the hidden states, or (hidden states, attention mask).
Activations = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def split_activations(inputs: Activations) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    return (inputs[0], inputs[1]) if isinstance(inputs, tuple) else (inputs, None)


def join_activations(tensor: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Activations:
    return tensor if attention_mask is None else (tensor, attention_mask)


class EmbeddingPipe(nn.Module):
    """The (vocab-parallel) word embedding; the first and the last stage each hold a tied copy."""

    model_prefix = names.TRUNK  # + a parameter's name here = its model name (`names.py`)

    def __init__(self, config: ModelConfig, state: ParallelState, shapes: Dict, seed: int,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        with meta_device():
            self.word_embeddings = parallel_embedding(config, state, sequence_parallel)
        materialize(self, config, state, shapes, seed, prefix=self.model_prefix)
        self.lm_head = VocabParallelLMHead(state.tp_comm, sequence_parallel=sequence_parallel)

    def forward(self, inputs: Activations) -> Activations:
        """Token ids, or (token ids, attention mask) -> embeddings (with the mask)."""
        input_ids, attention_mask = split_activations(inputs)
        return join_activations(self.word_embeddings(input_ids), attention_mask)


def lm_head_forward(embedding: EmbeddingPipe, hidden_states: torch.Tensor) -> torch.Tensor:
    """The tied LM head: this rank's vocabulary slice of the logits."""
    return embedding.lm_head(hidden_states, embedding.word_embeddings.weight)


class LayerNormPipe(nn.Module):
    """One of the trunk's LayerNorms, under its own name: `word_embeddings_layernorm` (after the embedding)
    or `ln_f` (the final one)."""

    model_prefix = names.TRUNK

    def __init__(self, config: ModelConfig, state: ParallelState, shapes: Dict, seed: int, name: str) -> None:
        super().__init__()
        self.name = name
        with meta_device():
            self.add_module(name, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon))
        materialize(self, config, state, shapes, seed, prefix=self.model_prefix)

    def forward(self, inputs: Activations) -> Activations:
        hidden_states, attention_mask = split_activations(inputs)
        return join_activations(getattr(self, self.name)(hidden_states), attention_mask)


class BlockPipe(BloomBlock):
    """Transformer block `layer_number`, taking and returning the hidden states (with the padding mask, when
    the batch has one)."""

    def __init__(self, config: ModelConfig, state: ParallelState, shapes: Dict, seed: int, layer_number: int,
                 sequence_parallel: bool = False) -> None:
        with meta_device():
            super().__init__(config)
            if state.tp > 1:
                parallelize_block(self, config, state, sequence_parallel)
        self.model_prefix = names.block_prefix(layer_number)
        materialize(self, config, state, shapes, seed, prefix=self.model_prefix)
        self.sequence_shards = state.tp if sequence_parallel else 1  # the input holds 1/this of the sequence

    def forward(self, inputs: Activations) -> Activations:
        hidden_states, attention_mask = split_activations(inputs)
        batch_size, seq_length = hidden_states.shape[0], hidden_states.shape[1] * self.sequence_shards
        positions, mask = attention_inputs(batch_size, seq_length, attention_mask, hidden_states.dtype,
                                           hidden_states.device)
        return join_activations(super().forward(hidden_states, positions, mask), attention_mask)


class LanguageModelLoss(nn.Module):
    """Mean cross-entropy of vocab-parallel logits against labels already shifted by one token."""

    def __init__(self, config: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.group = state.tp_comm
        self.vocab_start, self.real_columns = vocab_slice(config, state)
        self.fused = config.fused_kernels

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_token = vocab_parallel_cross_entropy(logits, labels, self.vocab_start, self.real_columns, self.group,
                                                 self.fused)
        return per_token.mean()
