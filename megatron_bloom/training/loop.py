"""The training loop: from a validated `TrainConfig` to optimizer steps on every rank."""

from __future__ import annotations

import gc
import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import deepspeed
from omegaconf import OmegaConf
import torch
import torch.distributed as dist

from megatron_bloom.config import TrainConfig, to_yaml
from megatron_bloom.config.schema import check_rampup
from megatron_bloom.data.builder import build_datasets
from megatron_bloom.data.sampler import build_data_loader
from megatron_bloom.data.skips import SkippedSamples
from megatron_bloom.errors import ConfigError, UserError
from megatron_bloom.fence.deepspeed import (
    clip_fp32_gradients_with,
    defer_muon_compilation,
    is_bf16_optimizer,
    switch_off_gradient_all_reduce,
)
from megatron_bloom.model import TaskConfig
from megatron_bloom.model.flops import iteration_flops
from megatron_bloom.parallel import ParallelState, sum_sequence_parallel_grads
from megatron_bloom.parallel.parallelize import SequenceParallelGradSum
from megatron_bloom.pipeline.layers import BlockPipe
from megatron_bloom.pipeline.model import StackedModel, build_pipeline
from megatron_bloom.tasks.training_data import TaskSamples, build_task_data, build_task_loader
from megatron_bloom.training.async_checkpoint import CheckpointWriter
from megatron_bloom.training.batch_schedule import global_batch_size_at
from megatron_bloom.training.checkpointing import (
    CheckpointSaver,
    Progress,
    StartPoint,
    load_universal_weights,
    load_weights_only,
    restore_optimizer_state,
    resume,
    start_writer,
    start_point,
)
from megatron_bloom.training.deepspeed_config import deepspeed_config, gradient_accumulation_steps
from megatron_bloom.training.harness import TrainingHarness, harness_interval
from megatron_bloom.training.metrics import MetricsLog
from megatron_bloom.training.mpu import DeepSpeedMPU
from megatron_bloom.training.optimizer import build_optimizer, build_scheduler, clip_gradients
from megatron_bloom.training.quiet import deepspeed_start_up
from megatron_bloom.training.resilience import (
    RunGuards,
    StopSignal,
    config_for_attempt,
    exchange_iteration,
    skipped_samples,
)
from megatron_bloom.training.rollback import handle_spike
from megatron_bloom.training.safe_checkpoint_engine import make_checkpoint_loads_safe


def micro_batches(loader, vocab_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, labels) from samples of seq_length + 1 tokens: labels are the inputs shifted by one.
    A token id the model has no embedding row for (shards made with a larger tokenizer, and no
    `data.tokenizer` to check against before the start) is a clear error, not an index error deep in
    the embedding."""
    for tokens in loader:
        largest = int(tokens.max())
        if largest >= vocab_size:
            raise UserError(f"the training data holds token id {largest}, but model.vocab_size is {vocab_size}: "
                            "the shards were made with a larger tokenizer. Raise model.vocab_size (or use a "
                            "model preset that matches the tokenizer), and pass data.tokenizer so that this is "
                            "checked before the run starts.")
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def batch_reader(dataset, consumed_samples: int, config: TrainConfig, state: ParallelState,
                 num_workers: int, skipped: Optional[SkippedSamples] = None) -> Iterator:
    """This data-parallel rank's micro-batches from `consumed_samples` on, past the `skipped` samples:
    (input ids, labels) of the pre-training data, or ((input ids, attention mask), labels) of a task's."""
    micro = config.train.micro_batch_size
    if isinstance(dataset, TaskSamples):
        return iter(build_task_loader(dataset, consumed_samples, micro, state.dp_rank, state.dp, skipped))
    return micro_batches(build_data_loader(dataset, consumed_samples, micro, state.dp_rank, state.dp,
                                           num_workers=num_workers, skipped=skipped), config.model.vocab_size)


def to_device(batch, device: torch.device):
    """A tensor, or nested tuples of them, on `device`."""
    if isinstance(batch, tuple):
        return tuple(to_device(part, device) for part in batch)
    return batch.to(device)


def build_engine(config: TrainConfig, state: ParallelState, start: Optional[StartPoint] = None,
                 task: Optional[TaskConfig] = None):
    """The DeepSpeed engine over this rank's layers (ending in `task`'s head; default: the LM head). A
    `start` of another layout sets the weights before DeepSpeed makes its master copies (and, from a
    reshaped checkpoint, the optimizer state after); a start of this layout is left to `resume`."""
    seed, checkpointing = config.train.seed, config.train.activation_checkpointing
    sequence_parallel = config.parallel.sequence_parallel
    quiet = deepspeed_start_up(config.logging.verbose)  # DeepSpeed's own prints, in the calls below
    with quiet:
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # DeepSpeed's comm wraps our process group
    if state.pp > 1:
        with quiet:
            model = build_pipeline(config.model, state, seed, checkpointing, task, config.parallel.pipeline_partition,
                                   sequence_parallel)
    else:
        model = StackedModel(config.model, state, seed, checkpointing, task, sequence_parallel).to(state.device)
    if sequence_parallel and state.tp > 1:  # summed in every backward, before DeepSpeed sees the gradients
        # ZeRO 3's parameters are whole only inside each layer's forward, and compiled blocks read their own
        # parameters: there the gradients are summed one by one
        if config.zero.stage == 3 or config.train.compile:
            sum_sequence_parallel_grads(model, state)
        else:
            model.gradient_sum = SequenceParallelGradSum(model, state)
    if config.train.compile:
        if state.device.type == "cuda" and importlib.util.find_spec("triton") is None:
            raise ConfigError("train.compile=true needs triton, which torch.compile generates GPU kernels with, "
                              "and it is not installed here. Install the triton that matches your torch, or set "
                              "train.compile=false.")
        for block in (module for module in model.modules() if isinstance(module, BlockPipe)):
            block.compile()  # compiles its forward in place: parameter names and hooks stay as they are
    carried_state = None
    if start is not None and start.universal:
        carried_state = load_universal_weights(model, start.directory, start.metadata, state)
    elif start is not None and start.weights_only is not None:
        load_weights_only(model, start.weights_only, state, start.new_head)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.sched, config.train.iters)
    defer_muon_compilation()
    # DeepSpeed's BF16 optimizer forces six full garbage collections while it is built, each walking every
    # object of the imports (0.3 s apiece on a 2-core machine). Frozen out of the collector's sight meanwhile,
    # and back in after, so that nothing stays uncollectable.
    gc.freeze()
    try:
        with quiet:
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(config, state),
                                                   mpu=DeepSpeedMPU(state) if state.pp == 1 else None)
    finally:
        gc.unfreeze()
    make_checkpoint_loads_safe(engine)
    if carried_state is not None:
        restore_optimizer_state(engine, *carried_state)
    if config.precision == "fp32" and config.zero.stage == 0:
        own_fp32_clipping(engine, state)
    if state.dp == 1 and (config.zero.stage == 0 or is_bf16_optimizer(engine.optimizer)):
        skip_gradient_all_reduce(engine)
    return engine, optimizer, scheduler


def skip_gradient_all_reduce(engine) -> None:
    """With one data-parallel replica, DeepSpeed still all-reduces the gradients without ZeRO and with its
    BF16 optimizer: it copies them all into one flat buffer, reduces that over a group of one rank and copies
    them back (bloom-small on 2 CPU cores: 60 ms of a 2 s step). Nothing else happens in that pass, so it is
    switched off. (ZeRO's own optimizers fill their partitions in it, so they keep it.)"""
    switch_off_gradient_all_reduce(engine)


def own_fp32_clipping(engine, state: ParallelState) -> None:
    """In fp32 without ZeRO, DeepSpeed clips with a norm over the tensor-parallel group alone (in a
    pipeline, each stage by its own) and keeps no norm for `get_global_grad_norm()`: clip with the whole
    model's norm (`clip_gradients`) and keep it, as its other optimizers do."""
    clip_fp32_gradients_with(engine, lambda: clip_gradients(engine.module.parameters(), engine.gradient_clipping(),
                                                            state))


def stacked_batch_loss(engine, batches: Iterator, state: ParallelState, accumulation: int, train: bool) -> float:
    """pp = 1: the global-batch mean loss over this rank's micro-batches and the data-parallel replicas,
    accumulating gradients over them and stepping the optimizer once when `train`."""
    total = torch.zeros((), dtype=torch.float64, device=state.device)
    for micro_batch in range(accumulation):
        inputs, labels = next(batches)
        if train:  # said explicitly: DeepSpeed's own micro-step count breaks when the batch size ramps up
            engine.set_gradient_accumulation_boundary(micro_batch == accumulation - 1)
        loss = engine(to_device(inputs, state.device), to_device(labels, state.device))
        if train:
            engine.backward(loss)
        total += loss.detach().double()
    if train:
        engine.step()
    total /= accumulation
    if state.dp > 1:
        dist.all_reduce(total, group=state.dp_group)
        total /= state.dp
    return float(total)


def train_step(engine, batches: Iterator, state: ParallelState, accumulation: int) -> float:
    """One optimizer step over the global batch; returns the global-batch mean loss (the same on all ranks)."""
    if state.pp > 1:
        return float(engine.train_batch(data_iter=batches))
    return stacked_batch_loss(engine, batches, state, accumulation, train=True)


def validation_loss(engine, batches: Iterator, state: ParallelState, accumulation: int, eval_iters: int) -> float:
    """Mean loss over `eval_iters` global batches of the validation split, without updating anything."""
    engine.eval()
    with torch.no_grad():
        losses = [float(engine.eval_batch(data_iter=batches, num_micro_batches=accumulation)) if state.pp > 1
                  else stacked_batch_loss(engine, batches, state, accumulation, train=False)
                  for _ in range(eval_iters)]
    engine.train()
    return sum(losses) / eval_iters


@dataclass
class TrainResult:
    losses: List[float]  # the global-batch mean loss of every iteration
    engine: object  # the DeepSpeed engine (its `module` holds this rank's layers)


class TrainingDiverged(UserError):
    """Too many consecutive iterations had a non-finite loss or gradient."""


def train(config: TrainConfig, state: ParallelState,
          on_engine: Optional[Callable[[object], None]] = None) -> TrainResult:
    """Train from `config` on this rank. `on_engine(engine)` runs once before the first step (profilers,
    fault injection in tests)."""
    config = config_for_attempt(config)
    guards = RunGuards(config, dist.get_rank())
    writer = None
    try:
        guards.take_checkpoint_dir()
        writer = start_writer(config)  # forked before the model is built, while the rank holds little memory
        result = _train(config, state, guards, on_engine, writer)
    except BaseException as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        guards.finish(f"failed: {type(error).__name__}: {first_line}")
        raise
    finally:
        if writer is not None:
            writer.close()
    guards.finish("finished")
    return result


def _train(config: TrainConfig, state: ParallelState, guards: RunGuards,
           on_engine: Optional[Callable[[object], None]], writer: Optional[CheckpointWriter]) -> TrainResult:
    run_dir = Path(config.run.dir)
    is_logger = dist.get_rank() == 0
    if is_logger:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config))
    torch.manual_seed(config.train.seed)
    fine_tuning, global_batch, seq_length = config.fine_tuning, config.train.global_batch_size, config.sample_length
    evaluations = config.train.iters // config.train.eval_interval if config.train.eval_interval else 0
    samples = (config.train.iters * global_batch, evaluations * config.train.eval_iters * global_batch)
    problem = check_rampup(config.train.rampup_batch_size, global_batch, config.train.micro_batch_size, state.dp)
    if problem:  # parallel.dp may only be known now, from the world size
        raise ConfigError(problem + ".")
    start = start_point(config, state)
    harness_every = harness_interval(config)
    harness = TrainingHarness(config, state) if harness_every else None  # its tasks checked before the model
    if fine_tuning:
        same_head = start.metadata.task if start.metadata is not None and not start.new_head else None
        task_data = build_task_data(config, samples, same_head, is_logger)
        task, train_set, valid_set = task_data.task, task_data.train, task_data.valid
    else:
        task = TaskConfig()
        train_set, valid_set, _ = build_datasets(config.data, seq_length, config.train.seed, (*samples, 0))
    engine, optimizer, scheduler = build_engine(config, state, start, task)
    if is_logger:  # what DeepSpeed's start-up output said, once and in our words
        print(f"mbloom-train: {config.model.num_parameters():,} parameters, tp {state.tp} x pp {state.pp} x dp "
              f"{state.dp}, {config.precision}, ZeRO {config.zero.stage}; {config.train.iters} iterations of "
              f"{global_batch} x {seq_length} tokens", flush=True)
    with deepspeed_start_up(config.logging.verbose):  # DeepSpeed's loads print debug lines too
        progress = resume(engine, start.directory, start.metadata, state) if start.exact else start.progress()
    if start.directory is not None and is_logger:
        how = ("everything: an exact resume" if start.exact else "weights and optimizer state (reshaped)"
               if start.universal else "weights only")
        if start.new_head:
            how = (f"the trunk of its {start.metadata.task.name} model, a new {task.name} head "
                   f"(seed {config.train.seed})")
        print(f"starting from {start.directory}: {how}, at iteration {progress.iteration}", flush=True)
    if not start.exact:
        for _ in range(progress.iteration):  # a weights-only continuation keeps the LR schedule's place
            scheduler.step()
    skipped = skipped_samples(config, progress.skipped_samples)
    progress.skipped_samples = skipped.to_list()
    if on_engine is not None:
        on_engine(engine)
    accumulation = gradient_accumulation_steps(config, state.dp)
    if config.precision == "bf16" and config.zero.stage == 0 and (accumulation > 1 or state.dp > 1) and is_logger:
        print(f"warning: zero.stage=0 in bf16 sums the gradients of {accumulation} micro-batches and "
              f"{state.dp} data-parallel replicas in bf16 (DeepSpeed has no float32 accumulation without ZeRO); "
              "zero.stage=1 sums them in float32.", flush=True)

    def readers(progress: Progress, skipped: SkippedSamples):
        """The training batches from where `progress` stands and, when there are any, the validation ones:
        validation resumes where it was too, each evaluation reading the next batches."""
        batches = batch_reader(train_set, progress.consumed_samples, config, state, config.data.num_workers, skipped)
        if valid_set is None:
            return batches, None
        valid_consumed = progress.iteration // config.train.eval_interval * config.train.eval_iters * global_batch
        return batches, batch_reader(valid_set, valid_consumed, config, state, num_workers=0)

    batches, valid_batches = readers(progress, skipped)
    flops = iteration_flops(config.model, global_batch, seq_length, config.train.activation_checkpointing,
                            lm_head=not fine_tuning)
    metrics = MetricsLog(run_dir, config.logging.interval, is_logger, config.logging,
                         OmegaConf.to_container(OmegaConf.structured(config)))
    losses: List[float] = []
    consecutive_skips = 0
    saving = config.checkpoint.dir is not None
    saver = CheckpointSaver(engine, config, state, task, writer)
    saved_iteration = progress.iteration if start.exact else None
    stop = StopSignal()
    guards.start(progress.iteration)
    try:
        iteration = progress.iteration
        while iteration < config.train.iters:
            iteration += 1
            lr = scheduler.get_last_lr()[0]
            optimizer.skipped = False
            batch = global_batch_size_at(progress.consumed_samples, global_batch, config.train.rampup_batch_size)
            if batch != engine.train_batch_size():
                engine.set_train_batch_size(batch)  # more micro-batches per step, same micro-batch size
            guards.step_started()
            started = time.perf_counter()
            loss = train_step(engine, batches, state, batch // (config.train.micro_batch_size * state.dp))
            step_s = time.perf_counter() - started
            guards.step_ended(iteration, step_s)
            losses.append(loss)
            read_from = progress.consumed_samples
            progress.iteration, progress.consumed_samples = iteration, skipped.advance(read_from, batch)
            grad_norm = engine.get_global_grad_norm()
            # DeepSpeed's ZeRO and fp16 optimizers skip an invalid step themselves; ours covers the rest.
            skipped_step = optimizer.skipped or not engine.was_step_applied()
            progress.skipped_iterations += skipped_step
            consecutive_skips = consecutive_skips + 1 if skipped_step else 0
            # collective: SIGTERM anywhere, the slowest rank, and whether an async save is written everywhere
            ranks = exchange_iteration(stop, step_s, saver.written_here(), state.device)
            saver.poll(ranks.all_written)
            metrics.log(iteration, config.train.iters, loss=loss, lr=lr,
                        grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
                        consumed_samples=progress.consumed_samples, step_s=step_s,
                        tokens_per_s=batch * seq_length / step_s,
                        tflops_per_rank=flops * batch / global_batch / step_s / state.world_size / 1e12,
                        skipped=skipped_step, slowest_rank=ranks.slowest_rank,
                        slowest_rank_step_s=ranks.slowest_step_s, median_rank_step_s=ranks.median_step_s)
            spike = guards.spikes.check(loss, skipped_step)
            if spike is not None:
                if config.train.loss_spike.policy == "rollback":
                    saver.finish()  # a save in flight may be the checkpoint to go back to
                rolled_back = handle_spike(engine, config, state, guards, progress, iteration, loss, spike,
                                        [read_from, progress.consumed_samples])
                if rolled_back is not None:  # go on from the checkpoint, past the spike's samples
                    progress, skipped = rolled_back, SkippedSamples(rolled_back.skipped_samples)
                    batches, valid_batches = readers(progress, skipped)
                    iteration = saved_iteration = progress.iteration
                    consecutive_skips = 0
                    continue
            if consecutive_skips >= config.train.max_consecutive_skips:
                raise TrainingDiverged(
                    f"stopped at iteration {iteration}: the last {consecutive_skips} iterations had a non-finite "
                    f"loss or gradient ({progress.skipped_iterations} skipped in all), so the model has diverged. "
                    "Resume from an earlier checkpoint with a lower optim.lr, more sched.warmup_iters or a smaller "
                    "optim.clip_grad; train.max_consecutive_skips sets this limit.")
            if valid_batches is not None and iteration % config.train.eval_interval == 0:
                metrics.log_validation(iteration, validation_loss(engine, valid_batches, state, accumulation,
                                                                  config.train.eval_iters), not fine_tuning)
            if harness is not None and iteration % harness_every == 0:
                metrics.log_harness(iteration, harness.evaluate(engine, iteration))
            if saving and (ranks.stop or iteration % (config.checkpoint.save_interval or math.inf) == 0):
                saver.save(progress)
                saved_iteration = iteration
            if ranks.stop:
                if is_logger:
                    saved = f", checkpoint saved in {config.checkpoint.dir}" if saving else ""
                    print(f"received SIGTERM: stopped cleanly after iteration {iteration} "
                          f"({progress.consumed_samples} samples consumed{saved})", flush=True)
                break
        else:
            if saving and saved_iteration != progress.iteration:  # the end of training is always kept
                saver.save(progress)
        saver.finish()  # the run ends once its last checkpoint is published
        metrics.summary(progress.iteration, config.checkpoint.dir)
    finally:
        stop.restore()
        metrics.close()
    return TrainResult(losses=losses, engine=engine)
