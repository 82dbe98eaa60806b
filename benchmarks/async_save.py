"""How long a checkpoint save stops training: synchronous against `checkpoint.async_save=true`.

    python benchmarks/async_save.py [--model bloom-small] [--precision fp32] [--repeats 5] [--train-threads N]

One process trains `--model` (ZeRO 1, micro-batch 1 at the model's sequence length, random tokens) and
saves its full training state (weights, fp32 masters, Adam moments, RNG) into a temporary checkpoint dir:
  - synchronous: the time `save_training_checkpoint` takes, files written, fsynced and published;
  - asynchronous: the time `CheckpointSaver.save` takes (the copy to host memory), plus what the training
    steps run while the files are written lose against steps without a save in flight, plus the publish.
    The loss is the steps' total time less that of as many steps right after, without a save in flight
    (paired, so the machine's drift cancels); differences are not clipped at zero, which would add the
    steps' noise up as stall. A median near zero or below says the loss is within the steps' noise.
Prints one JSON line per mode and the ratio (the issue's goal: asynchronous at most 0.2 of synchronous).

Training runs on `--train-threads` cores, by default all but one: on a GPU node the host cores are mostly
idle while the GPUs train, and the writer process uses them. With training on every core the writer (nice
19) gets only what training leaves, takes many steps to finish, and the paired differences get noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-small")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch

    torch.set_num_threads(args.train_threads)

    from megatron_bloom.config import load_config
    from megatron_bloom.parallel.distributed import init_distributed, state_for_run
    from megatron_bloom.training.checkpointing import (CheckpointSaver, Progress, save_training_checkpoint,
                                                       start_writer)
    from megatron_bloom.training.loop import build_engine, train_step

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"model={args.model}", f"precision={args.precision}", "train.micro_batch_size=1",
                     "train.global_batch_size=1", "zero.stage=1", f"checkpoint.dir={tmp}/ckpt",
                     f"run.dir={tmp}/run"]
        config = load_config(overrides)
        init_distributed(always=True)
        state = state_for_run(1, 1, 1, 1, require_groups=True)
        async_config = load_config(overrides + ["checkpoint.async_save=true"])
        writer = start_writer(async_config)  # as a run does: before the model is built
        engine, _, _ = build_engine(config, state)
        generator = torch.Generator().manual_seed(0)
        length = config.model.seq_length

        def batches():
            while True:
                tokens = torch.randint(0, config.model.vocab_size, (1, length + 1), generator=generator)
                yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

        data = batches()

        def step() -> float:
            started = time.perf_counter()
            train_step(engine, data, state, 1)
            return time.perf_counter() - started

        for _ in range(2):
            step()  # warm-up: optimizer state, allocator
        baseline = statistics.mean(step() for _ in range(3))
        progress = Progress(iteration=0)

        synchronous = []
        for _ in range(args.repeats):
            progress.iteration += 1
            started = time.perf_counter()
            save_training_checkpoint(engine, config, state, progress)
            synchronous.append(time.perf_counter() - started)
            step()

        saver = CheckpointSaver(engine, async_config, state, None, writer)
        asynchronous, steps_during, save_calls = [], [], []
        for _ in range(args.repeats):
            progress.iteration += 1
            started = time.perf_counter()
            saver.save(progress)
            stall = time.perf_counter() - started
            save_calls.append(stall)
            during = []
            while not saver.written_here():
                during.append(step())
            started = time.perf_counter()
            saver.poll(True)
            stall += time.perf_counter() - started
            stall += sum(during) - sum(step() for _ in during)
            asynchronous.append(stall)
            steps_during.append(len(during))
        writer.close()
        size_mb = sum(f.stat().st_size for f in Path(tmp, "ckpt").rglob("*") if f.is_file()) / 2**20 / (
            2 * args.repeats)
        sync_s, async_s = statistics.median(synchronous), statistics.median(asynchronous)
        print(json.dumps({"mode": "synchronous", "model": args.model, "checkpoint_mb": round(size_mb, 1),
                          "stall_s": [round(x, 3) for x in synchronous], "median_s": round(sync_s, 3)}))
        print(json.dumps({"mode": "asynchronous", "model": args.model, "train_threads": args.train_threads,
                          "step_s": round(baseline, 3), "save_call_s": [round(x, 3) for x in save_calls],
                          "stall_s": [round(x, 3) for x in asynchronous], "steps_while_writing": steps_during,
                          "median_s": round(async_s, 3)}))
        print(json.dumps({"async_over_sync": round(async_s / sync_s, 3),
                          "save_call_over_sync": round(statistics.median(save_calls) / sync_s, 3)}))


if __name__ == "__main__":
    main()
