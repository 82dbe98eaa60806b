"""`mbloom-merge-shards`: the parts of a corpus merge into the whole corpus's shard byte for byte; dtypes widen;
documents of several sequences keep their boundaries; megatron-core reads the result; bad shards are refused."""

import struct

import numpy as np
import pytest

from megatron_bloom.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from tests.conftest import CORPUS, assert_user_error, run_cli


def merge(*args, check=True):
    return run_cli(["megatron_bloom.cli.merge_shards", *map(str, args)], check=check)


def write_shard(prefix, documents, dtype):
    writer = IndexedDatasetWriter(prefix, dtype)
    writer.add_documents(np.concatenate(documents), np.array([len(d) for d in documents]))
    writer.finalize()


def megatron_shard(prefix):
    """Every sequence and the document index, as megatron-core reads them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    dataset = MegatronIndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))], list(dataset.document_indices), dataset.index.dtype


def test_the_parts_of_a_corpus_merge_into_the_shard_of_the_whole_byte_for_byte(shard, tmp_path):
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    parts = [lines[:500], lines[500:501], lines[501:]]  # a part of one document, too
    for number, part in enumerate(parts):
        (tmp_path / f"part{number}.jsonl").write_text("".join(part), encoding="utf-8")
        run_cli(["megatron_bloom.cli.preprocess", "--input", str(tmp_path / f"part{number}.jsonl"), "--tokenizer",
                 str(shard / "tok"), "--output-prefix", str(tmp_path / f"part{number}"), "--append-eod",
                 "--workers", "1"])
    result = merge("--output-prefix", tmp_path / "merged", *(tmp_path / f"part{n}" for n in range(3)))
    for suffix in (".bin", ".idx"):  # the session's shard: the whole corpus, preprocessed in one run
        assert (tmp_path / f"merged{suffix}").read_bytes() == (shard / f"corpus{suffix}").read_bytes(), suffix
    whole = IndexedDataset(shard / "corpus")
    assert f"merged 3 shards into {tmp_path / 'merged'}.bin/.idx: 1,200 documents, {whole.num_tokens:,} tokens, " \
           "uint16" in result.stdout


def test_dtypes_widen_and_documents_of_several_sequences_keep_their_boundaries(tmp_path):
    small = [np.array([5, 6, 7]), np.array([8]), np.array([65499, 0])]
    large = [np.array([70_000, 1, 2]), np.array([250_679])]
    write_shard(tmp_path / "small", small, np.uint16)
    write_shard(tmp_path / "large", large, np.int32)
    # Megatron's own tools can store a document as several sequences: 3 sequences, documents [0, 2) and [2, 3)
    sentences = [np.array([11, 12], dtype=np.uint16), np.array([13], dtype=np.uint16), np.array([14, 15, 16],
                                                                                            dtype=np.uint16)]
    (tmp_path / "sentences.bin").write_bytes(np.concatenate(sentences).tobytes())
    lengths = np.array([2, 1, 3], dtype=np.int32)
    with open(tmp_path / "sentences.idx", "wb") as idx:
        idx.write(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, 3, 3))
        idx.write(lengths.tobytes() + np.array([0, 4, 6], dtype=np.int64).tobytes()
                  + np.array([0, 2, 3], dtype=np.int64).tobytes())

    result = merge("--output-prefix", tmp_path / "out", tmp_path / "small", tmp_path / "large",
                   tmp_path / "sentences", tmp_path / "small")
    sequences, document_index, dtype = megatron_shard(tmp_path / "out")
    assert sequences == [d.tolist() for d in small + large + sentences + small]
    assert document_index == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11]  # the sentences' document of 2 stays one
    assert dtype == np.int32 and IndexedDataset(tmp_path / "out").dtype == np.int32
    assert "10 documents, 22 tokens, int32 (widened from int32, uint16)" in result.stdout


@pytest.mark.parametrize("problem, fragments", [
    ("missing", ["data file", "missing.idx does not exist"]),
    ("suffix", ["without .bin or .idx", "should be"]),
    ("truncated", ["good.bin is truncated"]),
    ("magic", ["is not an MMIDIDX index"]),
    ("gap", ["sequence 1 has length 1 at byte 10", "back to back would put it at byte 6"]),
    ("documents", ["document index must run from 0 to its 3 sequences"]),
    ("output-is-input", ["the output prefix", "is also an input"]),
])
def test_bad_shards_are_refused_in_one_paragraph_and_nothing_is_written(tmp_path, problem, fragments):
    write_shard(tmp_path / "good", [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])], np.uint16)
    inputs, output = [tmp_path / "good", tmp_path / "bad"], tmp_path / "out"
    idx = bytearray((tmp_path / "good.idx").read_bytes())
    header, count = 34, 3  # the header's bytes; the shard's sequences
    if problem == "missing":
        inputs[1] = tmp_path / "missing"
    elif problem == "suffix":
        inputs[1] = tmp_path / "good.bin"
    elif problem == "truncated":
        inputs = [tmp_path / "good"]
        (tmp_path / "good.bin").write_bytes((tmp_path / "good.bin").read_bytes()[:-2])
    elif problem == "output-is-input":
        output = tmp_path / "good"
    else:
        if problem == "magic":
            idx[:7] = b"NOTIDX!"
        elif problem == "gap":  # sequence 1 moved 4 bytes on: a gap in the .bin
            idx[header + 4 * count + 8: header + 4 * count + 16] = struct.pack("<q", 10)
        else:  # the document index goes backwards
            idx[-16:-8] = struct.pack("<q", 5)
        (tmp_path / "bad.idx").write_bytes(bytes(idx))
        (tmp_path / "bad.bin").write_bytes((tmp_path / "good.bin").read_bytes() + b"\x00" * 8)
    result = merge("--output-prefix", output, *inputs, check=False)
    assert_user_error(result, *fragments)
    assert result.stderr.count("error:") == 1 and "\n\n" not in result.stderr.strip()
    assert not list(tmp_path.glob("out*"))  # nothing written, not even temporary files
