"""Training MFU on one GPU, after checking the GPU-only fast paths against the reference computations.

    python benchmarks/gpu_train.py --data PREFIX [--model bloom-1b1] [--micro-batch 8] [--global-batch 64]
                                   [--iters 14] [overrides ...]

1. Checks (CUDA only; CI has no GPU): the compiled cross-entropy (`model.fused_kernels`) against the chunked
   eager one, loss and logits gradient; the model with folded-ALiBi causal flash attention against the
   masked-kernel path, logits of one bf16 forward.
2. `mbloom-train` of `--model` in bf16 (ZeRO-1, fused AdamW) with the fast paths and with the reference
   paths (`model.attention_impl=eager model.fused_kernels=false`, half the micro-batch twice, as eager
   attention's score matrices need the memory): median step time after `--warmup` steps (3),
   tokens/s, model TFLOP/s and MFU against the card's bf16 dense peak (planner hardware presets).
   `--global-batch` above the micro-batch accumulates gradients over several micro-batches per optimizer
   step, as real pre-training does (bloom-1b1 was trained with 256 sequences a step).
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEAKS = {"H100": "h100-80gb", "H200": "h200", "A100": "a100-80gb"}


def check_cross_entropy() -> None:
    from megatron_bloom.parallel.cross_entropy import vocab_parallel_cross_entropy

    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(4, 2048, 250880, device="cuda", generator=generator) * 4).bfloat16().requires_grad_()
    target = torch.randint(0, 250880, (4, 2048), device="cuda", generator=generator)
    weights = torch.rand(4, 2048, device="cuda", generator=generator)
    results, times = [], []
    for fused in (False, True):
        for _ in range(3):  # the last of three runs is timed (the first compiles)
            torch.cuda.synchronize()
            started = time.perf_counter()
            loss = vocab_parallel_cross_entropy(logits, target, 0, 250000, None, fused=fused)
            (grad,) = torch.autograd.grad((loss * weights).sum(), logits)
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        results.append((loss, grad))
        del grad
    (loss, grad), (fused_loss, fused_grad) = results
    print(json.dumps({"check": "compiled cross-entropy vs chunked",
                      "max_loss_diff": (fused_loss - loss).abs().max().item(),
                      "max_grad_diff": (fused_grad.float() - grad.float()).abs().max().item(),
                      "padding_grad_max": fused_grad[..., 250000:].abs().max().item(),
                      "chunked_ms": round(times[0] * 1e3, 2), "compiled_ms": round(times[1] * 1e3, 2)}),
          flush=True)


def check_attention(model_name: str) -> None:
    import dataclasses

    from megatron_bloom.config import load_config
    from megatron_bloom.model import build_model

    config = dataclasses.replace(load_config([f"model={model_name}"]).model, num_layers=2, attention_impl="sdpa")
    torch.manual_seed(0)
    model = build_model(config, dtype=torch.bfloat16).cuda().eval()
    input_ids = torch.randint(0, config.vocab_size, (2, config.seq_length), device="cuda")
    with torch.no_grad():
        folded = model(input_ids).logits  # no mask: folded ALiBi, causal flash kernel
        masked = model(input_ids, attention_mask=torch.ones_like(input_ids)).logits  # the masked kernel
        model.float()
        for block in model.transformer.h:
            block.self_attention.attention_impl = "eager"
        exact = model(input_ids, attention_mask=torch.ones_like(input_ids)).logits  # fp32 reference
    print(json.dumps({"check": "folded-ALiBi flash vs fp32 eager (bf16 logits)",
                      "folded_max_diff": (folded.float() - exact).abs().max().item(),
                      "masked_kernel_max_diff": (masked.float() - exact).abs().max().item()}), flush=True)


def train(model: str, data: str, micro: int, batch: int, iters: int, warmup: int, work: Path, name: str,
          *overrides: str) -> dict:
    run_dir = work / name
    command = [sys.executable, "-m", "megatron_bloom.cli.train", f"model={model}", f"data.paths=[{data}]",
               "precision=bf16", f"train.iters={iters}", f"train.micro_batch_size={micro}",
               f"train.global_batch_size={batch}", "logging.interval=1", f"run.dir={run_dir}",
               "data.num_workers=2", *overrides]
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(command, env=dict(os.environ, PYTHONPATH=python_path), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-4000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    return {key: statistics.median(row[key] for row in rows) for key in ("step_s", "tokens_per_s", "tflops_per_rank")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="token shard prefix (mbloom-preprocess output)")
    parser.add_argument("--model", default="bloom-1b1")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: one micro-batch)")
    parser.add_argument("--iters", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    parser.add_argument("--skip-reference", action="store_true", help="train only with the fast paths")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("overrides", nargs="*", help="more mbloom-train overrides for every run (zero.stage=0, ...)")
    args = parser.parse_args()
    from megatron_bloom.planner.hardware import PRESETS

    card = torch.cuda.get_device_name()
    preset = next((PRESETS[key] for fragment, key in PEAKS.items() if fragment in card), None)
    for check in () if args.skip_checks else (check_cross_entropy, lambda: check_attention(args.model)):
        try:
            check()
        except Exception as error:  # report and go on to the timings: a device session is short
            print(json.dumps({"check_failed": repr(error)[:2000]}), flush=True)
        torch.cuda.empty_cache()
    work = Path(tempfile.mkdtemp(prefix="mbloom-bench-gpu-"))
    batch = args.global_batch or args.micro_batch
    runs = [("fast", args.micro_batch, ())]
    if not args.skip_reference:  # eager attention keeps [batch, heads, seq, seq] scores: half the micro-batch
        runs.append(("reference", max(1, args.micro_batch // 2),
                     ("model.attention_impl=eager", "model.fused_kernels=false")))
    for name, micro, overrides in runs:
        result = train(args.model, args.data, micro, batch, args.iters, args.warmup, work, name, *overrides,
                       *args.overrides)
        mfu = result["tflops_per_rank"] / preset.peak_tflops_16bit if preset else float("nan")
        print(f"{card}, {args.model}, micro batch {micro}, global batch {batch} {' '.join(args.overrides)}, "
              f"{name} paths: "
              f"{result['step_s']:.3f} s/step, "
              f"{result['tokens_per_s']:,.0f} tokens/s, {result['tflops_per_rank']:.1f} TFLOP/s, MFU {mfu:.1%}",
              flush=True)
        print(json.dumps({"card": card, "model": args.model, "micro_batch": micro, "global_batch": batch,
                          "overrides": args.overrides, "paths": name, **result, "mfu": round(mfu, 4)}), flush=True)


if __name__ == "__main__":
    main()
