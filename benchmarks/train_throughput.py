"""Training tokens/s of `mbloom-train` against `transformers.BloomForCausalLM`, in one invocation.

    python benchmarks/train_throughput.py [--model bloom-small] [--iters 8] [--micro-batch 4] [--repeats 3]
                                          [--precision bf16|fp32] [overrides ...]

Both train the same shape (default bloom-small: hidden 512, 8 layers, seq 512) on batches of
`--micro-batch` sequences in one process with AdamW: ours through `mbloom-train` (DeepSpeed; in bf16, bf16
weights with fp32 master weights in the optimizer) on token shards made from the sample corpus,
`transformers` with its strongest stock settings: fp32 weights (under bf16 autocast for `--precision bf16`)
and torch's fused AdamW (`fused=True`). bf16 is for CPUs that compute in it (AVX512-BF16, AMX); elsewhere
every bf16 product is emulated, and `--precision fp32` compares the two in fp32. Its BLOOM has eager attention only (transformers 5.x offers no SDPA or
FlashAttention path for BLOOM), so that is what it runs. Each run's median step time after two warm-up
steps counts. The two alternate `--repeats` times (ours, theirs, ours, ...), so that a drift of the
machine's speed meets both; the median of the pairs' ratios is what to read (absolute numbers drift with
the machine's load).
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
sys.path.insert(0, str(REPO))

WARMUP = 2


def run(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-4000:])
    return result.stdout


def make_corpus(work: Path) -> Path:
    corpus = REPO / "data_prep" / "sample_corpus.jsonl"
    run("megatron_bloom.cli.train_tokenizer", "--input", str(corpus), "--vocab-size", "4000", "--output", str(work / "tok"))
    run("megatron_bloom.cli.preprocess", "--input", str(corpus), "--tokenizer", str(work / "tok"), "--output-prefix",
        str(work / "corpus"), "--append-eod")
    return work / "corpus"


def ours(model: str, iters: int, micro: int, corpus: Path, run_dir: Path, precision: str, overrides=()) -> tuple:
    run("megatron_bloom.cli.train", f"model={model}", f"data.paths=[{corpus}]", f"precision={precision}",
        f"train.iters={iters}", f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}",
        "logging.interval=1", f"run.dir={run_dir}", "data.num_workers=1", *overrides)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(line["step_s"] for line in lines[WARMUP:])
    return step_s, statistics.median(line["tflops_per_rank"] for line in lines[WARMUP:])


def theirs(model: str, iters: int, micro: int, precision: str) -> float:
    import torch
    import transformers

    from megatron_bloom.config import load_config

    config = load_config([f"model={model}"]).model
    reference = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, n_layer=config.num_layers,
        n_head=config.num_heads))
    optimizer = torch.optim.AdamW(reference.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, config.vocab_size, (micro, config.seq_length + 1))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = reference(tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-small")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("overrides", nargs="*", help="more mbloom-train overrides (train.compile=true, ...)")
    args = parser.parse_args()
    from megatron_bloom.config import load_config

    seq_length = load_config([f"model={args.model}"]).model.seq_length
    tokens = args.micro_batch * seq_length
    work = Path(tempfile.mkdtemp(prefix="mbloom-bench-train-"))
    corpus = make_corpus(work)
    runs = []
    for repeat in range(args.repeats):
        ours_s, tflops = ours(args.model, args.iters, args.micro_batch, corpus, work / f"run{repeat}", args.precision,
                              args.overrides)
        runs.append((ours_s, tflops, theirs(args.model, args.iters, args.micro_batch, args.precision)))
    ratios = [theirs_s / ours_s for ours_s, _, theirs_s in runs]
    ours_s, tflops, theirs_s = (statistics.median(column) for column in zip(*runs))
    import torch

    from benchmarks.gemm_peak import step_weighted_tflops
    from megatron_bloom.model.cpu_kernels import describe_cpu

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gemm_peak = step_weighted_tflops(load_config([f"model={args.model}"]).model, tokens, dtype)
    print(describe_cpu())
    print(f"{args.model}, micro batch {args.micro_batch} x {seq_length} tokens, {args.precision}, AdamW, one process, "
          f"{os.cpu_count()} cores; medians of {args.repeats} alternating runs each")
    print(f"  mbloom-train: {ours_s:.3f} s/step, {tokens / ours_s:,.0f} tokens/s, "
          f"{tflops * 1000:.0f} GFLOP/s (model FLOPs)")
    autocast = "bf16 autocast, " if args.precision == "bf16" else ""
    print(f"  transformers ({autocast}fused AdamW, eager attention): {theirs_s:.3f} s/step, "
          f"{tokens / theirs_s:,.0f} tokens/s")
    print(f"  ratio (mbloom-train / transformers tokens/s): {statistics.median(ratios):.2f} "
          f"(run by run: {', '.join(f'{ratio:.2f}' for ratio in ratios)})")
    print(f"  {args.precision} GEMM ceiling at these shapes (gemm_peak.py): {gemm_peak * 1000:.0f} GFLOP/s; mbloom-train "
          f"reaches {tflops / gemm_peak:.0%} of it")
    print(json.dumps({"ours_tokens_per_s": round(tokens / ours_s, 1), "transformers_tokens_per_s":
                      round(tokens / theirs_s, 1), "ratio": round(statistics.median(ratios), 3),
                      "ratios": [round(ratio, 3) for ratio in ratios],
                      "ours_gflops": round(tflops * 1000, 1), "gemm_peak_gflops": round(gemm_peak * 1000, 1),
                      "fraction_of_gemm_peak": round(tflops / gemm_peak, 3)}))


if __name__ == "__main__":
    main()
