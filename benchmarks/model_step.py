"""Forward + backward time of our BLOOM against `transformers.BloomForCausalLM`, same shapes and weights.

    python benchmarks/model_step.py [--model bloom-small] [--batch 4] [--steps 5] [--dtype bf16|fp32]

Both models run in this process, one after the other, on the same batch; the ratio is what to read
(absolute times drift with the machine's load). Prints one JSON line per dtype at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megatron_bloom.checkpoint.hf import hf_to_state_dict
from megatron_bloom.config import load_config
from megatron_bloom.model import TaskConfig, build_model
from megatron_bloom.model.flops import iteration_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_times(model, input_ids, steps: int) -> list:
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(input_ids, labels=input_ids).loss.backward()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append")
    args = parser.parse_args()
    import transformers

    config = load_config([f"model={args.model}"]).model
    input_ids = torch.randint(0, config.vocab_size, (args.batch, config.seq_length),
                              generator=torch.Generator().manual_seed(0))
    tokens = input_ids.numel()
    print(f"{args.model}, batch {args.batch} x {config.seq_length} tokens, {torch.get_num_threads()} threads")
    results = []
    for name in args.dtype or ["bf16", "fp32"]:
        dtype = DTYPES[name]
        reference = transformers.BloomForCausalLM(transformers.BloomConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, n_layer=config.num_layers,
            n_head=config.num_heads)).to(dtype)
        ours = build_model(config, dtype=dtype)
        ours.load_state_dict(hf_to_state_dict(reference.state_dict(), config, TaskConfig()))
        theirs_s = statistics.median(step_times(reference, input_ids, args.steps))
        ours_s = statistics.median(step_times(ours, input_ids, args.steps))
        flops = iteration_flops(config, args.batch, config.seq_length)
        row = {"dtype": name, "ours_s": round(ours_s, 4), "transformers_s": round(theirs_s, 4),
               "speedup": round(theirs_s / ours_s, 3), "ours_tokens_per_s": round(tokens / ours_s, 1),
               "ours_gflops": round(flops / ours_s / 1e9, 1)}
        print(f"  {name}: ours {ours_s:.3f} s/step, transformers {theirs_s:.3f} s/step, "
              f"speed-up x{theirs_s / ours_s:.2f}, {tokens / ours_s:.0f} tokens/s, {flops / ours_s / 1e9:.0f} GFLOP/s")
        results.append(row)
        del reference, ours
    for row in results:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
