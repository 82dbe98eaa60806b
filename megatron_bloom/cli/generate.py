"""`mbloom-generate`: text from a checkpoint, greedy or sampled, with a KV cache, at any tensor-parallel size.

    [torchrun --nproc-per-node N -m] mbloom-generate checkpoint.load=CKPT generate.prompt="..." [eval.tokenizer=TOK]
        [generate.max_new_tokens=32] [generate.do_sample=true generate.temperature=0.8 generate.top_k=50
        generate.top_p=0.95 generate.seed=1234] [generate.input=PROMPTS.jsonl generate.batch_size=8]

Prompts (`generate.prompt`, or the `prompt` of each line of `generate.input`) are tokenized without
special tokens and left-padded into batches; the prompt runs once, then each new token costs one
position (the cache holds the keys and values of the earlier ones). A sequence stops at the model's EOS
token or after `max_new_tokens`. Tensor-parallel ranks gather the full vocabulary's logits and take the
same token; data-parallel ranks split the batches. Sampling draws from a generator seeded by
`generate.seed` and the batch's index, so results do not depend on the layout. Each prompt's result is
one JSON line on stdout: `{"prompt": str, "completion": str, "token_ids": [int, ...]}`; with
`generate.stream=true` the completions are printed while they grow too, before those lines, as
`{"index": prompt index, "text": piece}` lines (a prompt's pieces join into its completion).
"""
from __future__ import annotations

import json
import sys
import time
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_bloom.cli.arguments import checkpoint_command_config, parse_command_line
from megatron_bloom.cli.errors import exit_on_user_error
from megatron_bloom.config.loading import quoted_value
from megatron_bloom.errors import UserError
from megatron_bloom.inference.text_generation import generate
from megatron_bloom.parallel import init_distributed
from megatron_bloom.parallel.distributed import state_for_run
from megatron_bloom.parallel.process_exit import run_and_leave

USAGE = ('checkpoint.load=CKPT_DIR generate.prompt=TEXT | --prompt-file FILE|- [eval.tokenizer=TOK] '
         '[generate.max_new_tokens=N] ...')
DESCRIPTION = ("generate.prompt takes any text as it is (any script, commas, '=', quotes): no Hydra quoting is "
               "needed. --prompt-file reads one prompt from a file, or from standard input with '-'.")
OPTIONS = ("--prompt-file",)


def literal_prompt(overrides: Sequence[str], prompt_file: Optional[str]) -> list:
    """The overrides with `generate.prompt` passed to Hydra as the literal text given (unless the user quoted
    it already, as earlier versions asked), and the prompt of `--prompt-file`."""
    literal = []
    for override in overrides:
        key, _, value = override.partition("=")
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        literal.append(f"{key}={quoted_value(value)}" if key == "generate.prompt" and not quoted else override)
    if prompt_file is not None:
        try:
            text = sys.stdin.read() if prompt_file == "-" else open(prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--prompt-file {prompt_file} cannot be read: {error}.") from None
        literal.append(f"generate.prompt={quoted_value(text.rstrip(chr(10)))}")
    return literal


@exit_on_user_error("mbloom-generate")
def main(argv: Optional[Sequence[str]] = None) -> None:
    overrides, flags = parse_command_line(argv, "mbloom-generate", USAGE, options=OPTIONS, description=DESCRIPTION)
    overrides = literal_prompt(overrides, flags.get("--prompt-file"))
    config = checkpoint_command_config(overrides, "mbloom-generate", USAGE, required=(),
                                       one_of=("generate.prompt", "generate.input"))
    start = time.perf_counter()
    world_size = init_distributed()
    layout = config.parallel
    state = state_for_run(layout.tp, layout.pp, layout.dp, world_size,
                          shared_memory_timeout_s=layout.shared_memory_timeout_s)
    results, times = generate(config, state)
    if state.is_first_rank:
        new_tokens = sum(len(result["token_ids"]) for result in results)
        elapsed = time.perf_counter() - start
        prompts = f"{len(results)} prompt" + ("s" if len(results) != 1 else "")
        print(f"mbloom-generate: {prompts}, {new_tokens} new tokens, tp={state.tp} pp={state.pp} dp={state.dp}, "
              f"{elapsed:.1f} s with loading; {times.summary()} (rank 0)", file=sys.stderr)
        for result in results:
            print(json.dumps(result, ensure_ascii=False), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def run() -> None:
    """The console script: `main`, then an exit that gloo's threads cannot abort (parallel/process_exit.py)."""
    run_and_leave(main)


if __name__ == "__main__":
    run()
