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
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Mapping, Sequence

# Imported once in the server: what the commands and the ranks of the tests import anyway.
PRELOAD = ["torch", "torch.distributed", "deepspeed", "transformers", "tokenizers", "safetensors.torch",
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
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if "OMP_NUM_THREADS" in env:  # read by torch when it is imported, which the server did already
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [module, *argv]
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
