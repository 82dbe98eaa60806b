"""No code runs from a checkpoint file: a payload planted in any kind of file a checkpoint holds (pipeline
layer and model states, ZeRO optimizer states, RNG states, a reshaped checkpoint's per-layer optimizer
states) would create a marker file if unpickled. Through every command that reads checkpoints, the marker
never appears, and the command exits non-zero with one paragraph naming the file."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_bloom.checkpoint.safe_load import UnsafeCheckpointFile, load_checkpoint_file
from megatron_bloom.training.checkpointing import _read_rng_states
from tests.conftest import REPO, overrides, run_cli
from tests.processes import run_module_ranks


class Payload:
    """Unpickling it opens (creates) `marker`: what a hostile file would do instead of something visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> None:
    """Add a payload to the checkpoint file `path`, keeping all it held (read here unsafely on purpose: the
    file is this test's own), and record its new size in the checkpoint's mbloom.json, as a forger would."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["payload"] = Payload(marker)
    torch.save(state, path)
    directory = next(parent for parent in path.parents if (parent / "mbloom.json").is_file())
    metadata = json.loads((directory / "mbloom.json").read_text())
    metadata["files"][str(path.relative_to(directory))] = path.stat().st_size
    (directory / "mbloom.json").write_text(json.dumps(metadata))


def test_a_payload_is_refused_by_name_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "layer_00-model_00-model_states.pt"
    torch.save({"weight": torch.ones(2), "payload": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointFile) as refused:
        load_checkpoint_file(path)
    message = str(refused.value)
    assert str(path) in message and "open" in message and "\n" not in message
    assert not marker.exists()


def test_rng_states_of_earlier_versions_still_read(tmp_path):
    """Before this version an RNG file pickled NumPy's state as it is (an array): still read, safely."""
    import random

    import numpy as np

    path = tmp_path / "rng_state_00000.pt"
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, path)
    states = _read_rng_states(path)
    assert states["numpy"][0] == "MT19937" and np.array_equal(states["numpy"][1], np.random.get_state()[1])


# --- every command that reads a checkpoint ------------------------------------------------------------------

KINDS = {"layers": "layer_*-model_states.pt", "optimizer": "zero_pp_rank_*_optim_states.pt",
         "rng": "rng_state_*.pt", "model states": "mp_rank_*_model_states.pt"}


def planted_copy(pipeline_run: Path, root: Path, kind: str, marker: Path) -> Path:
    """A copy of the (tp 2, pp 2) run's iteration-8 checkpoint with a payload in every file of `kind` (so
    that every rank that reads one stops at it)."""
    copy = root / "ckpt" / "global_step8"
    shutil.copytree(pipeline_run / "ckpt" / "global_step8", copy)
    (root / "ckpt" / "latest").write_text("global_step8")
    files = sorted(copy.glob(KINDS[kind]))
    assert files
    for path in files:
        plant(path, marker)
    return copy


def assert_refused(result, checkpoint: Path, marker: Path) -> None:
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not marker.exists()
    paragraph = " ".join(result.stderr.split())
    assert "was not loaded: unpickling it could run code" in paragraph, result.stderr[-3000:]
    assert str(checkpoint) in paragraph and "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("kind, command", [
    ("layers", "to-hf"), ("layers", "eval"), ("layers", "generate"), ("optimizer", "reshape"),
    ("layers", "weights-only start"),
])
def test_commands_refuse_a_planted_file(pipeline_run, shard, tmp_path, kind, command):
    marker = tmp_path / "ran"
    checkpoint = planted_copy(pipeline_run, tmp_path, kind, marker)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": line}) + "\n" for line in ["ka lo mi", "tu ré ça"]))
    argv = {
        "to-hf": ["megatron_bloom.cli.convert", "to-hf", "--checkpoint", str(checkpoint), "--output",
                  str(tmp_path / "hf")],
        "eval": ["megatron_bloom.cli.eval", f"checkpoint.load={checkpoint}", f"eval.input={docs}",
                 f"eval.tokenizer={shard / 'tok'}", "precision=fp32"],
        "generate": ["megatron_bloom.cli.generate", f"checkpoint.load={checkpoint}", f"eval.tokenizer={shard / 'tok'}",
                     "generate.prompt=ka", "generate.max_new_tokens=2", "precision=fp32"],
        "reshape": ["megatron_bloom.cli.convert", "reshape", "--checkpoint", str(checkpoint), "--output",
                    str(tmp_path / "reshaped"), "--tp", "1", "--pp", "1"],
        "weights-only start": ["megatron_bloom.cli.train", *overrides(shard, tmp_path / "run", 1, 1, 1, iters=9),
                               f"checkpoint.load={checkpoint}"],
    }[command]
    assert_refused(run_cli(argv, check=False), checkpoint, marker)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rng", "optimizer", "model states", "layers"])
def test_an_exact_resume_refuses_a_planted_file(pipeline_run, shard, tmp_path, kind):
    """The resume at the run's own layout: DeepSpeed's loads (model states, ZeRO partitions) go through our
    safe checkpoint engine, the RNG states through our reader."""
    marker = tmp_path / "ran"
    checkpoint = planted_copy(pipeline_run, tmp_path, kind, marker)
    result = run_module_ranks(4, "megatron_bloom.cli.train", overrides(shard, tmp_path / "run", 2, 2, 1, iters=10) + [
        f"checkpoint.load={checkpoint}"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert_refused(result, checkpoint, marker)


@pytest.mark.slow
def test_a_reshaped_checkpoint_refuses_a_planted_file(pipeline_run, shard, tmp_path):
    """A universal checkpoint's per-layer optimizer states, read when a run starts from it."""
    marker = tmp_path / "ran"
    reshaped = tmp_path / "reshaped"
    run_cli(["megatron_bloom.cli.convert", "reshape", "--checkpoint", str(pipeline_run / "ckpt" / "global_step8"),
             "--output", str(reshaped), "--tp", "1", "--pp", "1"])
    files = sorted(reshaped.rglob("*optim*.pt"))
    assert files
    for path in files:
        plant(path, marker)
    result = run_cli(["megatron_bloom.cli.train", *overrides(shard, tmp_path / "run", 1, 1, 1, iters=9),
                      f"checkpoint.load={reshaped}"], check=False)
    assert_refused(result, reshaped, marker)
