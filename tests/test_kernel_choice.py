"""Which side a CPU operator runs (model/kernel_choice.py): the faster of ours and torch's by a measurement
on this CPU, made once per machine (under a lock, so concurrent ranks agree), cached in a file that a damaged
or edited copy of cannot steer, and forced by MBLOOM_CPU_KERNELS; and a linear that keeps both layouts
where decoding and prompts choose apart."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from megatron_bloom.errors import UserError
from megatron_bloom.model import cpu_kernels, kernel_choice
from megatron_bloom.model.inference_linear import (MEASURED_PROMPT_ROWS, PROMPT_ROWS, ByRowsLinear, KernelLinear,
                                                   PackedLinear, inference_linear, packing_available)


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def sides(ours_s: float, torch_s: float, calls: list):
    def candidates():
        calls.append("measured")
        return {"ours": lambda: spin(ours_s), "torch": lambda: spin(torch_s)}
    return candidates


def never():
    raise AssertionError("measured, where the choice was known")


@pytest.fixture
def choices_dir(tmp_path, monkeypatch):
    """A machine's cache of its own, measuring (whatever the environment forced)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("MBLOOM_CPU_KERNELS", raising=False)
    return tmp_path


def test_the_faster_side_is_measured_once_and_cached_for_the_machine(choices_dir, capsys):
    calls = []
    assert kernel_choice.choose("test_faster", "one shape", sides(0.003, 0.001, calls)) == "torch"
    assert kernel_choice.choose("test_faster", "one shape", never) == "torch"  # this process remembers
    assert kernel_choice.choose("test_slower", "one shape", sides(0.001, 0.003, calls)) == "ours"
    assert calls == ["measured", "measured"]
    data = json.loads((choices_dir / kernel_choice.FILE_NAME).read_text())
    assert data["format"] == kernel_choice.FILE_FORMAT and data["machine"] == kernel_choice.machine()
    entry = data["choices"][f"test_faster@one shape@{torch.get_num_threads()}t"]
    assert entry["choice"] == "torch"
    assert entry["seconds"]["ours"] == pytest.approx(0.003, rel=0.5)
    assert entry["seconds"]["torch"] == pytest.approx(0.001, rel=0.5)
    err = capsys.readouterr().err
    assert "megatron_bloom: test_faster runs torch on this CPU (one shape" in err and "measured: ours 3" in err
    assert "test_slower runs our kernel on this CPU" in err


def test_ours_is_kept_unless_torch_is_clearly_faster(choices_dir):
    assert kernel_choice.choose("test_close_race", "one shape", sides(0.0010, 0.00099, [])) == "ours"
    assert kernel_choice.choose("test_clear_win", "one shape", sides(0.0010, 0.0008, [])) == "torch"


def test_concurrent_processes_measure_once_and_agree(choices_dir, tmp_path):
    """Two processes asking at once (a run's ranks): one measures, the other reads its choice; a third
    process (this one) reads it from the file."""
    script = textwrap.dedent("""
        import sys, time
        from megatron_bloom.model import kernel_choice
        def spin(seconds):
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        def candidates():
            with open(sys.argv[1], "a") as log:
                log.write("measured\\n")
            return {"ours": lambda: spin(0.003), "torch": lambda: spin(0.001)}
        print(kernel_choice.choose("test_concurrent", "one shape", candidates))
    """)
    log = tmp_path / "measurements.log"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(choices_dir))
    processes = [subprocess.Popen([sys.executable, "-c", script, str(log)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], results
    assert [out.strip() for out, _ in results] == ["torch", "torch"]
    assert log.read_text() == "measured\n"
    assert sorted("cached" in err for _, err in results) == [False, True]
    assert kernel_choice.choose("test_concurrent", "one shape", never) == "torch"


def test_damaged_edited_or_foreign_cache_files_are_measured_again(choices_dir, capsys):
    path = choices_dir / kernel_choice.FILE_NAME
    threads = torch.get_num_threads()
    path.write_text("{ not json")
    calls = []
    assert kernel_choice.choose("test_damaged", "one shape", sides(0.001, 0.003, calls)) == "ours"
    assert "could not be read (JSONDecodeError); the CPU kernels are measured again" in capsys.readouterr().err
    assert json.loads(path.read_text())["choices"][f"test_damaged@one shape@{threads}t"]["choice"] == "ours"
    for name, data in {
        "test_hostile": {"format": kernel_choice.FILE_FORMAT, "machine": kernel_choice.machine(),
                         "choices": {f"test_hostile@one shape@{threads}t": {"choice": "__import__('os')"}}},
        "test_foreign": {"format": kernel_choice.FILE_FORMAT, "machine": "another CPU",
                         "choices": {f"test_foreign@one shape@{threads}t": {"choice": "torch"}}},
        "test_listed": {"format": kernel_choice.FILE_FORMAT, "machine": kernel_choice.machine(), "choices": []},
    }.items():
        path.write_text(json.dumps(data))
        assert kernel_choice.choose(name, "one shape", sides(0.001, 0.003, calls)) == "ours"
        assert json.loads(path.read_text())["choices"][f"{name}@one shape@{threads}t"]["choice"] == "ours"
    assert len(calls) == 4
    assert not list(choices_dir.glob(".*.tmp"))  # written whole: a temporary file renamed over it


def test_a_cache_that_cannot_be_written_leaves_the_choice_to_each_process(tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "a-file" / "extensions"))  # not a directory
    monkeypatch.delenv("MBLOOM_CPU_KERNELS", raising=False)
    calls = []
    assert kernel_choice.choose("test_unwritable", "one shape", sides(0.003, 0.001, calls)) == "torch"
    assert kernel_choice.choose("test_unwritable", "another shape", sides(0.001, 0.003, calls)) == "ours"
    assert len(calls) == 2
    err = capsys.readouterr().err
    assert err.count("could not be written") == 1 and "hold for this process only" in err


def test_the_environment_forces_a_side_and_nonsense_is_one_paragraph(choices_dir, monkeypatch):
    for side in ("ours", "torch", " Torch "):
        monkeypatch.setenv("MBLOOM_CPU_KERNELS", side)
        assert kernel_choice.choose("test_forced", "one shape", never) == side.strip().lower()
    monkeypatch.setenv("MBLOOM_CPU_KERNELS", "amx")
    with pytest.raises(UserError, match="MBLOOM_CPU_KERNELS='amx' is not a choice of CPU kernels: use 'ours'"):
        kernel_choice.choose("test_forced", "one shape", never)
    assert not (choices_dir / kernel_choice.FILE_NAME).exists()


@pytest.mark.skipif(not (cpu_kernels.kernels_available() and packing_available(torch.device("cpu"), torch.bfloat16)),
                    reason="needs our bf16 kernel and oneDNN's bf16 packing")
@pytest.mark.parametrize("decoding, prompt", [("ours", "torch"), ("torch", "ours")])
def test_a_linear_keeps_both_layouts_where_decoding_and_prompts_choose_apart(decoding, prompt, monkeypatch):
    """Where one side wins decoding's rows and the other a prompt's, the linear holds both layouts and each
    number of rows gets its side's results, bit for bit."""
    chosen = {"linear@decode": decoding, "linear@prompt": prompt}
    asked = []

    def choose(operator, shape, candidates):
        asked.append((operator, shape))
        return chosen[operator]
    monkeypatch.setattr(kernel_choice, "choose", choose)
    generator = torch.Generator().manual_seed(0)
    weight = (0.05 * torch.randn(96, 64, generator=generator)).bfloat16()
    bias = torch.randn(96, generator=generator).bfloat16()
    linear = inference_linear(weight, bias, rows=8)
    assert isinstance(linear, ByRowsLinear)
    assert asked == [("linear@decode", "8x64x96"), ("linear@prompt", f"{MEASURED_PROMPT_ROWS}x64x96")]
    ours = KernelLinear(weight, bias)
    for rows, side, packed_for in ((1, decoding, 8), (PROMPT_ROWS - 1, decoding, 8),
                                   (PROMPT_ROWS, prompt, MEASURED_PROMPT_ROWS), (300, prompt, MEASURED_PROMPT_ROWS)):
        x = torch.randn(rows, 64, generator=generator).bfloat16()
        expected = ours(x) if side == "ours" else PackedLinear(weight, bias, packed_for)(x)
        assert torch.equal(linear(x), expected), (rows, side)
    monkeypatch.setitem(chosen, "linear@prompt", decoding)  # agreeing: one layout only
    assert isinstance(inference_linear(weight, bias, rows=8), KernelLinear if decoding == "ours" else PackedLinear)
