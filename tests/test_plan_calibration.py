"""`mbloom-plan --calibrate` and `hardware=FILE`: a real calibration on this machine's processes, the figures
a layout is predicted with (rank count, micro-batch), the cost model's use of them, and files that are
damaged, hostile or for another precision."""

import dataclasses
import json

import pytest

from megatron_bloom.config import load_config
from megatron_bloom.errors import ConfigError
from megatron_bloom.planner.communication import tensor_parallel_per_micro_batch
from megatron_bloom.planner.cost import predict_iteration
from megatron_bloom.planner.hardware_file import hardware
from megatron_bloom.planner.hardware_file import FILE_FORMAT, load_hardware_file
from megatron_bloom.planner.memory import plan_stages
from megatron_bloom.planner.report import build_report
from tests.conftest import assert_user_error_in_process, run_cli

TINY = ["model=bloom-tiny", "train.global_batch_size=16", "precision=bf16"]


def synthetic_file(path, precision="bf16"):
    path.write_text(synthetic_file_text(precision))
    return path


def synthetic_file_text(precision="bf16"):
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
    return json.dumps(data)


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
    2 (d - 1) / d of 4 P bytes plus 2 (d - 1) latencies, then (DeepSpeed's BF16 optimizer) an all-gather of
    the updated bf16 weights, half that in a quarter of the bytes; not overlapped; recomputation adds the
    file's 1.5 forwards of compute."""
    path = str(synthetic_file(tmp_path / "hw.json"))
    config = load_config([*TINY, f"hardware={path}", "parallel.tp=1", "parallel.pp=1", "parallel.dp=2",
                          "train.micro_batch_size=4", "zero.stage=1"])
    params = plan_stages(config)[0].params_per_rank
    predicted = predict_iteration(config, hardware(path))
    assert predicted.data_parallel_s == pytest.approx(1.25 * (4 * params / 1e9 + 2 * 1e-3))
    fp32 = load_config([*TINY, f"hardware={path}", "parallel.tp=1", "parallel.pp=1", "parallel.dp=2",
                        "train.micro_batch_size=4", "zero.stage=1", "precision=fp32"])
    # fp32 at ZeRO 1: a reduce-scatter and an all-gather of as many bytes, one all-reduce's traffic
    fp32_rank = dataclasses.replace(hardware(path), precision="fp32")
    assert predict_iteration(fp32, fp32_rank).data_parallel_s == pytest.approx(4 * params / 1e9 + 2 * 1e-3)
    recomputed = load_config([*TINY, f"hardware={path}", "parallel.tp=1", "parallel.pp=1", "parallel.dp=2",
                              "train.micro_batch_size=4", "train.activation_checkpointing=true"])
    base_compute = predicted.stages[0].compute_s
    with_recompute = predict_iteration(recomputed, hardware(path)).stages[0].compute_s
    # the LM head is never recomputed; everything else costs 4.5 passes instead of 3
    head = 2.0 * 4 * 128 * 64 * 1024 * 3 / (0.15 * 1.2e12)
    assert (with_recompute - head) == pytest.approx((base_compute - head) * 4.5 / 3)
    # ZeRO 2 reduce-scatters the float32 gradients after each of the 2 micro-batches and gathers the bf16
    # weights once: 1.25 all-reduces; ZeRO 3 gathers the parameters in every forward and backward instead (1 a
    # micro-batch), and its hooks take 2 ms a block and micro-batch here
    zero = {stage: predict_iteration(load_config(
        [*TINY, f"hardware={path}", "parallel.tp=1", "parallel.pp=1", "parallel.dp=2", "train.micro_batch_size=4",
         f"zero.stage={stage}"]), hardware(path)) for stage in (2, 3)}
    assert zero[3].stages[0].compute_s == pytest.approx(base_compute + 4 * 2e-3)
    assert zero[2].data_parallel_s == pytest.approx(1.25 * (4 * params / 1e9 + 2 * 1e-3))
    assert zero[3].data_parallel_s == pytest.approx(2 * (4 * params / 1e9 + 2 * 1e-3))


def test_a_measured_tensor_parallel_block_and_the_trainers_overheads_are_charged_where_they_apply(tmp_path):
    """At tp 2 a calibrated block replaces the rates' block and its collectives (the embedding's and the
    head's stay), scaled to the micro-batch and shared further beyond the ranks measured; the trainer's
    overheads, in each micro-batch and each step, go to every layout: those measured with data-parallel
    replicas to layouts with dp > 1, those of one rank alone to layouts without replicas."""
    path = synthetic_file(tmp_path / "hw.json")
    data = json.loads(path.read_text())
    pair = data["ranks"]["2"]
    pair["micro_batches"]["4"].update(tensor_parallel_block_s={"2": 0.008}, sequence_parallel_block_s={"2": 0.010})
    pair.update(step_overhead_s=0.05, block_step_overhead_s=0.002, micro_batch_overhead_s=0.003,
                block_micro_batch_overhead_s=0.001)
    data["ranks"]["1"].update(step_overhead_s=0.02, block_step_overhead_s=0.0005, micro_batch_overhead_s=0.0015,
                              block_micro_batch_overhead_s=0.0002)
    path.write_text(json.dumps(data))
    device = hardware(str(path))

    def predicted(*overrides):
        config = load_config([*TINY, f"hardware={path}", "parallel.pp=1", "train.micro_batch_size=4", *overrides])
        return config, predict_iteration(config, device)

    plain_config, plain = predicted("parallel.tp=2", "parallel.dp=1")
    _, parallel = predicted("parallel.tp=2", "parallel.dp=1", "parallel.sequence_parallel=true")
    head = 2.0 * 4 * 128 * 64 * 1024 / 2 * 3 / (0.15 * 1.2e12)  # the vocabulary's half, at the head's rate
    trainer = 0.0015 + 4 * 0.0002  # the trainer's own work in a micro-batch, one rank alone's: its and 4 blocks'
    assert plain.stages[0].compute_s == pytest.approx(4 * 0.008 + head + trainer)
    assert parallel.stages[0].compute_s == pytest.approx(4 * 0.010 + head + trainer)
    collectives, sent = tensor_parallel_per_micro_batch(plain_config, plan_stages(plain_config)[0], blocks=False)
    assert collectives == 2  # the embedding's and the head's
    assert plain.stages[0].tp_s == pytest.approx(sent / 5e9 + 2 * 1e-4)
    # micro-batch 2: the nearest measured is 4, half its block; recomputation one forward of it more (1.5 here)
    _, half = predicted("parallel.tp=2", "parallel.dp=1", "train.micro_batch_size=2", "train.global_batch_size=8")
    assert half.stages[0].compute_s == pytest.approx(4 * 0.004 + head / 2 + trainer)
    _, recomputed = predicted("parallel.tp=2", "parallel.dp=1", "train.activation_checkpointing=true")
    assert recomputed.stages[0].compute_s == pytest.approx(4 * 0.008 * 4.5 / 3 + head + trainer)
    # four ranks on a machine measured with two: each has half the cores, its block takes twice as long
    four = device.for_layout(4, 4)
    assert four.tensor_parallel_block_s(2, False, 4) == pytest.approx(0.016)
    assert four.tensor_parallel_block_s(4, False, 4) is None  # not measured: the rates' block
    # dp 2: the trainer's overheads, a step's and per micro-batch (2 of them) and block (4)
    _, replicas = predicted("parallel.tp=1", "parallel.dp=2")
    without = dataclasses.replace(device, measured=tuple(
        (n, b, dataclasses.replace(f, step_overhead_s=0.0, block_step_overhead_s=0.0, micro_batch_overhead_s=0.0,
                                   block_micro_batch_overhead_s=0.0))
        for n, b, f in device.measured))
    bare = predict_iteration(load_config([*TINY, f"hardware={path}", "parallel.pp=1", "train.micro_batch_size=4",
                                          "parallel.tp=1", "parallel.dp=2"]), without)
    assert replicas.total_s - bare.total_s == pytest.approx(0.05 + 4 * 0.002 + 2 * (0.003 + 4 * 0.001))
    # without data parallelism on two ranks, one rank alone's step overheads (the replicas' are theirs)
    assert plain.optimizer_s - predict_iteration(plain_config, without).optimizer_s == pytest.approx(0.02 + 4 * 0.0005)


def test_the_trainers_overheads_are_what_its_steps_took_beyond_the_prediction():
    """Steps made of the model's own prediction, with a block's and the head's compute as timed at the
    trainer's shapes (slower than the rates say: a short sequence), plus known overheads give back exactly
    those overheads: a step's, a block's in each step, a micro-batch's and a block's in each micro-batch, and
    ZeRO 3's beyond ZeRO 2's."""
    from megatron_bloom.planner.calibrate import (TRAINER_STEPS, ZERO3_MICRO_BATCHES, Shapes, _trainer_run,
                                                  trainer_overheads)
    from megatron_bloom.planner.hardware_file import hardware_from_data

    config = load_config([*TINY, "train.micro_batch_size=4"])
    shapes = Shapes(config, (4,), 1000, True)
    data = json.loads(synthetic_file_text())
    rank = {key: value for key, value in data["ranks"]["2"].items() if not key.startswith("zero3")}
    device = hardware_from_data({**data, "ranks": {"2": rank}}, "synthetic")
    step, block_step, micro, block, zero3_block, zero3_micro = 0.02, 0.006, 0.004, 0.001, 0.003, 0.005

    def rates_say(blocks: int) -> float:  # a micro-batch's compute of the blocks and head, by the rates
        return predict_iteration(_trainer_run(shapes, 2, blocks, 1, 1), device).stages[0].compute_s
    block_gap, head_gap = 0.0031, 0.0017  # what the rates leave out at these shapes
    times = {"trainer_block": rates_say(3) / 2 - rates_say(1) / 2 + block_gap}
    times["trainer_lm_head"] = rates_say(1) - times["trainer_block"] + block_gap + head_gap
    for blocks, m in TRAINER_STEPS:
        run = _trainer_run(shapes, 2, blocks, m, 1)
        times[f"trainer@{blocks}@{m}"] = (predict_iteration(run, device).total_s + m * (blocks * block_gap + head_gap)
                                          + step + blocks * block_step + m * (micro + blocks * block))
    with_trainer = hardware_from_data({**data, "ranks": {"2": {
        **rank, "step_overhead_s": step, "block_step_overhead_s": block_step, "micro_batch_overhead_s": micro,
        "block_micro_batch_overhead_s": block}}},
        "synthetic")
    m = ZERO3_MICRO_BATCHES
    for blocks, slow in ((1, 0.03), (3, 0.05)):  # ZeRO 2's and 3's runs, both slowed the same in this phase
        times[f"zero2@{blocks}"] = predict_iteration(_trainer_run(shapes, 2, blocks, m, 2), with_trainer).total_s + slow
        times[f"zero3@{blocks}"] = (predict_iteration(_trainer_run(shapes, 2, blocks, m, 3), with_trainer).total_s
                                    + slow + m * (zero3_micro + blocks * zero3_block))
    found = trainer_overheads(shapes, 2, rank, times)
    assert found == pytest.approx({"step_overhead_s": step, "block_step_overhead_s": block_step,
                                   "micro_batch_overhead_s": micro,
                                   "block_micro_batch_overhead_s": block, "zero3_block_overhead_s": zero3_block,
                                   "zero3_micro_batch_overhead_s": zero3_micro}, abs=1e-8)


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
    hostile = json.loads(json.dumps(good))
    hostile["ranks"]["2"]["micro_batches"]["4"]["tensor_parallel_block_s"] = {"2": "fast"}
    cases["tp-block.json"] = (json.dumps(hostile), "'2' must be a positive number")
    hostile["ranks"]["2"]["micro_batches"]["4"]["tensor_parallel_block_s"] = [0.01]
    cases["tp-list.json"] = (json.dumps(hostile), "must be an object of tensor-parallel degrees and seconds")
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
    and the tensor-parallel blocks only where there are two ranks, the trainer's overheads at both, and
    mbloom-plan predicts with the file (and searches it)."""
    from megatron_bloom.planner.calibrate import calibrate

    measured = calibrate(load_config(TINY), rank_counts=(1, 2), seconds=0.01)
    assert measured["kind"] == "cpu" and measured["precision"] == "bf16" and set(measured["ranks"]) == {"1", "2"}
    alone, pair = measured["ranks"]["1"], measured["ranks"]["2"]
    assert "gradient_gb_per_s" not in alone and pair["tensor_parallel_latency_s"] > 0 and pair["p2p_gb_per_s"] > 0
    assert set(alone["micro_batches"]) == {"1", "2", "4"}
    for figures in (*alone["micro_batches"].values(), *pair["micro_batches"].values()):
        assert all(value > 0 for value in figures.values() if not isinstance(value, dict)), figures
    for figures in pair["micro_batches"].values():  # tp 2 (bloom-tiny's 4 heads), with and without SP
        assert figures["tensor_parallel_block_s"]["2"] > 0 and figures["sequence_parallel_block_s"]["2"] > 0
    assert "tensor_parallel_block_s" not in alone["micro_batches"]["4"]
    for key in ("step_overhead_s", "block_step_overhead_s", "micro_batch_overhead_s", "block_micro_batch_overhead_s"):
        assert alone[key] >= 0 and pair[key] >= 0
    assert pair["zero3_block_overhead_s"] >= 0 and "zero3_block_overhead_s" not in alone
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
