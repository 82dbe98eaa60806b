"""Documents from jsonl records: what makes a record usable, and counting the ones that are not.

A bad record is skipped and counted by reason (never fatal unless the caller is strict): not JSON, invalid
UTF-8, no text key, a text that is not a string, an empty text, and, when languages are asked for, no
language key.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from megatron_bloom.errors import UserError

FIRST_LINES_KEPT = 5


@dataclass
class SkipReport:
    """Skipped records by reason, with the first few line numbers of each (for messages and stats); `strict`
(--strict): the first bad record is a `UserError` instead."""

    counts: Counter = field(default_factory=Counter)
    first_lines: Dict[str, List[str]] = field(default_factory=dict)
    strict: bool = False

    def skip(self, reason: str, where: Union[int, str]) -> None:
        if self.strict:
            raise UserError(f"{where}: {reason} (--strict stops at the first bad record).")
        self.counts[reason] += 1
        lines = self.first_lines.setdefault(reason, [])
        if len(lines) < FIRST_LINES_KEPT:
            lines.append(str(where))

    def add(self, reason: str, count: int, first_lines: List[str]) -> None:
        """Another report's skips for `reason`, met after this one's."""
        self.counts[reason] += count
        lines = self.first_lines.setdefault(reason, [])
        lines.extend(first_lines[:max(0, FIRST_LINES_KEPT - len(lines))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{count} {reason} (lines {', '.join(self.first_lines[reason])}"
                         f"{', ...' if count > len(self.first_lines[reason]) else ''})"
                         for reason, count in sorted(self.counts.items()))

    def as_dict(self) -> dict:
        return {reason: {"count": count, "first_lines": self.first_lines[reason]}
                for reason, count in sorted(self.counts.items())}


def no_usable_documents(report: SkipReport) -> UserError:
    """The error of a pass over inputs that found no document to use."""
    return UserError("no usable documents in the input" + (f"; skipped {report.summary()}" if report.total
                                                            else "") + ".")


def check_record(record: Any, text_key: str, lang_key: Optional[str] = None
                 ) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(text, language, None) for a usable record, else (None, None, reason)."""
    if not isinstance(record, dict) or text_key not in record:
        return None, None, f"no '{text_key}' key"
    text = record[text_key]
    if not isinstance(text, str):
        return None, None, f"non-string '{text_key}'"
    if not text:
        return None, None, f"empty '{text_key}'"
    language = None
    if lang_key is not None:
        language = record.get(lang_key)
        if not isinstance(language, str) or not language:
            return None, None, f"no '{lang_key}' key"
    return text, language, None


def parse_jsonl_line(raw: bytes, text_key: str, lang_key: Optional[str] = None
                     ) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """`check_record` of one raw jsonl line."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, None, "invalid UTF-8"
    except json.JSONDecodeError:
        return None, None, "not JSON"
    return check_record(record, text_key, lang_key)


def open_jsonl(path: Path):
    """A binary line reader for .jsonl or .jsonl.gz; a missing file is a `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} does not exist.")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_jsonl_texts(path: str | Path, text_key: str, report: SkipReport) -> Iterator[str]:
    """The usable texts of a .jsonl or .jsonl.gz file, in order; bad lines go to `report`."""
    with open_jsonl(Path(path)) as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            text, _, reason = parse_jsonl_line(raw, text_key)
            if reason:
                report.skip(reason, line_number)
            else:
                yield text
