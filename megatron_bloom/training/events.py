"""`run.dir/events.jsonl`: what happened to a run besides its iterations (restarts, hangs, loss spikes,
rollbacks, skipped data), one JSON object a line, in the order it happened.

Any rank may append (a hang is seen by the ranks that wait): each record is one `write` on a file opened
for appending, so lines from several processes do not interleave, and it is fsynced, because the next
attempt of a job reads the file (the samples a rollback skipped are taken from it on resume).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List

EVENTS_FILE = "events.jsonl"


def record_event(run_dir: Path, event: str, **fields) -> Dict:
    """Append `{"time", "event", **fields}` to run_dir/events.jsonl; returns the record."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(run_dir / EVENTS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def read_events(run_dir: Path) -> List[Dict]:
    """Every record of run_dir/events.jsonl; a line cut off by a kill mid-write is left out."""
    path = run_dir / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            events.append(record)
    return events
