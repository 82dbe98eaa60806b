"""The planner's predicted iteration time against real training runs on this machine.

    python benchmarks/plan_validation.py [--iters 6] [--passes 2] [--only NAME ...] [--calibrated DIR]

For bloom-small and bloom-tiny in turn: `mbloom-plan --calibrate` measures this machine at the model's shapes
into a hardware file; then, right after (the machine's speed drifts), for each of its layouts below
`mbloom-plan --json hardware=FILE` predicts the iteration time, and `mbloom-train` (torchrun, the ranks
sharing the cores: cores / ranks threads each, as the calibration measured them) runs it. A run's time is its
median step after two warm-up iterations; each layout runs once in each of `--passes` passes over the model's
layouts, and its measured time is the fastest pass's, as each figure of the calibration is the fastest of its
rounds: both then say what the machine does when nothing slows it (on a shared VM whose speed drifts by tens
of percent within minutes, one run says when it ran).
Prints predicted against measured per layout, the error, the median and largest absolute error, and
Spearman's rank correlation over all layouts (issue 29 asks for <= 20%, <= 35% and >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 2
MODELS = {  # model: (global batch, default micro-batch, tokenizer vocabulary that fits it)
    "bloom-small": (8, 2, 4000),
    "bloom-tiny": (16, 4, 1000),
}
LAYOUTS = [  # name, model, overrides (beside the global batch): tp, pp, dp, ZeRO, micro-batch, recomputation, SP
    ("small base", "bloom-small", "parallel.tp=1 parallel.pp=1 parallel.dp=1 train.micro_batch_size=2"),
    ("small micro 1", "bloom-small", "parallel.tp=1 parallel.pp=1 parallel.dp=1 train.micro_batch_size=1"),
    ("small micro 4", "bloom-small", "parallel.tp=1 parallel.pp=1 parallel.dp=1 train.micro_batch_size=4"),
    ("small recompute", "bloom-small", "parallel.tp=1 parallel.pp=1 parallel.dp=1 train.micro_batch_size=2 "
                                       "train.activation_checkpointing=true"),
    ("small tp 2", "bloom-small", "parallel.tp=2 parallel.pp=1 parallel.dp=1 train.micro_batch_size=2"),
    ("small tp 2 SP", "bloom-small", "parallel.tp=2 parallel.pp=1 parallel.dp=1 train.micro_batch_size=2 "
                                     "parallel.sequence_parallel=true"),
    ("small pp 2", "bloom-small", "parallel.tp=1 parallel.pp=2 parallel.dp=1 train.micro_batch_size=2"),
    ("small dp 2 ZeRO 2", "bloom-small", "parallel.tp=1 parallel.pp=1 parallel.dp=2 train.micro_batch_size=2 "
                                         "zero.stage=2"),
    ("small dp 2 ZeRO 3", "bloom-small", "parallel.tp=1 parallel.pp=1 parallel.dp=2 train.micro_batch_size=2 "
                                         "zero.stage=3"),
    ("small tp 2 pp 2", "bloom-small", "parallel.tp=2 parallel.pp=2 parallel.dp=1 train.micro_batch_size=2"),
    ("tiny base", "bloom-tiny", "parallel.tp=1 parallel.pp=1 parallel.dp=1 train.micro_batch_size=4"),
    ("tiny tp 2", "bloom-tiny", "parallel.tp=2 parallel.pp=1 parallel.dp=1 train.micro_batch_size=4"),
    ("tiny pp 2 dp 2", "bloom-tiny", "parallel.tp=1 parallel.pp=2 parallel.dp=2 train.micro_batch_size=4"),
    ("tiny dp 2 ZeRO 3", "bloom-tiny", "parallel.tp=1 parallel.pp=1 parallel.dp=2 train.micro_batch_size=4 "
                                       "zero.stage=3"),
]


def run(args, env=None) -> str:
    result = subprocess.run([sys.executable, *args], env=env or dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-4000:])
    return result.stdout


def ranks_of(overrides: str) -> int:
    sizes = dict(item.split("=") for item in overrides.split() if item.startswith("parallel.") and
                 item.split("=")[0] in ("parallel.tp", "parallel.pp", "parallel.dp"))
    return int(sizes["parallel.tp"]) * int(sizes["parallel.pp"]) * int(sizes["parallel.dp"])


def measure(name: str, model: str, overrides: str, corpus: Path, iters: int, work: Path) -> float:
    ranks = ranks_of(overrides)
    run_dir = Path(tempfile.mkdtemp(prefix=name.replace(" ", "-") + "-", dir=work))  # a run of its own: metrics append
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m",
         "megatron_bloom.cli.train", f"model={model}", f"data.paths=[{corpus}]", "precision=bf16",
         f"train.global_batch_size={MODELS[model][0]}", f"train.iters={iters}", "logging.interval=1",
         f"run.dir={run_dir}", "data.num_workers=0", *overrides.split()], env=env)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(line["step_s"] for line in lines[WARMUP:])


def spearman(xs, ys) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):  # ties share the mean of their places
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--passes", type=int, default=2, help="runs of each layout, the fastest taken")
    parser.add_argument("--only", nargs="*", help="layout names to run (default: all)")
    parser.add_argument("--calibrated", type=Path, help="a folder with hardware-<model>.json files of an earlier "
                                                        "run of this machine to use instead of calibrating again")
    args = parser.parse_args()
    layouts = [layout for layout in LAYOUTS if not args.only or layout[0] in args.only]
    work = Path(tempfile.mkdtemp(prefix="mbloom-bench-plan-"))
    source = REPO / "data_prep" / "sample_corpus.jsonl"
    print(f"bf16, {os.cpu_count()} cores shared by each layout's ranks")
    predicted, measured = [], []
    # each model's layouts right after its calibration: this machine's speed drifts over tens of minutes
    for model in [model for model in MODELS if any(layout[1] == model for layout in layouts)]:
        _, micro, vocab = MODELS[model]
        tokenizer, corpus, hardware = work / f"tok-{vocab}", work / f"corpus-{vocab}", work / f"hardware-{model}.json"
        run(["-m", "megatron_bloom.cli.train_tokenizer", "--input", str(source), "--vocab-size", str(vocab),
             "--output", str(tokenizer)])
        run(["-m", "megatron_bloom.cli.preprocess", "--input", str(source), "--tokenizer", str(tokenizer),
             "--output-prefix", str(corpus), "--append-eod"])
        if args.calibrated is not None:
            hardware = args.calibrated / hardware.name
        else:
            start = time.perf_counter()
            run(["-m", "megatron_bloom.cli.plan", "--calibrate", "--output", str(hardware), f"model={model}",
                 f"train.micro_batch_size={micro}", "precision=bf16"])
            print(f"calibrated {model} in {(time.perf_counter() - start) / 60:.1f} min: {hardware}", flush=True)
        mine = [layout for layout in layouts if layout[1] == model]
        guesses = [json.loads(run(["-m", "megatron_bloom.cli.plan", "--json", f"model={model}", "precision=bf16",
                                   f"train.global_batch_size={MODELS[model][0]}", f"hardware={hardware}",
                                   *overrides.split()]))["predicted_iter_time_s"] for _, _, overrides in mine]
        passes = [[measure(name, model, overrides, corpus, args.iters, work) for name, _, overrides in mine]
                  for _ in range(args.passes)]
        print(f"{'layout':<20} {'ranks':>5} {'predicted s':>11} {'measured s':>10} {'error':>7}   each pass, s")
        for index, ((name, _, overrides), guess) in enumerate(zip(mine, guesses)):
            seconds = min(times[index] for times in passes)
            predicted.append(guess)
            measured.append(seconds)
            print(f"{name:<20} {ranks_of(overrides):>5} {guess:>11.3f} {seconds:>10.3f} {guess / seconds - 1:>+7.1%}   "
                  + " ".join(f"{times[index]:.3f}" for times in passes), flush=True)
    layouts = [layout for model in MODELS for layout in layouts if layout[1] == model]  # in the order run
    errors = [abs(p / m - 1) for p, m in zip(predicted, measured)]
    correlation = spearman(predicted, measured) if len(layouts) > 1 else float("nan")
    print(f"median |error| {statistics.median(errors):.1%}, largest {max(errors):.1%}, Spearman {correlation:.3f} "
          f"over {len(layouts)} layouts")
    print(json.dumps({"layouts": [{"name": name, "predicted_s": round(p, 4), "measured_s": round(m, 4)}
                                  for (name, _, _), p, m in zip(layouts, predicted, measured)],
                      "median_abs_error": round(statistics.median(errors), 4), "max_abs_error": round(max(errors), 4),
                      "spearman": round(correlation, 4)}))


if __name__ == "__main__":
    main()
