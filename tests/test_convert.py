"""`mbloom-convert from-hf / to-hf` as users run it: round trips, every weight format, and bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_bloom.checkpoint.hf import read_hf_config
from megatron_bloom.checkpoint.layout import read_metadata
from megatron_bloom.checkpoint.weights import load_model_state_dict
from megatron_bloom.config import load_config
from megatron_bloom.model import TaskConfig, build_model
from tests.conftest import FIXTURES, assert_user_error, assert_user_error_in_process, hf_model, run_cli, small_config

TASKS = [
    TaskConfig(),
    TaskConfig(name="sequence_classification", num_labels=3),
    TaskConfig(name="token_classification", num_labels=4),
    TaskConfig(name="question_answering"),
]


def save_hf(tmp_path, config=None, task=TaskConfig(), name="hf", **save_kwargs):
    model = hf_model(config or small_config(vocab_size=1000), task)
    model.save_pretrained(tmp_path / name, **save_kwargs)
    return model, tmp_path / name


def hf_tensors(directory):
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("task", [task if task.name == "causal_lm" else pytest.param(task, marks=pytest.mark.slow)
                                  for task in TASKS], ids=lambda t: t.name)
def test_round_trip_hf_ours_hf_is_bit_exact(tmp_path, task):
    _, source = save_hf(tmp_path, task=task)
    run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(source), "--output", str(tmp_path / "ckpt")])
    run_cli(["megatron_bloom.cli.convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt"),
             "--output", str(tmp_path / "back")])
    original, exported = hf_tensors(source), hf_tensors(tmp_path / "back")
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert tensor.dtype == exported[name].dtype and torch.equal(tensor, exported[name]), name
    assert read_hf_config(source) == read_hf_config(tmp_path / "back")
    source_config = json.loads((source / "config.json").read_text())
    exported_config = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("architectures", "n_layer", "n_head", "hidden_size", "vocab_size", "id2label"):
        assert source_config.get(key) == exported_config.get(key), key


def test_exported_model_loads_in_transformers_and_matches_ours(tmp_path):
    import transformers

    config = small_config(num_layers=3, hidden_size=96, num_heads=6, vocab_size=1000)
    ours = build_model(config, seed=9).eval()
    from megatron_bloom.checkpoint.layout import CheckpointMetadata, save_model_checkpoint

    save_model_checkpoint(tmp_path / "ckpt", [ours.state_dict()], CheckpointMetadata(model=config))
    run_cli(["megatron_bloom.cli.convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt" / "global_step0"),
             "--output", str(tmp_path / "hf")])
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]  # the umask's, as every file it writes
    reference = transformers.BloomForCausalLM.from_pretrained(tmp_path / "hf").eval()
    input_ids = torch.randint(0, 1000, (2, 11))
    with torch.no_grad():
        assert torch.equal(reference(input_ids).logits, ours(input_ids).logits)


def test_checkpoint_layout_and_metadata(tmp_path):
    _, source = save_hf(tmp_path)
    result = run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(source), "--output", str(tmp_path / "c")])
    assert (tmp_path / "c" / "latest").read_text().strip() == "global_step0"
    tag = tmp_path / "c" / "global_step0"
    assert sorted(p.name for p in tag.iterdir()) == ["mbloom.json", "mp_rank_00_model_states.pt"]
    metadata = read_metadata(tmp_path / "c")
    assert (metadata.tp, metadata.pp, metadata.iteration, metadata.task.name) == (1, 1, 0, "causal_lm")
    assert metadata.model.vocab_size == 1000
    _, state = load_model_state_dict(tag)
    embedding = state["transformer.word_embeddings.weight"]
    assert embedding.shape == (1024, 64) and embedding[1000:].abs().max().item() == 0  # padded with zeros
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)  # DeepSpeed's keys
    assert {"module", "global_steps", "dp_world_size", "mp_world_size"} <= set(states)
    assert f"{metadata.model.num_parameters():,} parameters" in result.stdout


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tensor_parallel_checkpoint_round_trip(tmp_path, tp):
    """from-hf --tp N writes one DeepSpeed model file per rank, holding that rank's slices; to-hf merges."""
    _, source = save_hf(tmp_path)
    run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(source), "--output", str(tmp_path / "c"),
             "--tp", str(tp)])
    tag = tmp_path / "c" / "global_step0"
    assert sorted(p.name for p in tag.glob("mp_rank_*")) == [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    assert read_metadata(tag).tp == tp
    shard = torch.load(tag / "mp_rank_01_model_states.pt", weights_only=True)
    assert shard["mp_world_size"] == tp
    assert shard["module"]["transformer.h.0.mlp.dense_h_to_4h.weight"].shape == (4 * 64 // tp, 64)
    run_cli(["megatron_bloom.cli.convert", "to-hf", "--checkpoint", str(tmp_path / "c"), "--output", str(tmp_path / "back")])
    original, exported = hf_tensors(source), hf_tensors(tmp_path / "back")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[name], exported[name]) for name in original)


@pytest.mark.slow
def test_sharded_safetensors_and_pytorch_bin_inputs(tmp_path):
    model, _ = save_hf(tmp_path, name="single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(tmp_path / "single" / "config.json", bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")  # the older format, lm_head included
    states = {}
    for name in ("single", "sharded", "bin"):
        run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(tmp_path / name),
                 "--output", str(tmp_path / f"ckpt-{name}")])
        states[name] = load_model_state_dict(tmp_path / f"ckpt-{name}")[1]
    for name, tensor in states["single"].items():
        assert torch.equal(tensor, states["sharded"][name]) and torch.equal(tensor, states["bin"][name]), name


def test_real_bloom_560m_config_reads_as_the_preset():
    model, task = read_hf_config(FIXTURES / "bloom-560m")
    # the architecture alone, with the reference computations a checkpoint's model config reads as
    preset = load_config(["model=bloom-560m", "model.attention_impl=eager", "model.fused_kernels=false"]).model
    assert model == preset and task == TaskConfig()
    assert model.num_parameters() == 559_214_592


def test_unknown_missing_and_mismatched_tensors_are_refused(tmp_path):
    _, source = save_hf(tmp_path)
    tensors = hf_tensors(source)
    tensors["transformer.h.0.self_attention.rotary.weight"] = torch.zeros(3)
    del tensors["transformer.h.1.mlp.dense_h_to_4h.bias"]
    tensors["transformer.ln_f.weight"] = torch.ones(65)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    result = run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(source), "--output", str(tmp_path / "c")],
                     check=False)
    assert_user_error(result, "unknown tensors: transformer.h.0.self_attention.rotary.weight",
                      "missing tensors: transformer.h.1.mlp.dense_h_to_4h.bias",
                      "transformer.ln_f.weight (65,) (expected (64,))")
    assert not (tmp_path / "c").exists()  # nothing half-written


def test_config_that_disagrees_with_the_weights_is_refused(tmp_path):
    _, source = save_hf(tmp_path)
    config = json.loads((source / "config.json").read_text())
    config["n_layer"] = 3
    (source / "config.json").write_text(json.dumps(config))
    result = run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(source), "--output", str(tmp_path / "c")],
                     check=False)
    assert_user_error(result, "missing tensors: transformer.h.2.")


def test_untied_lm_head_is_refused(tmp_path):
    model, _ = save_hf(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "hf" / "model.safetensors").unlink()
    result = run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(tmp_path / "hf"), "--output",
                      str(tmp_path / "c")], check=False)
    assert_user_error(result, "lm_head.weight differs")


@pytest.mark.parametrize("problem", ["no-dir", "no-config", "not-bloom", "no-weights", "truncated", "pp"])
def test_bad_input_is_one_clear_error(tmp_path, problem):
    _, source = save_hf(tmp_path)
    extra = []
    expected = {
        "no-dir": "no such directory", "no-config": "has no config.json", "not-bloom": "'gpt2' model",
        "no-weights": "holds no weights", "truncated": "Is the file complete?",
        "pp": "--pp 3: the model has 2 layers, fewer than pipeline stages",
    }[problem]
    if problem == "no-dir":
        source = tmp_path / "missing"
    elif problem == "no-config":
        (source / "config.json").unlink()
    elif problem == "not-bloom":
        (source / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    elif problem == "no-weights":
        (source / "model.safetensors").unlink()
    elif problem == "truncated":
        data = (source / "model.safetensors").read_bytes()
        (source / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        extra = ["--pp", "3"]
    result = run_cli(["megatron_bloom.cli.convert", "from-hf", "--hf", str(source), "--output", str(tmp_path / "c"),
                      *extra], check=False)
    assert_user_error(result, expected)


def test_incomplete_checkpoint_is_never_loaded(tmp_path, capsys):
    """mbloom-convert's `main`, in this process."""
    from megatron_bloom.cli.convert import main

    _, source = save_hf(tmp_path)
    main(["from-hf", "--hf", str(source), "--output", str(tmp_path / "c")])
    weights = tmp_path / "c" / "global_step0" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_user_error_in_process(main, ["to-hf", "--checkpoint", str(tmp_path / "c"), "--output", str(tmp_path / "back")],
                                 capsys, "is incomplete", "mp_rank_00_model_states.pt is 1000 bytes")
    assert_user_error_in_process(main, ["to-hf", "--checkpoint", str(tmp_path / "nothing"), "--output",
                                        str(tmp_path / "back")], capsys, "does not exist")


def test_large_export_is_sharded_with_an_index(tmp_path, monkeypatch):
    import megatron_bloom.checkpoint.hf as hf

    config = small_config()
    model = build_model(config, seed=2)
    monkeypatch.setattr(hf, "_SHARD_BYTES", 100_000)  # a 5 GB limit, scaled to a test model
    hf.write_hf_checkpoint(tmp_path / "out", model.state_dict(), config, TaskConfig())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    import transformers

    reference = transformers.BloomForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in hf.state_dict_to_hf(model.state_dict(), config).items():
        assert torch.equal(reference.state_dict()[name], tensor), name
