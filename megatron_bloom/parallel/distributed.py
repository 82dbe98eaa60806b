"""Starting torch.distributed from the environment a launcher leaves: torchrun, deepspeed, srun, or none."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import signal
import socket
import subprocess
from datetime import timedelta
from typing import Callable, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from megatron_bloom.errors import ConfigError, UserError
from megatron_bloom.parallel.host_group import DEFAULT_TIMEOUT_S
from megatron_bloom.parallel.state import ParallelState, default_device

T = TypeVar("T")


def launch_rank() -> Tuple[int, int]:
    """(rank, world size) a launcher gave this process: torchrun's or deepspeed's RANK / WORLD_SIZE, else
    SLURM's task (one per rank), else (0, 1). Reads the environment only: usable before any process group."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def launcher_env() -> Optional[dict]:
    """RANK / WORLD_SIZE / LOCAL_RANK from torchrun or deepspeed, else from SLURM (one task per rank).

    None when no launcher started this process: it then runs alone.
    """
    env = os.environ
    rank, world_size = launch_rank()
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"rank": rank, "world_size": world_size, "local_rank": int(env.get("LOCAL_RANK", 0))}
    if world_size > 1:  # SLURM's
        os.environ.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost")))
        os.environ.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
        return {"rank": rank, "world_size": world_size, "local_rank": int(env.get("SLURM_LOCALID", 0))}
    return None


def die_with_parent() -> None:
    """This process dies with the one that started it (the kernel's parent-death signal, prctl
    PR_SET_PDEATHSIG, Linux). A rank dies with its launcher: torchrun starts each rank in a session of its own,
    so `kill -9` of the launcher's process group would leave the ranks training on, orphaned, still writing
    checkpoints. A checkpoint writer dies with its rank."""
    if platform.system() != "Linux":
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os._exit(1)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`node[03-05,07],gpu1` -> `node03`), via scontrol if present."""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[(\d+)[^\]]*\])?", nodelist)
    return (match.group(1) + (match.group(2) or "")) if match else nodelist


def init_distributed(timeout_minutes: int = 30, always: bool = False) -> int:
    """Initialize the default process group when launched as several ranks; returns the world size.

    NCCL on CUDA, gloo on CPU. Each rank takes the CUDA device of its LOCAL_RANK. `always`: a process
    started alone gets a group of one too (DeepSpeed needs one), on a free local port.
    """
    if dist.is_initialized():
        return dist.get_world_size()
    env = launcher_env()
    if env is not None:
        die_with_parent()
    if env is None or env["world_size"] == 1 and "MASTER_ADDR" not in os.environ:
        if not always:
            return 1
        env = {"rank": 0, "world_size": 1, "local_rank": 0}
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise UserError(f"{key} is not set: start several ranks with torchrun, the deepspeed launcher or "
                            "srun, which set MASTER_ADDR and MASTER_PORT.")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env["local_rank"] % torch.cuda.device_count())
        backend = "nccl"
    timeout = timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, store=rendezvous_store(env["rank"], env["world_size"], timeout),
                            rank=env["rank"], world_size=env["world_size"], timeout=timeout)
    return env["world_size"]


def rendezvous_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The key-value store the ranks meet in, as `env://` makes it (torchrun's agent hosts it; otherwise
    rank 0 does), with the keys of each restart under a prefix of their own: torchrun keeps its store across
    elastic restarts, and gloo's ranks would otherwise read the previous attempt's addresses and fail to
    connect (torch 2.13, launcher.max_restarts)."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_hosts and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"mbloom/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def decided_on_rank_zero(decide: Callable[[], T]) -> T:
    """Collective: `decide()` runs on global rank 0 only (it may read files other nodes cannot see, or print
    once), and every rank returns its (picklable) result."""
    holder = [decide() if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def state_for_run(tp: int, pp: int, dp: Optional[int], world_size: int, require_groups: bool = False,
                  shared_memory_timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelState:
    """The ParallelState of this process for the layout `parallel.tp`, `.pp` and `.dp` (None: what the world
    size leaves), checked against the world size.

    A single process gets no groups unless `require_groups` (then groups of one, from the default group).
    """
    dp = dp if dp is not None else max(1, world_size // (tp * pp))
    if tp * pp * dp != world_size:
        launch = "" if world_size > 1 else (
            f" Start {tp * pp * dp} processes, e.g. torchrun --nproc-per-node {tp * pp * dp} -m <command> ...")
        raise ConfigError(
            f"parallel.tp ({tp}) x parallel.pp ({pp}) x parallel.dp ({dp}) must equal the number "
            f"of processes ({world_size}).{launch}"
        )
    if world_size == 1 and not require_groups:
        return ParallelState.single(default_device())
    return ParallelState.create(tp=tp, pp=pp, dp=dp, shared_memory_timeout_s=shared_memory_timeout_s)
