"""Inputs split into the parts of tasks: whatever the cuts, the parts' records in task order are the whole
inputs' records, each once, with its own file name and line number."""

import gzip

import pytest

from data_prep.sources import Part, checked_records, iter_chunks, iter_part_chunks, resolve_inputs, split_inputs
from tests.conftest import CORPUS

# Blank lines (they keep the numbering), a bad record, a long line, and no newline at the end.
LINES = [b'{"text": "first", "lang": "en"}\n', b"\n", b'{"text": "second"}\r\n', b"not json\n",
         b'{"text": "' + b"x" * 120 + b'"}\n', b"\n", b"\n", b'{"text": "last, without a newline"}']


def records(chunks):
    return [record for chunk in chunks for record in checked_records(chunk, "text", "lang")]


def test_a_cut_at_any_byte_gives_every_line_once_with_its_number(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_bytes(b"".join(LINES))
    [source] = resolve_inputs([path])
    whole = records(iter_chunks([source], "text", "lang"))
    assert [where for where, *_ in whole] == [f"{path}:{n}" for n in (1, 3, 4, 5, 8)]
    for cut in range(path.stat().st_size + 2):
        for later in (cut, cut + 1, cut + 37):  # two cuts: three ranges, the middle one empty or short
            parts = [Part(source, 0, cut), Part(source, cut, later), Part(source, later)]
            assert records(iter_part_chunks(parts, "text", "lang")) == whole, (cut, later)


@pytest.mark.parametrize("tasks", [1, 2, 3, 4, 7, 40])
def test_tasks_get_consecutive_parts_of_the_inputs_and_whole_files_that_cannot_be_cut(tmp_path, tasks):
    lines = CORPUS.read_bytes().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines[:700]))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[700:900])))
    (tmp_path / "c.jsonl").write_bytes(b"".join(lines[900:]))
    sources = resolve_inputs([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.jsonl"])
    plan = split_inputs(sources, tasks)
    assert len(plan) == tasks
    parts = [part for task in plan for part in task]
    assert [part for part in parts if part.source.name.endswith(".gz")] == [Part(sources[1])]  # whole, once
    assert records(iter_part_chunks(parts, "text", "lang")) == records(iter_chunks(sources, "text", "lang"))
    if tasks <= 4:  # every task gets a share
        assert all(plan), plan


def test_a_single_file_is_cut_into_equal_byte_ranges(tmp_path):
    (tmp_path / "one.jsonl").write_bytes(CORPUS.read_bytes())
    size = (tmp_path / "one.jsonl").stat().st_size
    plan = split_inputs(resolve_inputs([tmp_path / "one.jsonl"]), 4)
    spans = [[(part.start, size if part.end is None else part.end) for part in task] for task in plan]
    assert [len(task) for task in spans] == [1, 1, 1, 1]
    ceiling = [-(-k * size // 4) for k in range(5)]  # the spans' ends: a quarter of the bytes each
    assert [task[0] for task in spans] == list(zip(ceiling[:-1], ceiling[1:]))
