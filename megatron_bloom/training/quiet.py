"""DeepSpeed's start-up output, off unless `logging.verbose=true`.

Building an engine, DeepSpeed prints on every rank: that its shared-memory comm op was built, the pipeline's
seed settings and rank topology, memory reports of its BF16 optimizer, and a warning that ZeRO runs a
"client" (our) optimizer. In a tp 2 x pp 2 run that was 29 of 61 lines. None of it is for a user to act on;
what matters (the layout, the precision, the optimizer) our own lines say once, on rank 0.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys


class deepspeed_start_up:  # noqa: N801 (used as a `with` statement's context, like contextlib's)
    """Inside: DeepSpeed's prints and its logger below ERROR are dropped, unless `verbose`. Should the block
    fail, what was dropped is printed after all, to help with the failure. Reusable."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def __enter__(self) -> None:
        if self.verbose:
            return
        from deepspeed.utils import logger

        self.logger, self.level, self.dropped = logger, logger.level, io.StringIO()
        logger.setLevel(logging.ERROR)
        self.redirect = contextlib.redirect_stdout(self.dropped)
        self.redirect.__enter__()

    def __exit__(self, kind, error, traceback) -> None:
        if self.verbose:
            return
        self.redirect.__exit__(kind, error, traceback)
        self.logger.setLevel(self.level)
        if error is not None:
            sys.stdout.write(self.dropped.getvalue())
