"""`mbloom-plan --calibrate --output FILE`: what the iteration-time model (planner/cost.py) needs, measured on
this machine at the shapes of the config's model, into a hardware file that `hardware=FILE` reads
(planner/hardware_file.py).

For each number of ranks n that may share the machine (CPUs: 1, 2, 4, ... up to twice the cores, each rank
with cores / n threads as the launcher gives them; GPUs: one rank per device), n processes measure at once,
so that each rank's figures are those it gets beside its n - 1 peers:
- compute, by shape class, each forward and backward through the model's own modules at tp 1, for micro-batches
  of 1, 2 and 4 sequences and the config's (small operands run below the rate of large ones): the block's four
  linear layers; attention's products with their softmax and masks (the kernel the model runs); the LM head
  with its loss; the rest of a block (LayerNorms, GeLU, residuals), as the block's time less the other two, in
  GB/s of the activations planner/memory.py counts; what recomputation adds, in forwards (the block under
  activation checkpointing, as pipeline/model.py runs it, less the block); a block's forward and backward
  with next to no work (its operators' dispatch, which tensor parallelism does not divide); Adam's step with
  clipping, in GB/s of its 30 bytes per parameter; and the square-GEMM peak.
- at n >= 2, the block as a layout at tp t runs it, for each t up to n (pipeline/layers.py's module, its
  collectives included), with and without sequence parallelism, at each micro-batch size;
- links, at n >= 2: the tensor-parallel all-reduce (on CPUs through the shared-memory group the layers use),
  the data-parallel all-reduce of the backend (gloo, NCCL) and a point-to-point send, each timed at a small
  and a large message: latency = the small one's time, bandwidth = the large one's extra bytes over its extra
  time (bus bytes for the all-reduces, 2 (n - 1) / n of the data, NCCL's convention);
- last (what DeepSpeed's engines leave behind slows what follows), the trainer's own steps (training/loop.py)
  on models of one and three blocks, one sequence of TRAINER_TOKENS a micro-batch (its overheads do not scale
  with the tokens), the n ranks as data-parallel replicas: what they take beyond the cost
  model's prediction of the same runs from the figures above, with a block's and the head's compute as timed
  at those shapes between the steps (trainer_overheads), and at n >= 2 what ZeRO 3's steps take beyond that.
Every rank repeats a timing as often as the others, which a collective needs; a time is the median of its
repetitions, a shape class's the fastest of ROUNDS interleaved rounds (the element-wise and recomputation
figures are differences of them: a slow stretch in one would swing them), and a compute figure the median
over ranks. Run it on a quiet machine: other work on the cores is measured too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from megatron_bloom.config import TrainConfig
from megatron_bloom.errors import UserError
from megatron_bloom.parallel.process_exit import leave
from megatron_bloom.planner.cost import ADAM_BYTES_PER_PARAMETER
from megatron_bloom.planner.hardware_file import FILE_FORMAT, LINKS
from megatron_bloom.planner.memory import layer_activation_bytes

OPTIMIZER_ELEMENTS = 8 * 2**20  # Adam is timed over this many parameters (or the model's, if fewer)
SMALL_MESSAGE_ELEMENTS = 256  # what a link's latency is timed with
LARGE_MESSAGE_ELEMENTS = 4 * 2**20  # and its bandwidth (or an activation, if larger): far past the latency
MIN_REPETITIONS = 3
TENSOR_PARALLEL_DEGREES = (2, 4, 8, 16, 32, 64)  # a block is timed at those of these a layout may use
ROUNDS = 3  # of the shape classes' timings (each `seconds` / ROUNDS long)
TRAINER_STEPS = ((1, 1), (1, 3), (3, 1), (3, 3))  # the trainer's steps timed: (blocks, micro-batches)
ZERO3_MICRO_BATCHES = 2  # ZeRO 3's steps (one and three blocks)
TRAINER_ROUNDS = 2  # of the trainer's steps' timings
# The trainer's steps run one sequence of this many tokens (at most the model's) a micro-batch: its overheads
# scale with the parameters and the modules, not the tokens, and its arithmetic with the tokens, so short
# sequences leave the overheads most of what is timed (at full length they were differences of steps 10-100x
# their size, and a 2% swing of one step moved them by more than their own size).
TRAINER_TOKENS = 64
TRAINER_WARMUP_STEPS = 2  # before a trainer's steps are timed (beside the timer's own warm-up)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the ranks measure at: the config's model at tp 1, micro-batches of these sizes."""

    config: TrainConfig
    micro_batch_sizes: tuple
    optimizer_elements: int
    on_cpu: bool

    @property
    def model(self):
        return self.config.model

    @property
    def seq_length(self) -> int:
        return self.config.sample_length

    @property
    def counted_as(self) -> str:
        """A `hardware=` name of this machine's kind: the memory model counts a CPU's attention activations
        (its kernel keeps s x s terms) apart from a GPU's."""
        return "cpu" if self.on_cpu else "a100-80gb"

    @property
    def trainer_zero_stage(self) -> int:
        """The config's ZeRO stage for the trainer's runs; ZeRO 3's own are measured against ZeRO 2."""
        return min(self.config.zero.stage, 2)

    @property
    def dtype(self):
        from megatron_bloom.checkpoint.layout import PRECISION_DTYPES

        return PRECISION_DTYPES[self.config.precision]


def default_rank_counts(on_gpu: bool) -> List[int]:
    if on_gpu:
        import torch

        return sorted({1, torch.cuda.device_count()})
    cores = os.cpu_count() or 1
    return [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max(2, 2 * cores)]


def calibrate(config: TrainConfig, rank_counts: Optional[Sequence[int]] = None, seconds: float = 0.6,
              progress: Callable[[str], None] = lambda line: None) -> dict:
    """The hardware file's contents for this machine (`seconds`: how long each figure is timed)."""
    import torch

    on_gpu = torch.cuda.is_available()
    counts = sorted(set(rank_counts or default_rank_counts(on_gpu)))
    if on_gpu and max(counts) > torch.cuda.device_count():
        raise UserError(f"--calibrate on GPUs runs one rank per device; this machine has "
                        f"{torch.cuda.device_count()}, not {max(counts)}.")
    model = config.model
    micro_batch_sizes = tuple(sorted({1, 2, 4, config.train.micro_batch_size}))
    shapes = Shapes(config, micro_batch_sizes, min(OPTIMIZER_ELEMENTS, model.num_parameters()), not on_gpu)
    ranks = {}
    for count in counts:
        progress(f"measuring {count} rank{'s' * (count > 1)} at once")
        times = _run_ranks(count, shapes, seconds, on_gpu)
        ranks[str(count)] = figures(shapes, times)
        ranks[str(count)].update(trainer_overheads(shapes, count, ranks[str(count)], times))
    import psutil

    memory_gb = (torch.cuda.get_device_properties(0).total_memory if on_gpu else psutil.virtual_memory().total) / 1e9
    return {
        "format": FILE_FORMAT,
        "kind": "gpu" if on_gpu else "cpu",
        "device": torch.cuda.get_device_name(0) if on_gpu else (platform.processor() or platform.machine()),
        "cores": os.cpu_count(),
        "memory_gb": round(memory_gb, 2),
        "precision": config.precision,
        "ranks_per_node": max(counts),
        "calibrated_for": {"hidden_size": model.hidden_size, "num_heads": model.num_heads,
                           "vocab_size": model.vocab_size, "seq_length": shapes.seq_length},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ranks": ranks,
    }


def figures(shapes: Shapes, times: dict) -> dict:
    """The rates of one rank count from the seconds its ranks measured."""
    config, h, s = shapes.config, shapes.model.hidden_size, shapes.seq_length
    vocab = shapes.model.padded_vocab_size(1)
    result = {"threads": int(times["threads"]), "peak_tflops_16bit": times["peak_16bit"],
              "peak_tflops_fp32": times["peak_fp32"],
              "optimizer_gb_per_s": ADAM_BYTES_PER_PARAMETER * shapes.optimizer_elements / times["optimizer"] / 1e9,
              "block_overhead_s": times["block_overhead"]}
    for link in LINKS:
        if link in times:
            small, large, bus_bytes = times[link]
            result[f"{link}_latency_s"] = small
            result[f"{link}_gb_per_s"] = bus_bytes / max(large - small, 1e-9) / 1e9
    result["micro_batches"] = {}
    for b in shapes.micro_batch_sizes:
        at = {key: times[f"{key}@{b}"] for key in ("block", "recomputed_block", "linear", "attention", "lm_head")}
        # as the cost model will count them for this machine: on a CPU its attention kernel's s x s terms
        one = dataclasses.replace(config, train=dataclasses.replace(config.train, micro_batch_size=b),
                                  parallel=dataclasses.replace(config.parallel, tp=1, pp=1, dp=1,
                                                               sequence_parallel=False),
                                  hardware=shapes.counted_as)
        elementwise_s = max(at["block"] - at["linear"] - at["attention"], 0.05 * at["block"])
        result["micro_batches"][str(b)] = {
            "linear_tflops": 3 * 24.0 * b * s * h * h / at["linear"] / 1e12,  # forward and backward (2x)
            "attention_tflops": 3 * 4.0 * b * s * s * h / at["attention"] / 1e12,
            "lm_head_tflops": 3 * 2.0 * b * s * h * vocab / at["lm_head"] / 1e12,
            # the bytes planner/cost.py charges the element-wise work with: 2 A a pass, 3 passes
            "elementwise_gb_per_s": 3 * 2.0 * layer_activation_bytes(one) / elementwise_s / 1e9,
            # a forward is about a third of the block's forward and backward
            "recompute_passes": max(0.1, (at["recomputed_block"] - at["block"]) / (at["block"] / 3)),
        }
        for key in ("tensor_parallel_block", "sequence_parallel_block"):
            blocks = {str(t): times[f"{key}@{t}@{b}"] for t in TENSOR_PARALLEL_DEGREES if f"{key}@{t}@{b}" in times}
            if blocks:
                result["micro_batches"][str(b)][f"{key}_s"] = blocks
    return _rounded(result)


def _rounded(value):
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return round(value, 9) if isinstance(value, float) else value


def _run_ranks(count: int, shapes: Shapes, seconds: float, on_gpu: bool) -> dict:
    """`count` processes measuring at once; the median over ranks of each time."""
    import torch.multiprocessing as mp

    from megatron_bloom.parallel.distributed import free_port

    with tempfile.TemporaryDirectory(prefix="mbloom-calibrate-") as out:
        mp.start_processes(_rank_main, args=(count, free_port(), shapes, seconds, on_gpu, out), nprocs=count,
                           start_method="spawn", join=True)
        results = [json.loads((Path(out) / f"{rank}.json").read_text()) for rank in range(count)]
    # compute: the median rank; links: rank 0's (it has a pipeline peer whatever the count)
    return {key: value if isinstance(value, list) else statistics.median(result[key] for result in results)
            for key, value in results[0].items()}


def _rank_main(rank: int, count: int, port: int, shapes: Shapes, seconds: float, on_gpu: bool, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cuda" if on_gpu else "cpu",
                      RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(count))  # as a launcher sets them
    threads = 1 if on_gpu else max(1, (os.cpu_count() or 1) // count)  # as the launcher shares the cores
    torch.set_num_threads(threads)
    if on_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=count)
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    timer = _Timer(device, seconds)
    try:
        times = {"threads": threads, **_compute_times(shapes, device, timer)}
        if count > 1:
            times.update(_tensor_parallel_block_times(shapes, device, timer, count))
            times.update(_link_times(shapes, device, timer, rank, count))
        times.update(_trainer_steps(shapes, count, timer))  # last: what engines leave behind slows what follows
        (Path(out) / f"{rank}.json").write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()
    leave(0)  # the engines keep gloo groups alive past destroy_process_group (parallel/process_exit.py)


class _Timer:
    """The median time of a callable over repetitions lasting about `seconds`, after a warm-up. Every rank
    starts together and repeats as often as the others (a collective must), as many times as the slowest
    rank's first call fits in `seconds`."""

    def __init__(self, device, seconds: float) -> None:
        self.device, self.seconds = device, seconds

    def __call__(self, fn: Callable[[], object]) -> float:
        import torch
        import torch.distributed as dist

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        dist.barrier()
        start = time.perf_counter()
        fn()  # the warm-up, timed as the probe
        sync()
        probe = torch.tensor([time.perf_counter() - start], device=self.device)
        dist.all_reduce(probe, op=dist.ReduceOp.MAX)
        samples: List[float] = []
        for _ in range(max(MIN_REPETITIONS, min(1000, int(self.seconds / max(probe.item(), 1e-6))))):
            start = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - start)
        dist.barrier()
        return statistics.median(samples)


def _compute_times(shapes: Shapes, device, timer: _Timer) -> Dict[str, float]:
    import torch

    times = {}
    side = 2048
    for key, peak_dtype in (("peak_16bit", torch.bfloat16), ("peak_fp32", torch.float32)):
        x, y = (torch.randn(side, side, device=device, dtype=peak_dtype) for _ in range(2))
        times[key] = 2.0 * side ** 3 / timer(lambda: torch.mm(x, y)) / 1e12
    # The element-wise work and recomputation's are differences of these times: rounds spread over the whole
    # phase, and the fastest of each, keep a slow stretch (the allocator, a first kernel, a busy neighbour)
    # out of them.
    round_timer = _Timer(device, timer.seconds / ROUNDS)
    for _ in range(ROUNDS):
        for micro_batch_size in shapes.micro_batch_sizes:
            for key, fns in _shape_class_steps(shapes, micro_batch_size, device).items():
                name = f"{key}@{micro_batch_size}"
                times[name] = min(times.get(name, math.inf), sum(round_timer(fn) for fn in fns))
    times["optimizer"] = timer(_optimizer_step(shapes, device))
    times["block_overhead"] = _block_overhead(shapes, device, timer)
    return times


def _block_overhead(shapes: Shapes, device, timer: _Timer) -> float:
    """A block's forward and backward with next to no work (the model's heads, 8 dimensions each, 16 tokens):
    the time its operators take to dispatch, which tensor parallelism does not divide."""
    import torch

    from megatron_bloom.model.block import BloomBlock
    from megatron_bloom.model.transformer import attention_inputs

    dtype, heads = shapes.dtype, shapes.model.num_heads
    small = dataclasses.replace(shapes.model, hidden_size=8 * heads)
    block = BloomBlock(small).to(device=device, dtype=dtype)
    x = torch.randn(1, 16, small.hidden_size, device=device, dtype=dtype, requires_grad=True)
    positions, mask = attention_inputs(1, 16, None, dtype, device)
    return timer(_forward_backward(lambda inp: block(inp, positions, mask), x))


def _forward_backward(fn, *inputs):
    """A call of `fn(*inputs)` and the backward of its output (gradient ones), to time."""
    import torch

    def step():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return step


def _shape_class_steps(shapes: Shapes, b: int, device,
                       seq_length: Optional[int] = None) -> Dict[str, List[Callable[[], None]]]:
    """What to time, at a micro-batch of `b` sequences (of the model's length, or `seq_length`): the forward
    and backward of a block, as a whole and recomputed, and of its shape classes (the sum of a class's list)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from megatron_bloom.model.alibi import alibi_bias
    from megatron_bloom.model.transformer import attention_inputs
    from megatron_bloom.parallel.cross_entropy import VocabParallelCausalLMLoss

    model, s, dtype = shapes.model, seq_length or shapes.seq_length, shapes.dtype
    h, heads = model.hidden_size, model.num_heads

    x = torch.randn(b, s, h, device=device, dtype=dtype, requires_grad=True)
    block = _trainer_block(model, None, device, dtype)
    positions, mask = attention_inputs(b, s, None, dtype, device)
    weights = [torch.nn.Parameter(torch.randn(out_features, in_features, device=device, dtype=dtype) * 0.02)
               for out_features, in_features in ((3 * h, h), (h, h), (4 * h, h), (h, 4 * h))]
    biases = [torch.nn.Parameter(torch.zeros(w.shape[0], device=device, dtype=dtype)) for w in weights]
    inputs = [torch.randn(b, s, w.shape[1], device=device, dtype=dtype, requires_grad=True) for w in weights]
    attention = block.self_attention
    qkv = [torch.randn(b, heads, s, h // heads, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    bias = alibi_bias(attention.alibi_slopes.to(device), positions, dtype)
    embedding = torch.nn.Parameter(torch.randn(model.padded_vocab_size(1), h, device=device, dtype=dtype) * 0.02)
    labels = torch.randint(0, model.vocab_size, (b, s), device=device)
    loss = VocabParallelCausalLMLoss(None, 0, model.vocab_size, fused=False)
    hidden = torch.randn(b, s, h, device=device, dtype=dtype, requires_grad=True)
    return {
        "block": [_forward_backward(block, x)],
        "recomputed_block": [_forward_backward(lambda inp: checkpoint(block, inp, use_reentrant=False), x)],
        "linear": [_forward_backward(F.linear, i, w, bias) for i, w, bias in zip(inputs, weights, biases)],
        "attention": [_forward_backward(lambda q, k, v: attention.core_attention(q, k, v, bias, mask), *qkv)],
        "lm_head": [_forward_backward(lambda inp: loss(F.linear(inp, embedding), labels), hidden)],
    }


def _trainer_block(model, state, device, dtype, sequence_parallel: bool = False):
    """A transformer block as the trainer builds it (pipeline/layers.py: it makes its attention inputs), on
    `state`'s tensor-parallel ranks (None: one rank alone)."""
    from megatron_bloom.model import TaskConfig
    from megatron_bloom.parallel.sharding import full_shapes
    from megatron_bloom.parallel.state import ParallelState
    from megatron_bloom.pipeline.layers import BlockPipe

    state = state or ParallelState.single(device)
    return BlockPipe(model, state, full_shapes(model, TaskConfig()), seed=0, layer_number=0,
                     sequence_parallel=sequence_parallel).to(dtype)


def tensor_parallel_degrees(model, count: int) -> List[int]:
    """The tensor-parallel degrees a layout of `count` ranks may use with `model` (beyond 1)."""
    return [t for t in TENSOR_PARALLEL_DEGREES if t <= count and model.num_heads % t == 0
            and model.hidden_size % t == 0]


def _tensor_parallel_block_times(shapes: Shapes, device, timer: _Timer, count: int) -> Dict[str, float]:
    """Forward and backward seconds of the model's block as a layout at tp t runs it (the module the trainer
    builds, its collectives included), with and without sequence parallelism, the ranks in count / t groups
    at once, at each micro-batch size: its operands are t times narrower, every rank dispatches every operator,
    and the ranks wait for each other at each collective, none of which the rates of whole blocks show."""
    import torch

    from megatron_bloom.parallel.state import ParallelState

    model, s, dtype = shapes.model, shapes.seq_length, shapes.dtype
    times = {}
    for t in tensor_parallel_degrees(model, count):
        state = ParallelState.create(tp=t, pp=1, dp=count // t, device=device)
        for sequence_parallel in (False, True)[:1 + (s % t == 0)]:
            block = _trainer_block(model, state, device, dtype, sequence_parallel)
            for b in shapes.micro_batch_sizes:
                x = torch.randn(b, s // t if sequence_parallel else s, model.hidden_size, device=device, dtype=dtype,
                                requires_grad=True)
                key = "sequence_parallel_block" if sequence_parallel else "tensor_parallel_block"
                times[f"{key}@{t}@{b}"] = timer(_forward_backward(block, x))
    return times


def _optimizer_step(shapes: Shapes, device):
    """What ends an iteration on one rank: clipping, AdamW (fused, as training/optimizer.py builds it) over
    float32 masters, and the new weights copied to `dtype`."""
    import torch

    sizes = [shapes.model.hidden_size * shapes.model.hidden_size] * max(
        1, shapes.optimizer_elements // shapes.model.hidden_size ** 2)
    masters = [torch.nn.Parameter(torch.randn(n, device=device) * 0.02) for n in sizes]
    for master in masters:
        master.grad = torch.randn_like(master) * 1e-3
    copies = [torch.empty(n, device=device, dtype=shapes.dtype) for n in sizes]
    optimizer = torch.optim.AdamW(masters, lr=1e-4, fused=True)

    def step():
        norm = torch.stack(torch._foreach_norm([m.grad for m in masters])).norm()
        torch._foreach_mul_([m.grad for m in masters], torch.clamp(1.0 / (norm + 1e-6), max=1.0))
        optimizer.step()
        torch._foreach_copy_(copies, masters)
    return step


def _link_times(shapes: Shapes, device, timer: _Timer, rank: int, count: int) -> dict:
    """(small message's seconds, large message's seconds, the large one's extra bus bytes) of each link."""
    import torch
    import torch.distributed as dist

    from megatron_bloom.parallel.host_group import SharedMemoryGroup

    dtype = shapes.dtype
    activation = max(LARGE_MESSAGE_ELEMENTS,
                     max(shapes.micro_batch_sizes) * shapes.seq_length * shapes.model.hidden_size)
    shared = SharedMemoryGroup.create(dist.group.WORLD) if device.type == "cpu" else None
    tensor_parallel = shared.all_reduce_ if shared is not None else dist.all_reduce
    bus = 2.0 * (count - 1) / count
    result = {}
    for link, collective, elements, link_dtype in (
            ("tensor_parallel", tensor_parallel, activation, dtype),
            # bf16 gradients are reduced in float32 (training/deepspeed_config.py)
            ("gradient", dist.all_reduce, max(LARGE_MESSAGE_ELEMENTS, shapes.optimizer_elements), torch.float32)):
        small = torch.ones(SMALL_MESSAGE_ELEMENTS, device=device, dtype=link_dtype)
        large = torch.ones(elements, device=device, dtype=link_dtype)
        size = large.element_size()
        result[link] = [timer(lambda: collective(small)), timer(lambda: collective(large)),
                        bus * (elements - SMALL_MESSAGE_ELEMENTS) * size]
    # pipeline neighbours: ranks 2i and 2i + 1 exchange an activation (a send forward, one backward)
    peer = rank ^ 1
    small = torch.ones(SMALL_MESSAGE_ELEMENTS, device=device, dtype=dtype)
    large = torch.ones(activation, device=device, dtype=dtype)

    def exchange(tensor):
        if peer >= count:
            return
        if rank % 2 == 0:
            dist.send(tensor, peer)
            dist.recv(tensor, peer)
        else:
            dist.recv(tensor, peer)
            dist.send(tensor, peer)
    # one exchange is two sends one after the other: half its time is one send's
    result["p2p"] = [timer(lambda: exchange(small)) / 2, timer(lambda: exchange(large)) / 2,
                     (activation - SMALL_MESSAGE_ELEMENTS) * large.element_size()]
    return result


def _trainer_steps(shapes: Shapes, count: int, timer: _Timer) -> Dict[str, float]:
    """The trainer's steps over models of TRAINER_STEPS' blocks and micro-batches, these ranks as data-parallel
    replicas, at ZeRO 1 or 2 (the config's) and, with more than one rank, at ZeRO 2 and 3 (one and three
    blocks, ZERO3_MICRO_BATCHES), and a block's and the head's forward and backward at the same shapes
    ("trainer_block", "trainer_lm_head"): what trainer_overheads compares with the model's prediction. Each group's
    engines are timed in TRAINER_ROUNDS interleaved rounds, the fastest of each: the overheads are
    differences of these times, which one slow stretch would swing."""
    stage = shapes.trainer_zero_stage
    groups = [{f"trainer@{blocks}@{m}": _trainer_run(shapes, count, blocks, m, stage) for blocks, m in TRAINER_STEPS}]
    if count > 1:  # ZeRO 3 against ZeRO 2, side by side (whatever slows this phase slows both)
        groups.append({f"zero{zero}@{blocks}": _trainer_run(shapes, count, blocks, ZERO3_MICRO_BATCHES, zero)
                       for blocks in (1, 3) for zero in (2, 3)})
    times, round_timer = {}, _Timer(timer.device, timer.seconds / TRAINER_ROUNDS)
    for group in groups:
        steps = {key: _trainer_step(run) for key, run in group.items()}
        if group is groups[0]:  # a block's and the head's own forward and backward at the same shapes, between them
            at_trainer_shapes = _shape_class_steps(shapes, 1, timer.device, _trainer_tokens(shapes))
            steps.update({f"trainer_{key}": at_trainer_shapes[key][0] for key in ("block", "lm_head")})
        for _ in range(TRAINER_ROUNDS):
            for key, step in steps.items():
                times[key] = min(times.get(key, math.inf), round_timer(step))
    return times


def trainer_overheads(shapes: Shapes, count: int, rank_figures: dict, times: dict) -> Dict[str, float]:
    """What the trainer's steps took beyond the model's prediction of the same runs from `rank_figures`, its
    blocks' and head's compute replaced by their forward and backward timed at the same shapes (what is left:
    DeepSpeed's engine and its gradient hooks, the embedding's backward, gradient accumulation, the optimizer's
    bookkeeping), in the four parts the runs of TRAINER_STEPS tell apart: one a step, one a block and step
    (what scales with the parameters, not the micro-batches), one a micro-batch, and one a block and
    micro-batch. Then what ZeRO 3's runs took beyond ZeRO 2's, less the traffic the model
    counts between them (its hooks on every module, gathering and releasing each parameter): a block's share
    and the rest's, a micro-batch."""
    from megatron_bloom.planner.cost import predict_iteration
    from megatron_bloom.planner.hardware_file import hardware_from_data

    def device(rank: dict):
        return hardware_from_data({"format": FILE_FORMAT, "kind": "cpu" if shapes.on_cpu else "gpu",
                                   "memory_gb": 1.0, "precision": shapes.config.precision,
                                   "cores": os.cpu_count() or 1, "ranks_per_node": count,
                                   "ranks": {str(count): rank}}, "this calibration")

    def residual(key: str, blocks: int, micro_batches: int, stage: int, predicted_on) -> float:
        # the blocks' and the head's compute as timed at these shapes, not as the rates (measured at the model's
        # length) predict it: a short sequence runs below those rates, and the gap is not the trainer's
        run = _trainer_run(shapes, count, blocks, micro_batches, stage)
        rates_say = predict_iteration(run, measured).stages[0].compute_s
        timed = blocks * times["trainer_block"] + times["trainer_lm_head"]
        return times[key] - predict_iteration(run, predicted_on).total_s - micro_batches * (timed - rates_say)

    measured, stage = device(rank_figures), shapes.trainer_zero_stage
    left = {(blocks, m): residual(f"trainer@{blocks}@{m}", blocks, m, stage, measured) for blocks, m in TRAINER_STEPS}
    # left(blocks, m) = step + blocks * block_step + m * (micro_batch + blocks * block)
    block = max((left[3, 3] - left[1, 3] - left[3, 1] + left[1, 1]) / 4, 0.0)
    block_step = max((left[3, 1] - left[1, 1]) / 2 - block, 0.0)
    micro_batch = max((left[1, 3] - left[1, 1]) / 2 - block, 0.0)
    result = {"step_overhead_s": max(left[1, 1] - block_step - micro_batch - block, 0.0),
              "block_step_overhead_s": block_step, "micro_batch_overhead_s": micro_batch,
              "block_micro_batch_overhead_s": block}
    if count > 1:
        with_trainer = device({**rank_figures, **result, "zero3_block_overhead_s": 0.0,
                               "zero3_micro_batch_overhead_s": 0.0})
        m = ZERO3_MICRO_BATCHES
        left = {blocks: (residual(f"zero3@{blocks}", blocks, m, 3, with_trainer)
                         - residual(f"zero2@{blocks}", blocks, m, 2, with_trainer)) / m for blocks in (1, 3)}
        zero3_block = max((left[3] - left[1]) / 2, 0.0)
        result.update(zero3_block_overhead_s=zero3_block, zero3_micro_batch_overhead_s=max(left[1] - zero3_block, 0))
    return _rounded(result)


def _trainer_run(shapes: Shapes, count: int, layers: int, micro_batches: int, zero_stage: int) -> TrainConfig:
    """The config's model cut to `layers` blocks, on `count` data-parallel ranks, `micro_batches` per step of
    one sequence of TRAINER_TOKENS."""
    config = shapes.config
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, num_layers=layers, seq_length=_trainer_tokens(shapes)),
        parallel=dataclasses.replace(config.parallel, tp=1, pp=1, dp=count, sequence_parallel=False),
        train=dataclasses.replace(config.train, micro_batch_size=1, global_batch_size=micro_batches * count,
                                  activation_checkpointing=False, compile=False),
        zero=dataclasses.replace(config.zero, stage=zero_stage),
        hardware=shapes.counted_as)


def _trainer_tokens(shapes: Shapes) -> int:
    return min(shapes.config.model.seq_length, TRAINER_TOKENS)


def _trainer_step(run: TrainConfig) -> Callable[[], object]:
    """One step of the trainer's own engine (training/loop.py) for `run` on these ranks, to time (after
    TRAINER_WARMUP_STEPS)."""
    import torch

    from megatron_bloom.parallel.distributed import state_for_run
    from megatron_bloom.training.loop import build_engine, train_step

    parallel, train = run.parallel, run.train
    state = state_for_run(1, 1, parallel.dp, parallel.dp, require_groups=True)
    tokens = torch.randint(0, run.model.vocab_size, (train.micro_batch_size, run.sample_length), device=state.device)

    def batches():
        while True:
            yield tokens, tokens
    engine, _, _ = build_engine(run, state)
    stream, accumulation = batches(), train.global_batch_size // train.micro_batch_size // parallel.dp
    for _ in range(TRAINER_WARMUP_STEPS):  # ZeRO 3 traces its modules' order in the first steps
        train_step(engine, stream, state, accumulation)
    return lambda: train_step(engine, stream, state, accumulation)
