"""Which implementation a CPU operator runs, chosen on the CPU at hand by timing the candidates once.

Our kernels (cpu_kernels.py) were written and tuned on a CPU with AVX512-BF16 and no AMX. Where the CPU has
AMX-BF16 tiles, oneDNN's products use them, and there a prompt's many-row products ran slower through ours
than through oneDNN (a first token 2.2x slower than `transformers`' on a 2-core Xeon with AMX). Neither the
vendor nor the flags decide, then: at its first use each operator times its candidates on this CPU, at its
own shape and thread count, and keeps the faster:

- "ours": our kernel (or, for causal attention, our causal blocks);
- "torch": torch's operators (oneDNN's products, with AMX tiles where the CPU has them).

Decoding's few rows and a prompt's many are separate choices of the linears (`linear@decode`,
`linear@prompt`). "torch" has to be faster by MARGIN to be taken: a close race flips from one timing to the
next, and ours was the path of every accuracy test and benchmark on the machines it was tuned on.

Choices are cached per machine beside the kernels' build (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), in `mbloom_kernel_choices.json`, for this CPU, torch's version, our kernels'
sources and the thread count. The first process to need a choice measures it under a file lock, and the
others read it, so the ranks of a run agree, and a resumed run takes its first run's choices (the two sides
round a few outputs differently; resuming is exact). A damaged file is measured again. Each process says
what it chose in one line per operator (rank 0, stderr; one more where a shape chose the other side).
`MBLOOM_CPU_KERNELS=ours` or `=torch` forces one side everywhere it applies, for comparisons; unset or
`measure`, the measurement decides.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Set, Tuple

import torch

from megatron_bloom.errors import UserError
from megatron_bloom.model import cpu_kernels

CANDIDATES = ("ours", "torch")
ENVIRONMENT = "MBLOOM_CPU_KERNELS"
FILE_NAME = "mbloom_kernel_choices.json"
FILE_FORMAT = "megatron_bloom.kernel_choices/1"
MARGIN = 0.05  # "torch" is taken when at least this much faster than "ours"
ROUNDS = 5  # interleaved timings of each candidate, the fastest of each kept
MIN_SECONDS = 0.02  # a timing repeats its call until this long (short calls are noisy)

# The choices this process has made (operator@shape@threads -> name), and the (operator, name) pairs it has
# said: one line per operator, and one more for a shape that chose the other side
_decided: Dict[str, str] = {}
_said: Set[Tuple[str, str]] = set()


def choose(operator: str, shape: str, candidates: Callable[[], Mapping[str, Callable[[], object]]]) -> str:
    """"ours" or "torch" for `operator` at `shape` (a short key of the sizes that matter) on this CPU:
    forced by MBLOOM_CPU_KERNELS, chosen already by this process or an earlier one on this machine, or
    measured now. `candidates()` makes the two calls to time (only when measuring)."""
    forced = os.environ.get(ENVIRONMENT, "measure").strip().lower() or "measure"
    if forced not in ("measure", *CANDIDATES):
        raise UserError(f"{ENVIRONMENT}={os.environ[ENVIRONMENT]!r} is not a choice of CPU kernels: use 'ours' "
                        "(our AVX512-BF16 kernels), 'torch' (torch's and oneDNN's operators) or 'measure' (the "
                        "faster on this CPU, the default).")
    if forced != "measure":
        return forced
    key = f"{operator}@{shape}@{torch.get_num_threads()}t"
    if key not in _decided:
        _decided[key] = _cached_or_measured(operator, shape, key, candidates)
    return _decided[key]


def cache_path() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / FILE_NAME


def nearest_power_of_two(size: int) -> int:
    """The size class a choice is made for (one for the sizes around it, not one for each size met)."""
    return 2 ** round(math.log2(max(size, 1)))


@functools.lru_cache(maxsize=None)
def machine() -> str:
    """What a cached choice holds for: this CPU, torch's version and our kernels' sources."""
    sources = hashlib.sha256(b"".join(path.read_bytes() for path in cpu_kernels.SOURCES)).hexdigest()[:16]
    return f"{cpu_kernels.describe_cpu()}; torch {torch.__version__}; kernels {sources}"


def _cached_or_measured(operator: str, shape: str, key: str, candidates) -> str:
    path = cache_path()
    try:
        with _locked(path):
            entries = _read(path)
            entry = entries.get(key)
            if entry is None:
                entry = entries[key] = _measured(candidates)
                _write(path, entries)
                how = "measured"
            else:
                how = "cached"
    except OSError as error:  # a cache directory that cannot be written: this process's choice only
        _warn(f"{path} could not be written ({error.strerror or type(error).__name__}); the CPU kernels' choices "
              "hold for this process only (set TORCH_EXTENSIONS_DIR to a writable directory)")
        entry, how = _measured(candidates), "measured"
    _say(operator, shape, entry, how)
    return entry["choice"]


def _measured(candidates) -> dict:
    seconds = measure(candidates())
    return {"choice": "torch" if seconds["torch"] * (1 + MARGIN) < seconds["ours"] else "ours", "seconds": seconds}


def measure(calls: Mapping[str, Callable[[], object]]) -> Dict[str, float]:
    """Seconds per call of each candidate: the fastest of ROUNDS interleaved timings (a slow stretch of the
    machine then slows both), each of as many calls as fill MIN_SECONDS, after one call to warm up."""
    for call in calls.values():
        call()
    best = {name: float("inf") for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            repeats, start = 0, time.perf_counter()
            while True:
                call()
                repeats += 1
                elapsed = time.perf_counter() - start
                if elapsed >= MIN_SECONDS:
                    break
            best[name] = min(best[name], elapsed / repeats)
    return best


def _read(path: Path) -> Dict[str, dict]:
    """The file's choices for this machine; none where it is missing, of another machine, or damaged (then
    said once, and measured again)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        _warn(f"{path} could not be read ({type(error).__name__}); the CPU kernels are measured again")
        return {}
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or data.get("machine") != machine():
        return {}
    choices = data.get("choices")
    if not isinstance(choices, dict):
        return {}
    return {key: entry for key, entry in choices.items()
            if isinstance(entry, dict) and entry.get("choice") in CANDIDATES}


def _write(path: Path, entries: Dict[str, dict]) -> None:
    """Whole or not at all (a kill mid-write leaves the old file): a temporary file renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"format": FILE_FORMAT, "machine": machine(), "choices": entries},
                                    indent=1, sort_keys=True))
    os.replace(temporary, path)


@contextlib.contextmanager
def _locked(path: Path):
    """Only one process of the machine measures at a time (the others wait, then read its choice)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: each process measures on its own
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _say(operator: str, shape: str, entry: dict, how: str) -> None:
    if (operator, entry["choice"]) in _said:
        return
    _said.add((operator, entry["choice"]))
    seconds = entry.get("seconds") if isinstance(entry.get("seconds"), dict) else {}
    threads = torch.get_num_threads()
    timings = ", ".join(f"{name} {value * 1e3:.3g} ms" for name, value in sorted(seconds.items())
                        if isinstance(value, (int, float)))
    _tell(f"megatron_bloom: {operator} runs {'our kernel' if entry['choice'] == 'ours' else 'torch'} on this CPU "
          f"({shape}, {threads} thread{'s' * (threads > 1)}; {how}{': ' + timings if timings else ''})")


def _warn(message: str) -> None:
    if (message, "") not in _said:  # once a process
        _said.add((message, ""))
        _tell(f"megatron_bloom: {message}")


def _tell(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
