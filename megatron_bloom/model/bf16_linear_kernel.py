"""A bf16 linear layer for the few rows of a decoding step, on CPUs with AVX512-BF16 (csrc/bf16_linear.cpp).

A decoding step multiplies a handful of rows by every weight, so its speed is the speed at which the weights
stream from memory. At 8 rows oneDNN's bf16 kernel reads its blocked weights at 14-18 GB/s on the 2-core
benchmark machine, where a plain read runs at 29 GB/s; this kernel reads each block of 32 outputs once,
contiguously, and reaches 28.6 GB/s (bloom-small's 33 linears: 2.9 ms a step against 4.5 ms). Its results
are torch's bf16 `F.linear`'s: float32 products of bf16 pairs summed along K in order, the bias added in
float32, one rounding to bf16. Torch splits a long K into blocks whose sums it adds, which can round a
few outputs to the neighbouring bf16 value (0.07% of them at K = 2048; none at K = 512).

The extension is compiled at first use with the C++ compiler and ninja that `torch.utils.cpp_extension`
uses (about 25 s, once a machine: it is cached under TORCH_EXTENSIONS_DIR). Where the CPU lacks
AVX512-BF16 or the build fails, `kernel_available()` says so (with a warning for a failed build) and the
caller keeps oneDNN's packed layout.
"""

from __future__ import annotations

import functools
import platform
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).parent / "csrc" / "bf16_linear.cpp"
BLOCK = 32  # outputs per packed block (csrc/bf16_linear.cpp's kBlock)
COMPILER_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]


def cpu_has_avx512_bf16() -> bool:
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags


@functools.lru_cache(maxsize=None)
def _load_operator() -> bool:
    """Builds (once a machine) and loads (once a process) the `mbloom::bf16_linear` operator; False where
    it cannot be."""
    if not cpu_has_avx512_bf16():
        return False
    from torch.utils.cpp_extension import load

    try:
        load(name="mbloom_bf16_linear", sources=[str(SOURCE)], extra_cflags=COMPILER_FLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # no compiler, no ninja, an old compiler without AVX512-BF16 intrinsics
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"megatron_bloom: the bf16 decoding kernel could not be built ({first_line}); "
                      "oneDNN's packed linears are used instead (about 1.5x slower per decoding step).")
        return False
    # Shapes for torch.compile's tracing.
    torch.library.register_fake("mbloom::bf16_linear")(
        lambda x, packed, bias: x.new_empty(*x.shape[:-1], packed.shape[0] * BLOCK))
    return True


def kernel_available() -> bool:
    return _load_operator()


def fits(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this [N, K] weight: N a multiple of the block, K even."""
    return weight.dim() == 2 and weight.shape[0] % BLOCK == 0 and weight.shape[1] % 2 == 0


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N / 32, K / 2, 32, 2] in bf16: per block of outputs, the inputs in pairs."""
    outputs, inputs = weight.shape
    blocks = weight.detach().to(torch.bfloat16).reshape(outputs // BLOCK, BLOCK, inputs // 2, 2)
    return blocks.permute(0, 2, 1, 3).contiguous()


def bf16_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for bf16 `x` [..., K], `packed = pack_weight(weight)` and a float32 bias
    (after `kernel_available()` returned True)."""
    return torch.ops.mbloom.bf16_linear(x, packed, bias)
