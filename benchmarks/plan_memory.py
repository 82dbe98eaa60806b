"""`mbloom-plan`'s memory per rank against the memory a real training run takes, in one invocation.

    python benchmarks/plan_memory.py [--model bloom-small] [--zero 0 1] [--dp 2] [--tp 1] [--micro-batch 4]
        [--iters 3] [--sequence-parallel off on]

Each ZeRO stage (and, at --tp 2 or more, each --sequence-parallel setting) trains `--iters` iterations with
tp x dp ranks under torchrun on token shards of the sample corpus. Every rank records its resident memory just before the model is built (Python, torch, DeepSpeed
and the data already loaded) and its peak after training; the difference is what training took, set
against the planner's total for the same config. Prints one JSON line per stage with both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(overrides, output: Path) -> None:
    """One rank: resident memory before the model, peak after training (bytes)."""
    import deepspeed  # noqa: F401  (imported before the baseline: it is not training memory)
    import psutil
    import torch.distributed as dist

    from megatron_bloom.config import load_config
    from megatron_bloom.parallel import init_distributed
    from megatron_bloom.parallel.distributed import state_for_run
    from megatron_bloom.parallel.process_exit import leave
    from megatron_bloom.training.loop import train

    config = load_config(overrides)
    layout = config.parallel
    state = state_for_run(layout.tp, layout.pp, layout.dp, init_distributed(always=True), require_groups=True)
    baseline = psutil.Process().memory_info().rss
    train(config, state)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    (output / f"rank{dist.get_rank()}.json").write_text(json.dumps({"baseline": baseline, "peak": peak}))
    dist.destroy_process_group()
    leave(0)  # the engine keeps gloo groups alive past destroy_process_group


def run(*args: str, env=None) -> str:
    result = subprocess.run([sys.executable, *args], env=env or dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-4000:])
    return result.stdout


def measure(overrides, ranks: int, work: Path) -> float:
    """The largest training memory (peak minus baseline) over the ranks, in bytes.

    The ranks run with glibc's mmap threshold fixed at 64 KiB. By default glibc raises it to the size of
    each large block freed (up to 32 MiB), after which blocks of that size come from the heap and stay
    resident when freed: the resident high-water mark then counts memory that was already free (bloom-small
    at tp 2 in fp32: 0.26 GB more, 1.39 GB against 1.11 GB of live peak). With the threshold fixed, large
    tensors are unmapped when freed, and the resident peak is the live peak: what the planner predicts, and
    what `torch.cuda.max_memory_allocated` would report on a GPU."""
    output = work / "memory"
    output.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_=str(64 << 10))
    run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), str(Path(__file__).resolve()),
        "--worker", str(output), *overrides, env=env)
    ranks = [json.loads(path.read_text()) for path in output.glob("rank*.json")]
    return max(rank["peak"] - rank["baseline"] for rank in ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-small")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sequence-parallel", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()

    from megatron_bloom.config import load_config
    from megatron_bloom.planner.report import build_report

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = REPO / "data_prep" / "sample_corpus.jsonl"
        run("-m", "megatron_bloom.cli.train_tokenizer", "--input", str(corpus), "--vocab-size", "4000", "--output",
            str(work / "tok"))
        run("-m", "megatron_bloom.cli.preprocess", "--input", str(corpus), "--tokenizer", str(work / "tok"),
            "--output-prefix", str(work / "corpus"), "--append-eod")
        for zero in args.zero:
            for sequence_parallel in args.sequence_parallel:
                name = f"zero{zero}-sp-{sequence_parallel}"
                overrides = [f"model={args.model}", f"data.paths=[{work / 'corpus'}]", f"precision={args.precision}",
                             f"zero.stage={zero}", f"parallel.dp={args.dp}", f"parallel.tp={args.tp}",
                             f"parallel.sequence_parallel={sequence_parallel == 'on'}", f"train.iters={args.iters}",
                             f"train.micro_batch_size={args.micro_batch}",
                             f"train.global_batch_size={args.micro_batch * args.dp}", f"run.dir={work / name}",
                             "data.num_workers=0", "launcher=local"]
                # the ranks run on this machine's CPUs, where fused attention keeps its bias (planner/memory.py)
                plan = build_report(load_config(overrides + ["hardware=cpu"]))["memory_per_rank_gb"]
                measured = measure(overrides, args.tp * args.dp, work / name)
                print(json.dumps({"model": args.model, "zero": zero, "tp": args.tp, "dp": args.dp,
                                  "sequence_parallel": sequence_parallel, "precision": args.precision,
                                  "predicted_gb": plan["total"], "predicted_activations_gb": plan["activations"],
                                  "measured_gb": round(measured / 1e9, 3),
                                  "predicted_over_measured": round(plan["total"] * 1e9 / measured, 3)}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[3:], Path(sys.argv[2]))
    else:
        main()
