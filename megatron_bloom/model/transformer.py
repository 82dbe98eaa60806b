"""The BLOOM trunk: word embeddings + their LayerNorm, the blocks, the final LayerNorm.

Each piece is usable on its own (`embed`, `attention_inputs`, the blocks, `ln_f`), which is what pipeline
stages are built from. Parameter names match Hugging Face's `BloomModel`, so state dicts convert by name.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from megatron_bloom.model.alibi import alibi_positions
from megatron_bloom.model.attention import causal_additive_mask
from megatron_bloom.model.block import BloomBlock
from megatron_bloom.model.config import ModelConfig
from megatron_bloom.model.kv_cache import KVCache


def attention_inputs(batch_size: int, seq_length: int, attention_mask: Optional[torch.Tensor], dtype: torch.dtype,
                     device: torch.device, past_length: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """ALiBi key positions [batch, kv] and the additive causal/padding mask [batch, 1, seq, kv], where the
    keys are `past_length` cached positions and then the `seq_length` new ones (`attention_mask`, when
    given, covers all of them)."""
    kv_length = past_length + seq_length
    positions = alibi_positions(attention_mask, batch_size, kv_length, device)
    mask = causal_additive_mask(attention_mask, batch_size, seq_length, kv_length, dtype, device)
    return positions, mask


class BloomModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.padded_vocab_size(), config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, seq] -> normalized embeddings [batch, seq, hidden] (BLOOM's embedding LayerNorm)."""
        return self.word_embeddings_layernorm(self.word_embeddings(input_ids))

    @staticmethod
    def attention_inputs(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], dtype: torch.dtype,
                         past_length: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """ALiBi key positions and the additive causal/padding mask shared by all blocks."""
        batch_size, seq_length = input_ids.shape
        return attention_inputs(batch_size, seq_length, attention_mask, dtype, input_ids.device, past_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """Token ids [batch, seq] (and a 0/1 padding mask) -> final hidden states [batch, seq, hidden].
        With a `cache`, `input_ids` continue the cached positions (and `attention_mask` covers both)."""
        hidden_states = self.embed(input_ids)
        past_length = cache.length if cache is not None else 0
        positions, mask = self.attention_inputs(input_ids, attention_mask, hidden_states.dtype, past_length)
        for index, block in enumerate(self.h):
            hidden_states = block(hidden_states, positions, mask, cache.layers[index] if cache is not None else None)
        return self.ln_f(hidden_states)
