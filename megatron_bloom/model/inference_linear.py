"""Inference on CPUs: linear layers whose weights are packed once into oneDNN's blocked layout, or
quantized to int8.

`F.linear` on a CPU hands oneDNN a plain row-major weight, which it re-blocks on every call; decoding runs a
few rows at a time, so that extra pass over the weights is most of a step's time. Packing them once (what
`torch.compile`'s CPU backend does when it freezes a model, with the same `mkldnn` operators) made one
decoding step of bloom-small in bf16 about 1.7x faster per linear and 2x for the LM head, with outputs
bit-identical to `F.linear` in bf16 (float32 rounds differently, so it is left as it is). On CPUs with
AVX512-BF16 our own kernel (`cpu_kernels.py`: a contiguous stream of weights per block of outputs)
can replace oneDNN's: on the AMD EPYC it was tuned on, 1.55x faster again for a decoding step's 8 rows, as
fast for a prompt's hundreds, and the same results up to the last bit of a few outputs. Where the CPU has
AMX tiles oneDNN's many-row products are faster, so each weight shape's decoding and prompt rows take the
faster of the two on the CPU at hand (`kernel_choice.py`): both layouts are kept where they differ.
Weights are frozen by packing: for generation and evaluation, never training.

`generate.quantize=int8` stores each weight as int8 with one scale per output channel (symmetric,
round-to-nearest: the weight-only scheme of LLM.int8's baseline and of torchao's `int8_weight_only`) and
multiplies with torch's int8-weight kernel: half the weights' memory of bf16; its accuracy cost is
measured by `benchmarks/generate.py --quantize int8`. In bf16 models on CPUs with AVX512-BF16 the int8
weights go to our kernel instead (`cpu_kernels.int8_linear`), which streams them at half bf16's bytes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_bloom.model import cpu_kernels, kernel_choice


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU, with torch's oneDNN operators present and a CPU they pack bf16 for (AVX-512 BW, VL and
    DQ, or AVX-NE-CONVERT: on an AVX2-only CPU oneDNN refuses to reorder bf16 weights)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


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


class KernelLinear(nn.Module):
    """`F.linear(x, weight, bias)` in bf16 through `cpu_kernels` (weight packed in its layout)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        if not cpu_kernels.kernels_available():
            raise RuntimeError("the bf16 linear kernel needs a CPU with AVX512-BF16 and a C++ compiler")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("packed_weight", cpu_kernels.pack_weight(weight), persistent=False)
        self.register_buffer("bias", bias.detach().float() if bias is not None else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.bf16_linear(x, self.packed_weight, self.bias)


class Int8Linear(nn.Module):
    """`F.linear(x, weight, bias)` with the weight in int8, one scale per output channel. Decoding's few
    rows go through torch's int8-weight kernel; many rows (a prompt), for which that kernel is slower than
    a GEMM, through the weight dequantized on the fly."""

    DEQUANTIZED_ROWS = 64  # = PROMPT_ROWS: where a product is a prompt's

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        scales = weight.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
        quantized = (weight.detach().float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", quantized, persistent=False)
        self.register_buffer("scales", scales.to(weight.dtype), persistent=False)
        self.register_buffer("bias", bias.detach() if bias is not None else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] >= self.DEQUANTIZED_ROWS:  # a prompt: the weight in x's dtype, then a plain GEMM
            weight = self.weight_int8.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            return F.linear(x, weight, self.bias)
        y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scales.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class KernelInt8Linear(Int8Linear):
    """`Int8Linear`'s weights (packed in the kernel's layout) through `cpu_kernels.int8_linear`, for every
    number of rows: bf16 activations only."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__(weight, bias)
        if not cpu_kernels.kernels_available():
            raise RuntimeError("the int8 linear kernel needs a CPU with AVX512-BF16 and a C++ compiler")
        self.weight_int8 = cpu_kernels.pack_weight(self.weight_int8)
        self.scales = self.scales.float()
        self.bias = self.bias.float() if self.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.int8_linear(x, self.weight_int8, self.scales, self.bias)


class ByRowsLinear(nn.Module):
    """One linear layer through `few` below PROMPT_ROWS rows (decoding) and through `many` from there (a
    prompt): each holds its own layout of the weight."""

    def __init__(self, few: nn.Module, many: nn.Module) -> None:
        super().__init__()
        self.few, self.many = few, many

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.many if x.numel() >= PROMPT_ROWS * x.shape[-1] else self.few)(x)


PROMPT_ROWS = Int8Linear.DEQUANTIZED_ROWS  # rows from which a product is a prompt's (many rows), not a decoding step's
MEASURED_PROMPT_ROWS = 256  # a prompt's rows, as measured (batch 8, 32 tokens)
MEASURED_OUTPUTS = 4096  # at most this many of a weight's outputs are timed (an LM head's are hundreds of thousands)


def inference_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int,
                     quantize: Optional[str] = None) -> nn.Module:
    """The frozen stand-in for a linear layer: int8 when `quantize` is "int8", else bf16 packed; through our
    kernels where the CPU, the dtype (bf16) and the weight's shape allow it and they are the faster on this
    CPU for decoding's `rows` or for a prompt's (kernel_choice.py), else through torch's."""
    kernel = weight.dtype == torch.bfloat16 and cpu_kernels.fits(weight) and cpu_kernels.kernels_available()
    int8 = quantize == "int8"
    if not kernel:
        return Int8Linear(weight, bias) if int8 else PackedLinear(weight, bias, rows)
    decoding_rows = min(max(rows, 1), PROMPT_ROWS - 1)
    decoding, prompt = (_linear_choice(weight, bias, int8, name, measured_rows)
                        for name, measured_rows in (("decode", decoding_rows), ("prompt", MEASURED_PROMPT_ROWS)))
    if decoding == prompt:
        return _linear_side(decoding, weight, bias, int8, rows)
    return ByRowsLinear(_linear_side(decoding, weight, bias, int8, decoding_rows),
                        _linear_side(prompt, weight, bias, int8, MEASURED_PROMPT_ROWS))


def _linear_side(side: str, weight: torch.Tensor, bias: Optional[torch.Tensor], int8: bool, rows: int) -> nn.Module:
    """The linear of `side`: "ours" (our kernel), or "torch" (oneDNN's layout packed for `rows`; int8: torch's
    int8 kernel, or the weights dequantized for many rows)."""
    if side == "ours":
        return KernelInt8Linear(weight, bias) if int8 else KernelLinear(weight, bias)
    return Int8Linear(weight, bias) if int8 else PackedLinear(weight, bias, rows)


def _linear_choice(weight: torch.Tensor, bias: Optional[torch.Tensor], int8: bool, rows_class: str,
                   rows: int) -> str:
    """Ours or torch's product for this weight's shape at `rows` rows, by kernel_choice."""
    outputs, inputs = weight.shape
    timed = min(outputs, MEASURED_OUTPUTS)

    def candidates():
        part = weight.detach()[:timed]
        part_bias = bias.detach()[:timed] if bias is not None else None
        x = torch.randn(rows, inputs, dtype=weight.dtype)
        sides = {side: _linear_side(side, part, part_bias, int8, rows) for side in kernel_choice.CANDIDATES}
        return {side: (lambda linear=linear: linear(x)) for side, linear in sides.items()}
    operator = f"{'int8_' if int8 else ''}linear@{rows_class}"
    return kernel_choice.choose(operator, f"{rows}x{inputs}x{timed}", candidates)


def pack_linears(model: nn.Module, rows: int, quantize: Optional[str] = None) -> int:
    """Replace every `nn.Linear` of `model` (exactly that class: tensor-parallel layers keep their own
    forward) by its `inference_linear`, in place; returns how many were replaced."""
    packed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, inference_linear(child.weight, child.bias, rows, quantize))
                packed += 1
    return packed
