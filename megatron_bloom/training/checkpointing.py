"""Saving and resuming a training run: DeepSpeed's own files, every rank's RNG state, and `mbloom.json`.

A save is collective. Every rank writes into the hidden staging directory of the tag (DeepSpeed: model,
optimizer / ZeRO partitions, LR schedule; we: this rank's RNG state); after a barrier rank 0 publishes it
(`checkpoint/layout.py`, `publish_staged`: fsync, `mbloom.json` with every file's size, rename, then `latest`) and prunes
old ones. A resume at the same tp/pp loads all of it, so the run continues bit for bit; a checkpoint of
another layout, or a weights-only one (from-hf), starts from its weights only. A run of another task (a
fine-tuning run from a pre-training checkpoint) starts from the trunk's weights at iteration 0, its own
head newly initialized.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state

from megatron_bloom.checkpoint.deepspeed_optimizer import MASTER, MOMENTS, STATE_KEYS
from megatron_bloom.checkpoint.layout import (
    TRAINING,
    UNIVERSAL,
    CheckpointMetadata,
    check_same_shape,
    newest_complete_checkpoint,
    prune_checkpoints,
    publish_staged,
    read_metadata,
    resolve_checkpoint,
    staging_dir,
    tag_for,
)
from megatron_bloom.checkpoint.safe_load import load_checkpoint_file
from megatron_bloom.checkpoint.universal import StateTensors, read_rank_states
from megatron_bloom.checkpoint.weights import load_model_state_dict
from megatron_bloom.config import TrainConfig
from megatron_bloom.errors import UserError
from megatron_bloom.fence.deepspeed import (
    fp32_masters_by_parameter,
    wrap_checkpoint_engine,
    has_fragment_mapping,
    low_precision_groups,
    torch_optimizer,
    zero3_flat_partitions,
)
from megatron_bloom.model import TaskConfig
from megatron_bloom.parallel import ParallelState
from megatron_bloom.parallel.distributed import decided_on_rank_zero
from megatron_bloom.parallel.sharding import shard_tensor
from megatron_bloom.pipeline.names import named_model_parameters
from megatron_bloom.pipeline.partition import stage_layers
from megatron_bloom.training.async_checkpoint import AsyncCheckpointWrites, CheckpointWriter


@dataclass
class Progress:
    """Where a run stands; saved in `mbloom.json` and restored on resume."""

    iteration: int = 0
    consumed_samples: int = 0  # the position in the training stream, skipped samples included
    skipped_iterations: int = 0
    skipped_samples: List[List[int]] = field(default_factory=list)  # data/skips.py's ranges, all of them

    @classmethod
    def of(cls, metadata: CheckpointMetadata) -> "Progress":
        return cls(metadata.iteration, metadata.consumed_samples, metadata.skipped_iterations,
                   list(metadata.skipped_samples))


def rng_file(rank: int) -> str:
    return f"rng_state_{rank:05d}.pt"


@dataclass
class PendingSave:
    """A checkpoint whose files are being written into its staging directory; rank 0 publishes it."""

    root: Path
    tag: str
    metadata: CheckpointMetadata
    tokenizer: Optional[Path]
    started: float


def stage_training_checkpoint(engine, config: TrainConfig, state: ParallelState, progress: Progress,
                              task: Optional[TaskConfig] = None) -> PendingSave:
    """Collective: every rank hands its files to DeepSpeed's checkpoint engine (which writes them, or with
    `checkpoint.async_save` queues them) in the staging directory of the tag."""
    started = time.perf_counter()
    root, tag = Path(config.checkpoint.dir), tag_for(progress.iteration)
    staging = staging_dir(root, tag)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # an earlier save of this tag was cut off
            prune_checkpoints(root, keep_last=None)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=staging.name, save_latest=False)
    staging.mkdir(parents=True, exist_ok=True)  # DeepSpeed made it only on the ranks that wrote files
    rng_path = staging / rng_file(rank)
    if isinstance(engine.checkpoint_engine, AsyncCheckpointWrites):  # in the same queue as DeepSpeed's files
        engine.checkpoint_engine.writer.submit(_rng_states(), str(rng_path))
    else:
        torch.save(_rng_states(), rng_path)
    metadata = CheckpointMetadata(
        model=config.model, task=task or TaskConfig(), tp=state.tp, pp=state.pp, dp=state.dp,
        pipeline_partition=config.parallel.pipeline_partition, contents=TRAINING,
        zero_stage=config.zero.stage, precision=config.precision, iteration=progress.iteration,
        consumed_samples=progress.consumed_samples, skipped_iterations=progress.skipped_iterations,
        skipped_samples=list(progress.skipped_samples), data_loader={
            "consumed_samples": progress.consumed_samples, "seed": config.train.seed,
            "global_batch_size": config.train.global_batch_size})
    return PendingSave(root, tag, metadata, Path(config.data.tokenizer) if config.data.tokenizer else None,
                       started)


def publish_pending(pending: PendingSave, keep_last: Optional[int]) -> None:
    """Rank 0, once every rank's files are written: `mbloom.json`, the rename, `latest`, then pruning."""
    publish_staged(pending.root, pending.tag, pending.metadata, pending.tokenizer)
    prune_checkpoints(pending.root, keep_last)
    print(f"saved checkpoint {pending.root / pending.tag} ({sum(pending.metadata.files.values()) / 2**20:.1f} MB, "
          f"{time.perf_counter() - pending.started:.1f} s)", flush=True)


def save_training_checkpoint(engine, config: TrainConfig, state: ParallelState, progress: Progress,
                             task: Optional[TaskConfig] = None) -> Path:
    """Collective and synchronous: every rank calls it after the same iteration (`task`: the head trained,
    default the language model's). Returns the published checkpoint dir."""
    pending = stage_training_checkpoint(engine, config, state, progress, task)
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        publish_pending(pending, config.checkpoint.keep_last)
    dist.barrier()  # nobody moves on (or exits) before the checkpoint is published
    return pending.root / pending.tag


def start_writer(config: TrainConfig) -> Optional[CheckpointWriter]:
    """With `checkpoint.async_save`, the rank's writer process; call it before the model is built."""
    if config.checkpoint.async_save and config.checkpoint.dir is not None:
        return CheckpointWriter()
    return None


class CheckpointSaver:
    """The saves of one run: synchronous, or with `checkpoint.async_save` written in the background while
    training goes on, at most one in flight, published once every rank has written its files (`poll`,
    with the flags every rank exchanges each iteration)."""

    def __init__(self, engine, config: TrainConfig, state: ParallelState, task: Optional[TaskConfig],
                 writer: Optional[CheckpointWriter] = None) -> None:
        """`writer`: with `checkpoint.async_save`, the rank's writer process (`start_writer`)."""
        self.engine, self.config, self.state, self.task = engine, config, state, task
        self.pending: Optional[PendingSave] = None
        self.writer = writer
        if writer is not None:
            wrap_checkpoint_engine(engine, lambda wrapped: AsyncCheckpointWrites(wrapped, writer))

    def save(self, progress: Progress) -> None:
        if self.writer is None:
            save_training_checkpoint(self.engine, self.config, self.state, progress, self.task)
            return
        self.finish()  # at most one save in flight
        self.pending = stage_training_checkpoint(self.engine, self.config, self.state, progress, self.task)

    def written_here(self) -> bool:
        """This rank has nothing left to write."""
        return self.pending is None or self.writer.written()

    def poll(self, written_everywhere: bool) -> None:
        """After each iteration's exchange: publish the save in flight once every rank has written it."""
        if self.pending is not None and written_everywhere:
            if dist.get_rank() == 0:
                publish_pending(self.pending, self.config.checkpoint.keep_last)
            self.pending = None

    def finish(self) -> None:
        """Collective: wait for the save in flight (every rank's files) and publish it."""
        if self.pending is None:
            return
        self.writer.wait()
        dist.barrier()
        if dist.get_rank() == 0:
            publish_pending(self.pending, self.config.checkpoint.keep_last)
        dist.barrier()
        self.pending = None


def checkpoint_to_load(config: TrainConfig) -> Optional[Path]:
    """The checkpoint dir `checkpoint.load` names: None (fresh start), `auto` (the newest complete one in
    `checkpoint.dir`, or a fresh start when there is none yet), or a root / tag dir."""
    load = config.checkpoint.load
    if load is None:
        return None
    if load == "auto":
        root = Path(config.checkpoint.dir)
        found = newest_complete_checkpoint(root) if root.is_dir() else None
        if found is None:
            print(f"checkpoint.load=auto: no complete checkpoint in {root} yet, starting from scratch", flush=True)
        return found
    return resolve_checkpoint(Path(load))


@dataclass
class StartPoint:
    """What a run starts from: nothing, a checkpoint's weights only, or a whole training checkpoint."""

    directory: Optional[Path] = None
    metadata: Optional[CheckpointMetadata] = None
    exact: bool = False  # DeepSpeed loads everything (same layout): the run continues bit for bit
    new_head: bool = False  # the checkpoint is of another task: its trunk starts this run, the head is new

    @property
    def weights_only(self) -> Optional[Path]:
        return self.directory if self.directory is not None and not self.exact and not self.universal else None

    @property
    def universal(self) -> bool:
        """A reshaped checkpoint (of this run's task): weights and per-parameter optimizer state, loaded
        into any layout."""
        return self.metadata is not None and self.metadata.contents == UNIVERSAL and not self.new_head

    def progress(self) -> Progress:
        """A start from a training checkpoint of another layout, or from a reshaped one, continues its
        iteration count and data position (its LR schedule too); from converted weights, or for another
        task (fine-tuning a pre-trained model), a run starts at iteration 0."""
        if self.metadata is None or self.metadata.contents not in (TRAINING, UNIVERSAL) or self.new_head:
            return Progress()
        return Progress.of(self.metadata)


def start_point(config: TrainConfig, state: ParallelState) -> StartPoint:
    """Rank 0 chooses the checkpoint (and warns about any it passes over); every rank loads that one."""
    directory = decided_on_rank_zero(lambda: checkpoint_to_load(config))
    if directory is None:
        return StartPoint()
    metadata = read_metadata(directory)
    check_same_shape(metadata, config.model, directory)
    new_head = metadata.task.name != config.task.name
    exact = resumes_exactly(metadata, config, state)
    if metadata.contents == TRAINING and not exact and not new_head and dist.get_rank() == 0:
        print(f"warning: {directory} was trained at tp={metadata.tp} pp={metadata.pp} dp={metadata.dp} "
              f"zero.stage={metadata.zero_stage} precision={metadata.precision} (pipeline stages split by "
              f"{metadata.pipeline_partition}); this run differs, so it starts "
              "from the weights only: the iteration count, data position and LR schedule continue, the "
              "optimizer state starts fresh. To keep the optimizer state, convert it first: mbloom-convert "
              "reshape --checkpoint CKPT --output NEW --tp N --pp N, then load NEW.", file=sys.stderr, flush=True)
    return StartPoint(directory, metadata, exact, new_head)


def resumes_exactly(metadata: CheckpointMetadata, config: TrainConfig, state: ParallelState) -> bool:
    """Whether DeepSpeed can load everything: a training checkpoint of this task, tp/pp, pipeline split,
    ZeRO stage and precision (and dp when ZeRO partitions the optimizer state)."""
    same_dp = metadata.dp == state.dp or config.zero.stage == 0
    return (metadata.contents == TRAINING and metadata.task.name == config.task.name
            and (metadata.tp, metadata.pp) == (state.tp, state.pp) and same_dp and same_stages(metadata, config)
            and metadata.zero_stage == config.zero.stage and metadata.precision == config.precision)


def same_stages(metadata: CheckpointMetadata, config: TrainConfig) -> bool:
    """Whether the run's pipeline stages hold the layers the checkpoint's did (its per-stage optimizer
    files hold those layers' state)."""
    pp = config.parallel.pp
    if pp == 1:
        return True
    saved = stage_layers(metadata.model, pp, metadata.task.name, metadata.pipeline_partition)
    return saved == stage_layers(config.model, pp, config.task.name, config.parallel.pipeline_partition)


def load_weights_only(model: nn.Module, directory: Path, state: ParallelState, new_head: bool = False) -> None:
    """Copy a checkpoint's weights (any layout) into this rank's layers, before DeepSpeed takes the model:
    its fp32 master copies are made from them. With `new_head` only the trunk's: the head keeps its
    initial values (and the checkpoint's own head, if any, is left out)."""
    metadata, full = load_model_state_dict(directory)
    with torch.no_grad():
        for name, param in named_model_parameters(model):
            if new_head and not name.startswith("transformer."):
                continue
            if name not in full:
                raise UserError(f"checkpoint {directory} has no weight {name}.")
            local = shard_tensor(name, full[name], metadata.model, state.tp, state.tp_rank)
            param.copy_(local.to(param.dtype))


def load_universal_weights(model: nn.Module, directory: Path, metadata: CheckpointMetadata,
                           state: ParallelState) -> Tuple[StateTensors, int]:
    """Before DeepSpeed takes the model: set this rank's weights from a reshaped checkpoint's fp32 masters
    (so DeepSpeed's low-precision copies are what they were in the original run) and return this rank's
    optimizer state for `restore_optimizer_state`, with Adam's step count."""
    parameters = dict(named_model_parameters(model))
    states, step = read_rank_states(directory, metadata, parameters, state.tp, state.tp_rank)
    with torch.no_grad():
        for name, param in parameters.items():
            param.copy_(states[MASTER][name].to(param.dtype))
    return states, step


def restore_optimizer_state(engine, states: StateTensors, step: int) -> None:
    """After `deepspeed.initialize`: put every parameter's fp32 master and Adam moments into the engine's
    optimizer, whatever its kind: ZeRO 1-3 and DeepSpeed's BF16 optimizer through DeepSpeed's
    `safe_set_full_*` API (each rank keeps its partition), the torch optimizer itself without ZeRO."""
    wrapper = engine.optimizer
    base = torch_optimizer(wrapper)
    _link_flat_states(wrapper, base)
    fp32_copies = fp32_masters_by_parameter(wrapper)  # DeepSpeed's fp16/bf16 wrapper without ZeRO
    for name, param in named_model_parameters(engine.module):
        values = {key: states[key][name].to(device=param.device, dtype=torch.float32) for key in STATE_KEYS}
        if has_fragment_mapping(param):
            safe_set_full_fp32_param(param, values[MASTER])
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, values[key], key)
            continue
        master = fp32_copies.get(id(param), param)
        with torch.no_grad():
            master.copy_(values[MASTER])
        base.state[master].update({key: values[key].clone() for key in MOMENTS})
        base.state[master].setdefault("step", torch.zeros((), dtype=torch.float32,
                                                          device=_scalar_device(base, master)))
    for adam in base.state.values():
        if torch.is_tensor(adam.get("step")):
            adam["step"].fill_(step)
        elif "step" in adam:
            adam["step"] = step


def _link_flat_states(wrapper, base: torch.optim.Optimizer) -> None:
    """Torch's Adam creates its state at the first step (under ZeRO 1-3 and the BF16 optimizer: one flat
    tensor per partition of a group), and ZeRO 1/2 only then let parameters reach their fragments of it;
    create it now, zeroed, so that it can be filled before any step."""
    flats = [p for group in base.param_groups for p in group["params"]]
    flats += zero3_flat_partitions(wrapper)  # ZeRO 3 hands them to Adam one at a time
    for flat in flats:
        if not base.state[flat]:
            base.state[flat].update(exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat),
                                    step=torch.zeros((), dtype=torch.float32, device=_scalar_device(base, flat)))
    for params, group in zip(low_precision_groups(wrapper), base.param_groups):
        lazy_init_hp_params_optimizer_state(params, group["params"][0], base.state)


def _scalar_device(optimizer: torch.optim.Optimizer, param: torch.Tensor):
    """Where torch's Adam keeps its step count: with the parameter when fused or capturable."""
    fused = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return param.device if fused else torch.device("cpu")


def resume(engine, directory: Path, metadata: CheckpointMetadata, state: ParallelState) -> Progress:
    """Load everything DeepSpeed saved (weights, optimizer, ZeRO partitions, LR schedule) and this rank's
    RNG state; returns the saved progress."""
    load_path, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {directory}.")
    rng = directory / rng_file(dist.get_rank())
    if rng.is_file():
        _set_rng_states(_read_rng_states(rng))
    elif dist.get_rank() == 0:
        print(f"warning: {directory} has no RNG state for rank {dist.get_rank()}; dropout masks will differ "
              "from the original run", file=sys.stderr, flush=True)
    return Progress.of(metadata)


def _rng_states() -> Dict[str, object]:
    """Every generator's state as tensors and plain numbers, so that the file reads back with
    weights_only=True (checkpoint/safe_load.py)."""
    version, python_state, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    states = {"python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
              "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                        "pos": numpy_state["state"]["pos"], "has_gauss": numpy_state["has_gauss"],
                        "gauss": numpy_state["gauss"]},
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


# RNG files of earlier versions pickled Python's and NumPy's states as they are: NumPy arrays, read safely
# with NumPy's array reconstruction allowed (the recipe torch documents for weights_only loads).
_RECONSTRUCT = getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct
_NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),  # files of NumPy 2 and of NumPy 1
                        (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
                        (_RECONSTRUCT, "numpy.core.multiarray._reconstruct")]


def _read_rng_states(path: Path) -> Dict[str, object]:
    return load_checkpoint_file(path, allowed=_NUMPY_ARRAY_GLOBALS)


def _set_rng_states(states: Dict[str, object]) -> None:
    python, numpy_state = states["python"], states["numpy"]
    if isinstance(python, dict):
        random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
        np.random.set_state({"bit_generator": "MT19937",
                             "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                             "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    else:  # an earlier version's file: the states as `random` and NumPy return them
        random.setstate(python)
        np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])

