"""BLOOM self-attention: fused QKV in BLOOM's per-head interleaved layout, ALiBi, fp32 softmax."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_bloom.model import cpu_kernels, kernel_choice
from megatron_bloom.model.alibi import alibi_bias, alibi_slopes, fold_alibi_into_query_key
from megatron_bloom.model.causal_blocks import causal_block_attention
from megatron_bloom.model.config import ModelConfig
from megatron_bloom.model.kv_cache import LayerKVCache


def causal_additive_mask(attention_mask: Optional[torch.Tensor], batch_size: int, q_length: int,
                         kv_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[batch, 1, q, kv]` mask added to the scores: 0 where a query may attend, the dtype's minimum elsewhere.

    Query i sits at key position `kv_length - q_length + i` (the earlier keys come from a KV cache).
    A padded key (attention_mask == 0) is never attended. Using the finite minimum rather than -inf keeps
    rows with no visible key (left padding) finite, as Hugging Face does. Without an `attention_mask` the
    mask is the same for every sequence and has batch size 1: that tells attention it is purely causal.
    """
    query_positions = torch.arange(kv_length - q_length, kv_length, device=device)
    key_positions = torch.arange(kv_length, device=device)
    allowed = key_positions[None, :] <= query_positions[:, None]  # [q, kv]
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class BloomAttention(nn.Module):
    """Multi-head self-attention with ALiBi.

    The fused `query_key_value` output is laid out per head as `[head, (q, k, v), head_dim]`, so the rows
    of heads `a..b` form one contiguous block: tensor parallelism splits it by rows and each rank keeps
    whole heads. `num_heads` and `alibi_slopes` are those of the heads this module computes; splitting
    the module across ranks narrows both (see `megatron_bloom.parallel`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        self.attention_impl = config.attention_impl
        self.hidden_dropout = config.hidden_dropout
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = nn.Dropout(config.attention_dropout)
        # Float32 on purpose and not a buffer: `model.to(bfloat16)` must not round the slopes, and they are
        # derived from the head count, so they are not saved with the weights.
        self.alibi_slopes = alibi_slopes(config.num_heads)
        # Decoding through our CPU kernel (cpu_kernels.decode_attention): switched on by generation's
        # `prepare_for_inference` for bf16 on CPUs with AVX512-BF16.
        self.cpu_decode_kernel = False

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                additive_mask: torch.Tensor, cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        """`hidden_states`, `residual`: [batch, seq, hidden]; `positions`: ALiBi key positions [batch, kv];
        `additive_mask`: [batch, 1, seq, kv]. With a `cache`, the keys are the cached ones and then these
        (kv = cached + seq), and these are added to it."""
        fused_qkv = self.query_key_value(hidden_states)
        # Shapes come from the QKV output: with sequence parallelism the input holds part of the sequence.
        batch_size, q_length, _ = fused_qkv.shape
        fused_qkv = fused_qkv.view(batch_size, q_length, self.num_heads, 3, self.head_dim)
        # unbind, not three indexings: its backward stacks the three gradients in one pass, where each
        # index's backward fills a zero tensor of the whole QKV size and autograd then adds the three.
        query, key, value = (part.transpose(1, 2) for part in fused_qkv.unbind(dim=3))  # [batch, heads, seq, hd]
        if cache is not None:
            key, value = cache.append(key, value)
        if self.alibi_slopes.device != hidden_states.device:
            self.alibi_slopes = self.alibi_slopes.to(hidden_states.device)
        bias = alibi_bias(self.alibi_slopes, positions, hidden_states.dtype)  # [batch * heads, 1, kv]
        context = self.core_attention(query, key, value, bias, additive_mask, cache)
        # [batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]
        context = context.permute(0, 2, 1, 3).reshape(batch_size, q_length, self.num_heads * self.head_dim)
        output = self.dense(context)
        return residual + F.dropout(output, p=self.hidden_dropout, training=self.training)

    def core_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                       additive_mask: torch.Tensor, cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim) + ALiBi `bias` + `additive_mask`) v, by `attention_impl`: the
        queries, keys and values `[batch, heads, seq, head_dim]` (the keys' seq is kv), the context the
        same shape as the queries."""
        if self.attention_impl == "sdpa" and query.shape[2] == 1:
            return self._decode_attention(query, key, value, bias, additive_mask, cache)
        if self.attention_impl == "sdpa":
            return self._fused_attention(query, key, value, bias, additive_mask)
        return self._eager_attention(query, key, value, bias, additive_mask)

    def _eager_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                         additive_mask: torch.Tensor) -> torch.Tensor:
        """Transformers' computation, step by step: `[batch, heads, seq, head_dim]`."""
        batch_size, _, q_length, _ = query.shape
        kv_length = key.shape[2]
        # [batch * heads, seq, head_dim]
        query = query.reshape(batch_size * self.num_heads, q_length, self.head_dim)
        key = key.reshape(batch_size * self.num_heads, kv_length, self.head_dim)
        value = value.reshape(batch_size * self.num_heads, kv_length, self.head_dim)
        # scores = bias + (q @ k^T) / sqrt(head_dim), one fused call
        scores = bias.baddbmm(query, key.transpose(1, 2), beta=1.0, alpha=self.inv_norm_factor)
        scores = scores.view(batch_size, self.num_heads, q_length, kv_length) + additive_mask
        # Softmax in float32 whatever the compute dtype: bf16/fp16 rows of 2048 scores lose too much.
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = self.attention_dropout(probs)
        context = torch.bmm(probs.view(batch_size * self.num_heads, q_length, kv_length), value)
        return context.view(batch_size, self.num_heads, q_length, self.head_dim)

    def _decode_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                          additive_mask: torch.Tensor, cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        """One new query per sequence (decoding with a KV cache), as plain products: the scores are K q, so
        the cached keys are read in their own layout (q k^T would copy them transposed every step), and the
        fused kernel's tiling costs several times more for a single query (0.37 ms a layer at batch 8 on
        CPU). Softmax in float32, as in the reference.

        The cached keys and values of the first `kv` positions are a strided view of the cache's buffers,
        which a CPU `bmm` would copy whole each step; once they fill a third of the buffers, the products
        run over the whole (contiguous, zero-initialized) buffers instead: the extra scores are cut off,
        and the extra values meet probabilities of exactly 0."""
        batch_size, kv_length = query.shape[0], key.shape[2]
        if self.cpu_decode_kernel and cache is not None:
            return cpu_kernels.decode_attention(query, cache.keys, cache.values, bias, additive_mask,
                                                self.inv_norm_factor, kv_length)
        whole_buffers = cache is not None and 3 * kv_length > cache.max_length and query.device.type == "cpu"
        keys, values = (cache.keys, cache.values) if whole_buffers else (key, value)
        scores = torch.matmul(keys, query.transpose(-1, -2)).transpose(-1, -2)[..., :kv_length]  # [b, heads, 1, kv]
        scores = scores * self.inv_norm_factor + bias.view(batch_size, self.num_heads, 1, kv_length) + additive_mask
        probs = self.attention_dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype))
        if whole_buffers:
            probs = F.pad(probs, (0, values.shape[2] - kv_length))
        return torch.matmul(probs, values)

    def _fused_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                         additive_mask: torch.Tensor) -> torch.Tensor:
        """The same attention, faster. On GPUs, for a purely causal batch without a cache, ALiBi is folded into
        q.k and the causal flash kernel runs; on CPUs a purely causal batch runs in causal blocks
        (`causal_blocks.py`, without dropout); otherwise `scaled_dot_product_attention` takes ALiBi and the
        causal/padding mask as its additive `attn_mask` (it keeps the softmax in float32 internally)."""
        batch_size, _, q_length, head_dim = query.shape
        kv_length = key.shape[2]
        dropout = self.attention_dropout.p if self.training else 0.0
        purely_causal = additive_mask.shape[0] == 1
        if purely_causal and query.is_cuda and q_length == kv_length:
            # No padding, no cache: ALiBi folded into q.k lets the causal flash kernel run without any
            # [batch, heads, seq, seq] bias (1.7x faster than the masked kernel on an H100, and more exact).
            query, key = fold_alibi_into_query_key(query, key, self.alibi_slopes, self.inv_norm_factor)
            value = F.pad(value, (0, query.shape[-1] - head_dim))
            context = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                                     scale=self.inv_norm_factor)
            return context[..., :head_dim]
        attn_mask = bias.view(batch_size, self.num_heads, 1, -1) + additive_mask
        if purely_causal and not query.is_cuda and dropout == 0.0 and _causal_blocks_chosen(query):
            # CPUs: causal blocks (1.7x faster forward and backward than torch's CPU flash kernel with this
            # mask on the AMD EPYC they were tuned on, whose arbitrary-mask path neither skips the masked
            # blocks nor runs at GEMM speed), where they are the faster on this CPU
            n = batch_size * self.num_heads
            query = query.reshape(n, q_length, head_dim)
            key, value = (x.reshape(n, kv_length, head_dim) for x in (key, value))
            context = causal_block_attention(query, key, value, attn_mask.view(n, q_length, kv_length),
                                             self.inv_norm_factor)
            return context.view(batch_size, self.num_heads, q_length, head_dim)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout,
                                              scale=self.inv_norm_factor)


def _causal_blocks_chosen(query: torch.Tensor) -> bool:
    """Whether causal blocks run a purely causal batch's attention faster than torch's CPU kernel on this
    CPU (kernel_choice.py): timed forward and backward on 8 heads of the power of two nearest the queries'
    length (one choice for lengths around it, not one for each prompt's); always while torch.compile traces
    (it does not time)."""
    if torch.compiler.is_compiling():
        return True
    length, head_dim = kernel_choice.nearest_power_of_two(query.shape[2]), query.shape[-1]

    def candidates():
        def inputs():
            return [torch.randn(8, length, head_dim, dtype=query.dtype, requires_grad=True) for _ in range(3)]
        mask = causal_additive_mask(None, 1, length, length, query.dtype, query.device).view(1, length, length)
        mask = mask.expand(8, length, length)
        scale = 1.0 / math.sqrt(head_dim)
        blocks, fused = inputs(), inputs()

        def forward_backward(fn, tensors):
            out = fn(*tensors)
            out.backward(torch.ones_like(out))
        return {"ours": lambda: forward_backward(lambda q, k, v: causal_block_attention(q, k, v, mask, scale), blocks),
                "torch": lambda: forward_backward(lambda q, k, v: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=scale), fused)}
    shape = f"~{length} tokens, head {head_dim}, {str(query.dtype).replace('torch.', '')}"
    with torch.enable_grad():
        return kernel_choice.choose("causal_attention", shape, candidates) == "ours"


def decode_kernel_chosen(attention: BloomAttention, batch_size: int, dtype: torch.dtype,
                         kv_length: int = 256) -> bool:
    """Whether our single-query kernel decodes `attention`'s heads faster than the eager products on this
    CPU (kernel_choice.py), timed at `batch_size` sequences of `kv_length` cached positions."""
    heads, head_dim = attention.num_heads, attention.head_dim

    def candidates():
        cache = LayerKVCache(2 * kv_length)
        cache.append(*(torch.randn(batch_size, heads, kv_length, head_dim, dtype=dtype) for _ in range(2)))
        query = torch.randn(batch_size, heads, 1, head_dim, dtype=dtype)
        bias = torch.randn(batch_size * heads, 1, kv_length, dtype=dtype)
        mask = torch.zeros(batch_size, 1, 1, kv_length, dtype=dtype)
        keys, values = cache.keys[:, :, :kv_length], cache.values[:, :, :kv_length]

        def step(kernel: bool):
            previous, attention.cpu_decode_kernel = attention.cpu_decode_kernel, kernel
            try:
                return attention._decode_attention(query, keys, values, bias, mask, cache)
            finally:
                attention.cpu_decode_kernel = previous
        return {"ours": lambda: step(True), "torch": lambda: step(False)}
    return kernel_choice.choose("decode_attention", f"batch {batch_size}, {heads} heads of {head_dim}",
                                candidates) == "ours"
