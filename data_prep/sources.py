"""Input corpora read as ordered chunks of records: jsonl, jsonl.gz, parquet, and saved `datasets` dirs.

An input is a local path, a glob pattern (`corpus/*.jsonl.gz`, `**` for any depth), or an fsspec URL
(`file:///data/x.jsonl`, `s3://bucket/part-*.parquet` where the backend's package is installed). A pattern
stands for its matches sorted by name, so the order, and with it the shards, never depends on the file system.

jsonl chunks carry raw lines, parsed (and checked) by the worker processes so that parsing runs in
parallel too; parquet and `datasets` chunks carry decoded rows. Every chunk knows the line (or row)
number of its first record, for skip reports and `--strict` errors.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

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


def _kind(name: str, path: str, fs) -> str:
    is_dir = fs.isdir(path) if fs is not None else Path(path).is_dir()
    if is_dir:
        markers = [f"{path.rstrip('/')}/{marker}" for marker in ("dataset_info.json", "dataset_dict.json")]
        if any(fs.isfile(marker) if fs is not None else Path(marker).is_file() for marker in markers):
            return "datasets"
        raise UserError(f"{name} is a directory but not a saved `datasets` dataset (no dataset_info.json).")
    if not (fs.isfile(path) if fs is not None else Path(path).is_file()):
        raise UserError(f"input {name} does not exist.")
    return "parquet" if path.endswith(".parquet") else "jsonl"


def resolve_inputs(entries: Sequence[str | Path]) -> List[Source]:
    """Every input, patterns expanded (matches sorted by name), each checked to exist before any work starts."""
    sources = []
    for entry in map(str, entries):
        fs, path = _file_system(entry)
        literal = Path(path).exists() if fs is None else fs.exists(path)  # a file may have `[` in its name
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


def iter_chunks(sources: Sequence[Source], text_key: str, lang_key: Optional[str]) -> Iterator[Chunk]:
    for source in sources:
        if source.kind == "jsonl":
            yield from _jsonl_chunks(source)
        elif source.kind == "parquet":
            yield from _parquet_chunks(source, text_key, lang_key)
        else:
            yield from _datasets_chunks(source, text_key, lang_key)


def _jsonl_chunks(source: Source) -> Iterator[Chunk]:
    lines: List[bytes] = []
    size, first = 0, 1
    with source.open() as handle:
        for line_number, raw in enumerate(handle, start=1):
            lines.append(raw)
            size += len(raw)
            if len(lines) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                yield Chunk(source=source.name, first_row=first, lines=lines)
                lines, size, first = [], 0, line_number + 1
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
