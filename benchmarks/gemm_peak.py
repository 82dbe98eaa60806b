"""This machine's sustained matrix-multiply rate at the shapes a model's training step runs.

    python benchmarks/gemm_peak.py [--model bloom-small] [--micro-batch 4] [--threads N]

For every GEMM of a transformer block and the LM head (forward shapes; the backward's are the same
products transposed), bf16 and fp32, the best rate over repeated products; then the FLOP-weighted rate
of the whole step, which is the ceiling `train_throughput.py`'s achieved FLOP/s is set against.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def model_gemms(model, tokens: int):
    """(name, m, k, n, count per step) of one forward pass: per block QKV, attention output, MLP in and out,
    and the LM head."""
    h, v = model.hidden_size, model.padded_vocab_size()
    return [("qkv", tokens, h, 3 * h, model.num_layers), ("attention out", tokens, h, h, model.num_layers),
            ("mlp in", tokens, h, 4 * h, model.num_layers), ("mlp out", tokens, 4 * h, h, model.num_layers),
            ("lm head", tokens, h, v, 1)]


def step_weighted_tflops(model, tokens: int, dtype, seconds: float = 0.5, report=None) -> float:
    """The rate a step's GEMMs would run at if each ran at its measured rate: total FLOPs / total time."""
    from megatron_bloom.planner.hardware import gemm_tflops

    total_flops = total_seconds = 0.0
    for name, m, k, n, count in model_gemms(model, tokens):
        rate = gemm_tflops(m, k, n, dtype, seconds)
        flops = 2.0 * m * k * n * count
        total_flops += flops
        total_seconds += flops / (rate * 1e12)
        if report is not None:
            report(name, (m, k, n), rate)
    return total_flops / total_seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-small")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seconds", type=float, default=0.5, help="measuring time per shape and dtype")
    args = parser.parse_args()

    import torch

    from megatron_bloom.config import load_config
    from megatron_bloom.model.cpu_kernels import describe_cpu

    print(json.dumps({"cpu": describe_cpu()}))
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_config([f"model={args.model}"]).model
    tokens = args.micro_batch * model.seq_length
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        def report(name, shape, rate, label=label):
            print(json.dumps({"dtype": label, "gemm": name, "shape": list(shape), "tflops": round(rate, 4)}))

        weighted = step_weighted_tflops(model, tokens, dtype, args.seconds, report)
        print(json.dumps({"dtype": label, "model": args.model, "threads": torch.get_num_threads(),
                          "step_weighted_tflops": round(weighted, 4)}), flush=True)


if __name__ == "__main__":
    main()
