"""Every DeepSpeed internal megatron_bloom relies on (`megatron_bloom/fence/deepspeed.py`), checked against the
installed DeepSpeed on real engines: each name still exists, and still does what we rely on. An upgrade
that renames, drops or stops reading one of them fails here, not silently in a run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from megatron_bloom.checkpoint.safe_load import load_checkpoint_file
from megatron_bloom.config import load_config
from megatron_bloom.fence import deepspeed as fence
from megatron_bloom.parallel import ParallelState
from tests.conftest import REPO
from tests.distributed import run_distributed

ENGINE = ["model=bloom-tiny", "train.global_batch_size=2", "train.micro_batch_size=2", "optim.lr=1e-2",
          "data.num_workers=0", "sched.warmup_iters=0"]
BATCH = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))


def test_setup_pins_the_tested_deepspeed_and_it_is_installed():
    import deepspeed

    [pin] = [Requirement(name) for name in re.findall(r'"(deepspeed[^"]*)"', (REPO / "setup.py").read_text())]
    assert pin.specifier == Requirement("deepspeed" + fence.TESTED_DEEPSPEED).specifier
    assert sorted(bound.operator for bound in pin.specifier) == ["<", ">="]  # a lower and an upper bound
    assert Version(deepspeed.__version__) in pin.specifier


def step(engine, count_all_reduces: bool = False) -> int:
    """One optimizer step on BATCH; how many times the engine all-reduced its gradients."""
    calls = []
    if count_all_reduces:
        original = engine.allreduce_gradients
        engine.allreduce_gradients = lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1]
    engine.backward(engine(BATCH[:, :-1], BATCH[:, 1:]))
    engine.step()
    if count_all_reduces:
        del engine.allreduce_gradients
    return len(calls)


def saved_files(engine, directory: Path) -> dict:
    """Save through the engine; every file read back with our safe reader (only FILE_TYPES allowed)."""
    engine.save_checkpoint(str(directory), tag="t", save_latest=False)
    return {path.name: load_checkpoint_file(path) for path in (directory / "t").iterdir()}


def engine_internals(rank, world_size, root):
    """Stacked engines (pp = 1), one process: each internal's behaviour, per precision and ZeRO stage."""
    from megatron_bloom.training.loop import build_engine
    from megatron_bloom.training.optimizer import clip_gradients

    report = {}
    state = ParallelState.create(tp=1, pp=1, dp=1)

    # fp32 without ZeRO: the norm our clipping returns is the one reported, and DeepSpeed steps with the
    # gradients it leaves (zeroed here: a first AdamW step without weight decay then moves nothing).
    config = load_config(ENGINE + ["precision=fp32", "zero.stage=0", "optim.clip_grad=1.0", "optim.weight_decay=0"])
    engine, _, _ = build_engine(config, state)
    before = {name: param.detach().clone() for name, param in engine.module.named_parameters()}

    def clip_to_nothing():
        for param in engine.module.parameters():
            param.grad.zero_()
        return torch.tensor(123.0)

    fence.clip_fp32_gradients_with(engine, clip_to_nothing)
    step(engine)
    report["norm_reported"] = float(engine.get_global_grad_norm())
    report["moved_after_zeroed_clip"] = max((param.detach() - before[name]).abs().max().item()
                                            for name, param in engine.module.named_parameters())
    fence.clip_fp32_gradients_with(engine, lambda: clip_gradients(engine.module.parameters(), 1.0, state))
    step(engine)
    report["moved_after_real_clip"] = max((param.detach() - before[name]).abs().max().item()
                                          for name, param in engine.module.named_parameters())
    # the flag DeepSpeed's backward reads before all-reducing (build_engine switched it off: dp = 1)
    report["all_reduces_switched_off"] = step(engine, count_all_reduces=True)
    engine.enable_backward_allreduce = True
    report["all_reduces_switched_on"] = step(engine, count_all_reduces=True)
    engine.enable_backward_allreduce = False
    loads = []
    fence.wrap_checkpoint_engine(engine, lambda wrapped: CountingLoads(wrapped, loads))
    files = saved_files(engine, Path(root) / "fp32")
    engine.load_checkpoint(str(Path(root) / "fp32"), tag="t")
    report["loads_through_our_engine"] = len(loads)
    model_states = files[fence.model_states_file(0)]
    report["fp32_keys"] = {fence.MODULE, fence.OPTIMIZER, *fence.MODULE_ONLY_KEYS} <= set(model_states)
    report["torch_optimizer"] = isinstance(fence.torch_optimizer(engine.optimizer), torch.optim.Optimizer)

    # bf16 with ZeRO 1: DeepSpeed's BF16 optimizer, its groups, fragment mappings and file.
    engine, _, _ = build_engine(load_config(ENGINE + ["precision=bf16", "zero.stage=1"]), state)
    report["bf16_optimizer"] = fence.is_bf16_optimizer(engine.optimizer)
    report["bf16_groups"] = sum(len(group) for group in fence.low_precision_groups(engine.optimizer))
    report["bf16_mapped"] = all(fence.has_fragment_mapping(param) for param in engine.module.parameters())
    bf16_file = fence.zero_optimizer_file(0, 0, fence.BF16_OPTIMIZER_PREFIX)
    partition = saved_files(engine, Path(root) / "bf16")[bf16_file][fence.OPTIMIZER_STATE]
    report["bf16_keys"] = {fence.BASE_OPTIMIZER_STATE, fence.PARAM_SLICE_MAPPINGS} <= set(partition)

    # fp32 with ZeRO 2 and ZeRO 3: their optimizers' groups, mappings and files.
    engine, _, _ = build_engine(load_config(ENGINE + ["precision=fp32", "zero.stage=2"]), state)
    report["zero2_bf16_optimizer"] = fence.is_bf16_optimizer(engine.optimizer)
    report["zero2_groups"] = sum(len(group) for group in fence.low_precision_groups(engine.optimizer))
    report["zero2_mapped"] = all(fence.has_fragment_mapping(param) for param in engine.module.parameters())
    partition = saved_files(engine, Path(root) / "zero2")[fence.zero_optimizer_file(0, 0)][fence.OPTIMIZER_STATE]
    report["zero2_keys"] = {fence.BASE_OPTIMIZER_STATE, fence.PARAM_SLICE_MAPPINGS} <= set(partition)
    engine, _, _ = build_engine(load_config(ENGINE + ["precision=fp32", "zero.stage=3"]), state)
    report["zero3_flats"] = len(fence.zero3_flat_partitions(engine.optimizer))
    report["zero3_mapped"] = all(fence.has_fragment_mapping(param) for param in engine.module.parameters())
    files = saved_files(engine, Path(root) / "zero3")
    zero3_partition = files[fence.zero_optimizer_file(0, 0)][fence.OPTIMIZER_STATE]
    report["zero3_keys"] = (fence.PARAM_SHAPES in files[fence.zero_model_states_file(0, 0)]
                            and fence.ZERO3_FLAT_GROUPS in zero3_partition)
    return report


class CountingLoads:
    def __init__(self, wrapped, loads):
        self.wrapped, self.loads = wrapped, loads

    def load(self, path, map_location=None):
        self.loads.append(path)
        return self.wrapped.load(path, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


def test_engine_internals_exist_and_do_what_we_rely_on(tmp_path):
    report = run_distributed(engine_internals, 1, str(tmp_path))[0]
    assert report["all_reduces_switched_off"] == 0 and report["all_reduces_switched_on"] == 1
    assert report["norm_reported"] == 123.0  # the norm we set is what DeepSpeed reports
    assert report["moved_after_zeroed_clip"] == 0.0  # and DeepSpeed stepped with the gradients we clipped
    assert report["moved_after_real_clip"] > 0
    assert report["loads_through_our_engine"] > 0
    assert report["fp32_keys"] and report["torch_optimizer"]
    assert report["bf16_optimizer"] and report["bf16_groups"] > 0 and report["bf16_mapped"] and report["bf16_keys"]
    assert not report["zero2_bf16_optimizer"] and report["zero2_groups"] > 0 and report["zero2_mapped"]
    assert report["zero2_keys"]
    assert report["zero3_flats"] > 0 and report["zero3_mapped"] and report["zero3_keys"]


def fp16_wrapper_internals(rank, world_size, root):
    """fp16 without ZeRO (DeepSpeed runs fp16 on accelerators only): its wrapper keeps fp32 masters of its
    fp16 parameters, and saves its own state dict around the torch optimizer's."""
    from megatron_bloom.training.loop import build_engine

    engine, _, _ = build_engine(load_config(ENGINE + ["precision=fp16", "zero.stage=0"]),
                                ParallelState.create(tp=1, pp=1, dp=1))
    masters = fence.fp32_masters_by_parameter(engine.optimizer)
    files = saved_files(engine, Path(root))
    return (len(masters) == len(list(engine.module.parameters()))
            and all(master.dtype == torch.float32 for master in masters.values())
            and fence.OPTIMIZER_STATE in files[fence.model_states_file(0)][fence.OPTIMIZER])


@pytest.mark.gpu
def test_fp16_wrapper_internals_exist_and_do_what_we_rely_on(tmp_path):
    assert run_distributed(fp16_wrapper_internals, 1, str(tmp_path)) == [True]


def pipeline_internals(rank, world_size, root):
    """pp = 2: the stages are ours, only blocks are recomputed, the pipeline's all-reduce flag is read, and
    the layer files are where we look for them."""
    from megatron_bloom.pipeline.layers import BlockPipe
    from megatron_bloom.pipeline.partition import stage_layers
    from megatron_bloom.training.loop import build_engine

    config = load_config(ENGINE + ["precision=fp32", "zero.stage=0", "parallel.pp=2", "train.global_batch_size=4",
                                   "train.micro_batch_size=1", "train.activation_checkpointing=true"])
    state = ParallelState.create(tp=1, pp=2, dp=1)
    engine, _, _ = build_engine(config, state)
    module = engine.module
    expected = stage_layers(config.model, 2, "causal_lm", config.parallel.pipeline_partition)
    recomputed = []
    checkpoint = module.activation_checkpoint_func
    module.activation_checkpoint_func = lambda function, *args: (recomputed.append(1), checkpoint(function, *args))[1]
    all_reduces = []
    engine.allreduce_gradients = lambda *args, **kwargs: all_reduces.append(1)
    batches = iter([(BATCH[:1, :-1], BATCH[:1, 1:])] * 4)
    engine.train_batch(data_iter=batches)
    engine.save_checkpoint(root, tag="t", save_latest=False)
    layer_files = [fence.pipeline_layer_file(layer, 0) for layer in expected[rank] if layer != expected[-1][-1]]
    return {"parts": module.parts, "expected": [expected[0].start, expected[1].start, expected[1].stop],
            "recomputed": len(recomputed), "blocks": sum(isinstance(f, BlockPipe) for f in module.forward_funcs),
            "all_reduces": len(all_reduces),
            "layer_files": all((Path(root) / "t" / name).is_file() for name in layer_files),
            "coordinates": fence.pipeline_topology(2, 1, 1).get_coord(rank).pipe}


@pytest.mark.slow
def test_pipeline_internals_exist_and_do_what_we_rely_on(tmp_path):
    for rank, report in enumerate(run_distributed(pipeline_internals, 2, str(tmp_path))):
        assert report["parts"] == report["expected"]
        assert report["blocks"] > 0 and report["recomputed"] == 4 * report["blocks"]  # 4 micro-batches: blocks only
        assert report["all_reduces"] == 0
        assert report["layer_files"] and report["coordinates"] == rank


def test_deepspeed_helpers_and_file_types_exist():
    import importlib

    assert fence.partition_balanced([1, 1, 1, 1], 2) == [0, 2, 4]
    assert fence.partition_balanced([5, 1, 1, 1, 1, 1], 2) == [0, 1, 6]
    for name in fence.FILE_TYPES:
        module, _, attribute = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attribute), name
    from deepspeed.pipe import PipelineModule

    for name in ("_partition_layers", "_set_bounds", "_is_checkpointable"):
        assert callable(getattr(PipelineModule, name)), name


DEFERRED_MUON = """
import inspect, sys
import torch
import deepspeed
from megatron_bloom.fence import deepspeed as fence

fence.defer_muon_compilation()
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam  # what DeepSpeed's optimizers import
assert "torch._inductor" not in sys.modules and "torch._dynamo" not in sys.modules, "compiled at import"
module = sys.modules[fence.MUON_MODULE]
kernels = [value for value in vars(module).values() if inspect.isfunction(value) and hasattr(value, "__wrapped__")]
assert len(kernels) == inspect.getsource(module).count("@compiler.compile()") > 0, kernels
assert module.compiler.compile is not None and module.compiler.compile() is torch.compile  # put back
# a deferred kernel still computes what the undecorated function does (dynamo off: no compilation here)
torch._dynamo.config.disable = True
grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
deferred = module.zeropower_via_newtonschulz5
assert torch.equal(deferred(grad, steps=2), deferred.__wrapped__(grad, steps=2))
print("deferred", len(kernels))
"""


def test_deepspeeds_muon_kernels_are_imported_without_compiling_them(tmp_path):
    """DeepSpeed's ZeRO and BF16 optimizers import its Muon module on every run, which decorates its kernels with
    `torch.compile` at import (torch._dynamo and torch._inductor: about 2 s of every rank's start-up). Through
    the fence the import compiles nothing, the kernels compile on their first call, and DeepSpeed's
    `compiler.compile` is left as it was. In a fresh interpreter: the test process has imported everything."""
    result = subprocess.run([sys.executable, "-c", DEFERRED_MUON], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["deferred", "3"], result.stdout
