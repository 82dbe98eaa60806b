"""Parameter names: the one place where the names training and DeepSpeed's files use are translated.

Every parameter has one name, its *model name*: its name in the plain single-process model, which is its
name in `transformers`' BLOOM classes. Initialization, tensor-parallel slicing, Hugging Face conversion and
every file we write use it. A training run holds the same parameters inside pipeline layers, and DeepSpeed
names them by those layers in its files:

    model name                                  transformer.h.3.mlp.dense_h_to_4h.weight
    pipeline module (pp > 1)                    5.mlp.dense_h_to_4h.weight
      its layer file layer_05-model_<tp>-...    mlp.dense_h_to_4h.weight       (layer 5, local name)
      the embedding both end stages hold        tied_modules.embed.word_embeddings.weight
    stacked model (pp = 1)                      blocks.3.mlp.dense_h_to_4h.weight
    a bare `transformers.BloomModel`'s files    h.3.mlp.dense_h_to_4h.weight

The pipeline layers, in the order of `pipeline.model.layer_specs` (L transformer blocks):

    0 embedding   1 its LayerNorm   2 .. L+1 the blocks   L+2 the final LayerNorm   L+3 the head

Each pipeline layer module carries `model_prefix`: its parameter names with that prefix are model names.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from megatron_bloom.model.config import ModelConfig

TRUNK = "transformer."  # the prefix of the trunk's parameters (embedding, LayerNorms, blocks)
HEAD = ""  # a fine-tuning head's parameters are top-level (`score.weight`)
TIED_EMBEDDING = "embed"  # DeepSpeed's key for the embedding tied between the first and the last stage
# The attributes of `pipeline.model.StackedModel` that hold the trunk's layers, and its head's.
STACKED_BLOCKS, STACKED_HEAD = "blocks", "head"
# The trunk's modules, which a bare `transformers.BloomModel` saves without the `transformer.` prefix.
_BARE_TRUNK = ("word_embeddings.", "word_embeddings_layernorm.", "h.", "ln_f.")


def block_prefix(index: int) -> str:
    """The model-name prefix of transformer block `index`."""
    return f"{TRUNK}h.{index}."


def layer_prefixes(config: ModelConfig, task: str = "causal_lm") -> List[Optional[str]]:
    """For each pipeline layer, the prefix that turns its parameter names into model names. The last layer
    is the LM head (None: a tied copy of the embedding, no weights of its own) or a fine-tuning head."""
    blocks = [block_prefix(i) for i in range(config.num_layers)]
    return [TRUNK, TRUNK, *blocks, TRUNK, None if task == "causal_lm" else HEAD]


def layer_of(model_name: str, config: ModelConfig) -> Tuple[int, str]:
    """The pipeline layer holding a parameter, and the parameter's name inside that layer."""
    if not model_name.startswith(TRUNK):  # a task head's weight: the last layer
        return config.num_layers + 3, model_name
    local = model_name.removeprefix(TRUNK)
    if local.startswith("h."):
        _, block, inside = local.split(".", 2)
        return 2 + int(block), inside
    layers = {"word_embeddings": 0, "word_embeddings_layernorm": 1, "ln_f": config.num_layers + 2}
    return layers[local.split(".")[0]], local


def from_pipeline_module(name: str, config: ModelConfig, task: str = "causal_lm") -> str:
    """A DeepSpeed `PipelineModule` parameter name (`<layer>.<local>` or `tied_modules.embed.<local>`) ->
    its model name."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        return TRUNK + rest.partition(".")[2]
    prefix = layer_prefixes(config, task)[int(head)]
    if prefix is None:
        raise ValueError(f"{name}: the LM head holds no weights of its own (it is the tied embedding)")
    return prefix + rest


def from_stacked_model(name: str) -> str:
    """A `StackedModel` parameter name -> its model name (`blocks.3.x` -> `transformer.h.3.x`,
    `head.score.weight` -> `score.weight`, `final_norm.ln_f.weight` -> `transformer.ln_f.weight`)."""
    module, _, rest = name.partition(".")
    if module == STACKED_BLOCKS:
        return block_prefix(int(rest.partition(".")[0])) + rest.partition(".")[2]
    if module == STACKED_HEAD:
        return HEAD + rest
    return TRUNK + rest  # embedding., embedding_norm., final_norm. hold their modules under model names


def from_deepspeed_module(name: str, config: ModelConfig, task: str, pp: int) -> str:
    """A name in DeepSpeed's files of a run with `pp` stages (its engine's module: the pipeline or the
    stacked model) -> its model name."""
    return from_pipeline_module(name, config, task) if pp > 1 else from_stacked_model(name)


def from_hf_file(name: str) -> str:
    """A name in a Hugging Face checkpoint -> its model name (the same, except a bare trunk's)."""
    return TRUNK + name if name.startswith(_BARE_TRUNK) else name


def named_model_parameters(module: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """The parameters of `module`'s pipeline layers under their model names, once each (a stage may hold the
    tied embedding twice over: as the input embedding and as the LM head of the last stage)."""
    seen = set()
    for layer in module.modules():
        prefix = getattr(layer, "model_prefix", None)
        if prefix is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        for name, param in layer.named_parameters():
            yield prefix + name, param
