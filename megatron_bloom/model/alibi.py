"""ALiBi: attention with linear biases (Press et al. 2022, https://arxiv.org/abs/2108.12409).

Each head adds `slope * key_position` to its attention scores. Adding the same value to a whole row does
not change a softmax, so a bias on the key position alone equals the paper's `slope * (key - query)`;
BLOOM (and Hugging Face) use this form, and so do we, for bit-identical scores.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The per-head slopes of the paper, float32, shape `[num_heads]`.

    For 2^k heads the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ... For other head counts the
    paper takes all slopes of the closest smaller power of two, then every other slope of twice that many
    (e.g. BLOOM-176B's 112 heads: the 64 slopes of n=64 followed by 48 odd-indexed slopes of n=128).
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    closest_power_of_2 = 2 ** math.floor(math.log2(num_heads))
    # Built on the CPU whatever the default device (models are constructed under `torch.device("meta")`).
    slopes = _geometric_slopes(closest_power_of_2, torch.arange(1, 1 + closest_power_of_2, device="cpu"))
    if closest_power_of_2 != num_heads:
        remaining = num_heads - closest_power_of_2
        odd_powers = torch.arange(1, 1 + 2 * remaining, 2, device="cpu")
        slopes = torch.cat([slopes, _geometric_slopes(2 * closest_power_of_2, odd_powers)])
    return slopes


def _geometric_slopes(n: int, powers: torch.Tensor) -> torch.Tensor:
    # base = 2^(-8/n), computed as float32 before the power, like the reference implementation
    base = torch.tensor(2 ** (-(2 ** -(math.log2(n) - 3))), dtype=torch.float32, device="cpu")
    return torch.pow(base, powers.to(torch.int32))


def alibi_positions(attention_mask: Optional[torch.Tensor], batch_size: int, kv_length: int,
                    device: torch.device) -> torch.Tensor:
    """Key positions that ALiBi multiplies by the slopes, shape `[batch, kv_length]`.

    Positions count only attended tokens, so a left-padded sequence starts at 0 on its first real token
    (padding itself gets position 0 and is masked out anyway).
    """
    if attention_mask is None:
        return torch.arange(kv_length, device=device).expand(batch_size, kv_length)
    mask = attention_mask.to(device=device, dtype=torch.long)
    return (mask.cumsum(dim=-1) - 1) * mask


def alibi_bias(slopes: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`slopes[h] * positions[b, k]` as `[batch * heads, 1, kv_length]` in `dtype` (computed in float32)."""
    batch_size, kv_length = positions.shape
    bias = slopes[:, None] * positions[:, None, :]
    return bias.reshape(batch_size * slopes.numel(), 1, kv_length).to(dtype)


# Key positions are written as 256 * high + low: integers up to 256 are exact in bf16 and fp16 alike.
_POSITION_BASE = 256


def fold_alibi_into_query_key(query: torch.Tensor, key: torch.Tensor, slopes: torch.Tensor, scale: float):
    """Query and key with ALiBi in four extra dimensions, so that `scale * q'.k' = scale * q.k + slope * j`
    for key position j: attention then needs no bias tensor and a causal flash kernel can run it.

    q' = [q, s_hi * 256, s_lo * 256, s_hi, s_lo] and k' = [k, j_hi, j_hi, j_lo, j_lo] with
    j = 256 j_hi + j_lo and slope / scale = s_hi + s_lo split into two numbers of the tensors' dtype, so
    the kernel's float32 accumulation gets the bias to about 16 bits. (The bf16 bias tensor the reference
    adds has 8: at 2048 tokens, slope 0.5, it is off by up to 4.) The head dimension is padded with zeros
    to a multiple of 8, as the fused kernels want. Positions are those of an unpadded sequence,
    0..kv_length-1; up to 65536 of them.
    """
    batch_size, num_heads, q_length, head_dim = query.shape
    kv_length = key.shape[2]
    if kv_length > _POSITION_BASE ** 2:
        raise ValueError(f"folded ALiBi covers up to {_POSITION_BASE ** 2} positions, got {kv_length}")
    scaled = slopes.to(device=query.device, dtype=torch.float32) / scale
    slope_hi = scaled.to(query.dtype)
    slope_lo = (scaled - slope_hi.float()).to(query.dtype)
    positions = torch.arange(kv_length, device=key.device)
    position_hi = (positions // _POSITION_BASE).to(key.dtype)
    position_lo = (positions % _POSITION_BASE).to(key.dtype)
    query_extra = torch.stack([slope_hi * _POSITION_BASE, slope_lo * _POSITION_BASE, slope_hi, slope_lo], dim=-1)
    key_extra = torch.stack([position_hi, position_hi, position_lo, position_lo], dim=-1)
    padding = -(head_dim + 4) % 8
    query = torch.cat([query, query_extra[None, :, None, :].expand(batch_size, num_heads, q_length, 4),
                       query.new_zeros(batch_size, num_heads, q_length, padding)], dim=-1)
    key = torch.cat([key, key_extra[None, None].expand(batch_size, num_heads, kv_length, 4),
                     key.new_zeros(batch_size, num_heads, kv_length, padding)], dim=-1)
    return query, key
