"""`mbloom-preprocess --tasks N`: a job of tasks (here, and as SLURM job arrays) writes the shards one process
writes, byte for byte; a cancelled task is the only one a rerun redoes; `--dedup` keeps the first of
duplicates, whatever the tasks."""

import fcntl
import gzip
import json
import os
import random
import subprocess
import sys
import time

import pytest
from tokenizers import Tokenizer

from megatron_bloom.cli.preprocess import main as preprocess_main
from tests.conftest import CORPUS, REPO, assert_user_error, assert_user_error_in_process, run_cli
from tests.test_preprocess import megatron_documents


def preprocess(*args, check=True):
    return run_cli(["megatron_bloom.cli.preprocess", *map(str, args)], check=check)


def shard_files(prefix):
    """Every shard a run wrote (by file name after the prefix) and its bytes."""
    directory, stem = prefix.parent, prefix.name
    return {path.name[len(stem):]: path.read_bytes() for path in sorted(directory.iterdir())
            if path.name.startswith(stem) and path.suffix in (".bin", ".idx")}


def mixed_inputs(directory):
    """The shipped corpus as a jsonl part, a file of bad records, a gzipped part and a last jsonl part."""
    lines = CORPUS.read_bytes().splitlines(keepends=True)
    (directory / "a.jsonl").write_bytes(b"".join(lines[:700]))
    (directory / "bad.jsonl").write_bytes(b'{"text": ""}\n\nnot json\n{"txt": "no text key"}\n')
    (directory / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[700:900])))
    (directory / "c.jsonl").write_bytes(b"".join(lines[900:]))
    return [directory / name for name in ("a.jsonl", "bad.jsonl", "b.jsonl.gz", "c.jsonl")]


@pytest.mark.parametrize("split_by_lang", [False, True])
def test_four_local_tasks_write_what_one_process_writes_byte_for_byte(shard, tmp_path, split_by_lang):
    inputs = mixed_inputs(tmp_path)
    split = ["--split-by-lang"] if split_by_lang else []
    common = ["--input", *inputs, "--tokenizer", shard / "tok", "--append-eod", *split]
    preprocess(*common, "--output-prefix", tmp_path / "one", "--workers", 1)
    result = preprocess(*common, "--output-prefix", tmp_path / "four", "--tasks", 4, "--workers", 2)
    one, four = shard_files(tmp_path / "one"), shard_files(tmp_path / "four")
    assert len(four) == (24 if split_by_lang else 2) and four == one
    stats = [json.loads((tmp_path / f"{name}.stats.json").read_text()) for name in ("one", "four")]
    for key in ("documents", "tokens", "skipped_total", "skipped"):
        assert stats[0][key] == stats[1][key], key
    assert stats[1]["skipped"]["not JSON"] == {"count": 1, "first_lines": [f"{inputs[1]}:3"]}
    assert stats[1]["tasks"] == 4 and len(stats[1]["task_seconds"]) == 4
    assert not (tmp_path / "four.tasks").exists()  # the run's work directory is gone once it ends well
    assert "wrote" in result.stdout
    if not split_by_lang:  # the shipped corpus's documents, bad records aside: the session's shard, and what
        assert four == shard_files(shard / "corpus")  # megatron-core reads back as the tokenizer's ids
        tokenizer = Tokenizer.from_file(str(shard / "tok" / "tokenizer.json"))
        expected = [tokenizer.encode(json.loads(line)["text"], add_special_tokens=False).ids + [2]
                    for line in CORPUS.read_text(encoding="utf-8").splitlines()]
        assert megatron_documents(tmp_path / "four") == expected


def test_the_first_bad_record_in_input_order_is_reported_whichever_task_meets_it(shard, tmp_path):
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1000] = "not json (met by the last task)\n"
    lines[600] = '{"text": 7}\n'  # the first in input order, met by the third of four tasks
    (tmp_path / "corpus.jsonl").write_text("".join(lines), encoding="utf-8")
    result = preprocess("--input", tmp_path / "corpus.jsonl", "--tokenizer", shard / "tok", "--output-prefix",
                        tmp_path / "out", "--tasks", 4, "--workers", 2, "--strict", check=False)
    assert_user_error(result, f"{tmp_path / 'corpus.jsonl'}:601: non-string 'text' (--strict stops at the first bad")
    assert not any(path.suffix in (".bin", ".idx") for path in tmp_path.iterdir())


def test_job_mistakes_are_one_paragraph(shard, tmp_path, capsys):
    common = ["--input", str(CORPUS), "--tokenizer", str(shard / "tok"), "--output-prefix", str(tmp_path / "out")]
    assert_user_error_in_process(preprocess_main, [*common, "--tasks", "0"], capsys, "--tasks must be at least 1")
    assert_user_error_in_process(preprocess_main, [*common, "--tasks", "2", "--slurm-time", "1:00:00"], capsys,
                                 "--slurm-partition and --slurm-time are for --executor slurm")
    assert_user_error_in_process(preprocess_main, [*common, "--dedup", "exact", "--tasks", "70000"], capsys,
                                 "at most 65535 tasks")
    (tmp_path / "out.tasks").mkdir()
    with open(tmp_path / "out.tasks" / "lock", "w") as held:  # another run is writing the same prefix
        fcntl.flock(held, fcntl.LOCK_EX)
        assert_user_error_in_process(preprocess_main, [*common, "--tasks", "2"], capsys,
                                     "another mbloom-preprocess is writing to the same --output-prefix")
    no_slurm = dict(os.environ, PATH=os.path.dirname(sys.executable), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "megatron_bloom.cli.preprocess", *common, "--tasks", "2",
                             "--executor", "slurm"], env=no_slurm, capture_output=True, text=True, timeout=120)
    assert_user_error(result, "--executor slurm needs SLURM's sbatch on the PATH")


# --- deduplication ----------------------------------------------------------------------------------------

def planted_corpus(path, seed=0):
    """400 distinct documents in three languages (zh written without spaces), then 40 exact copies of earlier
    documents (10 of them upper-cased or with doubled spaces: equal once normalized) and 40 near copies (2 words
    or characters changed), each placed after its original. Returns the records and, for each, what it is:
    ("distinct", i), ("exact", i) or ("near", i), i the index of the original."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice("abcdefghijklmnoprstuvwyzéèàü") for _ in range(rng.randint(2, 9)))
                  for _ in range(4000)]
    han = [chr(0x4E00 + rng.randrange(3000)) for _ in range(800)]

    def text(language):
        if language == "zh":
            return "".join(rng.choice(han) for _ in range(rng.randint(200, 300)))
        return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(120, 220)))

    def changed(original, language):
        units = list(original) if language == "zh" else original.split(" ")
        for position in rng.sample(range(len(units)), 2):
            units[position] = rng.choice(han) if language == "zh" else rng.choice(vocabulary) + "x"
        return ("" if language == "zh" else " ").join(units)

    records = [{"text": text(language), "lang": language} for language in rng.choices(["en", "fr", "zh"], k=400)]
    kinds = [("distinct", i) for i in range(400)]
    for kind, originals in (("exact", rng.sample(range(400), 40)), ("near", rng.sample(range(400), 40))):
        for count, original in enumerate(originals):
            record = dict(records[kinds.index(("distinct", original))])
            if kind == "near":
                record["text"] = changed(record["text"], record["lang"])
            elif count < 5:
                record["text"] = record["text"].upper()
            elif count < 10:
                record["text"] = record["text"].replace(" ", "  ") + "\n"
            at = rng.randint(kinds.index(("distinct", original)) + 1, len(records))
            records.insert(at, record)
            kinds.insert(at, (kind, original))
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return records, kinds


def test_dedup_removes_the_planted_copies_keeping_the_first_whatever_the_tasks(shard, tmp_path):
    records, kinds = planted_corpus(tmp_path / "planted.jsonl")
    tokenizer = Tokenizer.from_file(str(shard / "tok" / "tokenizer.json"))
    ids = [tuple(tokenizer.encode(record["text"], add_special_tokens=False).ids) for record in records]
    by_language = {language: [i for i, record in enumerate(records) if record["lang"] == language]
                   for language in ("en", "fr", "zh")}
    for mode in ("exact", "near"):
        outputs = {}
        for tasks in (1, 4):
            prefix = tmp_path / f"{mode}{tasks}"
            preprocess("--input", tmp_path / "planted.jsonl", "--tokenizer", shard / "tok", "--output-prefix", prefix,
                       "--split-by-lang", "--dedup", mode, "--tasks", tasks, "--workers", 2)
            outputs[tasks] = shard_files(prefix)
        assert outputs[1] == outputs[4], mode  # the same documents kept, whatever the tasks
        stats = json.loads((tmp_path / f"{mode}4.stats.json").read_text())
        kept = set()
        for language, indices in by_language.items():
            documents = [tuple(document) for document in megatron_documents(tmp_path / f"{mode}4_{language}")]
            # each kept document is the first record with its ids, in input order
            positions = [next(i for i in indices if ids[i] == document) for document in documents]
            assert positions == sorted(positions)
            kept.update(positions)
            removed = len(indices) - len(documents)
            assert stats["outputs"][language]["duplicates_removed"] == removed
        removed = [kinds[i] for i in range(len(records)) if i not in kept]
        assert stats["duplicates_removed"] == len(removed)
        if mode == "exact":
            assert sorted(removed) == sorted(kind for kind in kinds if kind[0] == "exact")
        else:
            near_removed = sum(kind == "near" for kind, _ in removed)
            distinct_removed = sum(kind == "distinct" for kind, _ in removed)
            assert sum(kind == "exact" for kind, _ in removed) == 40
            assert near_removed >= 38 and distinct_removed < 4, (near_removed, distinct_removed)


# --- SLURM ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_job_arrays_write_what_one_process_writes_and_a_cancelled_task_alone_is_redone(shard, tmp_path,
                                                                                           slurm):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(CORPUS.read_bytes() * 12)  # 3 s of tokenizing: tasks long enough to cancel one running
    common = ["--input", corpus, "--tokenizer", shard / "tok", "--append-eod"]

    def on_slurm(*args):
        return [sys.executable, "-m", "megatron_bloom.cli.preprocess", *map(str, common + list(args)), "--tasks", "4",
                "--executor", "slurm"]

    command = on_slurm("--output-prefix", tmp_path / "arrays")
    preprocess(*common, "--output-prefix", tmp_path / "one", "--workers", 1)

    # 1. The last task is cancelled while it runs (scancel of one array element): the command says which
    # task did not finish, and how to resume.
    run = subprocess.Popen(command, env=slurm, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    cancelled, deadline = None, time.time() + 120
    while cancelled is None and run.poll() is None and time.time() < deadline:
        queue = subprocess.run(["squeue", "--noheader", "--array", "--format=%i %T"], env=slurm,
                               capture_output=True, text=True).stdout.split("\n")
        cancelled = next((line.split()[0] for line in queue if line.endswith("_3 RUNNING")), None)
        time.sleep(0.05)
    assert cancelled, "the last task was never seen running"
    subprocess.run(["scancel", cancelled], env=slurm, check=True)
    stdout, stderr = run.communicate(timeout=180)
    assert run.returncode == 2, stdout + stderr
    paragraph = " ".join(stderr.split())
    assert "1 of 4 tasks (3) of the tokenize stage did not finish" in paragraph, stderr
    assert "Rerun the same command to resume" in paragraph and "Traceback" not in stderr

    # 2. The same command again: one job array of that task alone, and the shards of one process.
    rerun = subprocess.run(command, env=slurm, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "tokenize: submitted job array" in rerun.stderr and "for 1 of 4 tasks (3);" in rerun.stderr
    assert shard_files(tmp_path / "arrays") == shard_files(tmp_path / "one")

    # 3. Per language, too.
    preprocess(*common, "--split-by-lang", "--output-prefix", tmp_path / "ml-one", "--workers", 1)
    split = subprocess.run(on_slurm("--split-by-lang", "--output-prefix", tmp_path / "ml-slurm"), env=slurm,
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert split.returncode == 0, split.stdout + split.stderr
    assert "for all 4 tasks" in split.stderr
    assert shard_files(tmp_path / "ml-slurm") == shard_files(tmp_path / "ml-one")
    assert len(shard_files(tmp_path / "ml-one")) == 24


# --- what data_prep/executors.py knows of datatrove (setup.py pins the tested range) ------------------------

def test_datatrove_finished_markers_and_sbatch_arguments_are_what_the_executors_module_expects(tmp_path):
    from datatrove.executor import LocalPipelineExecutor

    from data_prep.executors import _SlurmArray, completions, forget_tasks

    def step(data, rank, world_size):
        (tmp_path / f"ran-{rank}").touch()

    executor = LocalPipelineExecutor(pipeline=[step], tasks=3, workers=1, logging_dir=str(tmp_path / "stage"))
    executor.run()
    assert completions(tmp_path / "stage") == [0, 1, 2]
    forget_tasks(tmp_path / "stage", [1])
    assert executor.get_incomplete_ranks() == [1]  # what a rerun runs again
    array = _SlurmArray(pipeline=[step], tasks=4, time=None, partition=None, mem_per_cpu_gb=None, qos=None,
                        logging_dir=str(tmp_path / "array"))
    arguments = array.get_sbatch_args(4)
    assert arguments["array"] == "0-3" and arguments["cpus-per-task"] == 1
    assert not {"partition", "time", "mem-per-cpu", "qos"} & set(arguments)  # the cluster's defaults
    timed = _SlurmArray(pipeline=[step], tasks=4, time="1:00:00", partition="cpu", mem_per_cpu_gb=None, qos=None,
                        logging_dir=str(tmp_path / "timed")).get_sbatch_args(4)
    assert timed["partition"] == "cpu" and timed["time"] == "1:00:00"


@pytest.mark.exhaustive
@pytest.mark.slurm
def test_a_200_mb_corpus_gives_the_same_shards_with_4_tasks_here_and_on_slurm(shard, tmp_path, slurm):
    """The issue's scale: about 200 MB of generated multilingual documents (4 minutes on 2 cores)."""
    from data_prep.sample_corpus import generate_documents

    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as handle:
        for seed in range(40):  # 20k documents of about 5 MB each time
            handle.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in generate_documents(20_000, seed))
    assert corpus.stat().st_size > 200e6
    for split in ([], ["--split-by-lang"]):
        common = ["--input", str(corpus), "--tokenizer", str(shard / "tok"), "--append-eod", *split]
        preprocess(*common, "--output-prefix", tmp_path / "one", "--workers", 2)
        preprocess(*common, "--output-prefix", tmp_path / "local", "--tasks", 4, "--workers", 2)
        on_slurm = subprocess.run([sys.executable, "-m", "megatron_bloom.cli.preprocess", *common, "--output-prefix",
                                   str(tmp_path / "arrays"), "--tasks", "4", "--executor", "slurm"], env=slurm,
                                  capture_output=True, text=True, timeout=900)
        assert on_slurm.returncode == 0, on_slurm.stderr
        one = shard_files(tmp_path / "one")
        assert len(one) == (24 if split else 2)
        assert shard_files(tmp_path / "local") == one and shard_files(tmp_path / "arrays") == one, split
        for path in tmp_path.iterdir():
            if path.name.startswith(("one", "local", "arrays")) and path.is_file():
                path.unlink()
