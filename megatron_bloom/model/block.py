"""One BLOOM transformer block: pre-LayerNorm attention and tanh-GeLU MLP, each with a residual."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_bloom.model import cpu_kernels, kernel_choice
from megatron_bloom.model.attention import BloomAttention
from megatron_bloom.model.config import ModelConfig
from megatron_bloom.model.kv_cache import LayerKVCache


_SQRT_2_OVER_PI = 0.79788456  # sqrt(2/pi) as rounded in Megatron-LM's bias_gelu, which BLOOM trained with
_CUBIC = 0.044715


class BloomGeLU(torch.autograd.Function):
    """The tanh approximation of GeLU (Hendrycks & Gimpel 2016) with BLOOM's trained constants.

    `F.gelu(approximate="tanh")` uses the exact sqrt(2/pi) and differs in the last bits, so we keep the
    trained function. The backward is its analytic derivative, so only the input is saved (autograd
    through the formula would keep seven intermediates of the 4h-wide activation):
        d/dx 0.5 x (1 + tanh u) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx,
        u = c x (1 + a x^2),  du/dx = c + 3 a c x^2.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * x * (1.0 + _CUBIC * x * x)))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        tanh_u = torch.tanh(_SQRT_2_OVER_PI * x * (1.0 + _CUBIC * x * x))
        du_dx = _SQRT_2_OVER_PI + 3.0 * _CUBIC * _SQRT_2_OVER_PI * x * x
        return (0.5 * x * ((1.0 - tanh_u * tanh_u) * du_dx) + 0.5 * (1.0 + tanh_u)) * grad_output


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    return BloomGeLU.apply(x)


def fused_bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """The same function through torch's vectorized tanh-GeLU kernel: one pass forward and one backward
    (BLOOM's formula as separate ops makes seven). Its sqrt(2/pi) is exact where BLOOM's is rounded to
    0.79788456, a relative difference of 8e-10. Training in bf16 on CPUs with AVX512-BF16 it runs through our
    kernel (csrc/gelu.cpp: 3x faster than torch's on the AMD EPYC it was tuned on) where it is the faster on
    this CPU (kernel_choice.py); torch.compile fuses torch's own."""
    if (not torch.compiler.is_compiling() and x.requires_grad and x.device.type == "cpu"
            and x.dtype == torch.bfloat16 and x.is_contiguous() and cpu_kernels.kernels_available()
            and kernel_choice.choose("gelu", f"{kernel_choice.nearest_power_of_two(x.numel())} values",
                                     lambda: _gelu_candidates(x)) == "ours"):
        return _KernelGeLU.apply(x)
    return F.gelu(x, approximate="tanh")


def _gelu_candidates(x: torch.Tensor) -> dict:
    """Forward and backward of the GeLU on a copy of `x`, through our kernel and through torch's."""
    x = x.detach().clone()
    grad = torch.randn_like(x)
    return {"ours": lambda: (cpu_kernels.gelu_tanh(x), cpu_kernels.gelu_tanh_backward(grad, x)),
            "torch": lambda: (F.gelu(x, approximate="tanh"), torch.ops.aten.gelu_backward(grad, x, approximate="tanh"))}


class _KernelGeLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return cpu_kernels.gelu_tanh(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return cpu_kernels.gelu_tanh_backward(grad.contiguous(), x)


class BloomMLP(nn.Module):
    """h -> 4h -> GeLU (tanh approximation, as BLOOM was trained) -> h, then dropout and the residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.activation = fused_bloom_gelu if config.fused_kernels else bloom_gelu
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        intermediate = self.activation(self.dense_h_to_4h(hidden_states))
        output = self.dense_4h_to_h(intermediate)
        return residual + F.dropout(output, p=self.hidden_dropout, training=self.training)


class BloomBlock(nn.Module):
    """x + Attention(LN(x)), then y + MLP(LN(y)). Parameter names match Hugging Face's `BloomBlock`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = BloomMLP(config)

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor, additive_mask: torch.Tensor,
                cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        attention_output = self.self_attention(self.input_layernorm(hidden_states), hidden_states,
                                               positions, additive_mask, cache)
        return self.mlp(self.post_attention_layernorm(attention_output), attention_output)
