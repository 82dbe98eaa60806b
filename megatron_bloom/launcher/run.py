"""Starting what `mbloom-launch` was given: one job or a sweep, run here (torchrun or the deepspeed launcher)
or queued on SLURM, every job validated before any starts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_bloom.config import load_config
from megatron_bloom.errors import ConfigError
from megatron_bloom.launcher.jobs import (
    Job,
    deepspeed_command,
    launch_environment,
    plan_job,
    shell_line,
    torchrun_command,
)
from megatron_bloom.launcher.slurm import render_sbatch, submit, wait_for_jobs
from megatron_bloom.launcher.sweep import PointResult, expand_sweep, summary_table, sweep_keys


def launch(overrides: Sequence[str], dry_run: bool = False, multirun: bool = False) -> int:
    """Run the job (or with `multirun`, every point of the sweep) that `overrides` describe; returns the
    exit status for the command: 0 when every job completed (or was submitted, for one SLURM job)."""
    root, jobs = plan_points(list(overrides), multirun)
    if dry_run:
        print_commands(jobs)
        return 0
    env = launch_environment()
    statuses: Dict[int, str] = {}
    queued = {number: job for number, job in enumerate(jobs) if job.config.launcher.name == "slurm"}
    if queued:
        ids = {number: submit(write_sbatch(job), job.overrides, env) for number, job in queued.items()}
        for number, job_id in ids.items():
            print(f"mbloom-launch: submitted SLURM job {job_id} ({queued[number].world_size} ranks on "
                  f"{queued[number].nodes} node(s)); output in {queued[number].config.run.dir}", flush=True)
        if not multirun:
            return 0
        states = wait_for_jobs(list(ids.values()), env)
        statuses.update((number, states[job_id].lower()) for number, job_id in ids.items())
    for number, job in enumerate(jobs):
        if number in queued:
            continue
        if multirun:
            print(f"mbloom-launch: job {number + 1}/{len(jobs)}: {shell_line(job.overrides)}", flush=True)
        statuses[number] = run_here(job, quiet=multirun)
        if not multirun and statuses[number] != "completed":
            return 1
    if not multirun:
        return 0
    results = [PointResult.read(number, job.overrides, Path(job.config.run.dir), statuses[number])
               for number, job in enumerate(jobs)]
    print(summary_table(results, sweep_keys(overrides)), flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in results))
    return 0 if all(result.status == "completed" for result in results) else 1


def plan_points(overrides: List[str], multirun: bool) -> Tuple[Optional[Path], List[Job]]:
    """The jobs to start, all validated before any starts; with a sweep, its root dir."""
    points = expand_sweep(overrides)
    if not multirun:
        if len(points) > 1:
            swept = ", ".join(sweep_keys(overrides))
            raise ConfigError(f"{swept} list several values: that is a sweep. Add --multirun to run one job per "
                              "combination.")
        return None, [plan_job(points[0])]
    root = Path(load_config(points[0]).run.dir).absolute()  # resolved once: ${now:...} must not differ
    jobs = [plan_job([arg for arg in point if not arg.startswith("run.dir=")] + [f"run.dir={root / str(number)}"])
            for number, point in enumerate(points)]
    checkpoint_dirs = [job.config.checkpoint.dir for job in jobs if job.config.checkpoint.dir]
    if len(set(checkpoint_dirs)) < len(checkpoint_dirs):
        raise ConfigError(f"the {len(jobs)} jobs of the sweep would share checkpoint.dir {checkpoint_dirs[0]}; give "
                          "each its own, e.g. checkpoint.dir='${run.dir}/checkpoints'.")
    return root, jobs


def launch_command(job: Job) -> List[str]:
    return deepspeed_command(job) if job.config.launcher.name == "deepspeed" else torchrun_command(job)


def write_sbatch(job: Job) -> Path:
    run_dir = Path(job.config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / "train.sbatch"
    script.write_text(render_sbatch(job))
    return script


def print_commands(jobs: List[Job]) -> None:
    """`--dry-run`: each job's command, or its sbatch script and the sbatch line."""
    for job in jobs:
        if job.config.launcher.name == "slurm":
            print(f"# {job.config.run.dir}/train.sbatch\n{render_sbatch(job)}")
            print(f"sbatch {job.config.run.dir}/train.sbatch {shell_line(job.overrides)}\n")
        else:
            print(shell_line(launch_command(job)))


def run_here(job: Job, quiet: bool) -> str:
    """Run one job on this machine to its end; returns its status. `quiet`: output to `run.dir/launch.log`."""
    env = launch_environment(job)
    command = launch_command(job)
    if not quiet:
        return _status(subprocess.run(command, env=env).returncode)
    run_dir = Path(job.config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "launch.log", "w") as log:
        log.write(shell_line(command) + "\n")
        log.flush()
        return _status(subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode)


def _status(returncode: int) -> str:
    return "completed" if returncode == 0 else f"failed (exit {returncode})"
