"""A cache of index arrays (`.npy`), keyed by a hash of everything they depend on, built once.

The first process to need an entry takes an exclusive `flock` on the entry's lock file, builds it,
writes each array under a temporary name and renames it into place; every other process (other ranks,
other jobs sharing the cache dir) waits on the lock and then loads what was built. Arrays load
memory-mapped. The description that was hashed is saved next to them as JSON, for humans.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Tuple

import numpy as np

from megatron_bloom.errors import UserError

CACHE_FORMAT = 1


def describe_file(path: Path) -> dict:
    """What identifies a file's content cheaply: a rewrite (a new preprocessing run) changes it."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(description: dict) -> str:
    text = json.dumps({"cache_format": CACHE_FORMAT, **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_arrays(cache_dir: Path, name: str, description: dict, names: Tuple[str, ...],
                  build: Callable[[], Dict[str, np.ndarray]]) -> Tuple[Dict[str, np.ndarray], bool]:
    """The arrays `names` for `description`, built by `build()` only if no process has built them yet.

    Returns the arrays (memory-mapped) and whether this call built them.
    """
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the index cache directory {cache_dir} ({error}); set data.cache_dir to "
                        "a writable directory.") from None
    stem = f"{name}_{cache_key(description)}"
    paths = {array: cache_dir / f"{stem}_{array}.npy" for array in names}
    built = False
    if not all(path.is_file() for path in paths.values()):
        with _locked(cache_dir / f"{stem}.lock"):
            if not all(path.is_file() for path in paths.values()):  # nobody built it while we waited
                arrays = build()
                for array, path in paths.items():
                    temporary = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npy")
                    np.save(temporary, arrays[array], allow_pickle=False)
                    os.replace(temporary, path)
                (cache_dir / f"{stem}.json").write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
                built = True
    return {array: np.load(path, mmap_mode="r", allow_pickle=False) for array, path in paths.items()}, built
