"""The README's tour, run as written: its shell block, from a directory that holds the shipped sample corpus
where the repository does, with the console scripts and torchrun a `pip install` puts on the PATH."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def tour_commands() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## A five-minute tour"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_the_readmes_tour_runs_as_written(tmp_path):
    (tmp_path / "data_prep").symlink_to(REPO / "data_prep")
    scripts = Path(sys.executable).parent  # where pip put mbloom-* and torchrun
    env = dict(os.environ, PATH=f"{scripts}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", tour_commands()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "starting from tour/ckpt/global_step20: everything: an exact resume" in out
    iterations = [json.loads(line)["iter"] for line in (tmp_path / "tour/run/metrics.jsonl").read_text().splitlines()]
    assert iterations == [10, 20, 30]
    evaluation = json.loads(next(line for line in out.splitlines() if line.startswith('{"loss"')))
    assert evaluation["documents"] == 1200 and evaluation["skipped"] == 0
    assert (tmp_path / "tour/hf/model.safetensors").is_file() and (tmp_path / "tour/hf/tokenizer.json").is_file()
    generated = json.loads(out.strip().splitlines()[-1])
    assert generated["prompt"] == "Жизнь, и всё" and 1 <= len(generated["token_ids"]) <= 16
    assert "_load_legacy_checkpoint" not in out and "Traceback" not in result.stderr
