"""Hydra-style sweeps: `optim.lr=1e-4,3e-4 parallel.tp=1,2` is four jobs, each with a run dir of its own,
and a summary of what each one reached."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from megatron_bloom.errors import ConfigError


def expand_sweep(overrides: Sequence[str]) -> List[List[str]]:
    """Every point of the sweep (the cartesian product of the sweep overrides, in Hydra's order: the
    first sweep key varies slowest), each as a plain override list."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise ConfigError(f"cannot read the sweep {' '.join(overrides)}: {error}") from None
    choices = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(point) for point in itertools.product(*choices)]


def sweep_keys(overrides: Sequence[str]) -> List[str]:
    """The keys that vary across the sweep (the columns of its summary)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [override.get_key_element() for override in parsed if override.is_sweep_override()]


@dataclass
class PointResult:
    number: int
    overrides: List[str]
    run_dir: Path
    status: str  # "completed", "failed (exit N)", a SLURM state, "not run"
    iterations: int = 0
    final_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None

    @classmethod
    def read(cls, number: int, overrides: List[str], run_dir: Path, status: str) -> "PointResult":
        """What the run's `metrics.jsonl` says (the last line of an iteration counts)."""
        records = {}
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                    records[record["iter"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut off by a kill
        result = cls(number, overrides, run_dir, status, iterations=len(records))
        if records:
            last = records[max(records)]
            result.final_loss = last.get("loss")
            speeds = [r["tokens_per_s"] for r in records.values() if isinstance(r.get("tokens_per_s"), (int, float))]
            result.tokens_per_s = sum(speeds) / len(speeds) if speeds else None
        return result

    def to_json(self) -> dict:
        return {"number": self.number, "overrides": self.overrides, "run_dir": str(self.run_dir),
                "status": self.status, "iterations": self.iterations, "final_loss": self.final_loss,
                "tokens_per_s": self.tokens_per_s}


def summary_table(results: Sequence[PointResult], keys: Sequence[str]) -> str:
    """A plain-text table: one row per point, the swept values, the outcome."""
    header = ["#", *keys, "status", "iters", "final loss", "tokens/s", "run dir"]
    rows = [header]
    for result in results:
        values = dict(override.split("=", 1) for override in result.overrides if "=" in override)
        rows.append([str(result.number), *(values.get(key, "") for key in keys), result.status,
                     str(result.iterations), _number(result.final_loss, ".4f"), _number(result.tokens_per_s, ",.0f"),
                     str(result.run_dir)])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _number(value: Optional[float], spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)
