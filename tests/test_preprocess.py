"""`mbloom-train-tokenizer` and `mbloom-preprocess` as users run them; shards read back by megatron-core."""

import gzip
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep.sample_corpus import generate_documents, write_jsonl
from data_prep.sources import CHUNK_BYTES
from megatron_bloom.data.indexed_dataset import IndexedDataset
from tests.conftest import CORPUS, REPO, assert_user_error, run_cli

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok") / "tokenizer"
    result = run_cli(["megatron_bloom.cli.train_tokenizer", "--input", str(CORPUS), "--vocab-size", "1000",
                      "--output", str(directory)])
    assert "1000-token byte-level BPE on 1,200 documents" in result.stdout
    return directory

def megatron_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    dataset = MegatronIndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))
    return [dataset[i].tolist() for i in range(len(dataset))]

def corpus_records(path=CORPUS):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

def preprocess(*args, check=True):
    return run_cli(["megatron_bloom.cli.preprocess", *map(str, args)], check=check)

def test_tokenizer_loads_in_transformers_with_bloom_special_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert [ours.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert hf.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>"]) == [0, 1, 2, 3]
    for record in corpus_records()[:50]:
        ids = ours.encode(record["text"], add_special_tokens=False).ids
        assert hf(record["text"])["input_ids"] == ids
        assert ours.decode(ids) == record["text"]  # byte-level: nothing is unknown

@pytest.mark.parametrize("append_eod", [False, True])
def test_megatron_core_reads_every_document(tokenizer_dir, tmp_path, append_eod):
    extra = ["--append-eod"] if append_eod else []
    result = preprocess("--input", CORPUS, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "corpus",
                        "--workers", 2, *extra)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    expected = [tokenizer.encode(r["text"], add_special_tokens=False).ids + ([2] if append_eod else [])
                for r in corpus_records()]
    assert megatron_documents(tmp_path / "corpus") == expected
    assert IndexedDataset(tmp_path / "corpus").dtype == np.uint16  # a 1000-token vocabulary fits
    stats = json.loads((tmp_path / "corpus.stats.json").read_text())
    assert stats["documents"] == 1200 and stats["tokens"] == sum(map(len, expected))
    assert stats["skipped_total"] == 0
    assert f"documents: 1,200  tokens: {stats['tokens']:,}" in result.stdout

def test_split_by_lang_writes_one_shard_per_language(tokenizer_dir, tmp_path):
    preprocess("--input", CORPUS, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "ml",
               "--split-by-lang", "--workers", 2)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    records = corpus_records()
    languages = sorted({r["lang"] for r in records})
    assert len(languages) == 12
    stats = json.loads((tmp_path / "ml.stats.json").read_text())
    assert sorted(stats["outputs"]) == languages
    for language in languages:
        expected = [tokenizer.encode(r["text"], add_special_tokens=False).ids for r in records if r["lang"] == language]
        assert megatron_documents(tmp_path / f"ml_{language}") == expected
    assert not (tmp_path / "ml.bin").exists()

def test_output_does_not_depend_on_worker_count(tokenizer_dir, tmp_path):
    for workers in (1, 3):
        preprocess("--input", CORPUS, CORPUS, "--tokenizer", tokenizer_dir, "--output-prefix",
                   tmp_path / f"w{workers}", "--workers", workers)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w3{suffix}").read_bytes()

@pytest.mark.slow
def test_gzip_parquet_and_datasets_inputs_give_the_same_shard(tokenizer_dir, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = corpus_records()
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "corpus.parquet", row_group_size=300)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "corpus_ds"))
    outputs = {}
    for name in ("corpus.jsonl.gz", "corpus.parquet", "corpus_ds"):
        preprocess("--input", tmp_path / name, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / f"o-{name}")
        outputs[name] = (tmp_path / f"o-{name}.bin").read_bytes()
    preprocess("--input", CORPUS, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "o-jsonl")
    reference = (tmp_path / "o-jsonl.bin").read_bytes()
    assert all(data == reference for data in outputs.values())

def test_bad_records_are_skipped_and_counted_exactly(tokenizer_dir, tmp_path):
    good = json.dumps({"text": "Bread tastes better when it is shared with friends."}).encode()
    lines = [
        good,                                   # 1
        b"{not json",                           # 2  not JSON
        json.dumps({"txt": "no key"}).encode(),  # 3  no 'text' key
        json.dumps({"text": 42}).encode(),      # 4  non-string 'text'
        json.dumps({"text": ""}).encode(),      # 5  empty 'text'
        b'{"text": "caf\xe9 broken"}',          # 6  invalid UTF-8
        b"",                                    # 7  a blank line: not a record, not counted
        good,                                   # 8
        b"[1, 2]",                              # 9  no 'text' key (not an object)
        json.dumps({"text": None}).encode(),    # 10 non-string 'text'
        b"{not json either",                    # 11 not JSON
        good,                                   # 12
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = preprocess("--input", tmp_path / "bad.jsonl", "--tokenizer", tokenizer_dir, "--output-prefix",
                        tmp_path / "out")
    stats = json.loads((tmp_path / "out.stats.json").read_text())
    where = str(tmp_path / "bad.jsonl")
    assert stats["documents"] == 3 and stats["skipped_total"] == 8
    assert stats["skipped"] == {
        "empty 'text'": {"count": 1, "first_lines": [f"{where}:5"]},
        "invalid UTF-8": {"count": 1, "first_lines": [f"{where}:6"]},
        "no 'text' key": {"count": 2, "first_lines": [f"{where}:3", f"{where}:9"]},
        "non-string 'text'": {"count": 2, "first_lines": [f"{where}:4", f"{where}:10"]},
        "not JSON": {"count": 2, "first_lines": [f"{where}:2", f"{where}:11"]},
    }
    assert "skipped 2 (not JSON), first at" in result.stdout
    assert len(megatron_documents(tmp_path / "out")) == 3

    strict = preprocess("--input", tmp_path / "bad.jsonl", "--tokenizer", tokenizer_dir, "--output-prefix",
                        tmp_path / "strict", "--strict", check=False)
    assert_user_error(strict, f"{where}:2: not JSON")
    assert not list(tmp_path.glob("strict*"))  # nothing left behind, not even temporary files

@pytest.mark.parametrize("problem, fragment", [
    ("missing-input", "does not exist"),
    ("missing-tokenizer", "not found"),
    ("bad-tokenizer", "cannot load tokenizer"),
    ("no-documents", "no usable documents"),
    ("parquet-column", "has no column 'text'"),
])
def test_setup_errors_are_one_line(tokenizer_dir, tmp_path, problem, fragment):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, tokenizer = CORPUS, tokenizer_dir
    if problem == "missing-input":
        source = tmp_path / "nope.jsonl"
    elif problem == "missing-tokenizer":
        tokenizer = tmp_path / "nope"
    elif problem == "bad-tokenizer":
        (tmp_path / "tokenizer.json").write_text("{}")
        tokenizer = tmp_path / "tokenizer.json"
    elif problem == "no-documents":
        source = tmp_path / "empty.jsonl"
        source.write_text('{"body": "x"}\n')
    else:
        source = tmp_path / "t.parquet"
        pq.write_table(pa.Table.from_pylist([{"body": "x"}]), source)
    result = preprocess("--input", source, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "o", check=False)
    assert_user_error(result, fragment)
    assert result.stderr.count("error:") == 1 and "\n\n" not in result.stderr.strip()  # one paragraph

@pytest.mark.slow
def test_a_huge_document(tokenizer_dir, tmp_path):
    """One document (a whole book, a code dump) twice the size of a reading chunk (8 MB) goes through like any
    other."""
    sentence = "The lighthouse keeper wrote letters that nobody ever answered. "
    text = sentence * (2 * CHUNK_BYTES // len(sentence))
    (tmp_path / "huge.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": sentence}) + "\n")
    preprocess("--input", tmp_path / "huge.jsonl", "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "h",
               "--workers", 2)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    dataset = IndexedDataset(tmp_path / "h")
    assert len(dataset) == 2
    assert dataset[0].tolist() == tokenizer.encode(text, add_special_tokens=False).ids
    assert dataset[1].tolist() == tokenizer.encode(sentence, add_special_tokens=False).ids

def test_killed_run_leaves_no_complete_looking_pair(tokenizer_dir, tmp_path):
    write_jsonl(generate_documents(300_000, seed=1), tmp_path / "big.jsonl")
    process = subprocess.Popen([sys.executable, "-m", "megatron_bloom.cli.preprocess", "--input", str(tmp_path / "big.jsonl"),
                                "--tokenizer", str(tokenizer_dir), "--output-prefix", str(tmp_path / "k"),
                                "--workers", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob("k.bin.tmp-*")):
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the run: it writes for several seconds
    assert process.poll() is None, "the run finished before it could be killed; make the input larger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "k.bin").exists() and not (tmp_path / "k.idx").exists()
    assert list(tmp_path.glob("k.bin.tmp-*"))  # the partial data sits under a temporary name only

def test_large_vocabularies_use_int32_tokens(tmp_path):
    """Above 65499 ids tokens are int32 (megatron-core's rule); megatron-core reads both widths."""
    from megatron.core.datasets.indexed_dataset import DType

    from megatron_bloom.data.indexed_dataset import IndexedDatasetWriter, token_dtype

    for vocab_size in (1000, 65499, 65500, 250880):
        assert token_dtype(vocab_size) == DType.optimal_dtype(vocab_size)
    documents = [np.array([250879, 5, 65535, 65536]), np.array([7]), np.array([], dtype=np.int64), np.array([1, 2])]
    writer = IndexedDatasetWriter(tmp_path / "wide", token_dtype(250880))
    writer.add_documents(np.concatenate(documents), np.array([len(d) for d in documents]))
    writer.finalize()
    assert megatron_documents(tmp_path / "wide") == [d.tolist() for d in documents]
    assert IndexedDataset(tmp_path / "wide").dtype == np.int32

def test_progress_lines_when_not_a_terminal(capsys):
    from megatron_bloom.data.progress import Progress

    with Progress(interval=0.0) as progress:  # pytest's stderr is not a terminal
        progress.update(1500, 90_000)
    line = capsys.readouterr().err.strip()
    assert "1,500 documents (" in line and "90,000 tokens (" in line and "/s)" in line
    with Progress(interval=0.0, total=10_700, label="mbloom-eval") as progress:
        progress.update(2000, 50_000)
    line = capsys.readouterr().err.strip()
    assert line.startswith("mbloom-eval: [") and "2,000 of 10,700 documents" in line
    with Progress(interval=0.0, enabled=False) as progress:  # ranks after the first: nothing
        progress.update(5, 5)
    assert capsys.readouterr().err == ""

def test_glob_patterns_and_fsspec_urls_read_their_matches_in_name_order(tokenizer_dir, tmp_path):
    """Parts of the sample corpus under a directory tree (one gzipped, one parquet): a `**` pattern, the same
    as a file:// URL, and a pattern on an fsspec file system other than the local one (memory://) each give
    the shard of the whole corpus, byte for byte."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.options import PreprocessOptions
    from data_prep.preprocess import preprocess as preprocess_in_process

    lines = CORPUS.read_bytes().splitlines(keepends=True)
    parts = {"c-1.jsonl.gz": lines[:400], "c-2.parquet": lines[400:800], "sub/c-3.jsonl": lines[800:]}
    memory = fsspec.filesystem("memory")
    for name, part in parts.items():
        path = tmp_path / "tree" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".gz"):
            data = gzip.compress(b"".join(part))
        elif name.endswith(".parquet"):
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist([json.loads(line) for line in part]), sink)
            data = sink.getvalue().to_pybytes()
        else:
            data = b"".join(part)
        path.write_bytes(data)
        memory.pipe(f"/mbloom-test/tree/{name}", data)
    preprocess("--input", CORPUS, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "whole", "--workers", 1)
    preprocess("--input", tmp_path / "tree" / "**" / "c-*", "--tokenizer", tokenizer_dir, "--output-prefix",
               tmp_path / "glob", "--workers", 1)
    preprocess("--input", f"file://{tmp_path}/tree/**/c-*", "--tokenizer", tokenizer_dir, "--output-prefix",
               tmp_path / "url", "--workers", 1)
    stats = preprocess_in_process(PreprocessOptions(input=["memory:///mbloom-test/tree/**/c-*"], tokenizer=tokenizer_dir,
                                                    output_prefix=str(tmp_path / "memory")))
    assert stats["inputs"] == [f"memory:///mbloom-test/tree/{name}" for name in parts]
    for prefix in ("glob", "url", "memory"):
        for suffix in (".bin", ".idx"):
            assert (tmp_path / f"{prefix}{suffix}").read_bytes() == (tmp_path / f"whole{suffix}").read_bytes(), prefix
    assert json.loads((tmp_path / "glob.stats.json").read_text())["inputs"] == [
        str(tmp_path / "tree" / name) for name in parts]

    nothing = preprocess("--input", tmp_path / "tree" / "*.txt", "--tokenizer", tokenizer_dir, "--output-prefix",
                         tmp_path / "none", check=False)
    assert_user_error(nothing, f"the input pattern {tmp_path / 'tree' / '*.txt'} matches no file")
