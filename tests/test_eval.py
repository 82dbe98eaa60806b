"""`mbloom-eval` at several layouts against the loss transformers computes on the same documents."""

import json

import pytest
import torch

from megatron_bloom.data.tokenizer import load_tokenizer
from megatron_bloom.model import ModelConfig
from tests.conftest import assert_user_error, hf_model, run_cli, run_ranks, sample_texts, train_test_tokenizer

SEQ_LENGTH = 48
CONFIG = ModelConfig(num_layers=2, hidden_size=96, num_heads=6, vocab_size=1000, seq_length=SEQ_LENGTH)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tokenizer, 23 documents (one bad line, one of a single token), a HF model and its tp=1/tp=2 imports."""
    root = tmp_path_factory.mktemp("eval")
    texts = sample_texts(23, seed=1, max_words=40)
    train_test_tokenizer(root / "tokenizer", sample_texts(400, seed=2), vocab_size=600)
    lines = [json.dumps({"text": text}) for text in texts]
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"text": "ka"}))
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    reference = hf_model(CONFIG, seed=5)
    reference.save_pretrained(root / "hf")
    for tp in (1, 2):
        run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(root / "hf"), "--output", str(root / f"tp{tp}"),
                 "--tp", str(tp)])
    return root, reference, texts + ["ka"]


def reference_loss(reference, tokenizer_dir, texts):
    """Summed next-token NLL / predicted tokens, from transformers, one document at a time."""
    tokenizer = load_tokenizer(tokenizer_dir)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False).ids[:SEQ_LENGTH]
            if len(ids) < 2:
                continue
            input_ids = torch.tensor([ids])
            nll += reference(input_ids, labels=input_ids).loss.double().item() * (len(ids) - 1)
            tokens += len(ids) - 1
    return nll / tokens, tokens


def run_eval(root, checkpoint, nproc, *overrides):
    args = [f"checkpoint.load={root / checkpoint}", f"eval.input={root / 'docs.jsonl'}",
            f"eval.tokenizer={root / 'tokenizer'}", "precision=fp32", "eval.micro_batch_size=4",
            f"eval.seq_length={SEQ_LENGTH}", *overrides]
    if nproc == 1:
        result = run_cli(["megatron_bloom.cli.eval", *args])
    else:
        result = run_ranks(nproc, "megatron_bloom.cli.eval", args)
    return result, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("checkpoint, nproc, overrides", [
    ("tp2", 2, ["parallel.tp=2"]),                                              # the acceptance run
    ("tp2", 1, []),                                                             # tp=2 shards merged for tp=1
    pytest.param("tp1", 4, ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true"],  # sliced;
                 marks=pytest.mark.slow),                                                      # dp splits docs
], ids=["tp2-from-tp2", "tp1-from-tp2", "tp2-dp2-sp-from-tp1"])
def test_eval_matches_transformers(workspace, checkpoint, nproc, overrides):
    root, reference, texts = workspace
    expected_loss, expected_tokens = reference_loss(reference, root / "tokenizer", texts)
    result, summary = run_eval(root, checkpoint, nproc, *overrides)
    assert summary["tokens"] == expected_tokens
    assert summary["documents"] == 24 and summary["skipped"] == 1
    assert abs(summary["loss"] - expected_loss) <= 1e-4, (summary, expected_loss)
    assert summary["perplexity"] == pytest.approx(torch.tensor(summary["loss"]).exp().item(), rel=1e-6)
    assert "skipped 1 lines" in result.stderr and "not JSON (lines 6)" in result.stderr


@pytest.mark.slow
def test_a_pipeline_checkpoint_evaluates_the_same_at_every_layout(pipeline_run, shard, tmp_path):
    """The (tp 2, pp 2) training run's last checkpoint at (tp, pp) = (1, 1), (2, 1), (1, 2), (2, 2), (1, 4):
    one loss within 1e-5, which is the loss transformers computes with its to-hf export within 1e-4."""
    import transformers

    texts = sample_texts(13, seed=3)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    losses = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2), (1, 4)):
        result = run_ranks(tp * pp, "megatron_bloom.cli.eval", [
            f"checkpoint.load={pipeline_run / 'ckpt'}", f"eval.input={tmp_path / 'docs.jsonl'}",
            f"eval.tokenizer={shard / 'tok'}", "precision=fp32", "eval.micro_batch_size=2",
            f"eval.seq_length={SEQ_LENGTH}", f"parallel.tp={tp}", f"parallel.pp={pp}"])
        losses[tp, pp] = json.loads(result.stdout.strip().splitlines()[-1])["loss"]
    assert max(losses.values()) - min(losses.values()) <= 1e-5, losses
    run_cli(["megatron_bloom.cli.convert", "to-hf", "--checkpoint", str(pipeline_run / "ckpt"), "--output",
             str(tmp_path / "hf")])
    reference = transformers.BloomForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected, _ = reference_loss(reference, shard / "tok", texts)
    assert abs(losses[2, 2] - expected) <= 1e-4, (losses, expected)


def test_layout_errors_are_clear(workspace, tmp_path):
    root, _, _ = workspace
    result = run_cli(["megatron_bloom.cli.eval", f"checkpoint.load={root / 'tp2'}", f"eval.input={root / 'docs.jsonl'}",
                      f"eval.tokenizer={root / 'tokenizer'}", "parallel.tp=4"], check=False)
    assert_user_error(result, "model.num_heads (6)", "parallel.tp (4)")
    result = run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(root / "hf"), "--output", str(tmp_path / "c"),
                      "--tp", "4"], check=False)
    assert_user_error(result, "model.num_heads (6)", "parallel.tp (4)")
    result = run_cli(["megatron_bloom.cli.eval", f"checkpoint.load={root / 'tp2'}", f"eval.input={root / 'docs.jsonl'}",
                      f"eval.tokenizer={root / 'tokenizer'}", "parallel.tp=2"], check=False)
    assert_user_error(result, "must equal the number of processes (1)", "torchrun --nproc-per-node 2")


@pytest.mark.parametrize("problem, fragment", [
    ("no-input", "needs eval.input"),
    ("missing-input", "does not exist"),
    ("missing-tokenizer", "not found"),
    ("no-checkpoint", "does not exist"),
    ("flag", "takes Hydra overrides"),
])
def test_bad_eval_input(workspace, tmp_path, problem, fragment):
    root, _, _ = workspace
    args = {"checkpoint.load": root / "tp1", "eval.input": root / "docs.jsonl", "eval.tokenizer": root / "tokenizer"}
    extra = []
    if problem == "no-input":
        del args["eval.input"]
    elif problem == "missing-input":
        args["eval.input"] = tmp_path / "nope.jsonl"
    elif problem == "missing-tokenizer":
        args["eval.tokenizer"] = tmp_path / "tok"
    elif problem == "no-checkpoint":
        args["checkpoint.load"] = tmp_path / "ckpt"
    else:
        extra = ["--tp", "2"]
    result = run_cli(["megatron_bloom.cli.eval", *[f"{k}={v}" for k, v in args.items()], *extra], check=False)
    assert_user_error(result, fragment)
