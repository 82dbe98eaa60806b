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
from typing import Mapping, Sequence

from megatron_bloom.parallel.distributed import free_port

# Imported once in the server: what the commands and the ranks of the tests import anyway, including what
# they import lazily: torch._dynamo (1.5 s; initializing a parameter on the meta device imports it) and
# DeepSpeed's Muon optimizer (1.2 s; DeepSpeed imports it to check the optimizer it is given for ZeRO).
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer",
           "deepspeed.runtime.pipe.engine", "transformers", "tokenizers", "safetensors.torch",
           "megatron_bloom.cli.train", "megatron_bloom.cli.eval", "megatron_bloom.cli.generate",
           "megatron_bloom.cli.convert", "megatron_bloom.cli.plan", "megatron_bloom.cli.preprocess",
           "megatron_bloom.cli.train_tokenizer", "megatron_bloom.training.loop", "megatron_bloom.inference.evaluation"]


def forkserver_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context whose processes are forked from the preloaded server."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (the first process)
    return context


def _run_module_as_main(module: str, argv: Sequence[str], cwd: str, env: Mapping[str, str], stdout: str,
                        stderr: str) -> None:
    """In the forked process: what `python -m module argv...` does after the interpreter has started."""
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # ranks share one file each
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
    warnings.filterwarnings("ignore", message=".* found in sys.modules after import of package", category=RuntimeWarning)
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
    with tempfile.TemporaryDirectory() as outputs:
        stdout, stderr = os.path.join(outputs, "stdout"), os.path.join(outputs, "stderr")
        process = forkserver_context().Process(
            target=_run_module_as_main, args=(module, list(argv), str(cwd), dict(env), stdout, stderr))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([module, *argv], timeout, Path(stdout).read_text(),
                                            Path(stderr).read_text())
        return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], process.exitcode,
                                           Path(stdout).read_text(errors="replace"),
                                           Path(stderr).read_text(errors="replace"))


def run_module_ranks(nproc: int, module: str, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
                     timeout: float) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc -m module argv...` with forked ranks: each rank gets the
    environment torchrun gives its workers, and all share one stdout and one stderr as they share torchrun's.
    When a rank fails the others are stopped and the status is 1, as torchrun does; a timeout kills all."""
    context = forkserver_context()
    with tempfile.TemporaryDirectory() as outputs:
        stdout, stderr = os.path.join(outputs, "stdout"), os.path.join(outputs, "stderr")
        for path in (stdout, stderr):
            Path(path).touch()
        port = free_port()
        ranks = []
        for rank in range(nproc):
            rank_env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                            GROUP_RANK="0", ROLE_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                            ROLE_WORLD_SIZE=str(nproc), GROUP_WORLD_SIZE="1", ROLE_NAME="default",
                            TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0")
            process = context.Process(target=_run_module_as_main,
                                      args=(module, list(argv), str(cwd), rank_env, stdout, stderr))
            process.start()
            ranks.append(process)
        deadline = time.monotonic() + timeout
        failed = False
        while any(process.is_alive() for process in ranks) and not failed:
            if time.monotonic() > deadline:
                for process in ranks:
                    process.kill()
                raise subprocess.TimeoutExpired([module, *argv], timeout, Path(stdout).read_text(),
                                                Path(stderr).read_text())
            multiprocessing.connection.wait([p.sentinel for p in ranks if p.is_alive()], timeout=1)
            failed = any(process.exitcode not in (None, 0) for process in ranks)
        for process in ranks:  # a failed rank's peers would wait for it until their collectives time out
            if process.is_alive():
                process.terminate()
            process.join()
        return subprocess.CompletedProcess(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m", module, *argv],
            1 if failed else 0, Path(stdout).read_text(errors="replace"), Path(stderr).read_text(errors="replace"))
