"""Generation speed of `mbloom-generate`'s batched decoding against `transformers`' `generate`, in one invocation.

    python benchmarks/generate.py [--model bloom-small] [--batch 8] [--new-tokens 128] [--dtype bf16]
                                  [--quantize int8] [--compile]

Both models hold the same random weights and decode the same left-padded batch of mixed-length prompts
greedily for exactly `--new-tokens` tokens (EOS off). Reported: time to first token (the prompt's forward
and one token), decoding tokens/s over the batch, the ratio of whole-run tokens/s, and how many rows give
the same tokens (in bf16 a near-tie between two logits can flip, as any change of kernel order does).

With `--quantize int8` ours runs with int8 weights (`generate.quantize=int8`), and its accuracy cost is
measured against float32 computation on the same weights, beside bf16's: the largest and mean difference of
the prompt's logits, and the share of greedy tokens equal to float32's up to each row's first difference.
With `--compile` ours decodes through `torch.compile` (`generate.compile=true`); the one-time compilation,
done in the warm-up run, is reported apart.
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
from megatron_bloom.inference.generation import generate_batch, prepare_for_inference
from megatron_bloom.model import TaskConfig, build_model
from megatron_bloom.model.cpu_kernels import describe_cpu
from megatron_bloom.parallel import ParallelState

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    import transformers

    dtype = DTYPES[args.dtype]
    config = dataclasses.replace(load_config([f"model={args.model}"]).model, eos_token_id=None)
    reference = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, n_layer=config.num_layers,
        n_head=config.num_heads)).to(dtype).eval()
    weights = hf_to_state_dict(reference.state_dict(), config, TaskConfig())

    def our_model(dtype: torch.dtype, quantize=None, compile=False):
        model = build_model(config, dtype=dtype)
        model.load_state_dict(weights)
        # as mbloom-generate does; returns the compiled decoding step, or None
        return model, prepare_for_inference(model, ParallelState.single(), dtype, args.batch, quantize, compile)

    ours, decode = our_model(dtype, args.quantize, args.compile)

    generator = torch.Generator().manual_seed(0)
    lengths = torch.linspace(8, 64, args.batch).long().tolist()
    prompts = [torch.randint(4, config.vocab_size, (length,), generator=generator).tolist() for length in lengths]
    input_ids, mask = padded_batch(prompts, config.pad_token_id, left=True)  # as mbloom-generate pads them
    longest = input_ids.shape[1]
    state = ParallelState.single()

    def ours_run(new_tokens: int):
        return generate_batch(ours, prompts, config, GenerateConfig(max_new_tokens=new_tokens), state,
                              generators=(), decode_model=decode)  # greedy: no draws

    def theirs_run(new_tokens: int):
        with torch.no_grad():
            output = reference.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=config.pad_token_id)
        return output[:, longest:].tolist()

    runs = {"mbloom": ours_run, "transformers": theirs_run}
    warm_up_s = {name: seconds(lambda: run(2)) for name, run in runs.items()}  # with --compile: the compilation
    first, whole = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine meets both
        for name, run in runs.items():
            first[name].append(seconds(lambda: run(1)))
            whole[name].append(seconds(lambda: run(args.new_tokens)))
    results = {}
    for name in runs:
        first_s, whole_s = statistics.median(first[name]), statistics.median(whole[name])
        results[name] = {"time_to_first_token_s": first_s, "total_s": whole_s,
                         "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / (whole_s - first_s),
                         "tokens_per_s": args.batch * args.new_tokens / whole_s}
    pair_ratios = sorted(theirs / ours for ours, theirs in zip(whole["mbloom"], whole["transformers"]))
    same_rows = sum(a == b for a, b in zip(ours_run(args.new_tokens), theirs_run(args.new_tokens)))
    if args.quantize:
        cost = accuracy_cost({"bf16": our_model(torch.bfloat16)[0], args.quantize: ours}, our_model(torch.float32)[0],
                             prompts, input_ids, mask, config, args.new_tokens)
    ratio = results["mbloom"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    print(describe_cpu())
    print(f"{args.model}, {args.dtype}, batch {args.batch} (prompts of {lengths[0]}-{lengths[-1]} tokens), "
          f"{args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads"
          + (f"; decoding step compiled once in {warm_up_s['mbloom']:.1f} s" if args.compile else ""))
    for name, row in results.items():
        print(f"  {name:13s} first token {row['time_to_first_token_s'] * 1000:7.1f} ms, "
              f"decoding {row['decode_tokens_per_s']:8.1f} tokens/s, whole run {row['tokens_per_s']:8.1f} tokens/s")
    print(f"  ratio (mbloom / transformers tokens/s, medians of {args.repeats} interleaved runs): {ratio:.2f} "
          f"(run by run {pair_ratios[0]:.2f}-{pair_ratios[-1]:.2f}); rows with identical tokens: {same_rows}/{args.batch}")
    if args.quantize:
        for name, row in cost.items():
            print(f"  accuracy of {name:5s} against float32: prompt logits max |diff| {row['max_logit_diff']:.4f}, "
                  f"mean {row['mean_logit_diff']:.5f}; greedy tokens equal up to the first difference "
                  f"{row['greedy_agreement']:.3f}")
    print(json.dumps({"model": args.model, "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new_tokens,
                      "quantize": args.quantize, "compile": args.compile, "ratio": round(ratio, 3),
                      "ratio_range": [round(pair_ratios[0], 3), round(pair_ratios[-1], 3)],
                      "identical_rows": same_rows, "warm_up_s": {k: round(v, 2) for k, v in warm_up_s.items()},
                      **({"accuracy": cost} if args.quantize else {}),
                      **{f"{name}_{key}": round(value, 4) for name, row in results.items()
                         for key, value in row.items()}}))


@torch.no_grad()
def accuracy_cost(variants: dict, exact, prompts, input_ids, mask, config, new_tokens: int) -> dict:
    """Each variant's prompt logits and greedy tokens against those of `exact` (float32)."""
    real = mask.bool()
    expected = exact(input_ids, attention_mask=mask).logits[real]
    settings, state = GenerateConfig(max_new_tokens=new_tokens), ParallelState.single()
    greedy = ()  # no generators: greedy decoding draws nothing
    expected_tokens = generate_batch(exact, prompts, config, settings, state, greedy)
    cost = {}
    for name, model in variants.items():
        difference = (model(input_ids, attention_mask=mask).logits[real].float() - expected).abs()
        tokens = generate_batch(model, prompts, config, settings, state, greedy)
        agreeing = sum(next((i for i, (a, b) in enumerate(zip(row, want)) if a != b), len(want))
                       for row, want in zip(tokens, expected_tokens))
        cost[name] = {"max_logit_diff": round(difference.max().item(), 5),
                      "mean_logit_diff": round(difference.mean().item(), 6),
                      "greedy_agreement": round(agreeing / sum(len(want) for want in expected_tokens), 4)}
    return cost


if __name__ == "__main__":
    main()
