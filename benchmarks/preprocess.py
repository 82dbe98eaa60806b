"""Throughput of `mbloom-preprocess` against what a user would otherwise run, on the same corpus, measured
in this one invocation.

    python benchmarks/preprocess.py [--documents 100000] [--workers 2] [--repeats 3] [--tokenizer DIR]

Makes a corpus of short multilingual documents (about 20 MB for 100k) from the sample corpus's sentences,
then times, alternating, best of `--repeats` each:
  * the baseline: Hugging Face `datasets`, the usual way to tokenize a corpus: `load_dataset("json")`
    (JSON to Arrow), then `Dataset.map(batched=True, num_proc=N)` with the same fast tokenizer's
    `encode_batch_fast` (the Rust batch encoder, no `transformers` wrapper in between), writing its
    tokenized Arrow files; fresh caches each time, so nothing is reused;
  * `mbloom-preprocess --workers N` end to end (reading jsonl, parsing, tokenizing, writing the shards);
  * the limit: one `encode_batch_fast` loop over the texts already in memory (no reading, no writing).
Both pipelines run as fresh processes; each reports its own pipeline time (after the interpreter and
imports are up) and the wall time with them. The ratios are of the pipeline times. (Megatron-LM's
`tools/preprocess_data.py` is not on PyPI, so it is not run here.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.sample_corpus import generate_documents, write_jsonl  # noqa: E402


def encode_batch_limit(texts, tokenizer_path: Path, batch: int = 1024) -> tuple:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path / "tokenizer.json"))
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch):
        tokens += sum(len(e) for e in tokenizer.encode_batch_fast(texts[i: i + batch], add_special_tokens=False))
    return tokens, time.perf_counter() - start


def datasets_pipeline(corpus: Path, tokenizer_path: Path, cache: Path, workers: int) -> dict:
    """The baseline, in this (fresh) process: what `--datasets-baseline` runs."""
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    tokenizer_file = str(tokenizer_path / "tokenizer.json")
    start = time.perf_counter()
    raw = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache / "load"),
                                num_proc=workers)

    def tokenize(batch, _tokenizer={}):  # one tokenizer per worker process, loaded at its first batch
        if "tokenizer" not in _tokenizer:
            _tokenizer["tokenizer"] = Tokenizer.from_file(tokenizer_file)
        encodings = _tokenizer["tokenizer"].encode_batch_fast(batch["text"], add_special_tokens=False)
        return {"input_ids": [encoding.ids for encoding in encodings]}

    tokenized = raw.map(tokenize, batched=True, batch_size=1000, num_proc=workers, remove_columns=raw.column_names,
                        cache_file_name=str(cache / "map" / "tokenized.arrow"))
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    return {"seconds": seconds, "documents": len(tokenized), "tokens": tokens,
            "arrow_bytes": sum(path.stat().st_size for path in (cache / "map").glob("*.arrow"))}


def timed_process(command, env) -> tuple:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-4000:])
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: train one on the sample corpus")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each side")
    parser.add_argument("--datasets-baseline", nargs=3, metavar=("CORPUS", "TOKENIZER", "CACHE"),
                        help=argparse.SUPPRESS)  # the baseline's own process
    args = parser.parse_args()
    if args.datasets_baseline:
        corpus, tokenizer, cache = map(Path, args.datasets_baseline)
        print(json.dumps(datasets_pipeline(corpus, tokenizer, cache, args.workers)))
        return
    work = Path(tempfile.mkdtemp(prefix="mbloom-bench-preprocess-"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = work / "tokenizer"
        subprocess.run([sys.executable, "-m", "megatron_bloom.cli.train_tokenizer", "--input",
                        str(REPO / "data_prep" / "sample_corpus.jsonl"), "--vocab-size", "8000", "--output",
                        str(tokenizer)], check=True, env=env, capture_output=True)
    documents = generate_documents(args.documents, seed=7, max_sentences=5)
    corpus = work / "corpus.jsonl"
    write_jsonl(documents, corpus)
    texts = [d["text"] for d in documents]
    print(f"corpus: {len(texts):,} documents, {corpus.stat().st_size / 1e6:.1f} MB; {os.cpu_count()} cores, "
          f"--workers {args.workers}")

    ours_runs, baseline_runs = [], []
    for repeat in range(args.repeats):
        _, wall = timed_process([sys.executable, "-m", "megatron_bloom.cli.preprocess", "--input", str(corpus),
                                 "--tokenizer", str(tokenizer), "--output-prefix", str(work / "out"),
                                 "--workers", str(args.workers)], env)
        ours_runs.append((json.loads((work / "out.stats.json").read_text()), wall))
        cache = work / f"datasets-cache-{repeat}"
        result, wall = timed_process([sys.executable, str(Path(__file__).resolve()), "--workers", str(args.workers),
                                      "--datasets-baseline", str(corpus), str(tokenizer), str(cache)], env)
        baseline_runs.append((json.loads(result.stdout.strip().splitlines()[-1]), wall))
        shutil.rmtree(cache, ignore_errors=True)
    limit = min((encode_batch_limit(texts, tokenizer) for _ in range(args.repeats)), key=lambda r: r[1])
    ours, ours_wall = min(ours_runs, key=lambda run: run[0]["seconds"])
    baseline, baseline_wall = min(baseline_runs, key=lambda run: run[0]["seconds"])
    assert ours["tokens"] == baseline["tokens"] == limit[0], "every side must produce the same tokens"
    tokens = limit[0]
    rate = {"mbloom-preprocess": tokens / ours["seconds"], "datasets": tokens / baseline["seconds"],
            "limit": tokens / limit[1]}
    print(f"datasets load_dataset + map(num_proc={args.workers}): {rate['datasets']:,.0f} tokens/s, "
          f"{len(texts) / baseline['seconds']:,.0f} documents/s ({baseline['seconds']:.2f} s in the pipeline, "
          f"{baseline_wall:.2f} s with start-up; Arrow output {baseline['arrow_bytes'] / 1e6:.1f} MB)")
    print(f"mbloom-preprocess --workers {args.workers}: {rate['mbloom-preprocess']:,.0f} tokens/s, "
          f"{len(texts) / ours['seconds']:,.0f} documents/s ({ours['seconds']:.2f} s in the pipeline, "
          f"{ours_wall:.2f} s with start-up)")
    print(f"encode_batch_fast over texts in memory (the limit): {rate['limit']:,.0f} tokens/s")
    print(f"mbloom-preprocess / datasets: {rate['mbloom-preprocess'] / rate['datasets']:.2f}x in the pipeline, "
          f"{baseline_wall / ours_wall:.2f}x with start-up; mbloom-preprocess / the limit: "
          f"{rate['mbloom-preprocess'] / rate['limit']:.2f}")
    print(json.dumps({"tokens": tokens, "documents": len(texts),
                      "tokens_per_s": {name: round(value) for name, value in rate.items()},
                      "ratio_to_datasets": round(rate["mbloom-preprocess"] / rate["datasets"], 3),
                      "ratio_to_datasets_wall": round(baseline_wall / ours_wall, 3),
                      "ratio_to_limit": round(rate["mbloom-preprocess"] / rate["limit"], 3)}))


if __name__ == "__main__":
    main()
