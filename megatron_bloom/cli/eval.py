"""`mbloom-eval`: loss and perplexity of a checkpoint on a jsonl file, or lm-evaluation-harness tasks, at any
tp x pp x dp layout.

    [torchrun --nproc-per-node N -m] mbloom-eval checkpoint.load=CKPT eval.input=DOCS.jsonl [eval.tokenizer=TOK]
    [torchrun ...] mbloom-eval checkpoint.load=CKPT eval.harness.tasks=[T1,T2] [eval.harness.include_path=DIR]
        [eval.harness.num_fewshot=N] [eval.harness.limit=N]

Each document's `text` is tokenized without special tokens and cut to `eval.seq_length` (default: the
model's); loss = summed next-token negative log-likelihood over all documents / number of predicted
tokens. Data-parallel ranks split the documents. The last line of stdout is JSON:
`{"loss": ..., "perplexity": ..., "tokens": ..., "documents": ..., "skipped": ...}`.

A checkpoint with a fine-tuning head (`task=NAME` optional: the checkpoint says which) is evaluated on
`eval.input` in that task's format instead, and the JSON holds the task's metrics (megatron_bloom/tasks).

With `eval.harness.tasks`, lm-eval runs its tasks through our model (inference/harness.py): the last line of
stdout is `{"results": {task: {metric: value}}}` with lm-eval's names, and lm-eval's whole results file is
written to `run.dir/harness_results.json`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_bloom.cli.arguments import checkpoint_command_config, parse_overrides
from megatron_bloom.cli.errors import exit_on_user_error
from megatron_bloom.inference.evaluation import evaluate
from megatron_bloom.inference.harness_evaluation import RESULTS_FILE, harness_evaluate, metrics, write_results
from megatron_bloom.parallel import init_distributed
from megatron_bloom.parallel.distributed import state_for_run
from megatron_bloom.parallel.process_exit import run_and_leave

USAGE = ("checkpoint.load=CKPT_DIR (eval.input=DOCS.jsonl | eval.harness.tasks=[TASK,...]) [eval.tokenizer=TOK] "
         "[parallel.tp=N] [precision=fp32] ...")


@exit_on_user_error("mbloom-eval")
def main(argv: Optional[Sequence[str]] = None) -> None:
    overrides = parse_overrides(argv, "mbloom-eval", USAGE)
    config = checkpoint_command_config(overrides, "mbloom-eval", USAGE, required=(),
                                       one_of=("eval.input", "eval.harness.tasks"))
    start = time.perf_counter()
    world_size = init_distributed()
    layout = config.parallel
    state = state_for_run(layout.tp, layout.pp, layout.dp, world_size,
                          shared_memory_timeout_s=layout.shared_memory_timeout_s)
    if config.eval.harness.tasks:
        harness(config, state, start)
    else:
        loss(config, state, start)
    if dist.is_initialized():
        dist.destroy_process_group()


def harness(config, state, start: float) -> None:
    results = harness_evaluate(config, state)
    if state.is_first_rank:
        path = write_results(results, Path(config.run.dir) / RESULTS_FILE)
        print(f"mbloom-eval: {', '.join(results['results'])} at tp={state.tp} pp={state.pp} dp={state.dp}, "
              f"{time.perf_counter() - start:.1f} s; lm-eval's results in {path}", file=sys.stderr)
        print(json.dumps({"results": metrics(results)}), flush=True)


def loss(config, state, start: float) -> None:
    result = evaluate(config, state)
    if state.is_first_rank:
        what = (f"{result['examples']} {result['task']} examples" if "task" in result
                else f"{result['documents']} documents, {result['tokens']} predicted tokens")
        print(f"mbloom-eval: {what}, tp={state.tp} pp={state.pp} dp={state.dp}, {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        print(json.dumps(result), flush=True)


def run() -> None:
    """The console script: `main`, then an exit that gloo's threads cannot abort (parallel/process_exit.py)."""
    run_and_leave(main)


if __name__ == "__main__":
    run()
