"""Inference on CPUs: linear layers whose weights are packed once into oneDNN's blocked layout.

`F.linear` on a CPU hands oneDNN a plain row-major weight, which it re-blocks on every call; decoding runs a
few rows at a time, so that extra pass over the weights is most of a step's time. Packing them once (what
`torch.compile`'s CPU backend does when it freezes a model, with the same `mkldnn` operators) made one
decoding step of bloom-small in bf16 about 1.7x faster per linear and 2x for the LM head, with outputs
bit-identical to `F.linear` in bf16 (float32 rounds differently, so it is left as it is). Weights are
frozen by packing: for generation and evaluation, never training.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU, with torch's oneDNN operators present."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """`F.linear(x, weight, bias)` with the weight pre-packed; `rows` is the number of rows it expects
    (the layout is chosen for it; any number of rows works)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", bias.detach() if bias is not None else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def pack_linears(model: nn.Module, rows: int) -> int:
    """Replace every `nn.Linear` of `model` (exactly that class: tensor-parallel layers keep their own
    forward) by a `PackedLinear`, in place; returns how many were packed."""
    packed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child.weight, child.bias, rows))
                packed += 1
    return packed
