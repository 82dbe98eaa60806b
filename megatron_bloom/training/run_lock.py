"""One run per `checkpoint.dir`: two jobs writing the same checkpoints would overwrite each other's tags and
move `latest` under each other.

Rank 0 holds a POSIX lock (`fcntl.lockf`, which NFS carries too) on `checkpoint.dir/.lock` for the whole
run, and writes who it is into the file. The kernel drops the lock when the process ends, however it ends,
so a lock left by a dead run never blocks; a second run finds it held and is refused, naming the first.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from megatron_bloom.errors import UserError
from megatron_bloom.parallel.distributed import decided_on_rank_zero

LOCK_FILE = ".lock"


class CheckpointDirLock:
    def __init__(self, fd: int) -> None:
        self._fd: Optional[int] = fd

    @classmethod
    def try_acquire(cls, root: Path, run_dir: Path) -> "CheckpointDirLock | str":
        """The lock, or a description of the run that holds it."""
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            return describe_owner(owner)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "run_dir": str(run_dir.absolute()),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "job": os.environ.get("SLURM_JOB_ID")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None


def describe_owner(text: str) -> str:
    try:
        owner = json.loads(text)
        job = f", SLURM job {owner['job']}" if owner.get("job") else ""
        return (f"process {owner['pid']} on {owner['host']}{job}, writing to run.dir {owner['run_dir']}, "
                f"started {owner['started']}")
    except (json.JSONDecodeError, KeyError, TypeError):
        return "another process (its details are unreadable)"


def lock_checkpoint_dir(root: Path, run_dir: Path) -> Optional[CheckpointDirLock]:
    """Collective: rank 0 takes the lock of `root`; every rank raises the same error when another run has it."""
    lock = None

    def acquire() -> Optional[str]:
        nonlocal lock
        got = CheckpointDirLock.try_acquire(root, run_dir)
        if isinstance(got, CheckpointDirLock):
            lock = got
            return None
        return got

    problem = decided_on_rank_zero(acquire)
    if problem is not None:
        raise UserError(f"checkpoint.dir {root} is in use by another run: {problem}. Two runs writing the same "
                        "checkpoints would overwrite each other's; wait for that run to end (or stop it), or give "
                        "this one its own checkpoint.dir.")
    return lock
