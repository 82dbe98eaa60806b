"""Accelerators `mbloom-plan` compares against: dense peak throughput and memory per device.

Peaks are the vendors' dense (no sparsity) figures: A100 80GB 312 TFLOP/s bf16 / 19.5 fp32; H100 SXM 989
bf16 / 67 fp32; H200 the same silicon as H100 with 141 GB. `cpu` is measured here and now: the bf16 (or
fp32) matrix-multiply rate of this machine with all its threads, and its total memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass



@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops_16bit: float
    peak_tflops_fp32: float
    memory_gb: float

    def peak_tflops(self, precision: str) -> float:
        return self.peak_tflops_fp32 if precision == "fp32" else self.peak_tflops_16bit


PRESETS = {  # every name of config.schema.HARDWARE_NAMES but `cpu`
    "a100-80gb": Hardware("a100-80gb", 312.0, 19.5, 80.0),
    "h100-80gb": Hardware("h100-80gb", 989.0, 67.0, 80.0),
    "h200": Hardware("h200", 989.0, 67.0, 141.0),
}


def hardware(name: str) -> Hardware:
    return measure_cpu() if name == "cpu" else PRESETS[name]


def gemm_tflops(m: int, k: int, n: int, dtype, seconds: float = 0.5) -> float:
    """Sustained rate of [m, k] x [k, n] products in `dtype` on this machine (best repetition over about
    `seconds`, after a warm-up), in TFLOP/s."""
    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2.0 * m * k * n / (time.perf_counter() - start))
    return best / 1e12


def measure_cpu(size: int = 2048, seconds: float = 1.0) -> Hardware:
    """This machine: its square-GEMM peak with all its threads, bf16 and fp32, and its total memory."""
    import psutil
    import torch

    return Hardware("cpu", gemm_tflops(size, size, size, torch.bfloat16, seconds / 2),
                    gemm_tflops(size, size, size, torch.float32, seconds / 2), psutil.virtual_memory().total / 1e9)
