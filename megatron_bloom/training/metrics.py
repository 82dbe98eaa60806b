"""What a run reports: `run.dir/metrics.jsonl` (one JSON object per logged iteration, flushed at once)
and a console line per log interval, both from global rank 0 only."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional


class MetricsLog:
    FIELDS = ("iter", "loss", "lr", "grad_norm", "consumed_samples", "step_s", "tokens_per_s", "tflops_per_rank",
              "skipped")

    def __init__(self, run_dir: Path, interval: int, enabled: bool) -> None:
        self.interval, self.enabled = interval, enabled
        self.handle = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.handle = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # a resumed run appends

    def log(self, iteration: int, total_iters: int, **values) -> None:
        """Record iteration `iteration` (1-based) if it falls on the log interval (or is the last one)."""
        if not self.enabled or (iteration % self.interval and iteration != total_iters):
            return
        record = {"iter": iteration, **{key: values[key] for key in self.FIELDS[1:]}}
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        print(f"iter {iteration:>6}/{total_iters} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
              f"grad norm {record['grad_norm']:.3f} | {record['step_s'] * 1000:.0f} ms | "
              f"{record['tokens_per_s']:,.0f} tokens/s | {record['tflops_per_rank']:.3f} TFLOP/s per rank"
              + (" | skipped" if record["skipped"] else ""), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle: Optional[object] = None
