"""Typed configuration of a run: one dataclass per config section, composed by Hydra from `configs/`.

The YAML files under `configs/` only set values; these classes define which keys exist and their types
(Hydra rejects an unknown key or a wrongly typed value), and their `__post_init__` checks the values.
Library code receives these objects, never a `DictConfig`.
"""

from __future__ import annotations

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


def _check_positive(section: str, obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key} must be positive, got {value!r}.")


@dataclass
class ParallelConfig:
    """tp x pp x dp = world size; ranks are ordered tp fastest, then dp, then pp (Megatron-DeepSpeed)."""

    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None  # None: world_size / (tp * pp)
    sequence_parallel: bool = False
    pipeline_partition: str = "flops"

    def __post_init__(self) -> None:
        _check_positive("parallel", self, "tp", "pp", "dp")
        _check_choice("parallel.pipeline_partition", self.pipeline_partition, PIPELINE_PARTITIONS)


@dataclass
class ZeroConfig:
    stage: int = 1  # what BLOOM-176B trained with; with pp > 1 only 0 or 1

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero.stage must be 0, 1, 2 or 3; got {self.stage!r}.")


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    iters: int = 1000
    seed: int = 1234
    activation_checkpointing: bool = False
    # torch.compile each transformer block (torchtitan's per-block compile): LayerNorms, residual adds, GeLU
    # and attention's reshapes fuse into fewer kernels. For GPUs; compilation costs time at the start.
    compile: bool = False
    eval_interval: Optional[int] = None  # iterations between validation passes; None: no validation
    eval_iters: int = 10
    # A NaN/inf loss or gradient skips the step; this many in a row stop the run (the model has diverged).
    max_consecutive_skips: int = 10
    # [start, increment, samples]: batch-size ramp-up (Megatron-LM's --rampup-batch-size); None: constant.
    rampup_batch_size: Optional[List[int]] = None

    def __post_init__(self) -> None:
        _check_positive("train", self, "micro_batch_size", "global_batch_size", "iters", "eval_interval",
                        "eval_iters", "max_consecutive_skips")
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
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

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
    decay_style: str = "cosine"
    decay_iters: Optional[int] = None  # None: decay over train.iters

    def __post_init__(self) -> None:
        _check_choice("sched.decay_style", self.decay_style, DECAY_STYLES)
        if self.warmup_iters < 0:
            raise ConfigError(f"sched.warmup_iters must not be negative, got {self.warmup_iters}.")
        _check_positive("sched", self, "decay_iters")


@dataclass
class DataConfig:
    # Megatron-style blend: [weight1, prefix1, weight2, prefix2, ...], or a single [prefix].
    paths: List[Any] = field(default_factory=list)
    tokenizer: Optional[str] = None
    split: str = "969,30,1"
    cache_dir: Optional[str] = None
    num_workers: int = 2
    # BLOOM-style language sampling: weights proportional to size^(1/temperature); data.paths holds prefixes only.
    temperature: Optional[float] = None

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
    save_interval: Optional[int] = None
    load: Optional[str] = None  # a checkpoint dir, "auto" (newest complete one in `dir`), or None
    keep_last: Optional[int] = None  # None: keep every checkpoint

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


@dataclass
class WandbConfig:
    mode: str = "disabled"
    project: str = "megatron_bloom"
    name: Optional[str] = None

    def __post_init__(self) -> None:
        _check_choice("logging.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False

    def __post_init__(self) -> None:
        _check_positive("logging", self, "interval")


@dataclass
class LauncherConfig:
    name: str = "local"
    nproc_per_node: Optional[int] = None  # None: tp * pp * dp on one node, divided over slurm.nodes

    def __post_init__(self) -> None:
        _check_choice("launcher", self.name, LAUNCHERS)
        _check_positive("launcher", self, "nproc_per_node")


@dataclass
class SlurmConfig:
    nodes: int = 1
    partition: Optional[str] = None
    time: str = "01:00:00"
    account: Optional[str] = None
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None

    def __post_init__(self) -> None:
        _check_positive("slurm", self, "nodes", "gpus_per_node", "cpus_per_task")


@dataclass
class EvalConfig:
    input: Optional[str] = None
    tokenizer: Optional[str] = None
    seq_length: Optional[int] = None  # None: model.seq_length
    micro_batch_size: int = 1

    def __post_init__(self) -> None:
        _check_positive("eval", self, "seq_length", "micro_batch_size")


@dataclass
class GenerateConfig:
    prompt: Optional[str] = None
    input: Optional[str] = None  # a jsonl file of prompts
    batch_size: int = 1
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234
    stream: bool = False  # print the completions as they grow: JSON lines {"index": i, "text": piece}
    quantize: Optional[str] = None  # "int8": int8 weights, one scale per output channel (CPU, tp 1)
    compile: bool = False  # the one-token decoding step through torch.compile (tp 1): compiled once, then faster

    def __post_init__(self) -> None:
        _check_positive("generate", self, "batch_size", "max_new_tokens", "temperature")
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
    train: Optional[str] = None  # fine-tuning: the task's training jsonl (mbloom-train)
    valid: Optional[str] = None  # fine-tuning: its validation jsonl (validation loss every train.eval_interval)
    labels: Optional[List[str]] = None  # label (or tag) names in index order; None: the checkpoint's or the data's
    max_length: int = 128  # tokens per example (right-padded); question answering: question + context window
    stride: int = 32  # question answering: tokens shared by consecutive windows of a long context
    max_answer_tokens: int = 30  # question answering: the longest span a prediction may be

    def __post_init__(self) -> None:
        _check_choice("task.name", self.name, TASKS)
        _check_positive("task", self, "max_length", "stride", "max_answer_tokens")


@dataclass
class TrainConfig:
    """The root config (`configs/train.yaml`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: str = "bf16"
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
    hardware: str = "a100-80gb"  # what mbloom-plan compares against (megatron_bloom/planner/hardware.py)

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("hardware", self.hardware, HARDWARE_NAMES)
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
