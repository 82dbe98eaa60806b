"""Training checkpoints on real processes: crashes at every moment of a save, fallback past a damaged
checkpoint, pruning, and the weights of any layout read back (to-hf, eval). (A killed rank's run resuming
bit for bit: tests/test_restarts.py.)"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from megatron_bloom.checkpoint.layout import (
    newest_complete_checkpoint,
    read_metadata,
    resolve_checkpoint,
)
from megatron_bloom.data.tokenizer import load_tokenizer
from tests.conftest import (
    CORPUS,
    REPO,
    assert_user_error,
    overrides,
    run_cli,
    run_ranks,
    sample_texts,
    train_test_tokenizer,
)
from tests.processes import run_module, run_module_ranks

pytestmark = pytest.mark.slow  # every test trains, converts or evaluates on real processes


def losses_by_iteration(run_dir):
    """The loss of every iteration; a resumed run appends, and the last line for an iteration counts."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["iter"]] = record["loss"]
    return losses


def test_to_hf_of_a_pipeline_checkpoint_matches_mbloom_eval(pipeline_run, shard, tmp_path):
    import transformers

    root = pipeline_run
    run_cli(["megatron_bloom.cli.convert", "to-hf", "--checkpoint", str(root / "ckpt"), "--output", str(tmp_path / "hf")])
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()[:40]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = run_ranks(2, "megatron_bloom.cli.eval", [
        f"checkpoint.load={root / 'ckpt'}", f"eval.input={tmp_path / 'docs.jsonl'}", f"eval.tokenizer={shard / 'tok'}",
        "precision=fp32", "parallel.tp=2", "eval.seq_length=64"])
    summary = json.loads(result.stdout.strip().splitlines()[-1])

    model = transformers.BloomForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = load_tokenizer(shard / "tok")
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False).ids[:64]
            if len(ids) >= 2:
                input_ids = torch.tensor([ids])
                nll += model(input_ids, labels=input_ids).loss.double().item() * (len(ids) - 1)
                tokens += len(ids) - 1
    assert summary["tokens"] == tokens
    assert abs(summary["loss"] - nll / tokens) <= 1e-4, (summary["loss"], nll / tokens)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_crashes_at_every_moment_of_a_save_never_lose_the_run(shard, tmp_path, monkeypatch, async_save):
    """12 processes in a row, each killed just before a different step of its first or second save (with
    `checkpoint.async_save`, steps of the background writer while training goes on); each next one resumes
    with `auto`. The newest complete checkpoint never goes backwards, and the finished run's losses equal
    those of a synchronous run that never crashed."""
    args = overrides(shard, tmp_path / "run", 1, 1, 1, iters=12) + [
        f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=1", "checkpoint.load=auto",
        f"checkpoint.async_save={str(async_save).lower()}"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # every run alike: thread counts change float sums
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))  # TMPDIR: the step counters
    newest = 0
    for kill_at in range(2, 26, 2):
        crashed = run_module("tests.crash_during_save", [str(kill_at), *args], cwd=REPO, env=env, timeout=300)
        assert crashed.returncode == -9, crashed.stderr[-3000:]  # it really died mid-save
        found = newest_complete_checkpoint(tmp_path / "ckpt")
        if found is not None:
            iteration = read_metadata(found).iteration
            assert iteration >= newest, (kill_at, iteration, newest)
            newest = iteration
    assert newest >= 2  # the crashes did not prevent progress
    run_cli(["megatron_bloom.cli.train", *args, "checkpoint.keep_last=2"])
    run_cli(["megatron_bloom.cli.train", *overrides(shard, tmp_path / "whole", 1, 1, 1, iters=12)])
    assert losses_by_iteration(tmp_path / "run") == losses_by_iteration(tmp_path / "whole")
    # keep_last pruned old checkpoints and the leftovers of interrupted saves
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == ["global_step11", "global_step12"]


def test_the_async_writer_writes_what_was_staged_even_if_the_state_changes_after(tmp_path):
    """A CheckpointWriter round trip: every kind of value a DeepSpeed file holds comes back equal from the
    writer process's file, with each tensor's own bytes only, though the live tensors changed as soon as
    `submit` returned; the reused buffer takes a second save; a failed write is raised on the rank."""
    from megatron_bloom.training.async_checkpoint import CheckpointWriteError, CheckpointWriter

    live = {"weight": torch.randn(64, 32), "step": torch.tensor(3), "bf16": torch.randn(5, dtype=torch.bfloat16),
            "strided": torch.randn(8, 8)[:, ::2], "nested": [torch.zeros(0, 4), (torch.arange(6), "text")],
            "scalar": 1.5}
    expected = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in live.items()}
    writer = CheckpointWriter()
    try:
        writer.submit(live, str(tmp_path / "first.pt"))
        live["weight"].add_(1.0)  # training goes on
        writer.wait()
        writer.submit({"weight": live["weight"]}, str(tmp_path / "second.pt"))
        writer.wait()
        with pytest.raises(CheckpointWriteError, match="missing"):
            writer.submit({"weight": live["weight"]}, str(tmp_path / "missing" / "third.pt"))
            writer.wait()
    finally:
        writer.close()
    first = torch.load(tmp_path / "first.pt", weights_only=True)
    for key in ("weight", "step", "bf16", "strided"):
        assert torch.equal(first[key], expected[key]) and first[key].dtype == expected[key].dtype, key
    assert first["nested"][0].shape == (0, 4) and torch.equal(first["nested"][1][0], torch.arange(6))
    assert first["nested"][1][1] == "text" and first["scalar"] == 1.5
    assert first["weight"].untyped_storage().nbytes() == 64 * 32 * 4  # not the whole staging buffer
    assert torch.equal(torch.load(tmp_path / "second.pt", weights_only=True)["weight"], expected["weight"] + 1)


def kill_ranks_during_saves(shard, pipeline_run, tmp_path, async_save, kills):
    """tp 2 x pp 2, a save every iteration: a job in a row for each `(rank, step)` of `kills`, whose `rank`
    is killed just before its `step`-th file-system step (the rest then stopped); each next job resumes with
    `auto`. The newest complete checkpoint never goes backwards, and the finished run's losses equal the
    uninterrupted run's (`pipeline_run`), bit for bit."""
    args = overrides(shard, tmp_path / "run", 2, 2, 1, iters=12) + [
        f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=1", "checkpoint.load=auto",
        f"checkpoint.async_save={str(async_save).lower()}"]
    newest = 0
    for rank, kill_at in kills:
        crashed = run_module_ranks(4, "tests.crash_during_save", [str(kill_at), *args], cwd=REPO, timeout=300,
                                   env=dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path),
                                            CRASH_RANK=str(rank)))
        assert crashed.returncode != 0, (rank, kill_at, crashed.stderr[-3000:])
        found = newest_complete_checkpoint(tmp_path / "ckpt")
        if found is not None:
            iteration = read_metadata(found).iteration
            assert iteration >= newest, (rank, kill_at, iteration, newest)
            newest = iteration
    run_ranks(4, "megatron_bloom.cli.train", args)
    assert losses_by_iteration(tmp_path / "run") == losses_by_iteration(pipeline_run / "run")


# The file-system steps of a job at tp 2 x pp 2, counted from its start (tests/crash_during_save.py):
# - rank 0: 3 at start (the checkpoint-dir lock, a DeepSpeed op probe, the first heartbeat); then each save:
#   its 8 files (5 pipeline layers, model states, ZeRO partition, RNG), the publish's fsync of all 26 files
#   of the 4 ranks, mbloom.json (fsync, rename), the staging dir's fsync, its rename, `latest` (fsync,
#   rename), the root's fsync: 41 steps, one more (removing an interrupted save's staging dir) after a crash;
# - rank 1: 2 at start, then 8 files a save; ranks 2 and 3 (the last stage): 2 at start, then 5 files.
# With async saves each file is a torch.save and an fsync of the rank's writer process, in the same count.
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_rank_of_four_killed_at_moments_of_a_save_never_loses_the_run(shard, pipeline_run, tmp_path, async_save):
    """Three moments per mode, on three ranks: a file write, and (rank 0) the publish."""
    kills = [(0, 9), (1, 13), (2, 19)] if async_save else [(0, 5), (1, 12), (0, 40)]
    kill_ranks_during_saves(shard, pipeline_run, tmp_path, async_save, kills)


@pytest.mark.exhaustive
def test_a_rank_of_four_killed_at_every_step_of_a_synchronous_save(shard, pipeline_run, tmp_path):
    """Rank 0 at each of steps 4 to 45 (every step of its first save in the job), and every other rank at
    each step of its first save: 60 jobs."""
    kills = ([(0, step) for step in range(4, 46)] + [(1, step) for step in range(3, 11)]
             + [(rank, step) for rank in (2, 3) for step in range(3, 8)])
    kill_ranks_during_saves(shard, pipeline_run, tmp_path, False, kills)


@pytest.mark.exhaustive
def test_a_rank_of_four_killed_at_ten_moments_of_async_saves(shard, pipeline_run, tmp_path):
    """Ten moments of async saves: the writer's file writes and fsyncs on each stage and tp rank, the
    publish's fsyncs, renames and `latest` on rank 0."""
    kills = [(0, 4), (0, 11), (0, 18), (1, 5), (1, 12), (2, 6), (3, 9), (0, 30), (0, 45), (0, 51)]
    kill_ranks_during_saves(shard, pipeline_run, tmp_path, True, kills)


def test_a_damaged_checkpoint_is_passed_over_with_a_warning(shard, tmp_path, capsys):
    args = overrides(shard, tmp_path / "run", 1, 1, 1, iters=3) + [
        f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=1"]
    run_cli(["megatron_bloom.cli.train", *args])
    newest = tmp_path / "ckpt" / "global_step3"
    assert resolve_checkpoint(tmp_path / "ckpt") == newest
    victim = next(newest.glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])  # a disk that lost the end of a file
    assert resolve_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt" / "global_step2"
    assert f"skipping checkpoint {newest}" in capsys.readouterr().err
    resumed = run_cli(["megatron_bloom.cli.train", *args[:-1], "train.iters=4", "checkpoint.load=auto"])
    assert "skipping checkpoint" in resumed.stderr and "iter      3/4" in resumed.stdout


def test_a_checkpoint_keeps_its_tokenizer_wherever_it_moves(shard, tmp_path):
    """`data.tokenizer=tok` relative to the directory the run started in: the checkpoint keeps a copy, so
    once moved elsewhere (and the original tokenizer gone), `to-hf` exports it and `mbloom-eval` uses it by
    default. Another tokenizer given by hand is refused in one paragraph unless forced."""
    run_cli(["megatron_bloom.cli.train", *overrides(shard, tmp_path / "run", 1, 1, 1, iters=1),
             "data.tokenizer=tok", f"checkpoint.dir={tmp_path / 'ckpt'}"], cwd=shard)
    source = (shard / "tok" / "tokenizer.json").read_bytes()
    (tmp_path / "moved").mkdir()
    checkpoint = resolve_checkpoint(shutil.move(tmp_path / "ckpt", tmp_path / "moved" / "ckpt"))
    assert read_metadata(checkpoint).tokenizer == "tokenizer"
    assert (checkpoint / "tokenizer" / "tokenizer.json").read_bytes() == source
    run_cli(["megatron_bloom.cli.convert", "to-hf", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf")],
            cwd=tmp_path)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == source

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in sample_texts(6)))
    evaluate = ["megatron_bloom.cli.eval", f"checkpoint.load={checkpoint}", f"eval.input={tmp_path / 'docs.jsonl'}",
                "precision=fp32"]
    own = json.loads(run_cli(evaluate).stdout.splitlines()[-1])
    given = json.loads(run_cli([*evaluate, f"eval.tokenizer={shard / 'tok'}"]).stdout.splitlines()[-1])
    assert own == given  # the same vocabulary given by hand: accepted
    other = train_test_tokenizer(tmp_path / "other-tok", sample_texts(200, seed=9), vocab_size=700)
    refused = run_cli([*evaluate, f"eval.tokenizer={other}"], check=False)
    assert_user_error(refused, f"eval.tokenizer={other} is not the tokenizer checkpoint", "eval.force_tokenizer=true")
    forced = json.loads(run_cli([*evaluate, f"eval.tokenizer={other}", "eval.force_tokenizer=true"]).stdout
                        .splitlines()[-1])
    assert forced["tokens"] != own["tokens"]


def test_a_checkpoint_of_an_earlier_version_names_its_tokenizer_by_path(shard, tmp_path):
    """Checkpoints written before the copy recorded the tokenizer's absolute path: read while it exists,
    and `to-hf` says so when it is gone."""
    run_cli(["megatron_bloom.cli.train", *overrides(shard, tmp_path / "run", 1, 1, 1, iters=1),
             f"checkpoint.dir={tmp_path / 'ckpt'}"])
    metadata_file = resolve_checkpoint(tmp_path / "ckpt") / "mbloom.json"
    metadata = json.loads(metadata_file.read_text())
    for recorded, exported in ((shard / "tok", True), (tmp_path / "moved-away", False)):
        metadata_file.write_text(json.dumps(dict(metadata, tokenizer=str(recorded))))
        output = tmp_path / f"hf-{exported}"
        result = run_cli(["megatron_bloom.cli.convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output",
                          str(output)])
        assert (output / "tokenizer.json").exists() == exported
        assert ("is not there any more; the export has no tokenizer files" in " ".join(result.stderr.split())) \
            != exported


def test_a_hugging_face_import_for_a_3d_layout_trains(shard, tmp_path):
    """from-hf for (tp 2, pp 2), then one training step there: it starts from the imported weights (its first
    loss is what transformers computes on the same batch) and writes a checkpoint."""
    import transformers

    from megatron_bloom.config import load_config
    from megatron_bloom.data.builder import build_datasets

    reference = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=1024, hidden_size=64, n_layer=4, n_head=4)).eval()
    reference.save_pretrained(tmp_path / "hf")
    run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported"),
             "--tp", "2", "--pp", "2"])
    metadata = read_metadata(tmp_path / "imported")
    assert (metadata.tp, metadata.pp, metadata.contents) == (2, 2, "weights")
    args = overrides(shard, tmp_path / "run", 2, 2, 1, iters=1) + [
        f"checkpoint.load={tmp_path / 'imported'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    run_ranks(4, "megatron_bloom.cli.train", args)

    config = load_config(args)
    train_set, _, _ = build_datasets(config.data, config.model.seq_length, config.train.seed, (8, 0, 0))
    tokens = torch.from_numpy(np.stack([train_set[i] for i in range(8)]).astype(np.int64))
    with torch.no_grad():
        logits = reference(tokens[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 1024), tokens[:, 1:].reshape(-1)).item()
    assert abs(losses_by_iteration(tmp_path / "run")[1] - expected) <= 1e-4
    assert read_metadata(tmp_path / "ckpt").iteration == 1
