"""How training time scales over layouts on this machine's fixed cores, against the ideal and the bubble model.

    python benchmarks/scaling.py [--model bloom-small] [--iters 6] [--micro-batch 2] [--global-batch 8]

Trains the same config at tp in {1, 2}, pp in {1, 2}, ZeRO in {0, 1} (one data-parallel replica), every
layout on all of the machine's cores: its ranks share them (OMP_NUM_THREADS = cores / ranks). Reports each
layout's median step time (after two warm-up steps) and tokens/s relative to (tp 1, pp 1) with the same
ZeRO stage. The ideal on fixed cores is the same step time (the work is only divided); a pipeline of p
stages and m micro-batches adds the 1F1B bubble, so its model is t(pp 1) * (1 + (p - 1) / m)
(Narayanan et al. 2021), and the table gives the measured time over that model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 2


def run(args, env=None) -> None:
    result = subprocess.run([sys.executable, *args], env=env or dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-4000:])


def step_time(model: str, tp: int, pp: int, zero: int, args, work: Path) -> float:
    ranks = tp * pp
    run_dir = work / f"tp{tp}-pp{pp}-zero{zero}"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    overrides = [f"model={model}", f"data.paths=[{work / 'corpus'}]", "precision=bf16", f"zero.stage={zero}",
                 f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.dp=1", f"train.iters={args.iters}",
                 f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.global_batch}",
                 "logging.interval=1", f"run.dir={run_dir}", "data.num_workers=0"]
    run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "megatron_bloom.cli.train",
         *overrides], env=env)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(line["step_s"] for line in lines[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-small")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from megatron_bloom.config import load_config

    seq_length = load_config([f"model={args.model}"]).model.seq_length
    micro_batches = args.global_batch // args.micro_batch
    work = Path(tempfile.mkdtemp(prefix="mbloom-bench-scaling-"))
    corpus = REPO / "data_prep" / "sample_corpus.jsonl"
    run(["-m", "megatron_bloom.cli.train_tokenizer", "--input", str(corpus), "--vocab-size", "4000", "--output",
         str(work / "tok")])
    run(["-m", "megatron_bloom.cli.preprocess", "--input", str(corpus), "--tokenizer", str(work / "tok"), "--output-prefix",
         str(work / "corpus"), "--append-eod"])
    print(f"{args.model}, global batch {args.global_batch} = {micro_batches} micro-batches of {args.micro_batch} x "
          f"{seq_length} tokens, bf16, {os.cpu_count()} cores shared by the ranks")
    print(f"{'zero':>4} {'tp':>3} {'pp':>3} {'s/step':>8} {'tokens/s':>9} {'vs tp1 pp1':>10} {'vs model':>9}")
    for zero in (0, 1):
        base = None
        for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
            seconds = step_time(args.model, tp, pp, zero, args, work)
            base = base or seconds
            model = base * (1 + (pp - 1) / micro_batches)
            tokens_per_s = args.global_batch * seq_length / seconds
            print(f"{zero:>4} {tp:>3} {pp:>3} {seconds:>8.3f} {tokens_per_s:>9,.0f} {base / seconds:>10.2f} "
                  f"{seconds / model:>9.2f}", flush=True)
            print(json.dumps({"zero": zero, "tp": tp, "pp": pp, "step_s": round(seconds, 4),
                              "tokens_per_s": round(tokens_per_s, 1), "speed_vs_tp1_pp1": round(base / seconds, 3),
                              "time_over_bubble_model": round(seconds / model, 3)}), flush=True)


if __name__ == "__main__":
    main()
