"""`mbloom-eval eval.harness.tasks=[...]`: lm-evaluation-harness tasks on a checkpoint, at any tp x pp x dp
layout, with no conversion (the adapter is `harness.py`).

Tasks come from lm-eval's registry, from `eval.harness.include_path`, and from the project's own offline
tasks (`tasks/` of the source tree, or the copy installed under `share/megatron_bloom/tasks`). lm-eval needs
no network for a task whose data is local. The result is lm-eval's own: `{"results": {task: {metric:
value}}}` with its task and metric names (`"acc,none"`), and its whole results file (configs, versions,
numbers of samples, and the samples with `eval.harness.log_samples`) goes to `run.dir/harness_results.json`.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from megatron_bloom.checkpoint.layout import PRECISION_DTYPES, read_metadata, resolve_checkpoint
from megatron_bloom.checkpoint.weights import load_model
from megatron_bloom.config import TrainConfig
from megatron_bloom.config.schema import HarnessConfig
from megatron_bloom.errors import UserError
from megatron_bloom.inference.generation import prepare_for_inference
from megatron_bloom.inference.tokenizer import command_tokenizer
from megatron_bloom.parallel import ParallelState

RESULTS_FILE = "harness_results.json"
NOT_METRICS = ("alias", "name", "sample_len")


def shipped_tasks_dir() -> Optional[Path]:
    """The project's lm-eval tasks: the source tree's `tasks/`, else the copy installed under `share/`."""
    for candidate in (Path(__file__).resolve().parents[2] / "tasks",
                      Path(sys.prefix) / "share" / "megatron_bloom" / "tasks"):
        if (candidate / "local_data.py").is_file():
            return candidate
    return None


def harness_evaluate(config: TrainConfig, state: ParallelState) -> Optional[dict]:
    """Run the tasks on the checkpoint; lm-eval's whole results on the first data-parallel replica's ranks,
    None on the others."""
    from megatron_bloom.inference.harness import HarnessModel  # lm-eval: imported when asked for

    harness = config.eval.harness
    if config.parallel.sequence_parallel:
        raise UserError("eval.harness scores requests of any length: use parallel.sequence_parallel=false.")
    task_manager = load_tasks(harness)
    directory = resolve_checkpoint(Path(config.checkpoint.load))
    tokenizer = command_tokenizer(config, directory, read_metadata(directory))  # before the model: fail fast
    dtype = PRECISION_DTYPES[config.precision]
    model, metadata = load_model(directory, state, dtype, run_model=config.model,
                                 partition=config.parallel.pipeline_partition)
    if metadata.task.name != "causal_lm":
        raise UserError(f"eval.harness evaluates a language model; {config.checkpoint.load} holds a "
                        f"{metadata.task.name} model.")
    model.eval()
    # as mbloom-generate: on CPUs in bf16, the linears packed for batches of this size
    prepare_for_inference(model.model if state.pp > 1 else model, state, dtype, harness.batch_size)
    language_model = HarnessModel(model, state, tokenizer, metadata.model,
                                  max_length=harness.max_length or metadata.model.seq_length,
                                  batch_size=harness.batch_size, max_gen_toks=harness.max_gen_toks)
    return run_tasks(language_model, harness, task_manager)


def load_tasks(harness: HarnessConfig):
    """lm-eval's task registry with the project's tasks and `include_path`; every asked task checked in it."""
    from lm_eval.tasks import TaskManager

    if harness.include_path is not None and not Path(harness.include_path).is_dir():
        raise UserError(f"eval.harness.include_path={harness.include_path} is not a directory.")
    paths = [str(path) for path in (shipped_tasks_dir(), harness.include_path) if path is not None]
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices would drown the results
    task_manager = TaskManager(include_path=paths or None)
    known = set(task_manager.all_tasks)
    for task in harness.tasks:
        if task not in known and not task_manager.match_tasks([task]):
            close = difflib.get_close_matches(task, known, n=3)
            raise UserError(f"eval.harness.tasks: no lm-eval task, group or tag is named {task!r}"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + ". Local tasks go in a directory given as eval.harness.include_path.")
    return task_manager


def run_tasks(language_model, harness: HarnessConfig, task_manager, seeded: bool = True) -> Optional[dict]:
    """lm-eval's `simple_evaluate` of the tasks; `seeded=False` leaves Python's, numpy's and torch's global
    generators unseeded (training's own streams; few-shot examples are drawn from lm-eval's own generator)."""
    import lm_eval

    seeds = {} if seeded else {"random_seed": None, "numpy_random_seed": None, "torch_random_seed": None}
    return lm_eval.simple_evaluate(model=language_model, tasks=list(harness.tasks), num_fewshot=harness.num_fewshot,
                                   limit=harness.limit, task_manager=task_manager, log_samples=harness.log_samples,
                                   **seeds)


def metrics(results: dict) -> dict:
    """`{task: {metric: value}}` from lm-eval's results: its names, numbers only (no "N/A" errors)."""
    return {task: {name: value for name, value in values.items()
                   if name not in NOT_METRICS and isinstance(value, (int, float))}
            for task, values in results["results"].items()}


def write_results(results: dict, path: Path) -> Path:
    """lm-eval's whole results (samples included, when kept) as JSON at `path`."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path

