"""Throughput of `mbloom-preprocess` against the raw `tokenizers` batch encoder, on the same texts.

    python benchmarks/preprocess.py [--documents 100000] [--workers 2] [--tokenizer DIR]

Makes a corpus of short multilingual documents (about 20 MB for 100k) from the sample corpus's sentences,
then measures, in this one invocation:
  * the limit: one `encode_batch_fast` loop over the texts already in memory (Rust threads on all cores),
  * `mbloom-preprocess --workers N` end to end (reading jsonl, parsing, tokenizing, writing the shards).
Prints both and their ratio, and documents/s against Megatron-DeepSpeed's tools/preprocess_data.py
(about 9k documents/s on 2 cores for such a corpus, the figure this project's issue gives).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.sample_corpus import generate_documents, write_jsonl  # noqa: E402

MEGATRON_DEEPSPEED_DOCS_PER_S = 9000.0


def encode_batch_limit(texts, tokenizer_path: Path, batch: int = 1024) -> tuple:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path / "tokenizer.json"))
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch):
        tokens += sum(len(e) for e in tokenizer.encode_batch_fast(texts[i: i + batch], add_special_tokens=False))
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: train one on the sample corpus")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each side")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mbloom-bench-preprocess-"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = work / "tokenizer"
        subprocess.run([sys.executable, "-m", "megatron_bloom.cli.train_tokenizer", "--input",
                        str(REPO / "data_prep" / "sample_corpus.jsonl"), "--vocab-size", "8000", "--output",
                        str(tokenizer)], check=True, env=env, capture_output=True)
    documents = generate_documents(args.documents, seed=7, max_sentences=5)
    write_jsonl(documents, work / "corpus.jsonl")
    texts = [d["text"] for d in documents]
    size_mb = (work / "corpus.jsonl").stat().st_size / 1e6
    print(f"corpus: {len(texts):,} documents, {size_mb:.1f} MB; {os.cpu_count()} cores")

    limit = min((encode_batch_limit(texts, tokenizer) for _ in range(args.repeats)), key=lambda r: r[1])
    limit_tps = limit[0] / limit[1]
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "megatron_bloom.cli.preprocess", "--input", str(work / "corpus.jsonl"),
                        "--tokenizer", str(tokenizer), "--output-prefix", str(work / "out"),
                        "--workers", str(args.workers)], check=True, env=env, capture_output=True)
        wall = time.perf_counter() - start
        stats = json.loads((work / "out.stats.json").read_text())
        runs.append((stats["seconds"], wall, stats))
    seconds, wall, stats = min(runs, key=lambda r: r[0])
    assert stats["tokens"] == limit[0], "both sides must see the same tokens"
    ours_tps = stats["tokens"] / seconds
    ours_dps = stats["documents"] / seconds
    print(f"encode_batch_fast limit: {limit_tps:,.0f} tokens/s ({len(texts) / limit[1]:,.0f} documents/s)")
    print(f"mbloom-preprocess --workers {args.workers}: {ours_tps:,.0f} tokens/s, {ours_dps:,.0f} documents/s "
          f"({seconds:.2f} s in the pipeline, {wall:.2f} s with interpreter start-up)")
    print(f"ratio to the encode_batch_fast limit: {ours_tps / limit_tps:.2f}")
    print(f"speed-up over Megatron-DeepSpeed's preprocess_data.py (~{MEGATRON_DEEPSPEED_DOCS_PER_S:,.0f} "
          f"documents/s): {ours_dps / MEGATRON_DEEPSPEED_DOCS_PER_S:.1f}x")
    print(json.dumps({"limit_tokens_per_s": round(limit_tps), "tokens_per_s": round(ours_tps),
                      "documents_per_s": round(ours_dps), "ratio": round(ours_tps / limit_tps, 3),
                      "speedup_vs_megatron_deepspeed": round(ours_dps / MEGATRON_DEEPSPEED_DOCS_PER_S, 2)}))


if __name__ == "__main__":
    main()
