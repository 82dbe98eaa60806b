"""One training job as a launcher sees it: the validated config, its world size, and the command per launcher.

Everything a job would refuse at start-up is refused here, before a process is spawned or a job queued:
the config's own checks, the layout against the number of processes, data files and tokenizer. `run.dir` is resolved once here, so every rank (and a requeued job) writes to the
same directory.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megatron_bloom.config import TrainConfig, load_config
from megatron_bloom.errors import ConfigError
from megatron_bloom.parallel.distributed import free_port
from megatron_bloom.training.validation import validate_training_inputs

TRAIN_MODULE = "megatron_bloom.cli.train"


@dataclass
class Job:
    overrides: List[str]  # what every rank receives: the user's, plus run.dir and parallel.dp made explicit
    config: TrainConfig
    nodes: int
    nproc_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def plan_job(overrides: Sequence[str]) -> Job:
    """Validate a training config for launching (raises `UserError`s) and fix its sizes."""
    config = load_config(overrides)
    nodes = config.slurm.nodes if config.launcher.name == "slurm" else 1
    parallel = config.parallel
    model_parallel = parallel.tp * parallel.pp
    if config.launcher.nproc_per_node is not None:
        world_size = config.launcher.nproc_per_node * nodes
        if world_size % model_parallel:
            raise ConfigError(
                f"launcher.nproc_per_node ({config.launcher.nproc_per_node}) x {nodes} node(s) = {world_size} "
                f"processes is not a multiple of parallel.tp ({parallel.tp}) x parallel.pp ({parallel.pp}).")
        dp = world_size // model_parallel
        if parallel.dp is not None and parallel.dp != dp:
            raise ConfigError(
                f"parallel.tp ({parallel.tp}) x parallel.pp ({parallel.pp}) x parallel.dp ({parallel.dp}) must equal "
                f"the number of processes: launcher.nproc_per_node ({config.launcher.nproc_per_node}) x {nodes} "
                f"node(s) = {world_size}.")
    else:
        dp = parallel.dp if parallel.dp is not None else 1
        world_size = model_parallel * dp
        if world_size % nodes:
            raise ConfigError(
                f"{world_size} processes (parallel.tp {parallel.tp} x pp {parallel.pp} x dp {dp}) do not split "
                f"evenly over slurm.nodes ({nodes}); set launcher.nproc_per_node or change the layout.")
    if config.launcher.max_restarts and config.launcher.name == "deepspeed":
        raise ConfigError(f"launcher.max_restarts={config.launcher.max_restarts} needs torchrun's elastic restarts: "
                          "use launcher=local (torchrun) or launcher=slurm; the deepspeed launcher cannot restart ranks.")
    config.parallel = dataclasses.replace(parallel, dp=dp)
    config.check_layout()  # the batch-size checks need dp
    validate_training_inputs(config)
    explicit = [arg for arg in overrides if not arg.startswith(("run.dir=", "parallel.dp="))]
    return Job(explicit + [f"parallel.dp={dp}", f"run.dir={os.path.abspath(config.run.dir)}"], config, nodes,
               world_size // nodes)


def torchrun_command(job: Job) -> List[str]:
    """One node: torchrun in standalone mode (a free port, so that jobs never clash), restarting the ranks
    up to launcher.max_restarts times after one fails."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(job.nproc_per_node), "--max-restarts", str(job.config.launcher.max_restarts), "-m", TRAIN_MODULE,
            *job.overrides]


def deepspeed_command(job: Job) -> List[str]:
    """DeepSpeed's launcher on this node; `--no_local_rank` keeps the ranks' arguments Hydra overrides."""
    return ["deepspeed", "--num_gpus", str(job.nproc_per_node), "--master_port", str(free_port()),
            "--no_local_rank", "--module", TRAIN_MODULE, *job.overrides]


def launch_environment(job: Optional[Job] = None) -> Dict[str, str]:
    """Without a GPU, DeepSpeed (and its launcher) must use its CPU accelerator; a job's ranks share this
    node's cores (OMP_NUM_THREADS = cores / ranks on the node, unless set)."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    if job is not None:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // job.nproc_per_node)))
    return env


def shell_line(command: Sequence[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)

