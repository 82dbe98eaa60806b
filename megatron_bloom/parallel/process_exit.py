"""Ending a process that ran gloo collectives without the abort CPython's teardown can cause.

Gloo runs each collective on a worker thread of its process group, and the worker drops its reference to
the collective's tensors after the caller has seen the result. Where the caller's Python object of such a
tensor is already gone, that drop decrefs the object, which takes the GIL. If the interpreter has begun to
finalize by then (the command returned a moment after its last collective, or the group outlives
`destroy_process_group` because something still references it), CPython ends the thread with
`pthread_exit`, whose unwinding through torch's C++ frames calls `std::terminate`: the rank dies of SIGABRT
("terminate called without an active exception") after a run that finished, and the launcher reports the
job failed (pytorch/pytorch#190489; a backtrace shows `ProcessGroupGloo::runLoop` ->
`~AsyncAllgatherWork` -> `TensorImpl::decref_pyobject` -> `take_gil` -> `pthread_exit`).

So the commands that run collectives end with `leave`: what the interpreter's exit does that matters (the
atexit handlers: logging, multiprocessing's children, temporary files, wandb; the standard streams
flushed), then `os._exit`, with no teardown for a late worker thread to meet.
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from typing import Callable, NoReturn


def leave(code: int = 0) -> NoReturn:
    """Exit with `code` after the atexit handlers and a flush of stdout and stderr, skipping the
    interpreter's teardown."""
    atexit._run_exitfuncs()  # noqa: SLF001 -- CPython's own exit runs exactly these
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say
            pass
    os._exit(code)


def exit_status(stop: SystemExit) -> int:
    """The status `sys.exit(arg)` gives: None is 0, an int itself, anything else printed and 1."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def run_and_leave(main: Callable[[], object]) -> NoReturn:
    """A console script's entry: `main()`, then `leave` with its status (a traceback and 1 for an
    exception, as Python's own exit would; Ctrl-C is left to Python)."""
    try:
        main()
    except SystemExit as stop:
        leave(exit_status(stop))
    except Exception:  # noqa: BLE001 -- a bug: its traceback, as the interpreter would print it
        traceback.print_exc()
        leave(1)
    leave(0)
