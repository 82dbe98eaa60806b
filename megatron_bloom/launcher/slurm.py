"""SLURM jobs: the sbatch script of `launch/slurm/train.sbatch` with `#SBATCH` lines from the `slurm.*` keys,
submitted with `sbatch`, and followed with `scontrol` until it ends."""

from __future__ import annotations

import re
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Dict, List, Sequence

from megatron_bloom.errors import UserError
from megatron_bloom.launcher.jobs import Job

FINISHED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED")


def sbatch_template() -> str:
    """The script in the package (`launch/slurm/train.sbatch` in the repository links to it)."""
    return resources.files("megatron_bloom.launcher").joinpath("train.sbatch").read_text()


def render_sbatch(job: Job) -> str:
    """The template with its `#SBATCH` resource lines replaced by the job's: nodes, one task per node
    running torchrun over that node's ranks, and partition, time, account, GPUs, CPUs when set."""
    slurm, run_dir = job.config.slurm, Path(job.config.run.dir)
    directives = [f"--job-name=mbloom-{run_dir.name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
                  f"--time={slurm.time}", "--signal=B:USR1@180", "--requeue", "--open-mode=append",
                  f"--output={run_dir / 'slurm-%j.out'}"]
    directives += [f"--{key}={value}" for key, value in (
        ("partition", slurm.partition), ("account", slurm.account), ("gpus-per-node", slurm.gpus_per_node),
        ("cpus-per-task", slurm.cpus_per_task)) if value is not None]
    lines = [line for line in sbatch_template().splitlines() if not line.startswith("#SBATCH")]
    header_end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    lines[header_end:header_end] = [f"#SBATCH {directive}" for directive in directives]
    # The ranks per task come from the layout, not from the node's GPU count.
    lines.insert(lines.index("set -uo pipefail") + 1, f"export NPROC_PER_TASK={job.nproc_per_node}")
    return "\n".join(lines) + "\n"


def submit(script: Path, overrides: Sequence[str], env: Dict[str, str]) -> int:
    """`sbatch script overrides...`; returns the job id."""
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script), *overrides], capture_output=True, text=True,
                                env=env, timeout=120)
    except FileNotFoundError:
        raise UserError("launcher=slurm needs SLURM's sbatch on PATH (run mbloom-launch on a login node).") from None
    if result.returncode != 0:
        raise UserError(f"sbatch refused the job: {result.stderr.strip() or result.stdout.strip()}")
    return int(result.stdout.strip().split(";")[0])


def job_state(job_id: int, env: Dict[str, str]) -> str:
    """SLURM's state of a job (PENDING, RUNNING, COMPLETED, ...); `sbatch --wait` is not relied on."""
    result = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, env=env,
                            timeout=60)
    match = re.search(r"JobState=(\S+)", result.stdout)
    return match.group(1) if match else "UNKNOWN"


def wait_for_jobs(job_ids: List[int], env: Dict[str, str], poll_seconds: float = 2.0) -> Dict[int, str]:
    """Poll until every job has ended; returns each one's final state."""
    states: Dict[int, str] = {}
    while len(states) < len(job_ids):
        for job_id in job_ids:
            if job_id not in states:
                state = job_state(job_id, env)
                if state in FINISHED_STATES:
                    states[job_id] = state
        if len(states) < len(job_ids):
            time.sleep(poll_seconds)
    return states
