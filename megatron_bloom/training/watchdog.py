"""Hung ranks and what each rank was doing when a job failed.

Every rank keeps a heartbeat file, `run.dir/heartbeats/rank-NNNNN.json`: its host and pid, the job attempt,
the last iteration it finished, when its current step started, when it was last alive, and its state
(`running`, `finished`, or `failed: <why>`). A thread rewrites it every `train.watchdog.heartbeat_s`.

The same thread times the rank's training steps. A step that runs `factor` times longer than the median of
the rank's last 20 (never less than `min_s`; `first_steps_s` for the first 5) is a hang:
  - the rank names the ranks that stopped beating (a stopped or frozen process: SIGSTOP, a dead node) and
    the ones furthest behind (the last to arrive), in `run.dir/events.jsonl` and on stderr;
  - it dumps its Python stacks (every thread) to `run.dir/hangs/attempt-K-rank-NNNNN.txt` and leaves a
    marker, upon which every other live rank dumps its stacks too; a stopped rank of its own host (state T)
    is killed, since it would take no other signal;
  - then it exits with status 75, so that the launcher restarts the job (launcher.max_restarts) or ends it.
The next attempt's rank 0 reads the heartbeats to record why the previous attempt ended (a rank whose file
still says `running` died without running any Python: SIGKILL, the OOM killer, a crash).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from megatron_bloom.config.schema import WatchdogConfig
from megatron_bloom.training.events import record_event

HEARTBEATS, HANGS = "heartbeats", "hangs"
EXIT_HUNG = 75  # EX_TEMPFAIL: a restart may well succeed
HISTORY, WARMUP_STEPS, SILENT_BEATS = 20, 5, 3


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return run_dir / HEARTBEATS / f"rank-{rank:05d}.json"


def read_heartbeats(run_dir: Path) -> Dict[int, dict]:
    beats = {}
    for path in sorted((run_dir / HEARTBEATS).glob("rank-*.json")):
        try:
            beat = json.loads(path.read_text())
            beats[int(beat["rank"])] = beat
        except (OSError, ValueError, KeyError, TypeError):
            continue  # cut off by a kill mid-write (writes are atomic renames, but a file may be foreign)
    return beats


class Watchdog:
    """The heartbeat and hang detector of one rank (a daemon thread)."""

    def __init__(self, settings: WatchdogConfig, run_dir: Path, rank: int, attempt: int) -> None:
        self.settings, self.run_dir, self.rank, self.attempt = settings, run_dir, rank, attempt
        self.tick_s = min(1.0, settings.heartbeat_s / 2)
        self.iteration = 0  # the last iteration this rank finished
        self.step_started: Optional[float] = None
        self.history: List[float] = []
        self.state = "running"
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mbloom-watchdog", daemon=True)
        self._host, self._pid = socket.gethostname(), os.getpid()

    # --- called by the training loop
    def start(self, iteration: int) -> None:
        self.iteration = iteration
        self._beat()
        self._thread.start()

    def step_started_now(self) -> None:
        self.step_started = time.time()

    def step_ended(self, iteration: int, step_s: float) -> None:
        with self._lock:
            self.iteration, self.step_started = iteration, None
            self.history = (self.history + [step_s])[-HISTORY:]

    def pause(self) -> None:
        """Not in a step (a save, a validation pass, a rollback): nothing to time."""
        self.step_started = None

    def stop(self, state: str) -> None:
        """The rank's last word: `finished` or `failed: <why>`."""
        self.state = state
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._beat()

    # --- the thread
    def limit_s(self) -> float:
        with self._lock:
            history = list(self.history)
        if len(history) < WARMUP_STEPS:
            return self.settings.first_steps_s
        return max(self.settings.min_s, self.settings.factor * statistics.median(history))

    def _beat(self) -> None:
        beat = {"rank": self.rank, "host": self._host, "pid": self._pid, "attempt": self.attempt,
                "iteration": self.iteration, "step_started": self.step_started, "alive": time.time(),
                "state": self.state}
        path = heartbeat_path(self.run_dir, self.rank)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_suffix(".tmp")
            staged.write_text(json.dumps(beat))
            os.replace(staged, path)
        except OSError:
            pass  # a full or vanished disk must not kill training; the hang check still runs

    def _watch(self) -> None:
        last_beat = time.time()
        marker = self.run_dir / HANGS / f"attempt-{self.attempt}"
        while not self._stopped.wait(self.tick_s):
            now = time.time()
            if now - last_beat >= self.settings.heartbeat_s:
                self._beat()
                last_beat = now
            started = self.step_started
            if started is not None and now - started > self.limit_s():
                self._hang(now - started, marker)
            elif marker.exists():  # another rank found a hang: leave this rank's stacks too
                self._dump_stacks(f"rank {self.rank}: another rank found a hang (see events.jsonl)")

    def _hang(self, elapsed: float, marker: Path) -> None:
        now, limit = time.time(), self.limit_s()
        beats = read_heartbeats(self.run_dir)
        silent = sorted(rank for rank, beat in beats.items() if beat.get("attempt") == self.attempt
                        and beat.get("state") == "running"
                        and now - beat.get("alive", 0) > SILENT_BEATS * self.settings.heartbeat_s)
        current = [beat for beat in beats.values() if beat.get("attempt") == self.attempt]
        behind = min((beat.get("iteration", 0) for beat in current), default=self.iteration)
        last_to_arrive = sorted(beat["rank"] for beat in current if beat.get("iteration", 0) == behind
                                and (beat.get("step_started") is None or beat["rank"] in silent)) or silent
        live = sorted(rank for rank, beat in beats.items() if beat.get("attempt") == self.attempt
                      and rank not in silent)
        summary = (f"rank {self.rank}: iteration {self.iteration + 1} has run {elapsed:.0f} s, more than its limit of "
                   f"{limit:.0f} s: a hang. Ranks not responding: {silent or 'none'}; last to arrive: "
                   f"{last_to_arrive or 'unknown'} (at iteration {behind}).")
        self._dump_stacks(summary)
        self._end_stopped_peers([beats[rank] for rank in silent])
        if not live or self.rank == live[0]:  # one record per hang: the lowest-numbered live rank's
            record_event(self.run_dir, "hang", rank=self.rank, iteration=self.iteration + 1,
                         elapsed_s=round(elapsed, 1), limit_s=round(limit, 1), not_responding=silent,
                         last_to_arrive=last_to_arrive, stacks=str(self.run_dir / HANGS))
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass
        print(f"mbloom-train: {summary} Stacks in {self.run_dir / HANGS}; stopping this rank (exit {EXIT_HUNG}) so "
              "that the launcher restarts the job.", file=sys.stderr, flush=True)
        self.state = f"failed: hang in iteration {self.iteration + 1} ({elapsed:.0f} s)"
        self._beat()
        time.sleep(2 * self.tick_s)  # the other ranks see the marker and dump their stacks
        os._exit(EXIT_HUNG)

    def _end_stopped_peers(self, beats: List[dict]) -> None:
        """A silent rank of this host that is stopped (SIGSTOP, state T) can take no signal but SIGKILL:
        kill it, so that the launcher restarts the job now instead of after its grace period (torchrun
        waits 30 s for ranks to take SIGTERM). Ranks of other hosts end with the job."""
        for beat in beats:
            if beat.get("host") != self._host:
                continue
            try:
                with open(f"/proc/{beat['pid']}/stat") as stat:
                    stopped = stat.read().rsplit(")", 1)[1].split()[0] == "T"
                if stopped:
                    os.kill(int(beat["pid"]), signal.SIGKILL)
            except (OSError, ValueError, KeyError, IndexError):
                continue

    def _dump_stacks(self, header: str) -> None:
        path = self.run_dir / HANGS / f"attempt-{self.attempt}-rank-{self.rank:05d}.txt"
        if path.exists():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as out:
                out.write(header + "\n\n")
                out.flush()
                faulthandler.dump_traceback(out, all_threads=True)
        except OSError:
            pass


def previous_attempt(run_dir: Path, attempt: int) -> Optional[dict]:
    """What the ranks of the attempt before `attempt` said last (read before this attempt's watchdogs
    start): which ranks ended it and why, and the last iteration any of them finished."""
    beats = [beat for beat in read_heartbeats(run_dir).values() if beat.get("attempt") == attempt - 1]
    if not beats:
        return None
    failed = []
    for beat in sorted(beats, key=lambda b: (b.get("state") != "running", b.get("alive", 0))):
        state = beat.get("state", "running")
        if state == "running":
            reason = "died without an exit of its own (SIGKILL, the out-of-memory killer or a crash)"
        elif state.startswith("failed: "):
            reason = state[len("failed: "):]
        else:
            continue
        failed.append({"rank": beat["rank"], "host": beat.get("host"), "reason": reason,
                       "last_iteration": beat.get("iteration", 0)})
    return {"failed": failed, "last_iteration": max(beat.get("iteration", 0) for beat in beats)}
