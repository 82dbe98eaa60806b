"""What `hardware=` names: a preset (planner/hardware.py), `cpu`, or a hardware file, what `mbloom-plan
--calibrate --output FILE` measured (planner/calibrate.py), read back as the `Hardware` it predicts with.

    {"format": "megatron_bloom.hardware/1", "kind": "cpu" | "gpu", "precision": "bf16", "memory_gb": 25.3,
     "cores": 2, "ranks_per_node": 4, "device": ..., "calibrated_for": {...}, "measured_at": ...,
     "ranks": {"<ranks running at once>": {
         "threads", "peak_tflops_16bit", "peak_tflops_fp32", "optimizer_gb_per_s", "block_overhead_s",
         "step_overhead_s", "block_step_overhead_s", "micro_batch_overhead_s", "block_micro_batch_overhead_s",
         "zero3_block_overhead_s", "zero3_micro_batch_overhead_s",          (2 ranks and more)
         "tensor_parallel_gb_per_s", "tensor_parallel_latency_s", "gradient_gb_per_s", "gradient_latency_s",
         "p2p_gb_per_s", "p2p_latency_s",                                   (links: 2 ranks and more)
         "micro_batches": {"<micro-batch size>": {"linear_tflops", "attention_tflops", "lm_head_tflops",
                                                  "elementwise_gb_per_s", "recompute_passes",
                                                  "tensor_parallel_block_s": {"<tp>": seconds},
                                                  "sequence_parallel_block_s": {"<tp>": seconds}}}}}}
                                                                    (2 ranks and more)

Each figure is one rank's, while that many ranks run at once (planner/calibrate.py says how each is timed).
A file that does not parse, or whose figures are missing or not positive numbers, is refused with one
paragraph; nothing in it is ever executed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Optional

from megatron_bloom.config.schema import PRECISIONS
from megatron_bloom.errors import UserError
from megatron_bloom.planner.hardware import PRESETS, Hardware, measure_cpu

FILE_FORMAT = "megatron_bloom.hardware/1"
LINKS = ("tensor_parallel", "gradient", "p2p")  # each with <link>_gb_per_s and <link>_latency_s


def hardware(name: str) -> Hardware:
    """A preset, `cpu` (measured now), or a hardware file's path."""
    if name == "cpu":
        return measure_cpu()
    return PRESETS[name] if name in PRESETS else load_hardware_file(name)


def is_cpu(name: str) -> bool:
    """Whether `hardware=name` describes CPUs (the attention kernels, and so the activations kept, differ)."""
    return name == "cpu" or (name not in PRESETS and _file_kind(name) == "cpu")


@functools.lru_cache(maxsize=16)  # the memory model asks for every layout a search weighs
def _file_kind(path: str) -> str:
    try:
        return json.loads(Path(path).read_text()).get("kind", "gpu")
    except (OSError, ValueError, AttributeError):
        return "gpu"  # load_hardware_file says what is wrong with it, when the file is used


def load_hardware_file(path: str) -> Hardware:
    """The Hardware a calibration file describes; a UserError saying what is wrong with it."""
    where = f"hardware={path}"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise UserError(f"{where}: the file cannot be read ({error.strerror or error}). hardware= takes a preset "
                        "(a100-80gb, h100-80gb, h200, cpu) or a file written by mbloom-plan --calibrate.") from None
    except ValueError as error:
        raise UserError(f"{where} is not JSON ({error}); hardware files are written by mbloom-plan --calibrate "
                        "--output FILE.") from None
    return hardware_from_data(data, path)


def hardware_from_data(data, path: str) -> Hardware:
    """The Hardware of a hardware file's parsed contents (`path`: its name in errors and in plans)."""
    where = f"hardware={path}"
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise UserError(f"{where} is not a hardware file of this version (its \"format\" must be "
                        f"{FILE_FORMAT!r}); write one with mbloom-plan --calibrate --output FILE.")
    try:
        kind, precision, ranks = data["kind"], data["precision"], data["ranks"]
        if kind not in ("cpu", "gpu") or precision not in PRECISIONS:
            raise ValueError(f"\"kind\" must be cpu or gpu, and \"precision\" one of {', '.join(PRECISIONS)}")
        if not isinstance(ranks, dict) or not ranks:
            raise ValueError("\"ranks\" must be a non-empty object")
        base = Hardware(name=path, peak_tflops_16bit=1.0, peak_tflops_fp32=1.0, memory_gb=_number(data, "memory_gb"),
                        kind=kind, precision=precision, cores=int(_number(data, "cores")))
        measured = tuple(sorted(
            (_count(count), _count(micro), _figures(base, entry, figures, _count(micro)))
            for count, entry in ranks.items() for micro, figures in _micro_batches(entry).items()))
        per_node = int(_number(data, "ranks_per_node"))
    except (KeyError, TypeError, ValueError) as error:
        what = f"it has no {error.args[0]!r}" if isinstance(error, KeyError) else str(error)
        raise UserError(f"{where} is damaged or was edited wrongly ({what}); write it again with mbloom-plan "
                        "--calibrate --output FILE.") from None
    return dataclasses.replace(measured[0][2], measured=measured, gpus_per_node=per_node)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"rank counts and micro-batch sizes must be positive, not {text!r}")
    return value


def _micro_batches(entry: dict) -> dict:
    micro_batches = entry["micro_batches"]
    if not isinstance(micro_batches, dict) or not micro_batches:
        raise ValueError("\"micro_batches\" must be a non-empty object")
    return micro_batches


def _number(data: dict, key: str, optional: bool = False, zero: bool = False) -> Optional[float]:
    """`data[key]`, a positive number (or 0, where `zero`: an overhead that may be none)."""
    value = data.get(key) if optional else data[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (value == 0 and not zero):
        raise ValueError(f"{key!r} must be a {'non-negative' if zero else 'positive'} number, not {value!r}")
    return float(value)


def _figures(base: Hardware, entry: dict, micro: dict, micro_batch_size: int) -> Hardware:
    """One rank's figures at one rank count and micro-batch size."""
    peak_16bit, peak_fp32 = _number(entry, "peak_tflops_16bit"), _number(entry, "peak_tflops_fp32")
    peak = peak_fp32 if base.precision == "fp32" else peak_16bit
    # A rank alone measures no links: a layout of one rank sends nothing (and one of more finds the figures of
    # its own count). One machine has nothing between nodes: its gradient figures stand in.
    rate = {link: _number(entry, f"{link}_gb_per_s", optional=True) or math.inf for link in LINKS}
    latency = {link: _number(entry, f"{link}_latency_s", optional=True) or 0.0 for link in LINKS}
    return dataclasses.replace(
        base, peak_tflops_16bit=peak_16bit, peak_tflops_fp32=peak_fp32,
        memory_gb_per_s=_number(micro, "elementwise_gb_per_s"),
        gemm_efficiency=_number(micro, "linear_tflops") / peak,
        attention_efficiency=_number(micro, "attention_tflops") / peak,
        lm_head_efficiency=_number(micro, "lm_head_tflops") / peak,
        recompute_passes=_number(micro, "recompute_passes"),
        optimizer_gb_per_s=_number(entry, "optimizer_gb_per_s"),
        block_overhead_s=_number(entry, "block_overhead_s", zero=True),
        zero3_block_overhead_s=_number(entry, "zero3_block_overhead_s", optional=True, zero=True) or 0.0,
        zero3_micro_batch_overhead_s=_number(entry, "zero3_micro_batch_overhead_s", optional=True, zero=True) or 0.0,
        step_overhead_s=_number(entry, "step_overhead_s", optional=True, zero=True) or 0.0,
        block_step_overhead_s=_number(entry, "block_step_overhead_s", optional=True, zero=True) or 0.0,
        micro_batch_overhead_s=_number(entry, "micro_batch_overhead_s", optional=True, zero=True) or 0.0,
        block_micro_batch_overhead_s=_number(entry, "block_micro_batch_overhead_s", optional=True, zero=True) or 0.0,
        intra_node_gb_per_s=rate["tensor_parallel"], intra_node_latency_s=latency["tensor_parallel"],
        inter_node_gb_per_s=rate["gradient"], inter_node_latency_s=latency["gradient"],
        gradient_gb_per_s=rate["gradient"], gradient_latency_s=latency["gradient"],
        p2p_gb_per_s=rate["p2p"], p2p_latency_s=latency["p2p"],
        tensor_parallel_blocks=_tensor_parallel_blocks(micro), micro_batch_size=micro_batch_size)


def _tensor_parallel_blocks(micro: dict) -> tuple:
    blocks = []
    for key, sequence_parallel in (("tensor_parallel_block_s", False), ("sequence_parallel_block_s", True)):
        measured = micro.get(key, {})
        if not isinstance(measured, dict):
            raise ValueError(f"{key!r} must be an object of tensor-parallel degrees and seconds")
        blocks += [(_count(tp), sequence_parallel, _number(measured, tp)) for tp in measured]
    return tuple(sorted(blocks))
