"""`mbloom-preprocess --tasks` on this machine: throughput as tasks are added, against the single-process path,
and a check that every layout writes the same shards, measured in this one invocation.

    python benchmarks/preprocess_tasks.py [--megabytes 200] [--repeats 2] [--split-by-lang] [--slurm]

Generates a multilingual corpus of about `--megabytes` MB (the sample corpus's sentences, `generate_documents`)
and a 8192-token tokenizer trained on the shipped corpus, then runs each of these as a fresh process, in
turn, best of `--repeats`:
  * `one process, 1 worker`: today's single-process path, `--workers 1` (the main process reads and writes,
    one worker process parses and tokenizes): the baseline of a task's throughput;
  * `one process, all cores`: the same with `--workers` = the cores (its strongest stock setting);
  * `1 task at a time`: `--tasks C --workers 1` (C = the cores): tasks one after another, each reading,
    tokenizing and writing its part in one process, then the merge;
  * `C tasks at once`: `--tasks C --workers C`;
  * with `--slurm`: `--tasks 4 --executor slurm` on SLURM_CONF's cluster (or the local one this script starts).
Throughput is tokens over the command's wall time (interpreter start included). Ratios: a task against the
single-process path with one worker, C tasks against one at a time and against one process with all cores.
Every run's shards must equal the first's byte for byte (the script fails otherwise); with `--split-by-lang`
every per-language shard is compared.
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

from data_prep.sample_corpus import generate_documents  # noqa: E402


def write_corpus(path: Path, megabytes: float) -> int:
    """Batches of generated documents (each batch its own seed) until the file holds `megabytes` MB."""
    written, seed = 0, 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < megabytes * 1e6:
            lines = "".join(json.dumps(document, ensure_ascii=False) + "\n"
                            for document in generate_documents(20_000, seed=seed))
            handle.write(lines)
            written += len(lines.encode("utf-8"))
            seed += 1
    return written


def shards(prefix: Path) -> dict:
    return {path.name[len(prefix.name):]: path.read_bytes() for path in sorted(prefix.parent.iterdir())
            if path.name.startswith(prefix.name) and path.suffix in (".bin", ".idx")}


def run(arguments, prefix: Path, env) -> tuple:
    command = [sys.executable, "-m", "megatron_bloom.cli.preprocess", *map(str, arguments), "--output-prefix",
               str(prefix)]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
    return seconds, json.loads(Path(f"{prefix}.stats.json").read_text())


def start_local_slurm(directory: Path) -> dict:
    script = REPO / "launch" / "slurm" / "local_cluster.sh"
    started = subprocess.run([str(script), "start", str(directory)], capture_output=True, text=True)
    if started.returncode != 0:
        raise SystemExit(f"the local SLURM cluster did not start:\n{started.stdout}{started.stderr}")
    return {"SLURM_CONF": str(directory / "slurm.conf")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--split-by-lang", action="store_true")
    parser.add_argument("--slurm", action="store_true", help="also --tasks 4 --executor slurm")
    parser.add_argument("--keep", type=Path, help="work here and keep the corpus (default: a temporary dir)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    work = args.keep or Path(tempfile.mkdtemp(prefix="preprocess-tasks-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started_slurm = None
    try:
        corpus, tokenizer = work / "corpus.jsonl", work / "tok"
        if not corpus.is_file():
            print(f"writing {write_corpus(corpus, args.megabytes) / 1e6:,.0f} MB of documents ...", flush=True)
        if not (tokenizer / "tokenizer.json").is_file():
            subprocess.run([sys.executable, "-m", "megatron_bloom.cli.train_tokenizer", "--input",
                            str(REPO / "data_prep" / "sample_corpus.jsonl"), "--vocab-size", "8192", "--output",
                            str(tokenizer)], env=env, check=True, capture_output=True)
        common = ["--input", corpus, "--tokenizer", tokenizer, "--append-eod"] + (
            ["--split-by-lang"] if args.split_by_lang else [])
        layouts = {
            "one process, 1 worker": ["--workers", 1],
            f"one process, {cores} workers": ["--workers", cores],
            "1 task at a time": ["--tasks", cores, "--workers", 1],
            f"{cores} tasks at once": ["--tasks", cores, "--workers", cores],
        }
        if args.slurm:
            if "SLURM_CONF" not in os.environ:
                started_slurm = work / "slurm"
                env.update(start_local_slurm(started_slurm))
            layouts["4 tasks on SLURM"] = ["--tasks", 4, "--executor", "slurm"]
        best = {name: float("inf") for name in layouts}
        reference, tokens = None, None
        for repeat in range(args.repeats):
            for number, (name, flags) in enumerate(layouts.items()):
                prefix = work / f"out{number}"
                seconds, stats = run(common + flags, prefix, env)
                best[name] = min(best[name], seconds)
                written = shards(prefix)
                if reference is None:
                    reference, tokens = written, stats["tokens"]
                elif written != reference:
                    raise SystemExit(f"{name} wrote other shards than {next(iter(layouts))}")
                for path in prefix.parent.glob(prefix.name + "*"):
                    path.unlink() if path.is_file() else shutil.rmtree(path)
        print(f"{corpus.stat().st_size / 1e6:,.0f} MB, {tokens:,} tokens, {cores} cores; every layout wrote the "
              f"same {len(reference)} files, byte for byte")
        print(f"{'layout':<26} {'seconds':>8} {'tokens/s':>12}")
        for name in layouts:
            print(f"{name:<26} {best[name]:>8.2f} {tokens / best[name]:>12,.0f}")
        one_task, all_tasks = best["1 task at a time"], best[f"{cores} tasks at once"]
        print(f"a task against one process with 1 worker: {best['one process, 1 worker'] / one_task:.2f}")
        print(f"{cores} tasks at once against 1 at a time: {one_task / all_tasks:.2f}")
        print(f"{cores} tasks at once against one process with {cores} workers: "
              f"{best[f'one process, {cores} workers'] / all_tasks:.2f}")
    finally:
        if started_slurm is not None:
            subprocess.run([str(REPO / "launch" / "slurm" / "local_cluster.sh"), "stop", str(started_slurm)])
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
