"""`mbloom-plan --calibrate` and `hardware=FILE`: a real calibration on this machine's processes, the figures
a layout is predicted with (rank count, micro-batch), the cost model's use of them, and files that are
damaged, hostile or for another precision."""

import json

import pytest

from megatron_bloom.config import load_config
from megatron_bloom.errors import ConfigError
from megatron_bloom.planner.cost import predict_iteration
from megatron_bloom.planner.hardware_file import hardware
from megatron_bloom.planner.hardware_file import FILE_FORMAT, load_hardware_file
from megatron_bloom.planner.memory import plan_stages
from megatron_bloom.planner.report import build_report
from tests.conftest import assert_user_error_in_process, run_cli

TINY = ["model=bloom-tiny", "train.global_batch_size=16", "precision=bf16"]


def synthetic_file(path, precision="bf16"):
    """A hardware file with round figures: at 1 rank twice the rates of 2 ranks; micro-batch 4 faster than 1."""
    def micro(scale):
        return {"linear_tflops": 0.2 * scale, "attention_tflops": 0.1 * scale, "lm_head_tflops": 0.15 * scale,
                "elementwise_gb_per_s": 10.0 * scale, "recompute_passes": 1.5}

    links = {"tensor_parallel_gb_per_s": 5.0, "tensor_parallel_latency_s": 1e-4, "gradient_gb_per_s": 1.0,
             "gradient_latency_s": 1e-3, "p2p_gb_per_s": 2.0, "p2p_latency_s": 2e-4,
             "zero3_block_overhead_s": 2e-3, "zero3_micro_batch_overhead_s": 0.0}  # an overhead may be none
    data = {"format": FILE_FORMAT, "kind": "cpu", "precision": precision, "memory_gb": 24.0, "cores": 2,
            "ranks_per_node": 2,
            "ranks": {"1": {"threads": 2, "peak_tflops_16bit": 0.4, "peak_tflops_fp32": 0.2, "optimizer_gb_per_s": 20.0,
                            "block_overhead_s": 1e-3,
                            "micro_batches": {"1": micro(2.0), "4": micro(2.4)}},
                      "2": {"threads": 1, "peak_tflops_16bit": 0.2, "peak_tflops_fp32": 0.1, "optimizer_gb_per_s": 10.0,
                            "block_overhead_s": 1e-3,
                            **links, "micro_batches": {"1": micro(1.0), "4": micro(1.2)}}}}
    path.write_text(json.dumps(data))
    return path


def test_a_layout_is_predicted_with_the_figures_of_its_rank_count_and_micro_batch(tmp_path):
    device = load_hardware_file(str(synthetic_file(tmp_path / "hw.json")))
    assert device.kind == "cpu" and device.gpus_per_node == 2
    one, two = device.for_layout(1, 4), device.for_layout(2, 1)
    assert one.gemm_efficiency * one.peak_tflops_16bit == pytest.approx(0.48)  # 1 rank, micro 4
    assert two.gemm_efficiency * two.peak_tflops_16bit == pytest.approx(0.2)  # 2 ranks, micro 1
    assert device.for_layout(2, 2).gemm_efficiency == device.for_layout(2, 4).gemm_efficiency  # ties: the larger
    assert device.for_layout(1, 16).lm_head_efficiency * 0.4 == pytest.approx(0.36)  # nearest measured: 4
    # 8 ranks on a machine measured with 2 at once: each gets a quarter of those rates (the cores are shared)
    eight = device.for_layout(8, 1)
    assert eight.peak_tflops_16bit == pytest.approx(0.05) and eight.memory_gb_per_s == pytest.approx(2.5)
    assert eight.optimizer_gb_per_s == pytest.approx(2.5) and eight.p2p_gb_per_s == 2.0
    assert not device.nodes_apart(64)  # one machine
    # GPUs: a device's compute is its own, whatever the count; a layout's links come from the most measured
    data = json.loads((tmp_path / "hw.json").read_text())
    (tmp_path / "gpu.json").write_text(json.dumps({**data, "kind": "gpu"}))
    gpus = load_hardware_file(str(tmp_path / "gpu.json"))
    assert gpus.for_layout(16, 1).p2p_gb_per_s == 2.0 and gpus.for_layout(16, 1).peak_tflops_16bit == 0.2
    assert gpus.for_layout(1, 1).peak_tflops_16bit == 0.4 and gpus.nodes_apart(2) and not gpus.nodes_apart(1)


def test_cost_model_uses_the_files_links_and_reduces_bf16_gradients_in_float32(tmp_path):
    """dp 2 at ZeRO 1 in bf16: a ring all-reduce of the rank's float32 gradients on the file's gradient link,
    2 (d - 1) / d of 4 P bytes plus 2 (d - 1) latencies, not overlapped; recomputation adds the file's 1.5
    forwards of compute."""
    path = str(synthetic_file(tmp_path / "hw.json"))
    config = load_config([*TINY, f"hardware={path}", "parallel.tp=1", "parallel.pp=1", "parallel.dp=2",
                          "train.micro_batch_size=4", "zero.stage=1"])
    params = plan_stages(config)[0].params_per_rank
    predicted = predict_iteration(config, hardware(path))
    assert predicted.data_parallel_s == pytest.approx(4 * params / 1e9 + 2 * 1e-3)
    recomputed = load_config([*TINY, f"hardware={path}", "parallel.tp=1", "parallel.pp=1", "parallel.dp=2",
                              "train.micro_batch_size=4", "train.activation_checkpointing=true"])
    base_compute = predicted.stages[0].compute_s
    with_recompute = predict_iteration(recomputed, hardware(path)).stages[0].compute_s
    # the LM head is never recomputed; everything else costs 4.5 passes instead of 3
    head = 2.0 * 4 * 128 * 64 * 1024 * 3 / (0.15 * 1.2e12)
    assert (with_recompute - head) == pytest.approx((base_compute - head) * 4.5 / 3)
    # ZeRO 3: DeepSpeed's hooks, 2 ms a block and micro-batch here, and half as much traffic again
    zero3 = load_config([*TINY, f"hardware={path}", "parallel.tp=1", "parallel.pp=1", "parallel.dp=2",
                         "train.micro_batch_size=4", "zero.stage=3"])
    predicted3 = predict_iteration(zero3, hardware(path))
    assert predicted3.stages[0].compute_s == pytest.approx(base_compute + 4 * 2e-3)
    assert predicted3.data_parallel_s == pytest.approx(1.5 * (4 * params / 1e9 + 2 * 1e-3))


def test_hardware_files_that_are_wrong_are_one_paragraph(tmp_path, capsys):
    from megatron_bloom.cli.plan import main

    good = json.loads(synthetic_file(tmp_path / "good.json").read_text())
    cases = {
        "not-json.json": ("{ not json", "is not JSON"),
        "other.json": (json.dumps({"format": "something/2"}), "is not a hardware file of this version"),
        "missing.json": (json.dumps({k: v for k, v in good.items() if k != "ranks"}),
                         "is damaged or was edited wrongly (it has no 'ranks')"),
        "negative.json": (json.dumps({**good, "memory_gb": -1}), "'memory_gb' must be a positive number"),
        "code.json": (json.dumps({**good, "memory_gb": "__import__('os').system('false')"}),
                      "'memory_gb' must be a positive number"),
    }
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text)
        assert_user_error_in_process(main, [*TINY, f"hardware={tmp_path / name}"], capsys, fragment)
    with pytest.raises(ConfigError, match="neither a preset nor an existing file"):
        load_config([*TINY, f"hardware={tmp_path / 'absent.json'}"])
    # one GPU measured alone knows no links: a layout of two ranks is refused, not predicted as if they were free
    alone = {**good, "kind": "gpu", "ranks_per_node": 1, "ranks": {"1": good["ranks"]["1"]}}
    (tmp_path / "one-gpu.json").write_text(json.dumps(alone))
    assert_user_error_in_process(main, [*TINY, "parallel.dp=2", f"hardware={tmp_path / 'one-gpu.json'}"], capsys,
                                 "was measured with one rank alone")
    # a file measured in bf16 says nothing of fp32: no prediction, and a search refuses
    report = build_report(load_config(["model=bloom-tiny", "precision=fp32", f"hardware={tmp_path / 'good.json'}"]),
                          None, hardware(str(tmp_path / "good.json")))
    assert "predicted_iter_time_s" not in report and "calibrated in bf16" in report["prediction_unavailable"]
    assert_user_error_in_process(main, ["--search", "model=bloom-tiny", "precision=fp32", "cluster.gpus=2",
                                        f"hardware={tmp_path / 'good.json'}"], capsys, "calibrate again with")
    assert_user_error_in_process(main, ["--calibrate", *TINY], capsys, "give its path with --output FILE")
    assert_user_error_in_process(main, ["--calibrate", "--output", str(tmp_path / "no" / "hw.json"), *TINY], capsys,
                                 "does not exist")


@pytest.mark.slow
def test_calibration_measures_this_machine_into_a_file_that_predicts(tmp_path):
    """One and two ranks at once, bloom-tiny's shapes, briefly: every figure is there and positive, the links
    only where there are two ranks, and mbloom-plan predicts with the file (and searches it)."""
    from megatron_bloom.planner.calibrate import calibrate

    measured = calibrate(load_config(TINY), rank_counts=(1, 2), seconds=0.01)
    assert measured["kind"] == "cpu" and measured["precision"] == "bf16" and set(measured["ranks"]) == {"1", "2"}
    alone, pair = measured["ranks"]["1"], measured["ranks"]["2"]
    assert "gradient_gb_per_s" not in alone and pair["tensor_parallel_latency_s"] > 0 and pair["p2p_gb_per_s"] > 0
    assert set(alone["micro_batches"]) == {"1", "2", "4"}
    for figures in (*alone["micro_batches"].values(), *pair["micro_batches"].values()):
        assert all(value > 0 for value in figures.values()), figures
    path = tmp_path / "hardware.json"
    path.write_text(json.dumps(measured))
    for layout in (["parallel.tp=1", "parallel.dp=1"], ["parallel.tp=2", "parallel.dp=1"]):
        result = run_cli(["megatron_bloom.cli.plan", *TINY, f"hardware={path}", "--json", *layout])
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["predicted_iter_time_s"] > 0 and report["predicted_mfu"] > 0
    search = run_cli(["megatron_bloom.cli.plan", "--search", *TINY, "cluster.gpus=2", "cluster.gpus_per_node=2",
                      f"hardware={path}", "--json"])
    candidates = json.loads(search.stdout.strip().splitlines()[-1])["candidates"]
    assert {(c["tp"], c["pp"], c["dp"]) for c in candidates} >= {(1, 1, 2), (2, 1, 1), (1, 2, 1)}


def test_calibrated_rates_are_in_the_units_the_cost_model_charges():
    """From a rank's times to the file's figures: FLOPs over seconds per shape class, and the element-wise
    rate in bytes of the activations the cost model counts on this kind of machine (on a CPU, with its
    attention kernel's s x s terms), so that the calibration shape is predicted back exactly."""
    from megatron_bloom.planner.calibrate import Shapes, figures
    from megatron_bloom.planner.memory import layer_activation_bytes

    config = load_config([*TINY, "train.micro_batch_size=2"])
    shapes = Shapes(config, (2,), 1000, True)
    times = {"threads": 1, "peak_16bit": 0.4, "peak_fp32": 0.2, "optimizer": 0.01, "block_overhead": 1e-3,
             "block@2": 0.010, "recomputed_block@2": 0.013, "linear@2": 0.004, "attention@2": 0.002,
             "lm_head@2": 0.003}
    micro = figures(shapes, times)["micro_batches"]["2"]
    h, s, b = 64, 128, 2
    assert micro["linear_tflops"] == pytest.approx(3 * 24 * b * s * h * h / 0.004 / 1e12, rel=1e-6)
    assert micro["attention_tflops"] == pytest.approx(3 * 4 * b * s * s * h / 0.002 / 1e12, rel=1e-6)
    assert micro["recompute_passes"] == pytest.approx(0.003 / (0.010 / 3))
    on_cpu = load_config([*TINY, "train.micro_batch_size=2", "hardware=cpu"])
    assert micro["elementwise_gb_per_s"] == pytest.approx(6 * layer_activation_bytes(on_cpu) / 0.004 / 1e9, rel=1e-6)
