"""The BLOOM model as a sequence of pipeline layers, each a view of the plain model's modules.

    EmbeddingPipe (tied)  ->  LayerNormPipe  ->  BlockPipe x L  ->  LayerNormPipe  ->  lm_head (tied)
                                                                                     or a task head

Every layer holds the same modules (and parameter names) as the single-process model, split across
tensor-parallel ranks by the same `parallelize_*` functions, and initializes itself from its canonical
parameter names, so any layout starts from the same full weights. Between layers flows the hidden states
alone when batches have no padding (pre-training: each block derives ALiBi positions and the causal mask
from the shape), or the pair (hidden states, 0/1 attention mask) for the padded batches of fine-tuning,
which the pipeline carries from stage to stage (an integer tensor: it gets no gradient).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from megatron_bloom.model import ModelConfig
from megatron_bloom.model.block import BloomBlock
from megatron_bloom.model.transformer import attention_inputs
from megatron_bloom.parallel import ParallelState
from megatron_bloom.parallel.cross_entropy import VocabParallelLMHead, vocab_parallel_cross_entropy
from megatron_bloom.parallel.parallelize import materialize, parallel_embedding, parallelize_block, vocab_slice


# What flows between pipeline layers: the hidden states, or (hidden states, attention mask).
Activations = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def split_activations(inputs: Activations) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    return (inputs[0], inputs[1]) if isinstance(inputs, tuple) else (inputs, None)


def join_activations(tensor: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Activations:
    return tensor if attention_mask is None else (tensor, attention_mask)


class EmbeddingPipe(nn.Module):
    """The (vocab-parallel) word embedding; the first and the last stage each hold a tied copy."""

    canonical_prefix = "transformer."  # + a parameter's name here = its name in the single-process model

    def __init__(self, config: ModelConfig, state: ParallelState, shapes: Dict, seed: int) -> None:
        super().__init__()
        with torch.device("meta"):
            self.word_embeddings = parallel_embedding(config, state)
        materialize(self, config, state, shapes, seed, prefix=self.canonical_prefix)
        self.lm_head = VocabParallelLMHead(state.tp_comm)

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

    canonical_prefix = "transformer."

    def __init__(self, config: ModelConfig, state: ParallelState, shapes: Dict, seed: int, name: str) -> None:
        super().__init__()
        self.name = name
        with torch.device("meta"):
            self.add_module(name, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon))
        materialize(self, config, state, shapes, seed, prefix=self.canonical_prefix)

    def forward(self, inputs: Activations) -> Activations:
        hidden_states, attention_mask = split_activations(inputs)
        return join_activations(getattr(self, self.name)(hidden_states), attention_mask)


class BlockPipe(BloomBlock):
    """Transformer block `layer_number`, taking and returning the hidden states (with the padding mask, when
    the batch has one)."""

    def __init__(self, config: ModelConfig, state: ParallelState, shapes: Dict, seed: int, layer_number: int) -> None:
        with torch.device("meta"):
            super().__init__(config)
            if state.tp > 1:
                parallelize_block(self, config, state)
        self.canonical_prefix = f"transformer.h.{layer_number}."
        materialize(self, config, state, shapes, seed, prefix=self.canonical_prefix)

    def forward(self, inputs: Activations) -> Activations:
        hidden_states, attention_mask = split_activations(inputs)
        batch_size, seq_length, _ = hidden_states.shape
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


def canonical_parameters(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """This rank's parameters under their single-process names, once each (a stage may hold the tied
    embedding twice over: as the input embedding and as the LM head of the last stage)."""
    seen = set()
    for module in model.modules():
        prefix = getattr(module, "canonical_prefix", None)
        if prefix is None or id(module) in seen:
            continue
        seen.add(id(module))
        for name, param in module.named_parameters():
            yield prefix + name, param


# How DeepSpeed's checkpoint files name this model's weights, mapped back to single-process names (the
# layer order is that of `megatron_bloom.pipeline.model.layer_specs`, the attributes those of `StackedModel`).

def layer_canonical_prefixes(config: ModelConfig, task: str = "causal_lm") -> List[Optional[str]]:
    """For each pipeline layer (DeepSpeed's `layer_<idx>-...` files), the prefix that turns its parameter
    names into single-process names; the last layer is the LM head (None: a tied copy of the embedding,
    no weights of its own) or a fine-tuning task's head (its weights under their own names)."""
    blocks = [f"transformer.h.{i}." for i in range(config.num_layers)]
    return ["transformer.", "transformer.", *blocks, "transformer.", None if task == "causal_lm" else ""]


def canonical_layer(name: str, config: ModelConfig) -> Tuple[int, str]:
    """The pipeline layer (`layer_specs` index) holding a single-process parameter, and its name there."""
    if not name.startswith("transformer."):  # a task head's weight: the last layer
        return config.num_layers + 3, name
    rest = name.removeprefix("transformer.")
    if rest.startswith("h."):
        _, block, local = rest.split(".", 2)
        return 2 + int(block), local
    layers = {"word_embeddings": 0, "word_embeddings_layernorm": 1, "ln_f": config.num_layers + 2}
    return layers[rest.split(".")[0]], rest


def pipeline_canonical_name(name: str, config: ModelConfig, task: str = "causal_lm") -> str:
    """A DeepSpeed `PipelineModule` parameter name -> its single-process name: `<layer>.<name>` (layer
    index in `layer_specs`) or `tied_modules.embed.<name>` (the embedding both end stages hold)."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        return EmbeddingPipe.canonical_prefix + rest.partition(".")[2]
    prefix = layer_canonical_prefixes(config, task)[int(head)]
    if prefix is None:
        raise ValueError(f"{name}: the LM head holds no weights of its own (it is the tied embedding)")
    return prefix + rest


def stacked_canonical_name(name: str) -> str:
    """A `StackedModel` parameter name -> its single-process name (`blocks.3.x` -> `transformer.h.3.x`,
    `head.score.weight` -> `score.weight`)."""
    module, _, rest = name.partition(".")
    if module == "blocks":
        return "transformer.h." + rest
    if module == "head":
        return rest
    return "transformer." + rest  # embedding., embedding_norm., final_norm.
