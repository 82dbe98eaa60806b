"""Quickstart: build bloom-tiny, import a Hugging Face checkpoint, check parity, export it back; then
train a tokenizer on the shipped multilingual sample corpus, turn the corpus into Megatron token shards,
build the blended training dataset, evaluate the imported model on the corpus, train bloom-tiny from
scratch on those shards with tensor parallelism 2 x pipeline parallelism 2 (4 processes), and evaluate
the trained checkpoint.

    python examples/quickstart.py [--workdir DIR] [--model bloom-tiny]

No network: the "downloaded" Hugging Face checkpoint is a randomly initialized `transformers` BLOOM of the
preset's shape, saved with `save_pretrained` exactly as a hub checkpoint is. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_bloom.checkpoint.weights import load_model_state_dict
from megatron_bloom.config import load_config
from megatron_bloom.model import build_model
from megatron_bloom.model.cpu_kernels import cpu_has_avx512_bf16


REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data_prep" / "sample_corpus.jsonl"
MODULES = {"mbloom-convert": "megatron_bloom.cli.convert", "mbloom-eval": "megatron_bloom.cli.eval",
           "mbloom-train-tokenizer": "megatron_bloom.cli.train_tokenizer", "mbloom-preprocess": "megatron_bloom.cli.preprocess"}
TRAIN_ITERS = 60


def run(command: str, *args: str) -> str:
    """Run one of the project's commands as a user would (its console script, or python -m)."""
    found = shutil.which(command)
    argv = [found] if found else [sys.executable, "-m", MODULES[command]]
    print(f"$ {command} " + " ".join(args))
    result = subprocess.run(argv + list(args), check=True, capture_output=True, text=True)
    print("  " + result.stdout.strip().replace("\n", "\n  "))
    return result.stdout


def convert(*args: str) -> None:
    run("mbloom-convert", *args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write, and keep, its files (default: a temporary dir, removed at the end)")
    parser.add_argument("--model", default="bloom-tiny", help="model preset (default bloom-tiny)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mbloom-quickstart-"))
    status = tour(args.model, workdir)
    if args.workdir is None and status == 0:
        shutil.rmtree(workdir)
        print(f"removed its files ({workdir}); --workdir DIR keeps them")
    else:
        print(f"files in {workdir}" + (" (kept to look into the failure)" if status else ""))
    return status


def tour(model: str, workdir: Path) -> int:
    """Every step, its files under `workdir`; 0 when every check holds."""

    # The reference computations (runs default to fused kernels, equal within rounding): bit-identical logits.
    config = load_config([f"model={model}", "model.attention_impl=eager", "model.fused_kernels=false"]).model
    ours = build_model(config, seed=1234)
    built = sum(p.numel() for p in ours.parameters())
    print(f"{model}: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} heads, "
          f"vocabulary {config.vocab_size}: {config.num_parameters():,} parameters (built model: {built:,})")

    import transformers  # only the reference side needs it

    torch.manual_seed(0)
    reference = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, n_layer=config.num_layers,
        n_head=config.num_heads, layer_norm_epsilon=config.layer_norm_epsilon, pad_token_id=3)).eval()
    reference.save_pretrained(workdir / "hf-source")
    convert("from-hf", "--hf", str(workdir / "hf-source"), "--output", str(workdir / "checkpoint"))
    _, state_dict = load_model_state_dict(workdir / "checkpoint")
    ours.load_state_dict(state_dict)
    ours.eval()

    input_ids = torch.randint(0, config.vocab_size, (2, min(64, config.seq_length)),
                              generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[0, :8] = 0  # one left-padded row
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask, labels=input_ids)
        actual = ours(input_ids, attention_mask=mask, labels=input_ids)
    logits_error = (expected.logits - actual.logits).abs().max().item()
    loss_error = abs(expected.loss.item() - actual.loss.item())
    print(f"parity with transformers (fp32): max |logits diff| = {logits_error:.2e}, "
          f"|loss diff| = {loss_error:.2e} (loss {actual.loss.item():.6f})")

    convert("to-hf", "--checkpoint", str(workdir / "checkpoint"), "--output", str(workdir / "hf-export"))
    source = load_file(str(workdir / "hf-source" / "model.safetensors"))
    exported = load_file(str(workdir / "hf-export" / "model.safetensors"))
    round_trip_exact = source.keys() == exported.keys() and all(torch.equal(source[k], exported[k]) for k in source)
    print(f"round trip HF -> megatron_bloom -> HF bit-exact: {round_trip_exact}")

    # Data: tokenizer -> per-language token shards -> a temperature-blended training dataset.
    run("mbloom-train-tokenizer", "--input", str(CORPUS), "--vocab-size", str(min(config.vocab_size, 1024)),
        "--output", str(workdir / "tokenizer"))
    run("mbloom-preprocess", "--input", str(CORPUS), "--tokenizer", str(workdir / "tokenizer"), "--output-prefix",
        str(workdir / "shards" / "corpus"), "--split-by-lang", "--append-eod", "--workers", "2")
    prefixes = sorted(str(p.with_suffix("")) for p in (workdir / "shards").glob("corpus_*.idx"))
    from megatron_bloom.data.builder import build_datasets

    data = load_config([f"data.paths=[{','.join(prefixes)}]", "data.temperature=2.0"]).data
    train, valid, _ = build_datasets(data, config.seq_length, seed=1234, num_samples=(1000, 100, 0))
    languages = [Path(p).name.removeprefix("corpus_") for p in prefixes]
    print(f"blended training set: {len(train)} samples of {config.seq_length + 1} tokens from {len(prefixes)} "
          f"languages; temperature-2 weights: "
          + ", ".join(f"{lang} {w:.3f}" for lang, w in zip(languages, train.weights)))
    summary = run("mbloom-eval", f"checkpoint.load={workdir / 'checkpoint'}", f"eval.input={CORPUS}",
                  f"eval.tokenizer={workdir / 'tokenizer'}", "precision=fp32", "eval.micro_batch_size=8")
    perplexity = json.loads(summary.strip().splitlines()[-1])["perplexity"]

    # Training: tp 2 x pp 2 on 4 processes (DeepSpeed pipeline with tied embeddings, ZeRO-1), in bf16 where
    # the CPU computes in bf16 (AVX512-BF16), else in fp32: elsewhere every bf16 product is emulated, 10x slower.
    precision = "bf16" if torch.cuda.is_available() or cpu_has_avx512_bf16() else "fp32"
    overrides = [f"model={model}", f"data.paths=[{','.join(prefixes)}]", "data.temperature=2.0",
                 f"data.tokenizer={workdir / 'tokenizer'}", "parallel.tp=2", "parallel.pp=2", f"precision={precision}",
                 f"train.iters={TRAIN_ITERS}", "train.global_batch_size=8", "train.micro_batch_size=2",
                 "optim.lr=3e-3", "optim.min_lr=3e-4", "sched.warmup_iters=10", "logging.interval=1",
                 f"run.dir={workdir / 'run'}", f"checkpoint.dir={workdir / 'trained'}"]
    print("$ torchrun --nproc-per-node 4 -m megatron_bloom.cli.train " + " ".join(overrides), flush=True)
    trained = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                                "-m", "megatron_bloom.cli.train", *overrides], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    output = []
    for line in trained.stdout:  # as the run goes: every 20th iteration's line, its saves and its summary
        output.append(line)
        iteration = int(line.split()[1].split("/")[0]) if line.startswith("iter ") else None
        shown = (iteration == 1 or iteration % 20 == 0) if iteration is not None else \
            line.startswith(("saved checkpoint", "mbloom-train: done"))
        if shown:
            print("  " + line.rstrip(), flush=True)
    if trained.wait() != 0:
        print("".join(output[-60:]))
        return 1
    losses = [json.loads(line)["loss"] for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"training loss fell from {losses[0]:.3f} to {losses[-1]:.3f} in {TRAIN_ITERS} iterations")

    # Evaluation of the trained (tp 2 x pp 2) checkpoint, here in one process: any layout loads.
    summary = run("mbloom-eval", f"checkpoint.load={workdir / 'trained'}", f"eval.input={CORPUS}",
                  f"eval.tokenizer={workdir / 'tokenizer'}", "precision=fp32", "eval.micro_batch_size=8")
    trained_perplexity = json.loads(summary.strip().splitlines()[-1])["perplexity"]
    print(f"perplexity on the sample corpus: {perplexity:.1f} before training, {trained_perplexity:.1f} after")

    ok = (logits_error <= 1e-5 and loss_error <= 1e-5 and round_trip_exact and built == config.num_parameters()
          and len(train) == 1000 and len(prefixes) == 12 and perplexity > 0 and losses[-1] < losses[0] - 1.0
          and trained_perplexity < perplexity / 2)
    print("quickstart: OK" if ok else "quickstart: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
