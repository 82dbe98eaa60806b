"""lm-evaluation-harness tasks on the live model during training (`train.eval_harness.tasks=[...]`), at the
training layout, with no checkpoint round trip.

The model lm-eval sees is a view of the training module's own parameters: the plain task model (or at pp > 1
this rank's `PipelineStage` of it, the blocks training's stage holds) is built on the meta device and its
parameters are the training layers' `Parameter` objects under their model names (`pipeline.names`), so it
always computes with the weights of the step just taken (DeepSpeed may move a parameter's storage; the
object stays). The evaluation runs in evaluation mode (no dropout) and leaves every random generator as it
found it, so that training goes on exactly as without it (a resume stays bit for bit).
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from megatron_bloom.checkpoint.weights import meta_rank_model
from megatron_bloom.config import TrainConfig
from megatron_bloom.data.tokenizer import load_tokenizer
from megatron_bloom.errors import ConfigError
from megatron_bloom.inference.harness_evaluation import load_tasks, metrics, write_results
from megatron_bloom.model import TaskConfig
from megatron_bloom.parallel import ParallelState
from megatron_bloom.pipeline.names import named_model_parameters


def harness_interval(config: TrainConfig) -> Optional[int]:
    """Iterations between harness evaluations; None without tasks. Checks what the evaluation needs."""
    harness = config.train.eval_harness
    if not harness.tasks:
        return None
    interval = harness.interval or config.train.eval_interval
    if interval is None:
        raise ConfigError("train.eval_harness.tasks needs an interval: set train.eval_harness.interval (or "
                          "train.eval_interval).")
    if config.data.tokenizer is None:
        raise ConfigError("train.eval_harness.tasks needs the run's tokenizer: set data.tokenizer.")
    if config.zero.stage == 3:
        raise ConfigError("train.eval_harness evaluates the parameters each rank holds whole: use zero.stage=0, 1 "
                          "or 2 (ZeRO 3 partitions them).")
    if config.fine_tuning:
        raise ConfigError("train.eval_harness evaluates a language model; this run fine-tunes a "
                          f"{config.task.name} head.")
    return interval


class TrainingHarness:
    """lm-eval's tasks (checked when the run starts) on the training module's live parameters."""

    def __init__(self, config: TrainConfig, state: ParallelState) -> None:
        self.config, self.state = config, state
        self.tasks = load_tasks(config.train.eval_harness)  # a misspelt task stops the run before training
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        self.language_model = None

    def evaluate(self, engine, iteration: int) -> Optional[dict]:
        """`{task: {metric: value}}` on the ranks of the first data-parallel replica, None on the others; the
        first rank also writes lm-eval's whole results to `run.dir/harness/iter_NNNNNNN.json`."""
        from megatron_bloom.inference.harness import HarnessModel
        from megatron_bloom.inference.harness_evaluation import run_tasks

        harness = self.config.train.eval_harness
        if self.language_model is None:
            model = live_model(engine.module, self.config, self.state)
            self.language_model = HarnessModel(model, self.state, self.tokenizer, self.config.model,
                                               max_length=harness.max_length or self.config.model.seq_length,
                                               batch_size=harness.batch_size, max_gen_toks=harness.max_gen_toks)
        engine.eval()
        try:
            with torch.no_grad(), random_state_kept():
                results = run_tasks(self.language_model, harness, self.tasks, seeded=False)
        finally:
            engine.train()
        if results is None:
            return None
        if self.state.is_first_rank:
            write_results(results, Path(self.config.run.dir) / "harness" / f"iter_{iteration:07d}.json")
        return metrics(results)


def live_model(module: torch.nn.Module, config: TrainConfig, state: ParallelState) -> torch.nn.Module:
    """The task model (at pp > 1 this rank's stage of it) whose parameters are `module`'s own."""
    model = meta_rank_model(config.model, TaskConfig(), state, partition=config.parallel.pipeline_partition)
    task_model = model.model if state.pp > 1 else model
    live = dict(named_model_parameters(module))
    task_model.load_state_dict({name: live[name] for name in task_model.state_dict()}, strict=True, assign=True)
    return model.eval()


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """Python's, numpy's and torch's generators (the CPU's and the GPUs') as they were before."""
    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
