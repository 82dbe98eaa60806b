"""What a run reports, from global rank 0 only: `run.dir/metrics.jsonl` (one JSON object per logged
iteration, flushed at once), a console line per log interval, and optionally wandb
(`logging.wandb.mode`: disabled | offline | online; offline needs no network and writes under
`run.dir/wandb`) and TensorBoard event files (`logging.tensorboard=true`, under `run.dir/tensorboard`)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_bloom.config.schema import LoggingConfig


class MetricsLog:
    # step_s is rank 0's; the slowest rank's step time, next to the median over ranks, shows a straggler
    FIELDS = ("iter", "loss", "lr", "grad_norm", "consumed_samples", "step_s", "tokens_per_s", "tflops_per_rank",
              "skipped", "slowest_rank", "slowest_rank_step_s", "median_rank_step_s")

    def __init__(self, run_dir: Path, interval: int, enabled: bool, logging: Optional[LoggingConfig] = None,
                 run_config: Optional[dict] = None) -> None:
        self.interval, self.enabled, self.run_dir = interval, enabled, run_dir
        self.handle = self.wandb_run = self.tensorboard = None
        # for the summary at the end: iterations and tokens of this run, its last loss, the best validation
        self.started, self.iterations, self.tokens, self.last_loss = time.perf_counter(), 0, 0, math.nan
        self.best_validation: Optional[tuple] = None  # (loss, iteration)
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.handle = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # a resumed run appends
        if logging is not None and logging.wandb.mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=logging.wandb.project, name=logging.wandb.name,
                                        mode=logging.wandb.mode, dir=str(run_dir), config=run_config)
        if logging is not None and logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, iteration: int, total_iters: int, **values) -> None:
        """Record iteration `iteration` (1-based) if it falls on the log interval (or is the last one)."""
        self.iterations += 1
        self.tokens += round(values["tokens_per_s"] * values["step_s"])
        self.last_loss = values["loss"]
        if not self.enabled or (iteration % self.interval and iteration != total_iters):
            return
        record = {"iter": iteration, **{key: values[key] for key in self.FIELDS[1:]}}
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        scalars = {key: float(value) for key, value in record.items() if key != "iter"}
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{key}": value for key, value in scalars.items()}, step=iteration)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{key}", value, iteration)
        print(f"iter {iteration:>6}/{total_iters} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
              f"grad norm {record['grad_norm']:.3f} | {record['step_s'] * 1000:.0f} ms | "
              f"{record['tokens_per_s']:,.0f} tokens/s | {record['tflops_per_rank']:.3f} TFLOP/s per rank"
              + (" | skipped" if record["skipped"] else ""), file=sys.stdout, flush=True)

    def log_validation(self, iteration: int, loss: float, language_model: bool = True) -> None:
        """The validation loss (and the language model's perplexity), to `run.dir/validation.jsonl`
        (metrics.jsonl holds training iterations only)."""
        if self.best_validation is None or loss < self.best_validation[0]:
            self.best_validation = (loss, iteration)
        if not self.enabled:
            return
        record = {"iter": iteration, "valid_loss": loss}
        if language_model:
            record["valid_perplexity"] = math.exp(min(loss, 700.0))
        with open(self.run_dir / "validation.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        perplexity = f" | perplexity {record['valid_perplexity']:.2f}" if language_model else ""
        print(f"validation at iter {iteration}: loss {loss:.4f}{perplexity}", flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log({f"valid/{key.removeprefix('valid_')}": value for key, value in record.items()
                                if key != "iter"}, step=iteration)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("valid/loss", loss, iteration)

    def log_harness(self, iteration: int, results: Optional[dict]) -> None:
        """lm-evaluation-harness metrics (`{task: {metric: value}}`, lm-eval's names) to
        `run.dir/validation.jsonl` as `{"iter", "harness"}`, and as `harness/<task>/<metric>` scalars."""
        if not self.enabled or results is None:
            return
        with open(self.run_dir / "validation.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"iter": iteration, "harness": results}) + "\n")
        shown = "; ".join(f"{task} " + ", ".join(f"{name.split(',')[0]} {value:.4g}" for name, value in values.items()
                                                  if "stderr" not in name) for task, values in results.items())
        print(f"lm-eval at iter {iteration}: {shown}", flush=True)
        scalars = {f"harness/{task}/{name.replace(',', '/')}": value for task, values in results.items()
                   for name, value in values.items()}
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=iteration)
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, iteration)

    def summary(self, iteration: int, checkpoints: Optional[str]) -> None:
        """The line that ends a run: what it did, how long it took, where it left its checkpoints."""
        if not self.enabled:
            return
        minutes, seconds = divmod(time.perf_counter() - self.started, 60)
        best = (f"; best validation loss {self.best_validation[0]:.4f} (iteration {self.best_validation[1]})"
                if self.best_validation is not None else "")
        print(f"mbloom-train: done at iteration {iteration}: {self.iterations} iterations and {self.tokens:,} tokens "
              f"in {int(minutes)} min {seconds:.0f} s; final loss {self.last_loss:.4f}{best}; "
              + (f"checkpoints in {checkpoints}" if checkpoints else "no checkpoints (checkpoint.dir is not set)"),
              flush=True)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
