"""A training rank leaves through the interpreter's own exit, in real interpreters: a finished run exits 0
with its `atexit` work done, and a rank whose peer died exits non-zero, also with its `atexit` work done."""

import os
import signal
import subprocess
import sys
import time

from megatron_bloom.parallel.distributed import free_port
from tests.conftest import REPO, overrides

# `python -m megatron_bloom.cli.train ...` with an atexit handler that leaves a marker file.
WITH_ATEXIT_MARKER = (
    "import atexit, runpy, sys\n"
    "marker = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(marker, 'w').write('atexit ran'))\n"
    "sys.argv[0] = 'mbloom-train'\n"
    "runpy.run_module('megatron_bloom.cli.train', run_name='__main__', alter_sys=True)\n")


def start_rank(args, marker, rank=0, world_size=1, port=0, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    if world_size > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_RANK=str(rank))
    return subprocess.Popen([sys.executable, "-c", WITH_ATEXIT_MARKER, str(marker), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_finished_run_exits_0_after_its_atexit_work(shard, tmp_path):
    run = start_rank(overrides(shard, tmp_path / "run", 1, 1, 1, iters=2) + [f"checkpoint.dir={tmp_path / 'ckpt'}"],
                     tmp_path / "marker")
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert (tmp_path / "marker").read_text() == "atexit ran"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step2"


def test_a_rank_whose_peer_died_exits_non_zero_after_its_atexit_work(shard, tmp_path):
    port = free_port()
    args = overrides(shard, tmp_path / "run", 1, 1, 2, iters=200)
    ranks = [start_rank(args, tmp_path / f"marker{rank}", rank, 2, port) for rank in range(2)]
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert ranks[0].poll() is None, ranks[0].communicate()[1][-3000:]
        time.sleep(0.2)
    ranks[1].send_signal(signal.SIGKILL)
    ranks[1].communicate()
    try:
        _, stderr = ranks[0].communicate(timeout=120)
    finally:
        ranks[0].kill()
    assert ranks[0].returncode not in (0, None), stderr[-3000:]
    assert (tmp_path / "marker0").read_text() == "atexit ran"
