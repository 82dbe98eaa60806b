"""The CPU kernels (model/csrc/): the linear gives torch's bf16 `F.linear` results for any number of rows,
the single-query attention the eager decoding step's, the cross-entropy passes the chunked torch passes'
results; where they cannot run, oneDNN's packing."""

import platform
import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import include_paths

from megatron_bloom.model import ModelConfig, cpu_kernels
from megatron_bloom.model.alibi import alibi_bias, alibi_positions
from megatron_bloom.model.attention import BloomAttention, causal_additive_mask
from megatron_bloom.model.block import fused_bloom_gelu
from megatron_bloom.model.inference_linear import (Int8Linear, KernelInt8Linear, KernelLinear, PackedLinear,
                                                   inference_linear, packing_available)
from megatron_bloom.model.kv_cache import LayerKVCache
from megatron_bloom.parallel import cross_entropy
from megatron_bloom.parallel.cross_entropy import vocab_parallel_cross_entropy

# Skipped only where the CPU cannot run the kernels: on a CPU that can, a kernel that does not build fails
# these tests (and the next one) rather than hiding as skips while the commands quietly fall back.
needs_kernel = pytest.mark.skipif(not cpu_kernels.cpu_has_avx512_bf16(), reason="the CPU lacks AVX512-BF16")


@needs_kernel
def test_the_kernels_build_on_a_cpu_that_can_run_them():
    assert cpu_kernels.kernels_available(), "the CPU kernels (model/csrc/) did not build: see the warning above"


@pytest.mark.skipif(platform.system() != "Linux", reason="the CPU's flags are read from /proc/cpuinfo")
def test_benchmarks_name_the_cpu_and_its_bf16_instructions():
    """What benchmarks print beside their figures: the model name and flags of /proc/cpuinfo's first CPU."""
    first = open("/proc/cpuinfo").read().split("\n\n")[0]
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
    flags = fields["flags"].split()
    line = cpu_kernels.describe_cpu()
    assert line.startswith(f"CPU: {fields['model name']}, ")
    assert f"AVX512-BF16 {'yes' if 'avx512_bf16' in flags else 'no'}" in line
    assert f"AMX-BF16 {'yes' if 'amx_bf16' in flags else 'no'}" in line
    assert cpu_kernels.cpu_has_avx512_bf16() == ("avx512_bf16" in flags)


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("c++") is None,
                    reason="compiling the AVX512-BF16 kernels needs an x86-64 machine with a C++ compiler")
def test_the_kernels_compile_on_any_x86_machine(tmp_path):
    """Compiling needs no AVX512-BF16 (running does): on a CPU without it, such as CI's, every source is
    still compiled with the build's flags, so that a kernel that does not build fails here instead of
    hiding behind the skips above. The sources are checked as one translation unit that includes them all:
    torch's headers, most of the work, are parsed once (18 s on 2 cores instead of 4 x 14 s)."""
    flags = ["-std=c++20", "-fsyntax-only", *cpu_kernels.COMPILER_FLAGS, "-DTORCH_EXTENSION_NAME=mbloom_cpu_kernels",
             *[f"-I{path}" for path in include_paths()], f"-I{sysconfig.get_paths()['include']}"]
    unit = tmp_path / "all_kernels.cpp"
    unit.write_text("".join(f'#include "{source}"\n' for source in cpu_kernels.SOURCES))
    compiler = subprocess.run(["c++", *flags, str(unit)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert compiler.returncode == 0, f"the kernels do not compile:\n{compiler.stdout[-3000:]}"


def linear_error_bound(x: torch.Tensor, weight: torch.Tensor, bias, reference: torch.Tensor) -> torch.Tensor:
    """How far a bf16 linear may be from the exact product (`reference`, float64) when it sums float32
    products of bf16 pairs along K, adds the bias in float32, and rounds once to bf16 (Higham, Accuracy
    and Stability of Numerical Algorithms, 3.1): the float32 sum s is within e = (K + 1) u32 (sum |x w| +
    |b|) of the exact r, and rounding s to bf16 moves it by at most u16 |s| <= u16 (|r| + e); u32 = 2^-24
    and u16 = 2^-8 are the unit roundoffs. Any order of summation, blocked or not, keeps to it."""
    magnitude = x.double().abs() @ weight.double().abs().t()
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    float32_error = (x.shape[-1] + 1) * 2.0 ** -24 * magnitude
    return 2.0 ** -8 * (reference.abs() + float32_error) + float32_error


@needs_kernel
@pytest.mark.parametrize("outputs,inputs", [(1536, 512), (512, 2048), (96, 64)])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_gives_the_bf16_rounding_of_the_exact_linear(outputs, inputs, rows, with_bias):
    """Against float64, not against torch's bf16 linear: torch's path depends on the CPU (AVX-512 or AMX)
    and rounds a few outputs differently on each."""
    generator = torch.Generator().manual_seed(rows + outputs)
    weight = (0.05 * torch.randn(outputs, inputs, generator=generator)).bfloat16()
    bias = torch.randn(outputs, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(rows, inputs, generator=generator).bfloat16()
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())  # exact products
    actual = KernelLinear(weight, bias)(x)
    assert actual.dtype == torch.bfloat16 and actual.shape == reference.shape
    error = (actual.double() - reference).abs()
    bound = linear_error_bound(x, weight, bias, reference)
    assert (error <= bound).all(), f"{(error > bound).sum().item()} outputs beyond bf16 rounding"
    # and not merely within it by luck: most outputs are the bf16 value nearest to the exact one
    assert (actual == reference.bfloat16()).float().mean().item() > 0.95


@needs_kernel
def test_kernel_keeps_leading_dimensions_and_strided_inputs():
    weight = torch.randn(64, 32).bfloat16()
    x = torch.randn(2, 5, 64).bfloat16()[..., ::2]  # [2, 5, 32], not contiguous
    torch.testing.assert_close(KernelLinear(weight, None)(x), F.linear(x, weight), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 8, 100])
def test_int8_kernel_multiplies_by_the_dequantized_weights(rows):
    """`generate.quantize=int8` in bf16: the kernel's product is x times the int8 weights times their
    scales (plus the bias), within one bf16 rounding of that product computed in float32."""
    generator = torch.Generator().manual_seed(rows)
    weight = (0.05 * torch.randn(512, 1024, generator=generator)).bfloat16()
    bias = torch.randn(512, generator=generator).bfloat16()
    x = torch.randn(rows, 1024, generator=generator).bfloat16()
    layer = inference_linear(weight, bias, rows=8, quantize="int8")
    assert isinstance(layer, KernelInt8Linear) and layer.weight_int8.dtype == torch.int8
    plain = Int8Linear(weight, bias)  # the same quantization, in the weight's own layout
    dequantized = plain.weight_int8.float() * plain.scales.float()[:, None]
    expected = x.float() @ dequantized.t() + bias.float()
    actual = layer(x)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, rtol=2 ** -7, atol=1e-3 * expected.abs().max().item())


@pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.bfloat16),
                    reason="oneDNN packs bf16 weights on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT only")
def test_weights_the_kernel_cannot_take_keep_onednn_packing(monkeypatch):
    odd_outputs = torch.randn(100, 64).bfloat16()  # not a multiple of the 32-output block
    assert not cpu_kernels.fits(odd_outputs)
    assert isinstance(inference_linear(odd_outputs, None, rows=8), PackedLinear)
    monkeypatch.setattr(cpu_kernels, "kernels_available", lambda: False)  # a CPU without AVX512-BF16
    assert isinstance(inference_linear(torch.randn(64, 64).bfloat16(), None, rows=8), PackedLinear)


@needs_kernel
@pytest.mark.parametrize("hidden_size,num_heads", [(512, 8), (1536, 16)])  # heads of 64 and 96 values
@pytest.mark.parametrize("padded", [True, False])
def test_decode_attention_kernel_gives_the_eager_steps_results(hidden_size, num_heads, padded):
    """One query per sequence against a partly filled cache, left padding or none (a batch-1 mask): the
    kernel repeats every bf16 rounding of BloomAttention's eager decoding step."""
    config = ModelConfig(num_layers=1, hidden_size=hidden_size, num_heads=num_heads, vocab_size=1024, seq_length=64)
    attention = BloomAttention(config).to(torch.bfloat16)
    batch, capacity, kv_length, head_dim = 4, 40, 29, config.head_dim
    generator = torch.Generator().manual_seed(hidden_size)

    def random(*shape):
        return torch.randn(*shape, generator=generator).bfloat16()

    cache = LayerKVCache(capacity)
    cache.append(random(batch, num_heads, kv_length - 1, head_dim), random(batch, num_heads, kv_length - 1, head_dim))
    keys, values = cache.append(random(batch, num_heads, 1, head_dim), random(batch, num_heads, 1, head_dim))
    query = random(batch, num_heads, 1, head_dim)
    attention_mask = None
    if padded:
        attention_mask = torch.ones(batch, kv_length, dtype=torch.long)
        attention_mask[1, :5] = 0
        attention_mask[2, :20] = 0
    bias = alibi_bias(attention.alibi_slopes, alibi_positions(attention_mask, batch, kv_length, query.device),
                      torch.bfloat16)
    mask = causal_additive_mask(attention_mask, batch, 1, kv_length, torch.bfloat16, query.device)
    expected = attention._decode_attention(query, keys, values, bias, mask, cache)
    attention.cpu_decode_kernel = True
    actual = attention._decode_attention(query, keys, values, bias, mask, cache)
    assert actual.shape == expected.shape == (batch, num_heads, 1, head_dim)
    torch.testing.assert_close(actual, expected, rtol=0, atol=2 ** -7 * expected.abs().max().item())
    assert (actual == expected).float().mean().item() >= 0.99  # the same bits, but for a rare tie of roundings


@needs_kernel
@pytest.mark.parametrize("real_columns, columns", [(1000, 1024), (1024, 1024), (7, 128)])
def test_cross_entropy_kernel_gives_the_chunked_passes_results(real_columns, columns, monkeypatch):
    """`model.fused_kernels` on a CPU: loss and logits gradient of the kernel against torch's chunked passes,
    with a ragged last vector of columns, vocabulary padding and targets on another rank's slice."""
    monkeypatch.setenv("MBLOOM_CPU_KERNELS", "ours")  # whichever is the faster here
    generator = torch.Generator().manual_seed(real_columns)
    logits = (4 * torch.randn(3, 100, columns, generator=generator)).bfloat16().requires_grad_()
    target = torch.randint(-5, real_columns, (3, 100), generator=generator)  # < 0: on another rank
    weights = torch.rand(3, 100, generator=generator)
    results = []
    for fused in (False, True):
        loss = vocab_parallel_cross_entropy(logits, target, 0, real_columns, None, fused=fused)
        results.append((loss, *torch.autograd.grad((loss * weights).sum(), logits)))
    (loss, grad), (kernel_loss, kernel_grad) = results
    torch.testing.assert_close(kernel_loss, loss, rtol=1e-6, atol=1e-6)
    # The same float32 values up to exp's last bits, rounded once to bf16: at most a neighbouring bf16 value.
    torch.testing.assert_close(kernel_grad.float(), grad.float(), rtol=2 ** -7, atol=1e-7)
    assert (kernel_grad != grad).float().mean().item() < 0.001
    if real_columns < columns:
        assert kernel_grad[..., real_columns:].abs().max().item() == 0  # padding: never predicted
    assert cross_entropy._path(logits.detach().reshape(-1, columns)[:, :real_columns], True) == "cpu_kernel"


@needs_kernel
def test_gelu_kernel_gives_torchs_tanh_gelu_and_its_gradient(monkeypatch):
    """Training's GeLU on a CPU in bf16 (`fused_bloom_gelu`): the kernel against torch's tanh-GeLU (both in
    float32, rounded once to bf16) and against float64. Below x = -4 torch's 1 + tanh(u) cancels in float32;
    the kernel stays within bf16 rounding there too (checked down to -6, where float64 itself starts to)."""
    monkeypatch.setenv("MBLOOM_CPU_KERNELS", "ours")  # whichever is the faster here
    x = torch.linspace(-12, 12, 2 ** 16 + 5, dtype=torch.float64).bfloat16().requires_grad_()
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    y = fused_bloom_gelu(x)
    assert "Kernel" in type(y.grad_fn).__name__
    (grad,) = torch.autograd.grad(y, x, grad_output)
    body = x.detach() >= -4
    expected = F.gelu(x.detach(), approximate="tanh")
    expected_grad = torch.ops.aten.gelu_backward(grad_output, x.detach(), approximate="tanh")
    assert (y[body] != expected[body]).float().mean().item() < 0.001
    torch.testing.assert_close(grad[body].float(), expected_grad[body].float(), rtol=2 ** -7, atol=1e-6)
    exact_x = x.detach().double().requires_grad_()
    exact = F.gelu(exact_x, approximate="tanh")
    (exact_grad,) = torch.autograd.grad(exact, exact_x, grad_output.double())
    near = x.detach() >= -6  # below, float64's own 1 + tanh(u) cancels (u < -12.5)
    assert ((y.double() - exact).abs() <= 2 ** -8 * exact.abs())[near].all()
    assert ((grad.double() - exact_grad).abs() <= 2 ** -7 * exact_grad.abs() + 1e-30)[near].all()
