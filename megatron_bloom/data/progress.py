"""Progress of a long pass over documents (preprocessing, evaluation, generation): a tqdm bar on a terminal,
plain periodic lines in logs."""

from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm import tqdm


class Progress:
    """Documents (or prompts) done, of `total` when known, and tokens, with rates: a live bar when stderr is
    a terminal, else a line every `interval` seconds (what a batch job's log wants). `enabled=False` (ranks
    other than the first) shows nothing."""

    def __init__(self, interval: float = 10.0, total: Optional[int] = None, unit: str = "documents",
                 enabled: bool = True, label: str = "") -> None:
        self.interval, self.total, self.unit, self.enabled = interval, total, unit, enabled
        self.label = f"{label}: " if label else ""
        self.start = self.last_line = time.perf_counter()
        self.stream = sys.stderr  # kept: a caller may swap sys.stderr while the pass runs
        self.bar = (tqdm(total=total, unit=f" {unit}", dynamic_ncols=True, desc=label or None, file=self.stream)
                    if enabled and self.stream.isatty() else None)
        self.done = 0

    def update(self, done: int, tokens: Optional[int] = None) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(done - self.done)
            if tokens is not None:
                self.bar.set_postfix_str(f"{tokens / elapsed:,.0f} tokens/s", refresh=False)
        elif now - self.last_line >= self.interval:
            of = f" of {self.total:,}" if self.total is not None else ""
            rate = f", {tokens:,} tokens ({tokens / elapsed:,.0f}/s)" if tokens is not None else ""
            print(f"{self.label}[{elapsed:7.1f} s] {done:,}{of} {self.unit} ({done / elapsed:,.1f}/s){rate}",
                  file=self.stream, flush=True)
            self.last_line = now
        self.done = done

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
