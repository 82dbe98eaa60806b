"""`mbloom-plan --search`: the layouts of a model on `cluster.gpus` accelerators that fit in memory, fastest
first by the predicted iteration time (planner/cost.py).

The layouts: tensor parallelism within a node (a divisor of `cluster.gpus_per_node` that divides the heads),
pipeline depths up to the layers, data parallelism for the rest of the GPUs, micro-batches of 1 to 16 that
divide each replica's share of the global batch, recomputation off and on, ZeRO 0 and 1 (and 2, 3 without
pipeline parallelism: DeepSpeed's pipeline engine takes no more). Sequence parallelism, precision and the
global batch stay the config's. A layout fits when its largest rank's memory (planner/memory.py) is within
what the accelerator leaves to a run's tensors (`Hardware.usable_memory_gb`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

from megatron_bloom.config import TrainConfig
from megatron_bloom.errors import ConfigError, UserError
from megatron_bloom.model.flops import iteration_flops
from megatron_bloom.planner.cost import predict_iteration
from megatron_bloom.planner.hardware import Hardware
from megatron_bloom.planner.memory import plan_stages

MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)


@dataclass
class Candidate:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    activation_checkpointing: bool
    zero_stage: int
    predicted_iter_time_s: float
    predicted_tflops_per_gpu: float
    memory_gb: float  # the largest rank's
    predicted_breakdown_s: dict  # pipeline, data_parallel, optimizer

    @property
    def layout(self) -> str:
        return f"tp {self.tp} x pp {self.pp} x dp {self.dp}"


def layouts(config: TrainConfig, gpus: int, gpus_per_node: int):
    """Every (tp, pp, dp, micro-batch, recomputation, ZeRO stage) the search considers."""
    model, batch = config.model, config.train.global_batch_size
    for tp in (t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0 and gpus % t == 0):
        if model.num_heads % tp or (config.parallel.sequence_parallel and tp == 1):
            continue
        for pp in (p for p in range(1, model.num_layers + 1) if gpus % (tp * p) == 0):
            dp = gpus // (tp * pp)
            for micro in MICRO_BATCH_SIZES:
                if batch % (micro * dp):
                    continue
                for recompute in (False, True):
                    for zero in ((0, 1) if pp > 1 else (0, 1, 2, 3)):
                        yield tp, pp, dp, micro, recompute, zero


def search(config: TrainConfig, device: Hardware) -> List[Candidate]:
    """The fitting layouts, fastest first."""
    gpus, per_node = config.cluster.gpus, config.cluster.gpus_per_node
    if gpus is None:
        raise UserError("mbloom-plan --search needs cluster.gpus=N (and cluster.gpus_per_node, default 8).")
    if not device.predicts:
        raise UserError(f"hardware={device.name} predicts no time: --search needs a preset (a100-80gb, h100-80gb, "
                        "h200) or a hardware file (mbloom-plan --calibrate --output FILE).")
    if device.describe_mismatch(config.precision):
        raise UserError(device.describe_mismatch(config.precision))
    found = []
    for tp, pp, dp, micro, recompute, zero in layouts(config, gpus, per_node):
        candidate = _evaluate(config, device, tp, pp, dp, micro, recompute, zero)
        if candidate is not None:
            found.append(candidate)
    if not found:
        raise UserError(f"no layout of {config.model.num_parameters():,} parameters fits {gpus} x {device.name} "
                        f"({device.memory_gb:.0f} GB each) with a global batch of {config.train.global_batch_size}.")
    return fastest_first(found)


def fastest_first(candidates: List[Candidate], tolerance: float = 1e-3) -> List[Candidate]:
    """By predicted time; times within `tolerance` of a run's fastest count as equal, and among those the
    simpler layout comes first (less ZeRO, less model parallelism, no recomputation, less memory)."""
    def simplicity(c: Candidate):
        return c.zero_stage, c.tp * c.pp, c.activation_checkpointing, c.memory_gb

    ordered: List[Candidate] = []
    tied: List[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: c.predicted_iter_time_s):
        if tied and candidate.predicted_iter_time_s > tied[0].predicted_iter_time_s * (1 + tolerance):
            ordered += sorted(tied, key=simplicity)
            tied = []
        tied.append(candidate)
    return ordered + sorted(tied, key=simplicity)


def _evaluate(config: TrainConfig, device: Hardware, tp: int, pp: int, dp: int, micro: int, recompute: bool,
              zero: int) -> Optional[Candidate]:
    layout = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, tp=tp, pp=pp, dp=dp),
                                 train=dataclasses.replace(config.train, micro_batch_size=micro,
                                                           activation_checkpointing=recompute),
                                 zero=dataclasses.replace(config.zero, stage=zero))
    try:
        layout.check_layout()
    except ConfigError:
        return None
    stages = plan_stages(layout)
    memory = max(stage.memory.total for stage in stages) / 1e9
    # on a calibrated CPU the layout's ranks share the machine's memory
    if memory * (tp * pp * dp if device.kind == "cpu" else 1) > device.usable_memory_gb:
        return None
    predicted = predict_iteration(layout, device, stages)
    seconds = predicted.total_s
    flops = iteration_flops(config.model, config.train.global_batch_size, config.sample_length, recompute,
                            not config.fine_tuning)
    return Candidate(tp, pp, dp, micro, recompute, zero, seconds, flops / seconds / (tp * pp * dp) / 1e12, memory,
                     {"pipeline": predicted.pipeline_s, "data_parallel": predicted.data_parallel_s,
                      "optimizer": predicted.optimizer_s})


def explain(candidates: List[Candidate]) -> str:
    """Why the fastest layout: against the fastest with a smaller replica (fewer GPUs in tp x pp), where the
    time goes in each (the pipeline, with its bubble, or the data-parallel reduction); or that no smaller
    replica fits; and what the neighbouring tp and pp of the same micro-batch, recomputation and ZeRO stage
    would cost."""
    best = candidates[0]
    smallest = min(candidate.tp * candidate.pp for candidate in candidates)
    setting = (best.micro_batch_size, best.activation_checkpointing, best.zero_stage)

    def time_of(tp: int, pp: int) -> Optional[float]:
        return next((c.predicted_iter_time_s for c in candidates if (c.tp, c.pp) == (tp, pp)
                     and (c.micro_batch_size, c.activation_checkpointing, c.zero_stage) == setting), None)

    neighbours = []
    for tp, pp in ((best.tp * 2, best.pp), (best.tp // 2, best.pp * 2), (best.tp, best.pp * 2),
                   (best.tp, best.pp // 2)):
        other = time_of(tp, pp) if tp >= 1 and pp >= 1 and (tp, pp) != (best.tp, best.pp) else None
        if other is not None:
            neighbours.append(f"tp {tp} x pp {pp} {other - best.predicted_iter_time_s:+.2f} s")
    compared = f"; the same at {', '.join(neighbours)}" if neighbours else ""
    smaller = [c for c in candidates if c.tp * c.pp < best.tp * best.pp]
    if smaller:
        rival, parts, mine = smaller[0], smaller[0].predicted_breakdown_s, best.predicted_breakdown_s
        why = (f"the fastest smaller replica, {rival.layout} (ZeRO {rival.zero_stage}), takes "
               f"{rival.predicted_iter_time_s - best.predicted_iter_time_s:+.2f} s: pipeline "
               f"{parts['pipeline']:.2f} s against {mine['pipeline']:.2f}, data-parallel reduction "
               f"{parts['data_parallel']:.2f} s against {mine['data_parallel']:.2f}")
    else:
        why = ("a replica fits on one GPU" if smallest == 1 else
               f"the model fits no replica of fewer than {smallest} GPUs")
    return (f"{best.layout}, micro-batch {best.micro_batch_size}, recomputation "
            f"{'on' if best.activation_checkpointing else 'off'}, ZeRO {best.zero_stage}: "
            f"{best.predicted_iter_time_s:.2f} s per iteration; {why}{compared}.")


def format_candidates(candidates: List[Candidate], limit: int = 20) -> str:
    lines = [f"{'rank':>4} {'tp':>3} {'pp':>3} {'dp':>4} {'micro':>5} {'recompute':>9} {'zero':>4} "
             f"{'s/iter':>8} {'TFLOP/s':>8} {'GB':>6}"]
    for place, c in enumerate(candidates[:limit], start=1):
        lines.append(f"{place:>4} {c.tp:>3} {c.pp:>3} {c.dp:>4} {c.micro_batch_size:>5} "
                     f"{'on' if c.activation_checkpointing else 'off':>9} {c.zero_stage:>4} "
                     f"{c.predicted_iter_time_s:>8.2f} {c.predicted_tflops_per_gpu:>8.1f} {c.memory_gb:>6.1f}")
    if len(candidates) > limit:
        lines.append(f"... and {len(candidates) - limit} more layouts that fit (--json lists them all)")
    lines.append("why: " + explain(candidates))
    return "\n".join(lines)
