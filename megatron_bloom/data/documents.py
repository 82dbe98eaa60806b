"""Reading documents from jsonl: bad lines are skipped and counted by reason, never fatal."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List

from megatron_bloom.errors import UserError


@dataclass
class SkipReport:
    counts: Counter = field(default_factory=Counter)
    first_lines: Dict[str, List[int]] = field(default_factory=dict)

    def skip(self, reason: str, line_number: int) -> None:
        self.counts[reason] += 1
        lines = self.first_lines.setdefault(reason, [])
        if len(lines) < 5:
            lines.append(line_number)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{count} {reason} (lines {', '.join(map(str, self.first_lines[reason]))}"
                         f"{', ...' if count > len(self.first_lines[reason]) else ''})"
                         for reason, count in sorted(self.counts.items()))


def read_jsonl_texts(path: str | Path, text_key: str, report: SkipReport) -> Iterator[str]:
    """The `text_key` strings of a .jsonl or .jsonl.gz file, in order; bad lines go to `report`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} does not exist.")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                report.skip("invalid UTF-8", line_number)
                continue
            except json.JSONDecodeError:
                report.skip("not JSON", line_number)
                continue
            if not isinstance(record, dict) or text_key not in record:
                report.skip(f"no '{text_key}' key", line_number)
            elif not isinstance(record[text_key], str):
                report.skip(f"non-string '{text_key}'", line_number)
            elif not record[text_key]:
                report.skip(f"empty '{text_key}'", line_number)
            else:
                yield record[text_key]
