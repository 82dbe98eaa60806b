"""`mbloom-plan`: parameters, memory per rank, FLOPs and pipeline bubble of a training config, before any job
is queued. No processes, no weights (formulas: megatron_bloom/planner/memory.py and model/flops.py).

    mbloom-plan model=bloom-176b parallel.tp=4 parallel.pp=12 parallel.dp=8 train.micro_batch_size=2 \\
        train.global_batch_size=2048 train.activation_checkpointing=true hardware=a100-80gb --iter-time 104.7

`--iter-time SECONDS` adds TFLOPs per GPU (counted as the trainer logs them) and MFU against the peak of
`hardware=` (a100-80gb, h100-80gb, h200, or cpu: this machine's measured GEMM peak); without it a preset
predicts them (planner/cost.py). `--search cluster.gpus=N [cluster.gpus_per_node=G]` lists the layouts of the
model that fit N accelerators, fastest first, and says why the first (planner/search.py). `--calibrate
--output FILE` measures this machine at the shapes of the config's model and micro-batch into a hardware file
that `hardware=FILE` predicts with (planner/calibrate.py). `--json` prints one JSON object instead of the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from megatron_bloom.cli.arguments import parse_command_line
from megatron_bloom.cli.errors import exit_on_user_error
from megatron_bloom.errors import UserError

USAGE = "[hydra overrides] [--iter-time SECONDS | --search cluster.gpus=N | --calibrate --output FILE] [--json]"
SWITCHES, OPTIONS = ("--json", "--search", "--calibrate"), ("--iter-time", "--output")  # OPTIONS take a value


def iter_time_seconds(value: Optional[object]) -> Optional[float]:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"--iter-time takes the seconds one training iteration takes; got {value!r}.")
    return seconds


@exit_on_user_error("mbloom-plan")
def main(argv: Optional[Sequence[str]] = None) -> None:
    overrides, flags = parse_command_line(argv, "mbloom-plan", USAGE, switches=SWITCHES, options=OPTIONS,
                                          description=__doc__)
    iter_time, as_json = iter_time_seconds(flags.get("--iter-time")), bool(flags.get("--json"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the stage split comes from DeepSpeed; no device is used
    from megatron_bloom.config import load_config
    from megatron_bloom.planner.hardware_file import hardware
    from megatron_bloom.planner.report import build_report, format_table

    config = load_config(overrides)
    if flags.get("--calibrate") or flags.get("--output"):
        calibrate_into(config, flags.get("--output"), iter_time, bool(flags.get("--search")))
        return
    if flags.get("--search"):
        from megatron_bloom.planner.search import explain, format_candidates, search

        if iter_time is not None:
            raise UserError("--search predicts each layout's time: leave out --iter-time.")
        candidates = search(config, hardware(config.hardware))
        print(json.dumps({"candidates": [dataclasses.asdict(c) for c in candidates], "why": explain(candidates)})
              if as_json else format_candidates(candidates), flush=True)
        return
    report = build_report(config, iter_time, hardware(config.hardware))
    print(json.dumps(report) if as_json else format_table(report), flush=True)


def calibrate_into(config, output: Optional[str], iter_time: Optional[float], searching: bool) -> None:
    from megatron_bloom.planner.calibrate import calibrate

    if output is None:
        raise UserError("--calibrate writes a hardware file: give its path with --output FILE.")
    if iter_time is not None or searching:
        raise UserError("--calibrate measures this machine and writes --output FILE; plan with hardware=FILE "
                        "afterwards (--iter-time and --search are for that run).")
    target = Path(output)
    if not target.parent.is_dir():
        raise UserError(f"--output {output}: its folder {target.parent} does not exist.")
    measured = calibrate(config, progress=lambda line: print(f"mbloom-plan: {line}", flush=True))
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(measured, indent=1) + "\n")
    partial.replace(target)  # whole or not at all
    print(f"mbloom-plan: wrote {output}; plan with hardware={output}", flush=True)


if __name__ == "__main__":
    main()
