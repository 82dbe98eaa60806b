"""Progress of a long offline job: a tqdm bar on a terminal, plain periodic lines in logs."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Documents and tokens done, with rates: a live bar when stderr is a terminal, else a line every
    `interval` seconds (what a batch job's log wants)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.start = self.last_line = time.perf_counter()
        self.bar = tqdm(unit=" docs", dynamic_ncols=True) if sys.stderr.isatty() else None
        self.documents = 0

    def update(self, documents: int, tokens: int) -> None:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(documents - self.documents)
            self.bar.set_postfix_str(f"{tokens / elapsed:,.0f} tokens/s", refresh=False)
        elif now - self.last_line >= self.interval:
            print(f"[{elapsed:7.1f} s] {documents:,} documents ({documents / elapsed:,.0f}/s), {tokens:,} tokens "
                  f"({tokens / elapsed:,.0f}/s)", file=sys.stderr, flush=True)
            self.last_line = now
        self.documents = documents

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
