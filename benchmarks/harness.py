"""Requests per second of lm-evaluation-harness through our adapter against lm-eval's own `hf` model, on the
same weights, tasks and CPU, in one invocation.

    python benchmarks/harness.py [--model bloom-small] [--dtype fp32] [--batch 16] [--repeats 3]
                                 [--tasks mbloom_choice,mbloom_perplexity,mbloom_generate] [--limit N]

A random `transformers` BLOOM of the preset's shape is saved as a Hugging Face model (with an 8192-token
tokenizer trained on the sample corpus) for lm-eval's `hf` model (`HFLM`, batch size `--batch`, the same
dtype and `max_length`); ours holds the same weights (`HarnessModel`, one process). Both run the project's
offline tasks through `lm_eval.simple_evaluate`, alternating, best of `--repeats`; the time counted is the
time spent answering requests (lm-eval's `loglikelihood`, `loglikelihood_rolling` and `generate_until`
calls), not task building or metrics. Prints requests/s per kind of request and overall, the ratio, and
whether the two gave the same metrics.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_bloom.checkpoint.hf import hf_to_state_dict, write_tokenizer_config  # noqa: E402
from megatron_bloom.config import load_config  # noqa: E402
from megatron_bloom.inference.generation import prepare_for_inference  # noqa: E402
from megatron_bloom.model import TaskConfig, build_model  # noqa: E402
from megatron_bloom.parallel import ParallelState  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def timed(language_model, spent: collections.Counter, counts: collections.Counter) -> None:
    """Count the time and requests of each kind of lm-eval call on this model (instance attributes)."""
    for kind in KINDS:
        method = getattr(language_model, kind)

        def wrapper(requests, *args, _method=method, _kind=kind, **kwargs):
            start = time.perf_counter()
            answers = _method(requests, *args, **kwargs)
            spent[_kind] += time.perf_counter() - start
            counts[_kind] += len(requests)
            return answers

        setattr(language_model, kind, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-small")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", default="mbloom_choice,mbloom_perplexity,mbloom_generate")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from tokenizers import Tokenizer

    from megatron_bloom.inference.harness import HarnessModel
    from megatron_bloom.inference.harness_evaluation import shipped_tasks_dir

    dtype = DTYPES[args.dtype]
    config = load_config([f"model={args.model}"]).model
    work = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    subprocess.run([sys.executable, "-m", "megatron_bloom.cli.train_tokenizer", "--input",
                    str(REPO / "data_prep" / "sample_corpus.jsonl"), "--vocab-size", "8192", "--output",
                    str(work / "tok")], check=True, capture_output=True)
    torch.manual_seed(0)
    reference = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, n_layer=config.num_layers,
        n_head=config.num_heads)).to(dtype).eval()
    reference.save_pretrained(work / "hf")
    (work / "hf" / "tokenizer.json").write_bytes((work / "tok" / "tokenizer.json").read_bytes())
    write_tokenizer_config(work / "hf")
    model = build_model(dataclasses.replace(config), dtype=dtype)
    model.load_state_dict(hf_to_state_dict(reference.state_dict(), config, TaskConfig()))
    prepare_for_inference(model, ParallelState.single(), dtype, args.batch)  # as mbloom-eval does
    del reference
    models = {
        "megatron_bloom": HarnessModel(model, ParallelState.single(), Tokenizer.from_file(
            str(work / "tok" / "tokenizer.json")), config, max_length=config.seq_length, batch_size=args.batch),
        "hf": HFLM(pretrained=str(work / "hf"), dtype=args.dtype.replace("fp", "float").replace("bf", "bfloat"),
                   batch_size=args.batch, max_length=config.seq_length, device="cpu"),
    }
    tasks = args.tasks.split(",")
    task_manager = TaskManager(include_path=str(shipped_tasks_dir()))
    best, counts, results = {}, {}, {}
    for _ in range(args.repeats):
        for name, language_model in models.items():
            spent, counted = collections.Counter(), collections.Counter()
            timed(language_model, spent, counted)
            outcome = lm_eval.simple_evaluate(model=language_model, tasks=tasks, limit=args.limit,
                                              task_manager=task_manager, bootstrap_iters=0, log_samples=False)
            for kind in KINDS:  # unwrap for the next repeat
                language_model.__dict__.pop(kind, None)
            if name not in best or sum(spent.values()) < sum(best[name].values()):
                best[name], counts[name], results[name] = spent, counted, outcome["results"]
    print(f"{args.model}, {args.dtype}, batch {args.batch}, tasks {', '.join(tasks)}; best of {args.repeats}")
    print(f"{'requests':<24} {'count':>6} {'ours req/s':>11} {'hf req/s':>9} {'ratio':>6}")
    for kind in KINDS:
        if counts["hf"][kind]:
            ours = counts["megatron_bloom"][kind] / best["megatron_bloom"][kind]
            theirs = counts["hf"][kind] / best["hf"][kind]
            print(f"{kind:<24} {counts['hf'][kind]:>6} {ours:>11.1f} {theirs:>9.1f} {ours / theirs:>6.2f}")
    total = {name: sum(counts[name].values()) / sum(best[name].values()) for name in models}
    print(f"{'all':<24} {sum(counts['hf'].values()):>6} {total['megatron_bloom']:>11.1f} {total['hf']:>9.1f} "
          f"{total['megatron_bloom'] / total['hf']:>6.2f}")
    same = all(results["megatron_bloom"][task].get(metric) == value for task in results["hf"]
               for metric, value in results["hf"][task].items() if metric.startswith(("acc", "exact_match")))
    print(f"the same accuracies and exact matches: {same}")


if __name__ == "__main__":
    main()
