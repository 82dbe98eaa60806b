"""The stages of a preprocessing job, run on datatrove's executors: on this machine (a pool of processes) or on
SLURM (one job array per stage, submitted and waited for).

The one place that knows datatrove's executor layout. A stage's folder holds `completions/NNNNN` for each
finished task (what a rerun skips: datatrove's resume), `logs/task_NNNNN.log`, and on SLURM the submitted
`launch_script.slurm`, `slurm_logs/JOB_INDEX.out` and, ours, `job_id` (the array to wait for again after an
interrupted wait). datatrove's console logging (loguru, to stderr) goes to the stage's `console.log`: the
command shows progress and its own summary instead.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from megatron_bloom.data.progress import Progress
from megatron_bloom.errors import UserError

POLL_S = 2.0


@dataclass
class Stage:
    """One stage of a job: `tasks` tasks, each running `pipeline`."""

    name: str
    tasks: int
    pipeline: Sequence[PipelineStep]


def completions(folder: Path) -> List[int]:
    """The tasks of the stage in `folder` that finished (datatrove's markers)."""
    marks = folder / "completions"
    return sorted(int(name) for name in os.listdir(marks)) if marks.is_dir() else []


def forget_tasks(folder: Path, tasks: Sequence[int]) -> None:
    """Mark tasks of the stage in `folder` unfinished, so that a rerun runs them again."""
    for task in tasks:
        (folder / "completions" / f"{task:05d}").unlink(missing_ok=True)


@contextlib.contextmanager
def datatrove_console_to(path: Path) -> Iterator[None]:
    """datatrove's loguru messages to `path` instead of stderr, in this process and the task processes it
    forks. datatrove adds a `sys.stderr` sink for each task (and re-adds one after it), so `sys.stderr`
    itself is swapped while the executor runs."""
    from loguru import logger

    path.parent.mkdir(parents=True, exist_ok=True)
    saved = sys.stderr
    with open(path, "a", encoding="utf-8") as log:
        logger.remove()
        sys.stderr = log
        try:
            yield
        finally:
            sys.stderr = saved
            logger.remove()


@contextlib.contextmanager
def progress_of(stage: Stage, folder: Path) -> Iterator[Progress]:
    """Tasks finished, of the stage's, shown while the stage runs (the finished markers, polled)."""
    with Progress(total=stage.tasks, unit="tasks", label=stage.name, interval=10.0) as progress:
        progress.update(len(completions(folder)))
        yield progress
        progress.update(len(completions(folder)))


class LocalStages:
    """Each stage on this machine: at most `workers` tasks at once, each in a process of its own."""

    executor = "local"

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def run(self, stage: Stage, folder: Path) -> List[int]:
        """Run the stage's unfinished tasks; returns the tasks still unfinished."""
        workers = min(self.workers, stage.tasks)
        executor = LocalPipelineExecutor(pipeline=list(stage.pipeline), tasks=stage.tasks, workers=workers,
                                         logging_dir=str(folder), start_method="fork")
        stop = threading.Event()
        with progress_of(stage, folder) as progress:
            watcher = threading.Thread(target=_watch, args=(folder, progress, stop), daemon=True)
            watcher.start()
            try:
                with datatrove_console_to(folder / "console.log"):
                    executor.run()
            finally:
                stop.set()
                watcher.join()
        return executor.get_incomplete_ranks()


def _watch(folder: Path, progress: Progress, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        progress.update(len(completions(folder)))


class _SlurmArray(SlurmPipelineExecutor):
    """datatrove's SLURM executor, asked only for what we give: no partition, time or memory per CPU when
    not given (the cluster's defaults), and no separate job to merge datatrove's statistics (the command sums
    its tasks' own)."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        arguments = super().get_sbatch_args(max_array)
        if self.mem_per_cpu_gb is None:
            del arguments["mem-per-cpu"]
        return {key: value for key, value in arguments.items() if value is not None}

    def launch_merge_stats(self) -> None:
        pass


class SlurmStages:
    """Each stage as one SLURM job array (one element per unfinished task), submitted and waited for."""

    executor = "slurm"

    def __init__(self, partition: Optional[str], time_limit: Optional[str]) -> None:
        self.partition, self.time_limit = partition, time_limit

    def run(self, stage: Stage, folder: Path) -> List[int]:
        self._wait_for_earlier_submission(stage, folder)
        unfinished = sorted(set(range(stage.tasks)) - set(completions(folder)))
        executor = _SlurmArray(
            pipeline=list(stage.pipeline), tasks=stage.tasks, time=self.time_limit, partition=self.partition,
            mem_per_cpu_gb=None, qos=None, job_name=f"mbloom-{stage.name}", logging_dir=str(folder),
            # the job's tasks run datatrove's launcher from this Python's environment
            env_command=f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH")
        try:
            with datatrove_console_to(folder / "console.log"):
                executor.run()  # submits the unfinished tasks, if any
        except FileNotFoundError:
            raise UserError("--executor slurm needs SLURM's sbatch on the PATH; none was found.") from None
        except subprocess.CalledProcessError as error:
            raise UserError(f"sbatch refused the job array of the {stage.name} stage (exit status "
                            f"{error.returncode}; its message is above). Check --slurm-partition and "
                            f"--slurm-time.") from None
        if executor.job_id not in (None, -1):
            (folder / "job_id").write_text(f"{executor.job_id}\n")
            print(f"{stage.name}: submitted job array {executor.job_id} for {tasks_named(unfinished, stage.tasks)}; "
                  f"logs in {folder}", file=sys.stderr, flush=True)
            self._wait(stage, folder, str(executor.job_id))
        return executor.get_incomplete_ranks()

    def _wait_for_earlier_submission(self, stage: Stage, folder: Path) -> None:
        """An array submitted by an earlier run whose wait was interrupted: wait for it rather than submit its
        tasks twice."""
        recorded = folder / "job_id"
        job_id = recorded.read_text().strip() if recorded.is_file() else None
        if job_id and job_states(job_id):
            print(f"{stage.name}: waiting for job array {job_id}, submitted earlier", file=sys.stderr, flush=True)
            self._wait(stage, folder, job_id)

    def _wait(self, stage: Stage, folder: Path, job_id: str) -> None:
        try:
            with progress_of(stage, folder) as progress:
                while job_states(job_id):
                    progress.update(len(completions(folder)))
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            raise UserError(f"stopped waiting: job array {job_id} keeps running (scancel {job_id} stops it). "
                            "Rerun the same command to wait for it again and finish the run.") from None


def tasks_named(tasks: Sequence[int], total: int) -> str:
    """"all 4 tasks", or "1 of 4 tasks (3)"."""
    if len(tasks) == total:
        return f"all {total} tasks"
    shown = ", ".join(map(str, tasks[:10])) + (", ..." if len(tasks) > 10 else "")
    return f"{len(tasks)} of {total} tasks ({shown})"


def job_states(job_id: str) -> List[str]:
    """The states of a job's elements still queued or running; none once it has ended (or is forgotten)."""
    result = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"], capture_output=True,
                            text=True)
    return result.stdout.split() if result.returncode == 0 else []
