"""Typed configuration of a run: one dataclass per config section, composed by Hydra from `configs/`.

The YAML files under `configs/` only set values; these classes define which keys exist and their types
(Hydra rejects an unknown key or a wrongly typed value), and their `__post_init__` checks the values.
Library code receives these objects, never a `DictConfig`. The string under each field is its
documentation: docs/configuration.md is generated from it (`config/reference.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from megatron_bloom.errors import ConfigError
from megatron_bloom.model.config import TASKS, ModelConfig

PRECISIONS = ("fp32", "bf16", "fp16")
HARDWARE_NAMES = ("a100-80gb", "h100-80gb", "h200", "cpu")  # the presets of megatron_bloom/planner/hardware.py
DECAY_STYLES = ("cosine", "linear", "constant")
WANDB_MODES = ("disabled", "offline", "online")
LAUNCHERS = ("local", "deepspeed", "slurm")
# How pipeline stages split the layers (megatron_bloom/pipeline/partition.py): balanced by each layer's
# training FLOPs (the LM head counted), or by transformer blocks alone (DeepSpeed's `type:` method)
PIPELINE_PARTITIONS = ("flops", "blocks")
SPIKE_POLICIES = ("off", "log", "rollback")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}.")


def check_rampup(rampup: Optional[List[int]], global_batch_size: int, micro_batch_size: int,
                 dp: Optional[int]) -> Optional[str]:
    """Why `train.rampup_batch_size` does not fit the batch sizes (None when it does)."""
    if not rampup:
        return None
    if len(rampup) != 3 or any(not isinstance(v, int) or v <= 0 for v in rampup):
        return f"train.rampup_batch_size must be three positive integers [start, increment, samples], got {rampup}"
    start, increment, _ = rampup
    if start >= global_batch_size or (global_batch_size - start) % increment:
        return (f"train.rampup_batch_size {list(rampup)}: the start ({start}) must be below "
                f"train.global_batch_size ({global_batch_size}) and reach it in whole increments of {increment}")
    unit = micro_batch_size * (dp or 1)
    if start % unit or increment % unit:
        return (f"train.rampup_batch_size {list(rampup)}: start and increment must be multiples of "
                f"train.micro_batch_size x parallel.dp ({unit}), so every step has whole micro-batches")
    return None


def check_skip_range(span: Any) -> None:
    """One [start, end] pair of `train.skip_samples`."""
    if (not isinstance(span, (list, tuple)) or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in span) or span[0] >= span[1]):
        raise ConfigError(f"train.skip_samples takes [start, end] pairs of sample positions with 0 <= start < end "
                          f"(end not included); got {span!r}.")


def _check_positive(section: str, obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key} must be positive, got {value!r}.")


@dataclass
class ParallelConfig:
    """tp x pp x dp = world size; ranks are ordered tp fastest, then dp, then pp (Megatron-DeepSpeed)."""

    tp: int = 1
    """Tensor-parallel ranks: each holds 1/tp of every weight matrix and whole attention heads (Megatron-LM)."""
    pp: int = 1
    """Pipeline stages (DeepSpeed's pipeline engine, 1F1B schedule, the embedding tied between the ends)."""
    dp: Optional[int] = None
    """Data-parallel replicas; null: the world size / (tp x pp)."""
    sequence_parallel: bool = False
    """Shard LayerNorm and dropout activations along the sequence over the tp ranks (needs tp > 1)."""
    pipeline_partition: str = "flops"
    """How pp stages split the layers: `flops` (balanced by training FLOPs, the LM head counted) or `blocks`
    (the same number of transformer blocks per stage)."""
    shared_memory_timeout_s: float = 600.0
    """CPU ranks of one host all-reduce through shared memory: how long one waits for a live peer before it
    fails naming that rank. A peer that has exited is named within 0.1 s whatever this is."""

    def __post_init__(self) -> None:
        _check_positive("parallel", self, "tp", "pp", "dp", "shared_memory_timeout_s")
        _check_choice("parallel.pipeline_partition", self.pipeline_partition, PIPELINE_PARTITIONS)


@dataclass
class ZeroConfig:
    stage: int = 1
    """ZeRO stage 0-3 of DeepSpeed's optimizer (BLOOM-176B trained with 1); with pp > 1 only 0 or 1."""

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero.stage must be 0, 1, 2 or 3; got {self.stage!r}.")


@dataclass
class HarnessConfig:
    """EleutherAI's lm-evaluation-harness on the checkpoint, at the run's layout (inference/harness.py)."""

    tasks: List[str] = field(default_factory=list)
    """lm-eval tasks, groups or tags to run: its own registry's, eval.harness.include_path's, or the project's
    (tasks/: mbloom_choice, mbloom_cloze, mbloom_perplexity, mbloom_generate; the tag mbloom runs the four);
    empty: none (mbloom-eval then computes the loss on eval.input)."""
    include_path: Optional[str] = None
    """A directory of lm-eval task YAML files, searched besides lm-eval's registry and the project's tasks."""
    num_fewshot: Optional[int] = None
    """Examples shown before each question; null: each task's own."""
    limit: Optional[int] = None
    """At most this many examples of each task; null: all."""
    batch_size: int = 16
    """Requests per forward pass."""
    max_length: Optional[int] = None
    """Tokens a request may have (a longer one loses its oldest context tokens); null: model.seq_length."""
    max_gen_toks: int = 256
    """New tokens of a generation whose task does not set max_gen_toks."""
    log_samples: bool = False
    """Also keep every request and response in lm-eval's results file (mbloom-eval: run.dir/harness_results.json;
    training: run.dir/harness/iter_NNNNNNN.json)."""

    def __post_init__(self) -> None:
        _check_positive("eval.harness", self, "limit", "batch_size", "max_length", "max_gen_toks")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"eval.harness.num_fewshot must be 0 or more, got {self.num_fewshot!r}.")


@dataclass
class TrainHarnessConfig(HarnessConfig):
    """lm-evaluation-harness tasks on the live model during training, at the training layout."""

    interval: Optional[int] = None
    """Iterations between harness evaluations (written to run.dir/validation.jsonl); null: train.eval_interval."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("train.eval_harness", self, "interval")


@dataclass
class LossSpikeConfig:
    """A loss spike: an iteration's loss more than `sigmas` standard deviations above the mean of the previous
    `window` iterations' losses, or `skipped_steps` non-finite steps in a row (training/spikes.py)."""

    policy: str = "log"
    """`off`, `log` (record each spike in run.dir/events.jsonl) or `rollback`: also reload the newest checkpoint
    from before the spike, skip the samples the spike was trained on, and go on (as BLOOM and OPT did by hand)."""
    window: int = 50
    """Iterations of running statistics; spikes are looked for once 10 of them are in."""
    sigmas: float = 6.0
    """How far above the window's mean, in its standard deviations (at least 1% of the mean), a spike is."""
    skipped_steps: int = 3
    """Non-finite steps in a row that count as a spike (train.max_consecutive_skips still stops a run)."""
    max_rollbacks: int = 5
    """Rollbacks one run may make; one more spike stops it (a run that keeps spiking needs a person)."""

    def __post_init__(self) -> None:
        _check_choice("train.loss_spike.policy", self.policy, SPIKE_POLICIES)
        _check_positive("train.loss_spike", self, "window", "sigmas", "skipped_steps", "max_rollbacks")


@dataclass
class WatchdogConfig:
    """A rank's training step that takes far longer than its recent ones is a hang (training/watchdog.py)."""

    enabled: bool = True
    """Watch every rank's steps; on a hang, dump every live rank's Python stack to run.dir/hangs/ and fail the
    job (so that launcher.max_restarts restarts it)."""
    factor: float = 10.0
    """A step is hung after this many times the median of the rank's last 20 steps ..."""
    min_s: float = 300.0
    """... and never sooner than this many seconds."""
    first_steps_s: float = 1800.0
    """The limit for the first 5 steps of a run (start-up, compilation), before there is a median."""
    heartbeat_s: float = 5.0
    """How often each rank records that it is alive (run.dir/heartbeats/); a rank silent for 3 of these is
    named as stopped."""

    def __post_init__(self) -> None:
        _check_positive("train.watchdog", self, "factor", "min_s", "first_steps_s", "heartbeat_s")


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    """Samples per forward and backward pass on one rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all replicas (micro-batch x accumulated micro-batches x dp)."""
    iters: int = 1000
    """Optimizer steps to train for."""
    seed: int = 1234
    """Seed of the initial weights, data order and dropout; the same for any layout."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass instead of keeping its activations."""
    compile: bool = False
    """Put each transformer block through torch.compile (fused LayerNorms, residuals, GeLU); for GPUs."""
    eval_interval: Optional[int] = None
    """Iterations between validation passes (written to `run.dir/validation.jsonl`); null: none."""
    eval_iters: int = 10
    """Global batches of the validation split per validation pass."""
    max_consecutive_skips: int = 10
    """A step with a NaN/inf loss or gradient is skipped; this many in a row stop the run as diverged."""
    rampup_batch_size: Optional[List[int]] = None
    """[start, increment, samples]: grow the global batch from start by increment over that many samples
    (Megatron-LM's --rampup-batch-size); null: constant."""
    skip_samples: Optional[List[List[int]]] = None
    """[[start, end], ...]: sample positions of the training data (consumed_samples, end excluded) never
    trained on; batches take the samples after them (Megatron-LM's --skip-train-iteration-range, in samples)."""
    eval_harness: TrainHarnessConfig = field(default_factory=TrainHarnessConfig)
    loss_spike: LossSpikeConfig = field(default_factory=LossSpikeConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)

    def __post_init__(self) -> None:
        _check_positive("train", self, "micro_batch_size", "global_batch_size", "iters", "eval_interval",
                        "eval_iters", "max_consecutive_skips")
        for span in self.skip_samples or ():
            check_skip_range(span)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})."
            )
        problem = check_rampup(self.rampup_batch_size, self.global_batch_size, self.micro_batch_size, None)
        if problem:
            raise ConfigError(problem + ".")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay (Loshchilov & Hutter 2019); BLOOM used beta2 = 0.95."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of the warmup."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the matrices (biases and LayerNorm weights are not decayed)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.95
    """Adam's second-moment decay."""
    eps: float = 1e-8
    """Adam's epsilon."""

    def __post_init__(self) -> None:
        _check_positive("optim", self, "lr", "eps")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr ({self.min_lr}) must be between 0 and optim.lr ({self.lr}).")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ConfigError(
                f"optim.weight_decay ({self.weight_decay}) and optim.clip_grad ({self.clip_grad}) must not be "
                "negative (clip_grad 0 turns clipping off)."
            )
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(self, key)!r}.")


@dataclass
class SchedConfig:
    warmup_iters: int = 0
    """Iterations of linear warmup from 0 to optim.lr."""
    decay_style: str = "cosine"
    """How the learning rate falls to optim.min_lr after the warmup: `cosine`, `linear` or `constant`."""
    decay_iters: Optional[int] = None
    """Iterations the decay takes, counted from the start; null: train.iters."""

    def __post_init__(self) -> None:
        _check_choice("sched.decay_style", self.decay_style, DECAY_STYLES)
        if self.warmup_iters < 0:
            raise ConfigError(f"sched.warmup_iters must not be negative, got {self.warmup_iters}.")
        _check_positive("sched", self, "decay_iters")


@dataclass
class DataConfig:
    paths: List[Any] = field(default_factory=list)
    """Token shards, a Megatron-style blend `[w1, prefix1, w2, prefix2, ...]` or `[prefix]`: each prefix names
    an MMIDIDX `prefix.bin` + `prefix.idx` pair."""
    tokenizer: Optional[str] = None
    """The shards' tokenizer (a tokenizer.json or its directory): checked against model.vocab_size before
    the start, and copied into every checkpoint the run saves."""
    split: str = "969,30,1"
    """Train, validation and test weights: each shard's documents are split in these proportions."""
    cache_dir: Optional[str] = None
    """Where the shuffled sample indices are cached; null: `index-cache/` next to the first shard."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    temperature: Optional[float] = None
    """Blend the shards of data.paths (prefixes only) with weights proportional to size^(1/temperature),
    BLOOM's language sampling; null: the weights given in data.paths."""

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"data.temperature must be positive, got {self.temperature}.")
        parts = [p.strip() for p in str(self.split).split(",")]
        if not 1 <= len(parts) <= 3 or not all(p.replace(".", "", 1).isdigit() for p in parts) or \
                sum(float(p) for p in parts) <= 0:
            raise ConfigError(
                f"data.split must be up to three non-negative weights such as \"969,30,1\" "
                f"(train, validation, test); got {self.split!r}."
            )


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Where the run saves checkpoints (`<dir>/global_step<N>/`, `<dir>/latest`); null: no checkpoints."""
    save_interval: Optional[int] = None
    """Iterations between saves; a run also saves at its end and on SIGTERM when checkpoint.dir is set."""
    load: Optional[str] = None
    """What to start from: a checkpoint (a checkpoint.dir root, whose latest complete one is used, or one
    `global_step<N>/` dir), `auto` (the newest complete one in checkpoint.dir, if any), or null."""
    keep_last: Optional[int] = None
    """Keep only the newest this many checkpoints; null: keep every one."""
    async_save: bool = False
    """Copy the state to host memory and write it from a background process while training goes on (one
    save in flight at a time); `latest` names it only once every rank's files are complete, as a synchronous
    save. Costs a host copy of each rank's checkpoint files in RAM."""

    def __post_init__(self) -> None:
        _check_positive("checkpoint", self, "save_interval", "keep_last")
        if self.load == "auto" and not self.dir:
            raise ConfigError("checkpoint.load=auto needs checkpoint.dir, the directory to resume from.")
        if (self.save_interval or self.keep_last) and not self.dir:
            raise ConfigError("checkpoint.save_interval and checkpoint.keep_last need checkpoint.dir, where "
                              "checkpoints are written.")


@dataclass
class RunConfig:
    dir: str = "runs/${now:%Y-%m-%d_%H-%M-%S}"
    """Everything a run writes that is not a checkpoint: config.yaml, metrics.jsonl, validation.jsonl, logs."""


@dataclass
class WandbConfig:
    mode: str = "disabled"
    """Weights & Biases logging: `disabled`, `offline` (no network; files under run.dir/wandb) or `online`."""
    project: str = "megatron_bloom"
    """The wandb project."""
    name: Optional[str] = None
    """The wandb run name; null: wandb's own."""

    def __post_init__(self) -> None:
        _check_choice("logging.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class LoggingConfig:
    interval: int = 10
    """Iterations per line of metrics.jsonl and of the console (1: every iteration)."""
    verbose: bool = False
    """Show DeepSpeed's own start-up output on every rank (comm op builds, seeds, topology, memory reports)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    """Write TensorBoard event files under run.dir/tensorboard."""

    def __post_init__(self) -> None:
        _check_positive("logging", self, "interval")


@dataclass
class LauncherConfig:
    name: str = "local"
    """How mbloom-launch starts the ranks: `local` (torchrun here), `deepspeed` (its launcher) or `slurm`
    (an sbatch script, submitted); chosen with `launcher=NAME`."""
    nproc_per_node: Optional[int] = None
    """Ranks per node; null: tp x pp x dp, divided over slurm.nodes."""
    max_restarts: int = 0
    """Restart the job's ranks up to this many times after one dies or hangs (torchrun's elastic restarts, in a
    SLURM job too); each restart resumes from the newest complete checkpoint of checkpoint.dir."""

    def __post_init__(self) -> None:
        _check_choice("launcher", self.name, LAUNCHERS)
        _check_positive("launcher", self, "nproc_per_node")
        if self.max_restarts < 0:
            raise ConfigError(f"launcher.max_restarts must be 0 or more, got {self.max_restarts!r}.")


@dataclass
class SlurmConfig:
    nodes: int = 1
    """Nodes of the SLURM job (`#SBATCH --nodes`)."""
    partition: Optional[str] = None
    """`#SBATCH --partition`; null: the cluster's default."""
    time: str = "01:00:00"
    """`#SBATCH --time`: the job's time limit; the run saves and requeues 180 s before it."""
    account: Optional[str] = None
    """`#SBATCH --account`; null: none."""
    gpus_per_node: Optional[int] = None
    """`#SBATCH --gpus-per-node`; null: none requested."""
    cpus_per_task: Optional[int] = None
    """`#SBATCH --cpus-per-task`; null: the cluster's default."""

    def __post_init__(self) -> None:
        _check_positive("slurm", self, "nodes", "gpus_per_node", "cpus_per_task")


@dataclass
class EvalConfig:
    input: Optional[str] = None
    """mbloom-eval's jsonl file: `{"text": ...}` lines, or a fine-tuning task's format."""
    tokenizer: Optional[str] = None
    """The tokenizer of mbloom-eval and mbloom-generate (a tokenizer.json or its directory); null: the copy the
    checkpoint keeps. One whose vocabulary differs from the checkpoint's is refused (see force_tokenizer)."""
    force_tokenizer: bool = False
    """Use eval.tokenizer even though its vocabulary differs from the tokenizer the checkpoint keeps."""
    seq_length: Optional[int] = None
    """Tokens mbloom-eval keeps of each document; null: model.seq_length."""
    micro_batch_size: int = 1
    """Documents (or task examples) per forward pass in mbloom-eval."""
    harness: HarnessConfig = field(default_factory=HarnessConfig)

    def __post_init__(self) -> None:
        _check_positive("eval", self, "seq_length", "micro_batch_size")


@dataclass
class GenerateConfig:
    prompt: Optional[str] = None
    """One prompt (or generate.input): on mbloom-generate's command line, any text as it is."""
    input: Optional[str] = None
    """A jsonl file of `{"prompt": ...}` lines (or generate.prompt)."""
    batch_size: int = 1
    """Prompts generated together (left-padded)."""
    max_new_tokens: int = 32
    """Tokens generated per prompt at most (a sequence also stops at EOS)."""
    do_sample: bool = False
    """Sample the next token instead of taking the most likely one."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0: all."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    seed: int = 1234
    """Seed of sampling (with each prompt's index): the same tokens at any layout and batch size."""
    stream: bool = False
    """Also print the completions while they grow, as `{"index": i, "text": piece}` lines."""
    quantize: Optional[str] = None
    """`int8`: int8 weights with one scale per output channel (CPU, tp 1); null: the run's precision."""
    compile: bool = False
    """Run the one-token decoding steps through torch.compile (tp 1, pp 1): compiled once, then faster."""
    micro_batches: Optional[int] = None
    """At pp > 1, each batch is decoded as this many micro-batches that take turns through the stages, so
    that every stage is busy at once; null: parallel.pp (1: one stage at a time)."""

    def __post_init__(self) -> None:
        _check_positive("generate", self, "batch_size", "max_new_tokens", "temperature", "micro_batches")
        if self.quantize is not None:
            _check_choice("generate.quantize", self.quantize, ("int8",))
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ConfigError(
                f"generate.top_p must be in (0, 1] and generate.top_k >= 0; got {self.top_p} and {self.top_k}."
            )


@dataclass
class TaskRunConfig:
    """What a run does with the model's head (`task=NAME` picks `configs/task/NAME.yaml`): pre-training
    (causal_lm) or one of the fine-tuning tasks, with its data handling (megatron_bloom/tasks)."""

    name: str = "causal_lm"
    """`causal_lm` (pre-training), `sequence_classification`, `token_classification` or
    `question_answering`; chosen with `task=NAME`."""
    train: Optional[str] = None
    """Fine-tuning: the task's training jsonl."""
    valid: Optional[str] = None
    """Fine-tuning: its validation jsonl (validation loss every train.eval_interval)."""
    labels: Optional[List[str]] = None
    """Label (or tag) names in index order; null: the checkpoint's, else the training data's, sorted."""
    max_length: int = 128
    """Tokens per example (right-padded); question answering: question and context window together."""
    stride: int = 32
    """Question answering: tokens shared by consecutive windows of a long context."""
    max_answer_tokens: int = 30
    """Question answering: the longest answer span a prediction may be."""

    def __post_init__(self) -> None:
        _check_choice("task.name", self.name, TASKS)
        _check_positive("task", self, "max_length", "stride", "max_answer_tokens")


@dataclass
class ClusterConfig:
    """The machines `mbloom-plan --search` chooses a layout for."""

    gpus: Optional[int] = None
    """Accelerators in all; the layouts searched use them all (tp x pp x dp)."""
    gpus_per_node: int = 8
    """Accelerators per node: tensor parallelism stays within one."""

    def __post_init__(self) -> None:
        _check_positive("cluster", self, "gpus", "gpus_per_node")


@dataclass
class TrainConfig:
    """The root config (`configs/train.yaml`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: str = "bf16"
    """`fp32`, `bf16` or `fp16` weights and activations (the optimizer keeps fp32 masters in 16-bit runs)."""
    train: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    task: TaskRunConfig = field(default_factory=TaskRunConfig)
    hardware: str = "a100-80gb"
    """What mbloom-plan compares memory and FLOPs against and predicts time on: `a100-80gb`, `h100-80gb`, `h200`,
    `cpu` (this machine's GEMM peak, measured; no prediction), or a hardware file's path (`mbloom-plan
    --calibrate --output FILE`)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        if self.hardware not in HARDWARE_NAMES and not os.path.isfile(str(self.hardware)):
            raise ConfigError(f"hardware must be one of {', '.join(HARDWARE_NAMES)} or the path of a hardware "
                              f"file (mbloom-plan --calibrate --output FILE); got {self.hardware!r}, which is "
                              "neither a preset nor an existing file.")
        self.check_layout()

    @property
    def fine_tuning(self) -> bool:
        """A task head is trained (`task=NAME`), not the language model."""
        return self.task.name != "causal_lm"

    @property
    def sample_length(self) -> int:
        """Tokens per training sample: the model's seq_length, or task.max_length when fine-tuning."""
        return self.task.max_length if self.fine_tuning else self.model.seq_length

    def check_layout(self) -> None:
        """The checks that relate several sections and need no world size."""
        model, parallel = self.model, self.parallel
        if model.num_heads % parallel.tp or model.hidden_size % parallel.tp:
            raise ConfigError(
                f"model.num_heads ({model.num_heads}) and model.hidden_size ({model.hidden_size}) must both "
                f"be divisible by parallel.tp ({parallel.tp}): each tensor-parallel rank holds whole heads."
            )
        if model.num_layers < parallel.pp:
            raise ConfigError(
                f"model.num_layers ({model.num_layers}) must be at least parallel.pp ({parallel.pp}): every "
                "pipeline stage needs a transformer layer."
            )
        if parallel.pp > 1 and self.zero.stage > 1:
            raise ConfigError(
                f"zero.stage={self.zero.stage} cannot be combined with pipeline parallelism "
                f"(parallel.pp={parallel.pp}): ZeRO stages 2 and 3 partition gradients, which DeepSpeed's "
                "pipeline engine does not support. Use zero.stage=0 or 1."
            )
        if parallel.sequence_parallel and parallel.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1: it shards along tp ranks.")
        problem = check_rampup(self.train.rampup_batch_size, self.train.global_batch_size,
                               self.train.micro_batch_size, parallel.dp)
        if problem:
            raise ConfigError(problem + ".")
        if parallel.dp is not None and self.train.global_batch_size % (self.train.micro_batch_size * parallel.dp):
            raise ConfigError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be divisible by "
                f"train.micro_batch_size ({self.train.micro_batch_size}) x parallel.dp ({parallel.dp})."
            )
