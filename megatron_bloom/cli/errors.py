"""What every command shares: a user's mistake printed as one paragraph with exit status 2, never a traceback.

Light on purpose: torch is imported by a command that uses it, not here. mbloom-preprocess,
mbloom-train-tokenizer and mbloom-merge-shards need none of it, and its import is 2 s of every start (of
every task of a preprocessing job, say).
"""

from __future__ import annotations

import functools
import sys
import textwrap
from typing import Callable, TypeVar

from megatron_bloom.errors import ConfigError, UserError

F = TypeVar("F", bound=Callable[..., object])


def exit_on_user_error(program: str) -> Callable[[F], F]:
    """Decorate a console-script `main`: a `UserError` prints `program: error: ...` and exits with status 2.
    Among several ranks, a config error (the same on every rank) is printed by rank 0 alone; another error
    by the rank that met it, which it names."""

    def decorate(main: F) -> F:
        @functools.wraps(main)
        def wrapped(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except UserError as error:
                from megatron_bloom.parallel.distributed import launch_rank  # torch: only on a mistake

                rank, ranks = launch_rank()
                if isinstance(error, ConfigError) and rank != 0:
                    sys.exit(2)
                where = "" if ranks == 1 or isinstance(error, ConfigError) else f"rank {rank}: "
                message = textwrap.fill(where + str(error), width=100, break_long_words=False,
                                        break_on_hyphens=False)
                print(f"{program}: error: {message}", file=sys.stderr)
                sys.exit(2)

        return wrapped  # type: ignore[return-value]

    return decorate
