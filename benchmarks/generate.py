"""Generation speed of `mbloom-generate`'s batched decoding against `transformers`' `generate`, in one invocation.

    python benchmarks/generate.py [--model bloom-small] [--batch 8] [--new-tokens 128] [--dtype bf16]

Both models hold the same random weights and decode the same left-padded batch of mixed-length prompts
greedily for exactly `--new-tokens` tokens (EOS off). Reported: time to first token (the prompt's forward
and one token), decoding tokens/s over the batch, the ratio of whole-run tokens/s, and how many rows give
the same tokens (in bf16 a near-tie between two logits can flip, as any change of kernel order does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from megatron_bloom.checkpoint.hf import hf_to_state_dict
from megatron_bloom.config import load_config
from megatron_bloom.config.schema import GenerateConfig
from megatron_bloom.data.padding import padded_batch
from megatron_bloom.generate import generate_batch, prepare_for_inference
from megatron_bloom.model import TaskConfig, build_model
from megatron_bloom.parallel import ParallelState

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import transformers

    dtype = DTYPES[args.dtype]
    config = dataclasses.replace(load_config([f"model={args.model}"]).model, eos_token_id=None)
    reference = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, n_layer=config.num_layers,
        n_head=config.num_heads)).to(dtype).eval()
    ours = build_model(config, dtype=dtype)
    ours.load_state_dict(hf_to_state_dict(reference.state_dict(), config, TaskConfig()))
    prepare_for_inference(ours, ParallelState.single(), dtype, args.batch)  # as mbloom-generate does

    generator = torch.Generator().manual_seed(0)
    lengths = torch.linspace(8, 64, args.batch).long().tolist()
    prompts = [torch.randint(4, config.vocab_size, (length,), generator=generator).tolist() for length in lengths]
    input_ids, mask = padded_batch(prompts, config.pad_token_id, left=True)  # as mbloom-generate pads them
    longest = input_ids.shape[1]
    state = ParallelState.single()

    def ours_run(new_tokens: int):
        return generate_batch(ours, prompts, config, GenerateConfig(max_new_tokens=new_tokens), state,
                              torch.Generator())

    def theirs_run(new_tokens: int):
        with torch.no_grad():
            output = reference.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=config.pad_token_id)
        return output[:, longest:].tolist()

    results = {}
    for name, run in (("mbloom", ours_run), ("transformers", theirs_run)):
        run(2)  # warm-up
        first = median_seconds(lambda: run(1), args.repeats)
        whole = median_seconds(lambda: run(args.new_tokens), args.repeats)
        results[name] = {"time_to_first_token_s": first, "total_s": whole,
                         "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / (whole - first),
                         "tokens_per_s": args.batch * args.new_tokens / whole}
    same_rows = sum(a == b for a, b in zip(ours_run(args.new_tokens), theirs_run(args.new_tokens)))
    ratio = results["mbloom"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    print(f"{args.model}, {args.dtype}, batch {args.batch} (prompts of {lengths[0]}-{lengths[-1]} tokens), "
          f"{args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads")
    for name, row in results.items():
        print(f"  {name:13s} first token {row['time_to_first_token_s'] * 1000:7.1f} ms, "
              f"decoding {row['decode_tokens_per_s']:8.1f} tokens/s, whole run {row['tokens_per_s']:8.1f} tokens/s")
    print(f"  ratio (mbloom / transformers tokens/s): {ratio:.2f}; rows with identical tokens: "
          f"{same_rows}/{args.batch}")
    print(json.dumps({"model": args.model, "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new_tokens,
                      "ratio": round(ratio, 3), "identical_rows": same_rows,
                      **{f"{name}_{key}": round(value, 4) for name, row in results.items()
                         for key, value in row.items()}}))


if __name__ == "__main__":
    main()
