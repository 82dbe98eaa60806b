"""Input corpora read as ordered chunks of records: jsonl, jsonl.gz, parquet, and saved `datasets` dirs.

An input is a local path, a glob pattern (`corpus/*.jsonl.gz`, `**` for any depth), or an fsspec URL
(`file:///data/x.jsonl`, `s3://bucket/part-*.parquet` where the backend's package is installed). A pattern
stands for its matches sorted by name, so the order, and with it the shards, never depends on the file system.

jsonl chunks carry raw lines, parsed (and checked) by the worker processes so that parsing runs in
parallel too; parquet and `datasets` chunks carry decoded rows. Every chunk knows the line (or row)
number of its first record, for skip reports and `--strict` errors.

A run split into tasks (`split_inputs`) gives each task consecutive parts of the inputs: whole files, or
byte ranges of uncompressed jsonl files, cut by size. A line belongs to the range its first byte is in, so
the tasks' records, in task order, are the records of the whole inputs, each once, with its own line number.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Sequence, Tuple

from megatron_bloom.data.documents import check_record, open_jsonl, parse_jsonl_line
from megatron_bloom.errors import UserError

GLOB_CHARACTERS = "*?["

CHUNK_RECORDS = 1024
CHUNK_BYTES = 4 << 20


@dataclass
class Chunk:
    source: str
    first_row: int  # 1-based line (jsonl) or row (parquet, datasets) number of the first record
    lines: Optional[List[bytes]] = None  # raw jsonl lines, blank ones included (they keep the numbering)
    records: Optional[List[dict]] = None  # decoded rows


def checked_records(chunk: Chunk, text_key: str, lang_key: Optional[str]
                    ) -> Iterator[Tuple[str, Optional[str], Optional[str], Optional[str]]]:
    """(where, text, language, skip reason) for each record of a chunk, in order; blank lines are no records."""
    if chunk.lines is not None:
        for offset, raw in enumerate(chunk.lines):
            if raw.strip():
                yield (f"{chunk.source}:{chunk.first_row + offset}",
                       *parse_jsonl_line(raw, text_key, lang_key))
    else:
        for offset, record in enumerate(chunk.records):
            yield f"{chunk.source}:{chunk.first_row + offset}", *check_record(record, text_key, lang_key)


@dataclass(frozen=True)
class Source:
    """One input file or `datasets` dir: its name (as given, or as a pattern matched it: what messages say), its
    kind (jsonl, parquet, datasets), and where it is: a local path, or a path on an fsspec file system."""

    name: str
    kind: str
    path: str
    fs: object = None  # an fsspec file system for a remote input; None: a local path

    def open(self):
        """A binary reader (gzip-decoded for .gz)."""
        if self.fs is None:
            return open_jsonl(Path(self.path))
        return self.fs.open(self.path, "rb", compression="gzip" if self.path.endswith(".gz") else None)


def _file_system(entry: str):
    """(fsspec file system, path in it) of a URL; (None, path) of a local path or a file:// URL."""
    import fsspec

    if "://" not in entry:
        return None, entry
    try:
        fs, path = fsspec.core.url_to_fs(entry)
    except (ImportError, ValueError) as error:
        raise UserError(f"cannot open input {entry}: {error}.") from None
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return None, path
    return fs, path


def _metadata(fs):
    """The file system that answers questions about a path (exists, is a directory, size): `fs`, or for a local
    path the local one."""
    import fsspec

    return fs if fs is not None else fsspec.filesystem("file")


def _kind(name: str, path: str, fs) -> str:
    fs = _metadata(fs)
    if fs.isdir(path):
        markers = [f"{path.rstrip('/')}/{marker}" for marker in ("dataset_info.json", "dataset_dict.json")]
        if any(fs.isfile(marker) for marker in markers):
            return "datasets"
        raise UserError(f"{name} is a directory but not a saved `datasets` dataset (no dataset_info.json).")
    if not fs.isfile(path):
        raise UserError(f"input {name} does not exist.")
    return "parquet" if path.endswith(".parquet") else "jsonl"


def resolve_inputs(entries: Sequence[str | Path]) -> List[Source]:
    """Every input, patterns expanded (matches sorted by name), each checked to exist before any work starts."""
    sources = []
    for entry in map(str, entries):
        fs, path = _file_system(entry)
        literal = _metadata(fs).exists(path)  # a file may have `[` in its name
        if literal or not any(character in path for character in GLOB_CHARACTERS):
            sources.append(Source(entry, _kind(entry, path, fs), path, fs))
            continue
        if fs is None:
            matches = sorted(glob.glob(path, recursive=True))
            named = [(match, match) for match in matches]
        else:
            matches = sorted(fs.glob(path))
            named = [(fs.unstrip_protocol(match), match) for match in matches]
        if not named:
            raise UserError(f"the input pattern {entry} matches no file.")
        sources.extend(Source(name, _kind(name, match, fs), match, fs) for name, match in named)
    return sources


@dataclass(frozen=True)
class Part:
    """A task's share of one input: all of it, or (an uncompressed jsonl file) the lines that start in
    [start, end)."""

    source: Source
    start: int = 0
    end: Optional[int] = None  # None: to the end of the file


def splittable(source: Source) -> bool:
    return source.kind == "jsonl" and not source.path.endswith(".gz")


def input_bytes(source: Source) -> int:
    """The input's size on disk (a `datasets` dir: its files')."""
    fs = _metadata(source.fs)
    return int(fs.du(source.path) if source.kind == "datasets" else fs.size(source.path))


def split_inputs(sources: Sequence[Source], tasks: int) -> List[List[Part]]:
    """The parts of each of `tasks` tasks, in input order: task k's come before task k+1's. The inputs' bytes,
    laid end to end, are cut into `tasks` equal spans. A splittable input is cut where a span ends; another
    (gzip, parquet, a `datasets` dir) goes whole to the task in whose span its first byte lies. A task may get
    nothing (fewer inputs than tasks, say)."""
    sizes = [input_bytes(source) for source in sources]
    total = sum(sizes)
    plan: List[List[Part]] = [[] for _ in range(tasks)]

    def task_at(position: int) -> int:
        return min(tasks - 1, position * tasks // total) if total else 0

    offset = 0
    for source, size in zip(sources, sizes):
        if not splittable(source) or size == 0:
            plan[task_at(offset)].append(Part(source))
        else:
            start = 0
            while start < size:
                task = task_at(offset + start)
                end = min(size, -(-(task + 1) * total // tasks) - offset)  # the task's span ends there
                plan[task].append(Part(source, start, None if end >= size else end))
                start = end
        offset += size
    return plan


def iter_chunks(sources: Sequence[Source], text_key: str, lang_key: Optional[str]) -> Iterator[Chunk]:
    yield from iter_part_chunks([Part(source) for source in sources], text_key, lang_key)


def iter_part_chunks(parts: Sequence[Part], text_key: str, lang_key: Optional[str]) -> Iterator[Chunk]:
    for part in parts:
        if part.source.kind == "jsonl":
            yield from _jsonl_chunks(part)
        elif part.source.kind == "parquet":
            yield from _parquet_chunks(part.source, text_key, lang_key)
        else:
            yield from _datasets_chunks(part.source, text_key, lang_key)


def _skip_to_range(handle: BinaryIO, start: int) -> Tuple[int, int]:
    """Read `handle` up to the first line that starts at `start` or later: (its byte position, its line
    number). Counts the lines before it, for the line numbers messages give (a read of the file's first
    `start` bytes)."""
    newlines, position = 0, 0
    block = 16 << 20
    last = b"\n"
    while position < start:
        data = handle.read(min(block, start - position))
        if not data:
            return position, newlines + 1
        newlines += data.count(b"\n")
        position += len(data)
        last = data[-1:]
    if last != b"\n":  # the line under way began in the range before: the next line is the first of this one
        rest = handle.readline()
        position += len(rest)
        newlines += rest.endswith(b"\n")
    return position, newlines + 1


def _jsonl_chunks(part: Part) -> Iterator[Chunk]:
    source = part.source
    lines: List[bytes] = []
    size = 0
    with source.open() as handle:
        position, first = _skip_to_range(handle, part.start) if part.start else (0, 1)
        line_number = first
        for raw in handle:
            if part.end is not None and position >= part.end:
                break
            lines.append(raw)
            size += len(raw)
            position += len(raw)
            line_number += 1
            if len(lines) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                yield Chunk(source=source.name, first_row=first, lines=lines)
                lines, size, first = [], 0, line_number
    if lines:
        yield Chunk(source=source.name, first_row=first, lines=lines)


def _columns(available: Sequence[str], name: str, text_key: str, lang_key: Optional[str]) -> List[str]:
    if text_key not in available:
        raise UserError(f"{name} has no column '{text_key}' (columns: {', '.join(available)}); "
                        "choose the text column with --text-key.")
    return [text_key] + ([lang_key] if lang_key and lang_key in available else [])


def _parquet_chunks(source: Source, text_key: str, lang_key: Optional[str]) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(source.path if source.fs is None else source.fs.open(source.path, "rb"))
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"cannot read {source.name} as parquet: {error}.") from None
    columns = _columns(table.schema_arrow.names, source.name, text_key, lang_key)
    row = 1
    for batch in table.iter_batches(batch_size=CHUNK_RECORDS, columns=columns):
        records = batch.to_pylist()
        yield Chunk(source=source.name, first_row=row, records=records)
        row += len(records)


def _datasets_chunks(source: Source, text_key: str, lang_key: Optional[str]) -> Iterator[Chunk]:
    import datasets

    if source.fs is None:
        dataset = datasets.load_from_disk(source.path)
    else:
        dataset = datasets.load_from_disk(source.name, storage_options=source.fs.storage_options)
    if isinstance(dataset, datasets.DatasetDict):
        raise UserError(f"{source.name} holds the splits {', '.join(dataset)}; give one split's directory, "
                        f"e.g. {source.name.rstrip('/')}/{next(iter(dataset))}.")
    columns = _columns(dataset.column_names, source.name, text_key, lang_key)
    row = 1
    for batch in dataset.select_columns(columns).iter(batch_size=CHUNK_RECORDS):
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        yield Chunk(source=source.name, first_row=row, records=records)
        row += len(records)
