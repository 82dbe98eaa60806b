"""`mbloom-eval`: loss and perplexity of a checkpoint on a jsonl file, at any tensor-parallel layout.

    [torchrun --nproc-per-node N -m] mbloom-eval checkpoint.load=CKPT eval.input=DOCS.jsonl [eval.tokenizer=TOK]

Each document's `text` is tokenized without special tokens and cut to `eval.seq_length` (default: the
model's); loss = summed next-token negative log-likelihood over all documents / number of predicted
tokens. Data-parallel ranks split the documents. The last line of stdout is JSON:
`{"loss": ..., "perplexity": ..., "tokens": ..., "documents": ..., "skipped": ...}`.

A checkpoint with a fine-tuning head (`task=NAME` optional: the checkpoint says which) is evaluated on
`eval.input` in that task's format instead, and the JSON holds the task's metrics (megatron_bloom/tasks).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_bloom.cli.arguments import checkpoint_command_config, parse_overrides
from megatron_bloom.cli.errors import exit_on_user_error
from megatron_bloom.inference.evaluation import evaluate
from megatron_bloom.parallel import init_distributed
from megatron_bloom.parallel.distributed import state_for_run

USAGE = "checkpoint.load=CKPT_DIR eval.input=DOCS.jsonl [eval.tokenizer=TOK] [parallel.tp=N] [precision=fp32] ..."


@exit_on_user_error("mbloom-eval")
def main(argv: Optional[Sequence[str]] = None) -> None:
    overrides = parse_overrides(argv, "mbloom-eval", USAGE)
    config = checkpoint_command_config(overrides, "mbloom-eval", USAGE, required=("eval.input",))
    start = time.perf_counter()
    world_size = init_distributed()
    layout = config.parallel
    state = state_for_run(layout.tp, layout.pp, layout.dp, world_size,
                          shared_memory_timeout_s=layout.shared_memory_timeout_s)
    result = evaluate(config, state)
    if state.is_first_rank:
        what = (f"{result['examples']} {result['task']} examples" if "task" in result
                else f"{result['documents']} documents, {result['tokens']} predicted tokens")
        print(f"mbloom-eval: {what}, tp={state.tp} pp={state.pp} dp={state.dp}, {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        print(json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
