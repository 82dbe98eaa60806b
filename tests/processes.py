"""Commands and ranks in processes forked from one preloaded server (multiprocessing's "forkserver").

Each command or rank still runs in a process of its own, with its own arguments, environment, working
directory, output, exit status and death by signal, exactly as `python -m module` runs it. What it does
not pay is the interpreter's start and the import of torch, DeepSpeed and the project: about 2.5 s of CPU a
process on a 2-core CI machine, which was half of the whole suite's time. The server is started once per
pytest worker, with those modules imported and nothing run, so nothing it forks shares threads or state.

Tests of how users start things (console scripts, torchrun, deepspeed, SLURM, the quickstart) still start
real interpreters.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import List, Mapping, Sequence, Tuple

from megatron_bloom.parallel.distributed import free_port

# Imported once in the server: what the commands and the ranks of the tests import anyway, including what
# they import lazily: torch._dynamo (1.5 s; torch's optimizers import it when they are built).
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "deepspeed", "deepspeed.runtime.pipe.engine", "transformers",
           "tokenizers", "safetensors.torch", "megatron_bloom.cli.train", "megatron_bloom.cli.eval",
           "megatron_bloom.cli.generate", "megatron_bloom.cli.convert", "megatron_bloom.cli.plan",
           "megatron_bloom.cli.preprocess", "megatron_bloom.cli.train_tokenizer", "megatron_bloom.training.loop",
           "megatron_bloom.inference.evaluation"]


def forkserver_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context whose processes are forked from the preloaded server."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (the first process)
    return context


def _run_module_as_main(module: str, argv: Sequence[str], cwd: str, env: Mapping[str, str], stdout: str,
                        stderr: str) -> None:
    """In the forked process: what `python -m module argv...` does after the interpreter has started."""
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # ranks share the files
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if "OMP_NUM_THREADS" in env:  # read by torch when it is imported, which the server did already
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [module, *argv]
    # the server imported the command's module already; running it again as __main__ is what is wanted here
    warnings.filterwarnings("ignore", message=".* found in sys.modules after import of package",
                            category=RuntimeWarning)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exit_:  # as the interpreter treats it: None is 0, a message goes to stderr as 1
        status = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        if not isinstance(exit_.code, int) and exit_.code is not None:
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (the interpreter prints any uncaught exception and exits with 1)
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_module(module: str, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
               timeout: float) -> subprocess.CompletedProcess:
    """`python -m module argv...` in a forked process, to the end: a CompletedProcess with its text output and
    exit status (minus the signal's number when a signal killed it, as `subprocess` reports it)."""
    (status,), stdout, stderr = _run_processes(module, argv, cwd, [env], timeout)
    return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], status, stdout, stderr)


def run_module_ranks(nproc: int, module: str, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
                     timeout: float) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc -m module argv...` with forked ranks: each rank gets the
    environment torchrun gives its workers, and all share one stdout and one stderr as they share torchrun's.
    When a rank fails the others are stopped and the status is 1, as torchrun does."""
    port = str(free_port())
    if nproc > 1 and "OMP_NUM_THREADS" not in env:
        env = dict(env, OMP_NUM_THREADS="1")  # torchrun's default for several workers
    envs = [dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                 GROUP_RANK="0", ROLE_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                 ROLE_WORLD_SIZE=str(nproc), GROUP_WORLD_SIZE="1", ROLE_NAME="default",
                 TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0") for rank in range(nproc)]
    statuses, stdout, stderr = _run_processes(module, argv, cwd, envs, timeout)
    return subprocess.CompletedProcess(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m", module, *argv],
        0 if all(status == 0 for status in statuses) else 1, stdout, stderr)


def _run_processes(module: str, argv: Sequence[str], cwd: Path, envs: Sequence[Mapping[str, str]],
                   timeout: float) -> Tuple[List[int], str, str]:
    """`module` run as __main__ in one forked process per environment, all writing to one stdout and one
    stderr, until all have ended or one has failed (the others then get SIGTERM, and SIGKILL 30 s later, as
    torchrun's agent does). Their exit statuses and output; past `timeout` all are killed and it raises."""
    context = forkserver_context()
    with tempfile.TemporaryDirectory() as outputs:
        stdout, stderr = Path(outputs, "stdout"), Path(outputs, "stderr")
        processes = [context.Process(target=_run_module_as_main,
                                     args=(module, list(argv), str(cwd), dict(env), str(stdout), str(stderr)))
                     for env in envs]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout

        def running():
            return [process for process in processes if process.exitcode is None]

        while running() and not any(process.exitcode for process in processes):
            if time.monotonic() > deadline:
                for process in running():
                    process.kill()
                raise subprocess.TimeoutExpired([module, *argv], timeout, stdout.read_text(errors="replace"),
                                                stderr.read_text(errors="replace"))
            multiprocessing.connection.wait([process.sentinel for process in running()], timeout=1)
        for process in running():  # a failed rank's peers would wait in their collectives until they time out
            process.terminate()
        for process in processes:
            process.join(30)
            if process.exitcode is None:
                process.kill()
                process.join()
        return ([process.exitcode for process in processes], stdout.read_text(errors="replace"),
                stderr.read_text(errors="replace"))
