"""The bf16 decoding kernel (model/csrc/bf16_linear.cpp): torch's bf16 `F.linear` results for any number of
rows, and the fallback to oneDNN's packing where it cannot run."""

import pytest
import torch
import torch.nn.functional as F

from megatron_bloom.model import bf16_linear_kernel
from megatron_bloom.model.inference_linear import KernelLinear, PackedLinear, inference_linear, packing_available

needs_kernel = pytest.mark.skipif(not bf16_linear_kernel.kernel_available(),
                                  reason="the CPU lacks AVX512-BF16, or the kernel could not be built")


@needs_kernel
@pytest.mark.parametrize("outputs,inputs", [(1536, 512), (512, 2048), (96, 64)])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_gives_torchs_bf16_linear(outputs, inputs, rows, with_bias):
    generator = torch.Generator().manual_seed(rows + outputs)
    weight = (0.05 * torch.randn(outputs, inputs, generator=generator)).bfloat16()
    bias = torch.randn(outputs, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(rows, inputs, generator=generator).bfloat16()
    expected = F.linear(x, weight, bias)
    actual = KernelLinear(weight, bias)(x)
    assert actual.dtype == torch.bfloat16 and actual.shape == expected.shape
    # Both sum float32 products of bf16 pairs along K; torch's kernel splits a long K (or many rows) into
    # blocks whose sums it adds, so the float32 sum can round to the neighbouring bf16 value on a few
    # outputs (0.07% at K = 2048); with K = 512 and a decoding step's rows the results are the same bits.
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=2 ** -8 * scale)
    differing = (actual != expected).float().mean().item()
    assert differing == 0.0 if inputs <= 512 and rows <= 8 else differing < 0.005


@needs_kernel
def test_kernel_keeps_leading_dimensions_and_strided_inputs():
    weight = torch.randn(64, 32).bfloat16()
    x = torch.randn(2, 5, 64).bfloat16()[..., ::2]  # [2, 5, 32], not contiguous
    torch.testing.assert_close(KernelLinear(weight, None)(x), F.linear(x, weight), rtol=0, atol=0)


@pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.bfloat16), reason="needs torch's oneDNN ops")
def test_weights_the_kernel_cannot_take_keep_onednn_packing(monkeypatch):
    odd_outputs = torch.randn(100, 64).bfloat16()  # not a multiple of the 32-output block
    assert not bf16_linear_kernel.fits(odd_outputs)
    assert isinstance(inference_linear(odd_outputs, None, rows=8), PackedLinear)
    monkeypatch.setattr(bf16_linear_kernel, "kernel_available", lambda: False)  # a CPU without AVX512-BF16
    assert isinstance(inference_linear(torch.randn(64, 64).bfloat16(), None, rows=8), PackedLinear)
