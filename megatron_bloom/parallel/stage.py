"""One pipeline stage of a plain BLOOM task model, for evaluation and generation at pp > 1.

Training's stages are DeepSpeed pipeline layers (`pipeline/`). Inference needs no engine: a stage is the
task model itself (tensor-parallel where tp > 1) with the layers of other stages taken out, so its
parameters keep their single-process names (`transformer.h.5.…` stays block 5) and a checkpoint's weights
load by name. The first stage holds the embedding and its LayerNorm, the last one the final LayerNorm and
the head (for the language model, a tied copy of the embedding).

What flows between stages is the hidden states `[batch, seq, hidden]`, or with sequence parallelism this
tp rank's `[batch, seq / tp, hidden]`. Every stage knows each micro-batch's token ids and padding mask,
so the receiver knows the shape, and ALiBi positions and the causal mask are computed where they are used.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_bloom.model import KVCache
from megatron_bloom.model.heads import TASK_HEAD_NAMES
from megatron_bloom.model.transformer import attention_inputs


class PipelineStage(nn.Module):
    """The blocks `blocks` of `model` (a task model, on the meta device: layers are dropped before any
    memory is allocated), with the embedding when `is_first` and the head when `is_last`."""

    def __init__(self, model: nn.Module, blocks: range, is_first: bool, is_last: bool,
                 sequence_shards: int = 1) -> None:
        super().__init__()
        self.blocks, self.is_first, self.is_last = blocks, is_first, is_last
        self.sequence_shards = sequence_shards  # with sequence parallelism, the hidden states hold 1/tp of it
        trunk = model.transformer
        for index in range(len(trunk.h)):
            if index not in blocks:
                trunk.h[index] = nn.Identity()  # a placeholder: the kept blocks keep their indices and names
        if not is_first:
            trunk.word_embeddings_layernorm = None
            if not (is_last and model.task == "causal_lm"):  # the LM head reads the embedding matrix
                trunk.word_embeddings = None
        if not is_last:
            trunk.ln_f = None
            for name in TASK_HEAD_NAMES.values():
                if hasattr(model, name):
                    setattr(model, name, None)
        self.model = model

    @property
    def config(self):
        return self.model.config

    def hidden_shape(self, batch_size: int, seq_length: int) -> tuple:
        """The shape of the hidden states this stage receives for a micro-batch of that many positions."""
        return batch_size, seq_length // self.sequence_shards, self.config.hidden_size

    def new_cache(self, max_length: int) -> KVCache:
        """A KV cache for this stage's blocks alone."""
        return KVCache(len(self.blocks), max_length)

    def forward(self, inputs: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                cache: Optional[KVCache] = None, **head_arguments):
        """`inputs`: the token ids (first stage) or the previous stage's hidden states; `input_ids` and
        `attention_mask` are the micro-batch's (the mask covering the cached positions too). Returns the
        hidden states for the next stage, or on the last stage the head's output (`head_arguments` go to
        the task model's `head`: labels, `last_positions`)."""
        trunk = self.model.transformer
        hidden = trunk.embed(inputs) if self.is_first else inputs
        past_length = cache.length if cache is not None else 0
        positions, mask = attention_inputs(input_ids.shape[0], input_ids.shape[1], attention_mask, hidden.dtype,
                                           hidden.device, past_length)
        for position, index in enumerate(self.blocks):
            hidden = trunk.h[index](hidden, positions, mask, cache.layers[position] if cache is not None else None)
        if not self.is_last:
            return hidden
        return self.model.head(trunk.ln_f(hidden), input_ids, **head_arguments)
