"""The README's main command, as a newcomer runs it."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_quickstart_reports_parity_and_a_bit_exact_round_trip(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--workdir", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max |logits diff| = 0.00e+00" in result.stdout
    assert "round trip HF -> megatron_bloom -> HF bit-exact: True" in result.stdout
    assert "265,728 parameters (built model: 265,728)" in result.stdout
    assert "blended training set: 1000 samples of 129 tokens from 12 languages" in result.stdout
    assert '"documents": 1200, "skipped": 0}' in result.stdout  # mbloom-eval over the whole sample corpus
    assert "training loss fell from" in result.stdout and "iter     60/60" in result.stdout
    assert "perplexity on the sample corpus:" in result.stdout
    assert (tmp_path / "trained" / "global_step60" / "mbloom.json").is_file()
    assert result.stdout.rstrip().endswith(f"quickstart: OK\nfiles in {tmp_path}")  # --workdir: kept
    assert (tmp_path / "checkpoint" / "latest").is_file() and (tmp_path / "hf-export" / "config.json").is_file()
