"""The on-disk layout of a training checkpoint, and publishing one so that a crash never leaves half of it.

    checkpoint.dir/
      latest                          the tag of the newest complete checkpoint (DeepSpeed's convention)
      global_step<N>/
        mp_rank_<tp>_model_states.pt  DeepSpeed's model file per tensor-parallel rank ({"module": ...})
        ...                           DeepSpeed's optimizer / pipeline-layer files, when training wrote them
        mbloom.json                   model config, layout, progress, and the size of every file above

A checkpoint is written under a hidden temporary name, `mbloom.json` last, then renamed into place; only
then is `latest` replaced (write + rename). Loading checks every file that `mbloom.json` lists, so a
checkpoint missing a file or holding a truncated one is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_bloom.errors import UserError
from megatron_bloom.model import ModelConfig, TaskConfig
from megatron_bloom.parallel.sharding import merge_state_dicts

METADATA_FILE = "mbloom.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def model_states_file(tp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


@dataclass
class CheckpointMetadata:
    """What `mbloom.json` records: enough to rebuild the model and to resume or convert the checkpoint."""

    model: ModelConfig
    task: TaskConfig = field(default_factory=TaskConfig)
    tp: int = 1
    pp: int = 1
    iteration: int = 0
    consumed_samples: int = 0
    data_loader: Optional[dict] = None
    tokenizer: Optional[str] = None
    files: Dict[str, int] = field(default_factory=dict)  # path inside the tag dir -> size in bytes
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> "CheckpointMetadata":
        try:
            raw = json.loads(text)
            if raw.get("format_version") != FORMAT_VERSION:
                raise UserError(f"{source} has format_version {raw.get('format_version')!r}; this version of "
                                f"megatron_bloom reads format {FORMAT_VERSION}.")
            raw["model"] = ModelConfig(**raw["model"])
            raw["task"] = TaskConfig(**raw["task"])
            return cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(f"{source} is not a valid checkpoint description: {error}.") from None


def publish_checkpoint(root: Path, tag: str, write_files: Callable[[Path], None],
                       metadata: CheckpointMetadata) -> Path:
    """Write a checkpoint via `write_files(directory)`, then make it visible atomically; returns its dir."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{tag}.incomplete"
    if staging.exists():
        shutil.rmtree(staging)  # left by an earlier, interrupted save of the same tag
    staging.mkdir()
    write_files(staging)
    metadata.files = {str(p.relative_to(staging)): p.stat().st_size
                      for p in sorted(staging.rglob("*")) if p.is_file()}
    _write_atomically(staging / METADATA_FILE, metadata.to_json())
    _fsync_dir(staging)
    final = root / tag
    if final.exists():  # re-saving a tag (e.g. after a resume): replace the old one only now
        shutil.rmtree(final)
    os.replace(staging, final)
    _write_atomically(root / LATEST_FILE, tag + "\n")
    _fsync_dir(root)
    return final


def save_model_checkpoint(root: Path, shards: List[Dict[str, torch.Tensor]],
                          metadata: CheckpointMetadata) -> Path:
    """A model-only checkpoint, one DeepSpeed model file per tensor-parallel rank (`shards` in tp-rank
    order). The keys besides `module` are those DeepSpeed's `load_checkpoint(load_module_only=True)` reads.
    """
    if len(shards) != metadata.tp or metadata.pp != 1:
        raise ValueError(f"expected {metadata.tp} tensor-parallel shards and pp=1, got {len(shards)} and "
                         f"pp={metadata.pp}")

    def write(directory: Path) -> None:
        for tp_rank, state_dict in enumerate(shards):
            states = {"module": state_dict, "global_steps": metadata.iteration,
                      "global_samples": metadata.consumed_samples, "skipped_steps": 0,
                      "dp_world_size": 1, "mp_world_size": metadata.tp}
            torch.save(states, directory / model_states_file(tp_rank))

    return publish_checkpoint(root, tag_for(metadata.iteration), write, metadata)


def resolve_checkpoint(path: Path) -> Path:
    """A `checkpoint.dir` root (its `latest` checkpoint) or one tag dir -> the tag dir to load."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if (path / tag / METADATA_FILE).is_file():
            return path / tag
        raise UserError(f"{latest} names checkpoint {tag!r}, but {path / tag} is missing or incomplete.")
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist.")
    raise UserError(f"{path} is not a megatron_bloom checkpoint: it holds neither {METADATA_FILE} (one "
                    f"checkpoint) nor a {LATEST_FILE} file (a checkpoint.dir).")


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


def load_model_shard(checkpoint: Path, tp_rank: int) -> Dict[str, torch.Tensor]:
    """The weights of one tensor-parallel rank, as stored (a tp=1 checkpoint has only rank 0)."""
    directory = resolve_checkpoint(checkpoint)
    states = torch.load(directory / model_states_file(tp_rank), map_location="cpu", weights_only=True)
    return states["module"]


def load_model_state_dict(checkpoint: Path) -> Tuple[CheckpointMetadata, Dict[str, torch.Tensor]]:
    """The full single-process model weights of a checkpoint of any tp layout, with its metadata."""
    directory = resolve_checkpoint(checkpoint)
    metadata = read_metadata(directory)
    if metadata.pp != 1:
        raise UserError(f"checkpoint {directory} is split over pp={metadata.pp} pipeline stages; reading "
                        "pipeline layouts is not available yet in this version.")
    shards = [load_model_shard(directory, rank) for rank in range(metadata.tp)]
    return metadata, merge_state_dicts(shards, metadata.model)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
