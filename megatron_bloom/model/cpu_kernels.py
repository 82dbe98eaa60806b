"""Our kernels for CPUs with AVX512-BF16 (csrc/): for decoding the operators `mbloom::bf16_linear`,
`mbloom::int8_linear` and `mbloom::decode_attention`; for training the cross-entropy's two passes over the
logits, `mbloom::cross_entropy_max_sum_exp` and `mbloom::cross_entropy_logits_grad` (csrc/cross_entropy.cpp), and the
MLP's GeLU, `mbloom::gelu_tanh` and its backward (csrc/gelu.cpp).

A decoding step multiplies a handful of rows by every weight, so its speed is the speed at which the
weights stream from memory. At 8 rows oneDNN's bf16 kernel reads its blocked weights at 14-18 GB/s on the
2-core benchmark machine, where a plain read runs at 29 GB/s; `bf16_linear` reads each block of 32 outputs
once, contiguously, and reaches 28.6 GB/s (bloom-small's 33 linears: 2.9 ms a step against 4.5 ms). Its
results are torch's bf16 `F.linear`'s: float32 products of bf16 pairs summed along K in order, the bias
added in float32, one rounding to bf16. Torch splits a long K into blocks whose sums it adds, which can
round a few outputs to the neighbouring bf16 value (0.07% of them at K = 2048; none at K = 512).
`int8_linear` is the same product with int8 weights and a scale per output. `decode_attention` does
BloomAttention's single-query step (scores, softmax, values) for each sequence and head in one pass over
its cached keys and values, instead of two one-column `bmm`s.

The operators are compiled at first use with the C++ compiler and ninja that `torch.utils.cpp_extension`
uses (about 10 s, once a machine: the build is cached under TORCH_EXTENSIONS_DIR). Where the CPU lacks
AVX512-BF16 or the build fails, `kernels_available()` says so (with a warning for a failed build) and
callers keep torch's own operators.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("linear.cpp", "decode_attention.cpp", "cross_entropy.cpp", "gelu.cpp")]
BLOCK = 32  # outputs per packed block of a linear's weight (csrc/linear.cpp's kBlock)
COMPILER_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo (empty off Linux or where it cannot be read)."""
    if platform.system() != "Linux":
        return {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in _cpuinfo().get("flags", "").split()


def describe_cpu() -> str:
    """The CPU's model and what decides our kernels' speed against oneDNN's: AVX512-BF16 (which they use)
    and AMX-BF16 tiles (which oneDNN uses, and they do not). For benchmarks to print beside their figures."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    model = info.get("model name") or platform.processor() or platform.machine()
    return (f"CPU: {model}, {os.cpu_count()} cores; AVX512-BF16 {'yes' if 'avx512_bf16' in flags else 'no'}, "
            f"AMX-BF16 {'yes' if 'amx_bf16' in flags else 'no'}")


@functools.lru_cache(maxsize=None)
def kernels_available() -> bool:
    """Builds (once a machine) and loads (once a process) the operators; False where they cannot run."""
    if not cpu_has_avx512_bf16():
        return False
    from torch.utils.cpp_extension import load

    try:
        with announce_build("the CPU kernels"):
            load(name="mbloom_cpu_kernels", sources=[str(source) for source in SOURCES], extra_cflags=COMPILER_FLAGS,
                 extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # no compiler, no ninja, an old compiler without AVX512-BF16 intrinsics
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"megatron_bloom: the CPU kernels could not be built ({first_line}); torch's operators "
                      "are used instead (about 1.5x slower per decoding step, 8% slower bf16 training steps).")
        return False
    # Output shapes, for torch.compile's tracing.
    torch.library.register_fake("mbloom::bf16_linear")(
        lambda x, packed, bias: x.new_empty(*x.shape[:-1], packed.shape[0] * BLOCK))
    torch.library.register_fake("mbloom::int8_linear")(
        lambda x, packed, scales, bias: x.new_empty(*x.shape[:-1], packed.shape[0] * BLOCK))
    torch.library.register_fake("mbloom::decode_attention")(
        lambda query, keys, values, bias, mask, scale, kv_length: query.new_empty(query.shape))
    torch.library.register_fake("mbloom::gelu_tanh")(lambda x: torch.empty_like(x))
    torch.library.register_fake("mbloom::gelu_tanh_backward")(lambda grad, x: torch.empty_like(x))
    torch.library.register_fake("mbloom::cross_entropy_max_sum_exp")(
        lambda rows, real_columns: tuple(rows.new_empty(rows.shape[0], dtype=torch.float32) for _ in range(2)))
    return True


@contextlib.contextmanager
def announce_build(what: str, seconds: float = 2.0):
    """Says so, once, on the first rank, when loading `what` took a build (over `seconds`): the first run on
    a machine compiles for a while, later runs load the cached library at once."""
    started = time.perf_counter()
    yield
    took = time.perf_counter() - started
    if took > seconds and os.environ.get("RANK", "0") == "0":
        print(f"megatron_bloom: built {what} in {took:.0f} s (once per machine: cached under TORCH_EXTENSIONS_DIR, "
              "default ~/.cache/torch_extensions)", file=sys.stderr, flush=True)


def fits(weight: torch.Tensor) -> bool:
    """Whether `bf16_linear` takes this [N, K] weight: N a multiple of the block, K even."""
    return weight.dim() == 2 and weight.shape[0] % BLOCK == 0 and weight.shape[1] % 2 == 0


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N / 32, K / 2, 32, 2] (bf16 or int8): per block of outputs, the inputs in pairs."""
    outputs, inputs = weight.shape
    blocks = weight.detach().reshape(outputs // BLOCK, BLOCK, inputs // 2, 2)
    return blocks.permute(0, 2, 1, 3).contiguous()


def bf16_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for bf16 `x` [..., K], `packed = pack_weight(weight)` and a float32 bias
    (once `kernels_available()`)."""
    return torch.ops.mbloom.bf16_linear(x, packed, bias)


def attention_fits(head_dim: int) -> bool:
    """Whether `decode_attention` takes heads of this size (a whole number of 32-value bf16 vectors)."""
    return head_dim % 32 == 0


def int8_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`(x . w_int8) * scales + bias` for bf16 `x` [..., K], `packed = pack_weight(w_int8)` and float32
    scales and bias (once `kernels_available()`): the int8 values are widened to bf16 in registers, so
    the weights stream at half bf16's bytes (bloom-small's linears at 8 rows: 1.85 ms a step against
    3.2 ms in bf16 and 5.8 ms through torch's int8 kernel)."""
    return torch.ops.mbloom.int8_linear(x, packed, scales, bias)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     mask: torch.Tensor, scale: float, kv_length: int) -> torch.Tensor:
    """Context `[batch, heads, 1, head_dim]` of one query per sequence (bf16) against the first `kv_length`
    positions of the cache buffers `keys`, `values` `[batch, heads, capacity, head_dim]`, with the ALiBi
    `bias` `[batch * heads, 1, kv]` and the additive `mask` `[batch or 1, 1, 1, kv]` (once
    `kernels_available()`)."""
    return torch.ops.mbloom.decode_attention(query, keys, values, bias, mask, scale, kv_length)


def cross_entropy_max_sum_exp(rows: torch.Tensor) -> tuple:
    """Each row's max and sum of e^(x - max), float32 `[rows]`, of bf16 logits `[rows, columns]` whose rows
    are contiguous (a column slice of a wider tensor is fine), once `kernels_available()`."""
    return torch.ops.mbloom.cross_entropy_max_sum_exp(rows, rows.shape[1])


def cross_entropy_logits_grad(grad: torch.Tensor, rows: torch.Tensor, log_sum_exp: torch.Tensor,
                              grad_loss: torch.Tensor, local_target: torch.Tensor, target_grad: torch.Tensor,
                              real_columns: int) -> None:
    """Writes into the contiguous bf16 `grad` (shaped like `rows`) the cross-entropy's logits gradient:
    e^(x - log_sum_exp) * grad_loss in the first `real_columns` columns plus `target_grad` at `local_target`,
    0 in the rest (once `kernels_available()`)."""
    torch.ops.mbloom.cross_entropy_logits_grad(grad, rows, log_sum_exp, grad_loss, local_target, target_grad,
                                               real_columns)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")` of a contiguous bf16 `x` (once `kernels_available()`)."""
    return torch.ops.mbloom.gelu_tanh(x)


def gelu_tanh_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`grad` times the tanh-GeLU's derivative at `x`, both contiguous bf16 (once `kernels_available()`)."""
    return torch.ops.mbloom.gelu_tanh_backward(grad, x)
