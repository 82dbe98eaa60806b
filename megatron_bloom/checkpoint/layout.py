"""The on-disk layout of a training checkpoint, and publishing one so that a crash never leaves half of it.

    checkpoint.dir/
      latest                          the tag of the newest complete checkpoint (DeepSpeed's convention)
      global_step<N>/
        mp_rank_<tp>_model_states.pt  DeepSpeed's model file per tensor-parallel rank ({"module": ...})
        ...                           DeepSpeed's optimizer / pipeline-layer files, when training wrote them
        rng_state_<rank>.pt           every rank's random-number generators (training checkpoints)
        tokenizer/                    a copy of the tokenizer the model was trained with (when it had one)
        mbloom.json                   model config, layout, progress, and the size of every file above

A checkpoint is written under a hidden temporary name (`.global_step<N>.incomplete`), `mbloom.json` last,
then renamed into place; only then is `latest` replaced (write + rename). Loading checks every file that
`mbloom.json` lists, so a checkpoint missing a file or holding a truncated one is never loaded: a root's
newest complete checkpoint is used instead, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_bloom.config.schema import PIPELINE_PARTITIONS
from megatron_bloom.errors import UserError
from megatron_bloom.fence.deepspeed import model_states_file, module_states
from megatron_bloom.model import ModelConfig, TaskConfig
from megatron_bloom.model.config import RUNTIME_FIELDS
from megatron_bloom.parallel.parallelize import check_tensor_parallel

METADATA_FILE = "mbloom.json"
LATEST_FILE = "latest"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # what AutoTokenizer reads
FORMAT_VERSION = 1


TAG_PATTERN = re.compile(r"global_step(\d+)")
# What a checkpoint holds: `weights` (from-hf: model weights only, under their model names), `training`
# (DeepSpeed's own files: weights, optimizer and LR-schedule state, plus every rank's RNG state) or
# `universal` (reshape: weights and per-parameter optimizer state per pipeline layer, see universal.py).
WEIGHTS, TRAINING, UNIVERSAL = "weights", "training", "universal"
# The dtype a run of each precision holds its weights in (its optimizer keeps fp32 masters).
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_files_layout(model: ModelConfig, tp: int, pp: int) -> None:
    """The `--tp` and `--pp` a checkpoint is to be written for (from-hf, reshape) fit the model."""
    if tp < 1 or pp < 1:
        raise UserError(f"--tp and --pp must be positive; got --tp {tp} --pp {pp}.")
    check_tensor_parallel(model, tp)
    if model.num_layers < pp:
        raise UserError(f"--pp {pp}: the model has {model.num_layers} layers, fewer than pipeline stages.")


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def staging_dir(root: Path, tag: str) -> Path:
    """Where a checkpoint is written before it is published (hidden, never named by `latest`)."""
    return Path(root) / f".{tag}.incomplete"


@dataclass
class CheckpointMetadata:
    """What `mbloom.json` records: enough to rebuild the model and to resume or convert the checkpoint."""

    model: ModelConfig
    task: TaskConfig = field(default_factory=TaskConfig)
    tp: int = 1
    pp: int = 1
    dp: int = 1
    # how the pp stages split the layers (`pipeline/partition.py`), which decides what each stage's
    # optimizer file holds; checkpoints from before the choice existed were split by blocks
    pipeline_partition: str = "blocks"
    contents: str = WEIGHTS
    zero_stage: int = 0
    precision: str = "fp32"
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    skipped_samples: List[List[int]] = field(default_factory=list)  # train.skip_samples and rollbacks' ranges
    data_loader: Optional[dict] = None
    # the checkpoint's own copy (TOKENIZER_DIR); older checkpoints recorded an absolute path instead
    tokenizer: Optional[str] = None
    files: Dict[str, int] = field(default_factory=dict)  # path inside the tag dir -> size in bytes
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        for key in RUNTIME_FIELDS:  # how a run computes is not part of the model
            del raw["model"][key]
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> "CheckpointMetadata":
        try:
            raw = json.loads(text)
            if raw.get("format_version") != FORMAT_VERSION:
                raise UserError(f"{source} has format_version {raw.get('format_version')!r}; this version of "
                                f"megatron_bloom reads format {FORMAT_VERSION}.")
            raw["model"] = ModelConfig(**{k: v for k, v in raw["model"].items() if k not in RUNTIME_FIELDS})
            raw["task"] = TaskConfig(**raw["task"])
            if raw.get("pipeline_partition", "blocks") not in PIPELINE_PARTITIONS:
                raise TypeError(f"unknown pipeline_partition {raw['pipeline_partition']!r}")
            return cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(f"{source} is not a valid checkpoint description: {error}.") from None


def publish_checkpoint(root: Path, tag: str, write_files: Callable[[Path], None],
                       metadata: CheckpointMetadata, tokenizer: Optional[Path] = None) -> Path:
    """Write a checkpoint via `write_files(directory)`, then make it visible atomically (with a copy of
    `tokenizer`, as `publish_staged`); returns its dir."""
    staging = staging_dir(root, tag)
    if staging.exists():
        shutil.rmtree(staging)  # left by an earlier, interrupted save of the same tag
    staging.mkdir(parents=True)
    write_files(staging)
    return publish_staged(root, tag, metadata, tokenizer)


def publish_staged(root: Path, tag: str, metadata: CheckpointMetadata, tokenizer: Optional[Path] = None) -> Path:
    """Publish the files written into `staging_dir(root, tag)` (by every rank, all finished) as `tag`, with a
    copy of `tokenizer` (a tokenizer.json or its directory) in `tokenizer/`, so that the checkpoint keeps
    it wherever it moves.

    Order matters for crash safety: the files are flushed to disk, `mbloom.json` (listing them and their
    sizes) is written last inside the hidden directory, the directory is renamed into place, and only
    then does `latest` name it. A kill at any point leaves either the previous checkpoint as `latest` or
    the new one complete.
    """
    root, staging = Path(root), staging_dir(root, tag)
    kept = tokenizer is not None and copy_tokenizer_files(tokenizer, staging / TOKENIZER_DIR)
    metadata.tokenizer = TOKENIZER_DIR if kept else None
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != METADATA_FILE)
    for path in files:
        fsync_file(path)
    metadata.files = {str(p.relative_to(staging)): p.stat().st_size for p in files}
    _write_atomically(staging / METADATA_FILE, metadata.to_json())
    _fsync_dir(staging)
    final = root / tag
    if final.exists():  # re-saving a tag (e.g. after a resume): the old one goes only now
        _remove_tree(final)
    os.replace(staging, final)
    _write_atomically(root / LATEST_FILE, tag + "\n")
    _fsync_dir(root)
    return final


# The fields that decide the weights' shapes; the rest (sequence length, dropout, ...) are the run's choice.
ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "num_heads", "vocab_size")


def check_same_shape(metadata: CheckpointMetadata, model: ModelConfig, directory: Path) -> None:
    """A run that starts from checkpoint `directory` must train a model of its shape."""
    differing = [f"model.{key}: checkpoint {getattr(metadata.model, key)!r}, this run {getattr(model, key)!r}"
                 for key in ARCHITECTURE_FIELDS if getattr(metadata.model, key) != getattr(model, key)]
    if differing:
        raise UserError(f"checkpoint {directory} holds a model of another shape than this run's "
                        f"({'; '.join(differing)}). Train it with the matching model= preset or overrides.")


def copy_tokenizer_files(source: Path, output: Path) -> List[Path]:
    """Copy the tokenizer files that `AutoTokenizer.from_pretrained` reads, where they exist, from a
    directory or beside a tokenizer file (which is copied as tokenizer.json, whatever its name)."""
    source = Path(source)
    sources = {name: source.parent / name for name in TOKENIZER_FILES} if source.is_file() else \
        {name: source / name for name in TOKENIZER_FILES}
    if source.is_file():
        sources["tokenizer.json"] = source
    copied = []
    for name, path in sources.items():
        if path.is_file():
            output.mkdir(parents=True, exist_ok=True)
            (output / name).write_bytes(path.read_bytes())
            copied.append(output / name)
    return copied


def checkpoint_tokenizer(directory: Path, metadata: CheckpointMetadata) -> Optional[Path]:
    """The tokenizer checkpoint `directory` was made with: its own copy, or the path an older checkpoint
    recorded; None when it has none, or the recorded path is gone."""
    if metadata.tokenizer is None:
        return None
    path = Path(directory) / metadata.tokenizer  # an absolute path stays what it is
    return path if path.exists() else None


def checkpoint_tags(root: Path) -> List[Tuple[int, Path]]:
    """The published `global_step<N>` dirs of a checkpoint root, newest first (complete or not)."""
    found = []
    for path in Path(root).iterdir() if Path(root).is_dir() else []:
        match = TAG_PATTERN.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def prune_checkpoints(root: Path, keep_last: Optional[int]) -> List[Path]:
    """Delete all but the newest `keep_last` checkpoints (None keeps all) and leftovers of interrupted
    saves; returns what was removed. `latest` is never removed."""
    root = Path(root)
    latest = (root / LATEST_FILE).read_text().strip() if (root / LATEST_FILE).is_file() else None
    tags = checkpoint_tags(root)
    doomed = [path for _, path in tags[keep_last:]] if keep_last else []
    doomed = [path for path in doomed if path.name != latest]
    doomed += [p for p in root.glob(".*.incomplete") if p.is_dir()] + [p for p in root.glob(".*.removing")]
    for path in doomed:
        _remove_tree(path)
    return doomed


def _remove_tree(path: Path) -> None:
    """Rename first, then delete: a kill half-way leaves a hidden leftover, never a half checkpoint under
    a real tag."""
    doomed = path.with_name(f".{path.name.lstrip('.')}.removing")
    if path != doomed:
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_model_checkpoint(root: Path, shards: List[Dict[str, torch.Tensor]], metadata: CheckpointMetadata,
                          tokenizer: Optional[Path] = None) -> Path:
    """A model-only checkpoint, one DeepSpeed model file per tensor-parallel rank (`shards` in tp-rank
    order, single-process names), whatever `metadata.pp`: each pipeline stage takes its layers by name.
    The keys besides `module` are those DeepSpeed's `load_checkpoint(load_module_only=True)` reads.
    """
    if len(shards) != metadata.tp:
        raise ValueError(f"expected {metadata.tp} tensor-parallel shards, got {len(shards)}")

    def write(directory: Path) -> None:
        for tp_rank, state_dict in enumerate(shards):
            torch.save(module_states(state_dict, metadata.iteration, metadata.consumed_samples, metadata.tp),
                       directory / model_states_file(tp_rank))

    return publish_checkpoint(root, tag_for(metadata.iteration), write, metadata, tokenizer)


def resolve_checkpoint(path: Path, warn: bool = True) -> Path:
    """A `checkpoint.dir` root or one tag dir -> the tag dir to load.

    For a root: the checkpoint `latest` names if it is complete, otherwise the newest complete one (with a
    warning on stderr for each incomplete one passed over, when `warn`).
    """
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist.")
    found = newest_complete_checkpoint(path, warn)
    if found is not None:
        return found
    if (path / LATEST_FILE).is_file() or checkpoint_tags(path):
        raise UserError(f"{path} holds no complete checkpoint: every one was cut off while being written"
                        + (" (see the warnings above)." if warn else "."))
    raise UserError(f"{path} is not a megatron_bloom checkpoint: it holds neither {METADATA_FILE} (one "
                    f"checkpoint) nor a {LATEST_FILE} file (a checkpoint.dir).")


def newest_complete_checkpoint(root: Path, warn: bool = True, before: Optional[int] = None) -> Optional[Path]:
    """`latest` if complete, else the newest complete `global_step<N>` in `root`; None if there is none.
    `before`: the newest complete one of an iteration below that."""
    root = Path(root)
    latest_file = root / LATEST_FILE
    latest = root / latest_file.read_text().strip() if latest_file.is_file() else None
    if before is not None:
        latest = None
    candidates = ([latest] if latest is not None else []) + [p for number, p in checkpoint_tags(root)
                                                             if p != latest and (before is None or number < before)]
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        if warn:
            print(f"warning: skipping checkpoint {candidate}: {problem}", file=sys.stderr, flush=True)
    return None


def checkpoint_problem(directory: Path) -> Optional[str]:
    """Why `directory` is not a complete checkpoint, or None if it is."""
    if not (directory / METADATA_FILE).is_file():
        return "it is missing or was never finished (no mbloom.json)"
    try:
        read_metadata(directory)
    except UserError as error:
        return str(error)
    return None


def read_metadata(checkpoint: Path) -> CheckpointMetadata:
    """`mbloom.json` of a checkpoint, after checking that every file it lists is there, whole."""
    directory = resolve_checkpoint(checkpoint)
    metadata = CheckpointMetadata.from_json((directory / METADATA_FILE).read_text(), directory / METADATA_FILE)
    for name, size in metadata.files.items():
        actual = (directory / name).stat().st_size if (directory / name).is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes instead of {size}"
            raise UserError(f"checkpoint {directory} is incomplete: {name} is {found}.")
    return metadata


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
