"""Accelerators `mbloom-plan` plans for: peak throughput, memory, and what the iteration-time model
(planner/cost.py) needs: achieved GEMM fractions, memory bandwidth, and bandwidth and latency within a node
and between nodes. Bandwidths are per GPU, in GB/s; an all-reduce's is the bus bandwidth (NCCL's convention:
the rate at which 2 (n - 1) / n of the data moves per rank).

Sources of the presets (dense figures, no sparsity):
- a100-80gb (SXM4, in an 8-GPU HGX/DGX A100 node): 312 TFLOP/s bf16, 19.5 fp32, 80 GB HBM2e at 2,039 GB/s
  (NVIDIA A100 datasheet, 2021). NVLink 3 through NVSwitch, 600 GB/s per GPU both ways; nccl-tests'
  all-reduce reaches about 230 GB/s bus bandwidth on a DGX A100 (NVIDIA, DGX A100 user guide and nccl-tests
  results). One 200 Gb/s HDR InfiniBand adapter per GPU (DGX A100), 25 GB/s, about 22 achieved.
- h100-80gb (SXM5, HGX/DGX H100): 989 TFLOP/s bf16, 67 fp32, 80 GB HBM3 at 3,350 GB/s (NVIDIA H100
  datasheet, 2023). NVLink 4, 900 GB/s per GPU both ways; about 360 GB/s all-reduce bus bandwidth
  (nccl-tests on DGX H100). One 400 Gb/s NDR adapter per GPU, 50 GB/s, about 45 achieved.
- h200 (SXM): the H100's compute and links, 141 GB HBM3e at 4,800 GB/s (NVIDIA H200 datasheet, 2024).
- Achieved GEMM fractions: transformer-sized bf16 GEMMs run at about 70% of the A100's peak and 65% of the
  H100's (NVIDIA's Deep Learning Performance Guide, "Matrix Multiplication Background"; Narayanan et al.
  2021 measured the same order in Megatron-LM's layers); attention's batched products of head-sized
  operands, with the softmax between them unfused, at about half that.
`cpu` is measured here and now: the bf16 (or fp32) matrix-multiply rate of this machine with all its
threads, and its total memory; it predicts no time.

A hardware FILE (`mbloom-plan --calibrate --output FILE`, planner/calibrate.py; read by
planner/hardware_file.py) holds what was measured on one machine, for each number of ranks that shared it and
each micro-batch size: where ranks share cores (CPUs) each rank's rates depend on how many run at once, and
small operands run below the rate of large ones, so a layout is predicted with the figures of its own rank
count and micro-batch (`for_layout`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_bloom.errors import UserError


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops_16bit: float
    peak_tflops_fp32: float
    memory_gb: float
    # what planner/cost.py needs (None: unknown, no prediction)
    memory_gb_per_s: Optional[float] = None
    gemm_efficiency: Optional[float] = None  # achieved fraction of peak: linears and the LM head
    attention_efficiency: Optional[float] = None  # achieved fraction of peak: attention's batched products
    intra_node_gb_per_s: Optional[float] = None  # all-reduce bus bandwidth within a node, per GPU
    intra_node_latency_s: Optional[float] = None
    inter_node_gb_per_s: Optional[float] = None  # per GPU, between nodes
    inter_node_latency_s: Optional[float] = None
    gpus_per_node: int = 8
    # measured machines (hardware files) only
    kind: str = "gpu"  # or "cpu": ranks share the cores
    precision: Optional[str] = None  # the one the rates were measured in; None: any (presets)
    lm_head_efficiency: Optional[float] = None  # the LM head and its loss; None: gemm_efficiency
    optimizer_gb_per_s: Optional[float] = None  # Adam's effective rate; None: memory_gb_per_s
    gradient_gb_per_s: Optional[float] = None  # the data-parallel all-reduce within a node; None: intra_node
    gradient_latency_s: Optional[float] = None
    p2p_gb_per_s: Optional[float] = None  # a pipeline send within a node; None: intra_node
    p2p_latency_s: Optional[float] = None
    recompute_passes: float = 1.0  # what recomputation adds, in forwards (checkpointing's own work included)
    block_overhead_s: float = 0.0  # a block's forward and backward dispatch, not divided by tp (GPUs: hidden)
    cores: int = 0  # a calibrated CPU's, which its ranks share
    zero3_block_overhead_s: float = 0.0  # ZeRO 3's hooks, a block and micro-batch, beyond its traffic
    zero3_micro_batch_overhead_s: float = 0.0  # and the rest of the model's (embedding, head), a micro-batch
    # the trainer's work beyond the model's arithmetic and traffic (DeepSpeed's engine and hooks, the embedding's
    # backward, gradient accumulation, the optimizer's bookkeeping): a step's, a block's in each step, a
    # micro-batch's, a block's in each micro-batch
    step_overhead_s: float = 0.0
    block_step_overhead_s: float = 0.0
    micro_batch_overhead_s: float = 0.0
    block_micro_batch_overhead_s: float = 0.0
    # a block's forward and backward at tp > 1 as a layout runs it, collectives included, at this micro-batch:
    # (tp, sequence parallel, seconds)
    tensor_parallel_blocks: Tuple[Tuple[int, bool, float], ...] = ()
    micro_batch_size: int = 0  # the one a calibrated machine's figures were measured at
    # a hardware file's figures: (ranks sharing the machine, micro-batch size, one rank's figures)
    measured: Tuple[Tuple[int, int, "Hardware"], ...] = ()

    def peak_tflops(self, precision: str) -> float:
        return self.peak_tflops_fp32 if precision == "fp32" else self.peak_tflops_16bit

    def tensor_parallel_block_s(self, tp: int, sequence_parallel: bool, micro_batch_size: int) -> Optional[float]:
        """A block's measured forward and backward at this tp degree, for `micro_batch_size` sequences (scaled
        from the micro-batch measured, as the rates are); None where it was not measured."""
        for degree, sp, seconds in self.tensor_parallel_blocks:
            if (degree, sp) == (tp, sequence_parallel):
                return seconds * micro_batch_size / self.micro_batch_size
        return None

    @property
    def usable_memory_gb(self) -> float:
        """What a run's tensors may take: the CUDA context, NCCL's buffers, the libraries' workspaces and the
        caching allocator's fragmentation keep about 8% of a GPU (PyTorch's memory notes; the same margin
        on a host leaves room for the system)."""
        return USABLE_MEMORY_FRACTION * self.memory_gb

    @property
    def predicts(self) -> bool:
        """Whether it knows enough to predict an iteration's time."""
        return None not in (self.memory_gb_per_s, self.gemm_efficiency, self.attention_efficiency,
                            self.intra_node_gb_per_s, self.intra_node_latency_s, self.inter_node_gb_per_s,
                            self.inter_node_latency_s)

    def for_layout(self, world_size: int, micro_batch_size: int) -> "Hardware":
        """The figures of one rank of a layout, on a calibrated machine, at the nearest micro-batch size
        measured. CPUs: those measured with as many ranks at once (all of a layout's ranks share the machine),
        past the largest count measured its rates shared further (the cores are divided). GPUs: a device's
        compute is its own; the links are those measured with the most devices together."""
        if not self.measured:
            return self
        counts = sorted({count for count, _, _ in self.measured})
        if self.kind == "cpu":
            count = max((n for n in counts if n <= world_size), default=counts[0])
        else:
            count = counts[-1] if world_size > 1 else counts[0]
        sizes = [(abs(math.log2(micro / micro_batch_size)), -micro, figures)
                 for n, micro, figures in self.measured if n == count]
        figures = min(sizes, key=lambda entry: entry[:2])[2]
        if world_size > 1 and count == 1:
            raise UserError(f"hardware={self.name} was measured with one rank alone: it knows no links between "
                            f"ranks, and this layout has {world_size}. Calibrate on a machine with as many "
                            "devices (GPUs: one rank each) as a node of the cluster has.")
        if self.kind != "cpu" or count >= world_size:
            return figures
        share = count / world_size
        return dataclasses.replace(figures, peak_tflops_16bit=figures.peak_tflops_16bit * share,
                                   peak_tflops_fp32=figures.peak_tflops_fp32 * share,
                                   memory_gb_per_s=figures.memory_gb_per_s * share,
                                   optimizer_gb_per_s=figures.optimizer_gb_per_s * share,
                                   tensor_parallel_blocks=tuple((t, sp, seconds / share) for t, sp, seconds
                                                                in figures.tensor_parallel_blocks))

    def while_one_stage_runs(self, world_size: int, pipeline_stages: int, micro_batch_size: int) -> "Hardware":
        """The figures of one rank while only its own stage's ranks work (a pipeline's fill and drain): on a
        CPU the idle stages' cores go to the working ranks, as far as their threads can use them (each has
        cores / world_size of them, as the launcher gives them)."""
        if self.kind != "cpu" or not self.measured:
            return self.for_layout(world_size, micro_batch_size)
        threads = max(1, self.cores // world_size)
        working = max(world_size // pipeline_stages, self.cores // threads)
        return self.for_layout(min(working, world_size), micro_batch_size)

    def nodes_apart(self, ranks_apart: int) -> bool:
        """Whether ranks this far apart in the rank order run on different nodes (never on CPUs: a hardware
        file describes one machine)."""
        return self.kind != "cpu" and ranks_apart >= self.gpus_per_node

    def describe_mismatch(self, precision: str) -> Optional[str]:
        """Why this hardware cannot predict a run in `precision` (None when it can)."""
        if self.precision is not None and self.precision != precision:
            return (f"hardware={self.name} was calibrated in {self.precision}, and its rates say nothing of "
                    f"{precision}: calibrate again with precision={precision}, or plan in {self.precision}.")
        return None


USABLE_MEMORY_FRACTION = 0.92

PRESETS = {  # every name of config.schema.HARDWARE_NAMES but `cpu`; figures and sources above
    "a100-80gb": Hardware("a100-80gb", 312.0, 19.5, 80.0, memory_gb_per_s=2039.0, gemm_efficiency=0.70,
                          attention_efficiency=0.35, intra_node_gb_per_s=230.0, intra_node_latency_s=15e-6,
                          inter_node_gb_per_s=22.0, inter_node_latency_s=25e-6),
    "h100-80gb": Hardware("h100-80gb", 989.0, 67.0, 80.0, memory_gb_per_s=3350.0, gemm_efficiency=0.65,
                          attention_efficiency=0.33, intra_node_gb_per_s=360.0, intra_node_latency_s=12e-6,
                          inter_node_gb_per_s=45.0, inter_node_latency_s=20e-6),
    "h200": Hardware("h200", 989.0, 67.0, 141.0, memory_gb_per_s=4800.0, gemm_efficiency=0.65,
                     attention_efficiency=0.33, intra_node_gb_per_s=360.0, intra_node_latency_s=12e-6,
                     inter_node_gb_per_s=45.0, inter_node_latency_s=20e-6),
}


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
                    gemm_tflops(size, size, size, torch.float32, seconds / 2), psutil.virtual_memory().total / 1e9,
                    kind="cpu")
