"""Input corpora read as ordered chunks of records: jsonl, jsonl.gz, parquet, and saved `datasets` dirs.

jsonl chunks carry raw lines, parsed (and checked) by the worker processes so that parsing runs in
parallel too; parquet and `datasets` chunks carry decoded rows. Every chunk knows the line (or row)
number of its first record, for skip reports and `--strict` errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from megatron_bloom.data.documents import check_record, open_jsonl, parse_jsonl_line
from megatron_bloom.errors import UserError

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


def input_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "datasets"
        raise UserError(f"{path} is a directory but not a saved `datasets` dataset (no dataset_info.json).")
    if not path.is_file():
        raise UserError(f"input {path} does not exist.")
    return "parquet" if path.suffix == ".parquet" else "jsonl"


def check_inputs(paths: Sequence[Path]) -> List[str]:
    """The kind of every input, failing on the first that is missing before any work starts."""
    return [input_kind(Path(path)) for path in paths]


def iter_chunks(paths: Sequence[Path], text_key: str, lang_key: Optional[str]) -> Iterator[Chunk]:
    for path, kind in zip(paths, check_inputs(paths)):
        path = Path(path)
        if kind == "jsonl":
            yield from _jsonl_chunks(path)
        elif kind == "parquet":
            yield from _parquet_chunks(path, text_key, lang_key)
        else:
            yield from _datasets_chunks(path, text_key, lang_key)


def _jsonl_chunks(path: Path) -> Iterator[Chunk]:
    lines: List[bytes] = []
    size, first = 0, 1
    with open_jsonl(path) as handle:
        for line_number, raw in enumerate(handle, start=1):
            lines.append(raw)
            size += len(raw)
            if len(lines) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                yield Chunk(source=str(path), first_row=first, lines=lines)
                lines, size, first = [], 0, line_number + 1
    if lines:
        yield Chunk(source=str(path), first_row=first, lines=lines)


def _columns(available: Sequence[str], path: Path, text_key: str, lang_key: Optional[str]) -> List[str]:
    if text_key not in available:
        raise UserError(f"{path} has no column '{text_key}' (columns: {', '.join(available)}); "
                        "choose the text column with --text-key.")
    return [text_key] + ([lang_key] if lang_key and lang_key in available else [])


def _parquet_chunks(path: Path, text_key: str, lang_key: Optional[str]) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"cannot read {path} as parquet: {error}.") from None
    columns = _columns(table.schema_arrow.names, path, text_key, lang_key)
    row = 1
    for batch in table.iter_batches(batch_size=CHUNK_RECORDS, columns=columns):
        records = batch.to_pylist()
        yield Chunk(source=str(path), first_row=row, records=records)
        row += len(records)


def _datasets_chunks(path: Path, text_key: str, lang_key: Optional[str]) -> Iterator[Chunk]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise UserError(f"{path} holds the splits {', '.join(dataset)}; give one split's directory, "
                        f"e.g. {path / next(iter(dataset))}.")
    columns = _columns(dataset.column_names, path, text_key, lang_key)
    row = 1
    for batch in dataset.select_columns(columns).iter(batch_size=CHUNK_RECORDS):
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        yield Chunk(source=str(path), first_row=row, records=records)
        row += len(records)
