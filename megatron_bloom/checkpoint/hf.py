"""Hugging Face BLOOM checkpoints: `config.json` + safetensors (or `pytorch_model.bin`), sharded or not.

Our parameter names are those of `transformers`' BLOOM classes, so conversion is a check plus two
layout details: the embedding's vocabulary padding (added on import, dropped on export) and the tied LM
head (`lm_head.weight`, which `transformers` does not save and we do not keep).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron_bloom.checkpoint.layout import (
    TOKENIZER_FILES,
    CheckpointMetadata,
    check_files_layout,
    checkpoint_tokenizer,
    copy_tokenizer_files,
    resolve_checkpoint,
    save_model_checkpoint,
)
from megatron_bloom.checkpoint.safe_load import UnsafeCheckpointFile, load_checkpoint_file
from megatron_bloom.checkpoint.weights import load_model_state_dict
from megatron_bloom.data.progress import Progress
from megatron_bloom.errors import UserError
from megatron_bloom.model import ModelConfig, TaskConfig
from megatron_bloom.parallel.sharding import full_shapes, split_for_ranks
from megatron_bloom.pipeline import names

ARCHITECTURES = {
    "causal_lm": "BloomForCausalLM",
    "sequence_classification": "BloomForSequenceClassification",
    "token_classification": "BloomForTokenClassification",
    "question_answering": "BloomForQuestionAnswering",
}
_EMBEDDING = "transformer.word_embeddings.weight"
_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size

StateDict = Dict[str, torch.Tensor]


def convert_from_hf(hf_dir: Path, output: Path, tp: int = 1, pp: int = 1) -> Path:
    """`mbloom-convert from-hf`: a Hugging Face BLOOM directory as a training checkpoint; returns its dir.

    The weights are stored per tensor-parallel rank under their model names; a training run of any pp
    (and dp) takes its stages' layers from them, so `pp` is recorded, not split into files.
    """
    if not Path(hf_dir).is_dir():
        raise UserError(f"--hf {hf_dir}: no such directory.")
    model, task = read_hf_config(hf_dir)
    check_files_layout(model, tp, pp)
    state_dict = hf_to_state_dict(read_hf_weights(hf_dir), model, task)
    has_tokenizer = any((Path(hf_dir) / name).is_file() for name in TOKENIZER_FILES)
    return save_model_checkpoint(output, split_for_ranks(state_dict, model, tp),
                                 CheckpointMetadata(model=model, task=task, tp=tp, pp=pp),
                                 tokenizer=Path(hf_dir) if has_tokenizer else None)


def convert_to_hf(checkpoint: Path, output: Path) -> List[Path]:
    """`mbloom-convert to-hf`: a training checkpoint of any layout as a Hugging Face directory; returns the
    files written."""
    directory = resolve_checkpoint(checkpoint)
    metadata, state_dict = load_model_state_dict(directory)
    tokenizer = checkpoint_tokenizer(directory, metadata)
    if tokenizer is None and metadata.tokenizer is not None:  # an older checkpoint's recorded path
        print(f"warning: the tokenizer {checkpoint} was trained with ({metadata.tokenizer}) is not there any "
              "more; the export has no tokenizer files", file=sys.stderr, flush=True)
    return write_hf_checkpoint(output, state_dict, metadata.model, metadata.task, tokenizer)


# --- config.json -------------------------------------------------------------------------------------

def read_hf_config(hf_dir: Path) -> Tuple[ModelConfig, TaskConfig]:
    """The model shape and task head described by a Hugging Face BLOOM `config.json`."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model directory: it has no config.json.")
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}.") from None
    if hf.get("model_type") != "bloom":
        raise UserError(f"{path} describes a {hf.get('model_type')!r} model; only BLOOM (model_type "
                        "\"bloom\") checkpoints can be converted.")
    if hf.get("apply_residual_connection_post_layernorm"):
        raise UserError(f"{path} sets apply_residual_connection_post_layernorm=true; no released BLOOM "
                        "model does, and megatron_bloom implements the pre-LayerNorm residual only.")
    if hf.get("tie_word_embeddings", True) is False:
        raise UserError(f"{path} sets tie_word_embeddings=false; BLOOM ties its LM head to the input "
                        "embeddings and megatron_bloom relies on it.")
    try:
        model = ModelConfig(
            num_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
            hidden_size=hf.get("hidden_size", hf.get("n_embed")),
            num_heads=hf.get("n_head", hf.get("num_attention_heads")),
            vocab_size=hf["vocab_size"],
            seq_length=hf.get("seq_length", 2048),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            init_std=hf.get("initializer_range", 0.02),
            hidden_dropout=hf.get("hidden_dropout", 0.0),
            attention_dropout=hf.get("attention_dropout", 0.0),
            pad_token_id=hf.get("pad_token_id"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
    except (KeyError, TypeError, UserError) as error:
        raise UserError(f"{path} is not a complete BLOOM config: {error}") from None
    return model, _task_from_hf(hf, path)


def _task_from_hf(hf: dict, path: Path) -> TaskConfig:
    architecture = (hf.get("architectures") or ["BloomForCausalLM"])[0]
    by_architecture = {arch: task for task, arch in ARCHITECTURES.items()}
    by_architecture["BloomModel"] = "causal_lm"  # a bare trunk: the tied LM head needs no weights
    if architecture not in by_architecture:
        raise UserError(f"{path}: unknown architecture {architecture!r}; expected one of "
                        f"{', '.join(sorted(by_architecture))}.")
    id2label = hf.get("id2label")
    labels = [id2label[key] for key in sorted(id2label, key=int)] if id2label else None
    num_labels = len(labels) if labels else hf.get("num_labels", 2)
    return TaskConfig(name=by_architecture[architecture], num_labels=num_labels,
                      problem_type=hf.get("problem_type"), labels=labels)


def hf_config_dict(model: ModelConfig, task: TaskConfig, dtype: torch.dtype) -> dict:
    """A `config.json` that `transformers.BloomConfig` reads back into the same model."""
    config = {
        "architectures": [ARCHITECTURES[task.name]],
        "model_type": "bloom",
        "apply_residual_connection_post_layernorm": False,
        "n_layer": model.num_layers,
        "hidden_size": model.hidden_size,
        "n_head": model.num_heads,
        "vocab_size": model.vocab_size,
        "seq_length": model.seq_length,
        "layer_norm_epsilon": model.layer_norm_epsilon,
        "initializer_range": model.init_std,
        "hidden_dropout": model.hidden_dropout,
        "attention_dropout": model.attention_dropout,
        "pad_token_id": model.pad_token_id,
        "bos_token_id": model.bos_token_id,
        "eos_token_id": model.eos_token_id,
        "pretraining_tp": 1,
        "slow_but_exact": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if task.name in ("sequence_classification", "token_classification"):
        labels = task.labels or [f"LABEL_{i}" for i in range(task.num_labels)]
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
        if task.problem_type:
            config["problem_type"] = task.problem_type
    return config


# --- weights -----------------------------------------------------------------------------------------

def read_hf_weights(hf_dir: Path) -> StateDict:
    """All tensors of a Hugging Face checkpoint: single or sharded safetensors, else pytorch_model.bin."""
    hf_dir = Path(hf_dir)
    for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                               ("pytorch_model.bin.index.json", _load_torch)):
        index = hf_dir / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as error:
                raise UserError(f"{index} is not a valid shard index: {error}.") from None
            weights: StateDict = {}
            with Progress(total=len(shards), unit="shards read", label=f"reading {hf_dir}") as progress:
                for number, shard in enumerate(shards, start=1):
                    weights.update(loader(hf_dir / shard))
                    progress.update(number)
            return weights
    for name, loader in (("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_torch)):
        if (hf_dir / name).is_file():
            return loader(hf_dir / name)
    raise UserError(f"{hf_dir} holds no weights: expected model.safetensors, pytorch_model.bin or a sharded "
                    "index (model.safetensors.index.json / pytorch_model.bin.index.json).")


def _load_safetensors(path: Path) -> StateDict:
    if not path.is_file():
        raise UserError(f"weight file {path} is missing (named by the shard index).")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"cannot read {path}: {error}. Is the file complete?") from None


def _load_torch(path: Path) -> StateDict:
    if not path.is_file():
        raise UserError(f"weight file {path} is missing (named by the shard index).")
    try:
        return load_checkpoint_file(path, allowed=())
    except UnsafeCheckpointFile:
        raise
    except Exception as error:  # torch raises several types for a corrupt or truncated pickle
        raise UserError(f"cannot read {path}: {error}. Is the file complete?") from None


def hf_to_state_dict(hf_weights: StateDict, model: ModelConfig, task: TaskConfig) -> StateDict:
    """Check a Hugging Face state dict against the config and return ours (vocabulary padded with zeros).

    Every tensor must be known and of the right shape, and none may be missing; otherwise a `UserError`
    lists what is wrong.
    """
    weights = {names.from_hf_file(name): tensor for name, tensor in hf_weights.items()}
    lm_head = weights.pop("lm_head.weight", None)
    shapes = full_shapes(model, task)
    shapes[_EMBEDDING] = torch.Size([model.vocab_size, model.hidden_size])  # HF keeps no padding
    unknown = sorted(set(weights) - set(shapes))
    missing = sorted(set(shapes) - set(weights))
    mismatched = [f"{name} {tuple(weights[name].shape)} (expected {tuple(shape)})"
                  for name, shape in shapes.items() if name in weights and weights[name].shape != shape]
    problems = []
    if unknown:
        problems.append(f"unknown tensors: {_first(unknown)}")
    if missing:
        problems.append(f"missing tensors: {_first(missing)}")
    if mismatched:
        problems.append(f"tensors whose shape does not match config.json: {_first(mismatched)}")
    if problems:
        raise UserError(f"the checkpoint does not match a BLOOM {task.name} model with {model.num_layers} "
                        f"layers, hidden size {model.hidden_size} and vocabulary {model.vocab_size}: "
                        + "; ".join(problems) + ".")
    if lm_head is not None and not torch.equal(lm_head, weights[_EMBEDDING]):
        raise UserError("lm_head.weight differs from transformer.word_embeddings.weight; BLOOM ties the two, "
                        "and an untied LM head cannot be converted.")
    embedding = weights[_EMBEDDING]
    padding = model.padded_vocab_size() - model.vocab_size
    if padding:
        weights[_EMBEDDING] = torch.cat([embedding, embedding.new_zeros(padding, model.hidden_size)])
    return weights


def state_dict_to_hf(state_dict: StateDict, model: ModelConfig) -> StateDict:
    """Our single-process state dict as `transformers` saves it: no padding rows, no `lm_head.weight`."""
    weights = {name: tensor for name, tensor in state_dict.items() if name != "lm_head.weight"}
    weights[_EMBEDDING] = weights[_EMBEDDING][: model.vocab_size]
    return {name: tensor.contiguous() for name, tensor in weights.items()}


def write_hf_checkpoint(output: Path, state_dict: StateDict, model: ModelConfig, task: TaskConfig,
                        tokenizer_dir: Optional[Path] = None) -> List[Path]:
    """Write `config.json` and safetensors (sharded above 5 GB, with an index) that `transformers` loads."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    weights = state_dict_to_hf(state_dict, model)
    dtype = weights[_EMBEDDING].dtype
    (output / "config.json").write_text(json.dumps(hf_config_dict(model, task, dtype), indent=2) + "\n")
    shards = _split_into_shards(weights)
    written = [output / "config.json"]
    if len(shards) == 1:
        written.append(_save_safetensors(shards[0], output / "model.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            written.append(_save_safetensors(shard, output / name))
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append(output / "model.safetensors.index.json")
    if tokenizer_dir is not None:
        written += copy_tokenizer_files(Path(tokenizer_dir), output)
        if (output / "tokenizer.json").is_file() and not (output / "tokenizer_config.json").is_file():
            written.append(write_tokenizer_config(output))
    return written


# BLOOM's special tokens, as bigscience/bloom's tokenizer_config.json names them
BLOOM_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def write_tokenizer_config(output: Path) -> Path:
    """A tokenizer_config.json for a bare tokenizer.json (ours, from mbloom-train-tokenizer): BLOOM's tokenizer
    class, padding side and those of its special tokens the vocabulary has. Without it `AutoTokenizer` knows
    no end-of-text token, which lm-evaluation-harness, generation and padding need."""
    vocabulary = json.loads((output / "tokenizer.json").read_text(encoding="utf-8")).get("model", {}).get("vocab", {})
    config = {"tokenizer_class": "BloomTokenizer", "padding_side": "left", "add_prefix_space": False}
    config.update({role: token for role, token in BLOOM_SPECIAL_TOKENS.items() if token in vocabulary})
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return output / "tokenizer_config.json"


def _save_safetensors(tensors: StateDict, path: Path) -> Path:
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # safetensors creates its files 0600; the export's others follow the umask
    os.replace(temporary, path)
    return path


def _split_into_shards(weights: StateDict) -> List[StateDict]:
    shards: List[StateDict] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _first(items: Iterable[str], limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
