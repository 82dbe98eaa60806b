"""The Hydra config tree: every file composes and validates, presets have the published shapes and sizes."""

import importlib
import re

import pytest
import torch
from omegaconf import OmegaConf

from megatron_bloom.config import available_presets, config_dir, load_config, to_yaml
from megatron_bloom.config.reference import config_keys
from megatron_bloom.errors import ConfigError
from megatron_bloom.model import BloomForCausalLM

# Published parameter counts of the bigscience checkpoints (model cards / safetensors metadata).
PUBLISHED = {
    "bloom-560m": 559_214_592,
    "bloom-1b1": 1_065_314_304,
    "bloom-1b7": 1_722_408_960,
    "bloom-3b": 3_002_557_440,
    "bloom-7b1": 7_069_016_064,
    "bloom-176b": 176_247_271_424,
}
SHAPES = {  # layers, hidden, heads
    "bloom-560m": (24, 1024, 16), "bloom-1b1": (24, 1536, 16), "bloom-1b7": (24, 2048, 16),
    "bloom-3b": (30, 2560, 32), "bloom-7b1": (30, 4096, 32), "bloom-176b": (70, 14336, 112),
    "bloom-small": (8, 512, 8), "bloom-tiny": (4, 64, 4),
}


def test_every_config_file_composes_and_validates():
    groups = sorted(p.name for p in config_dir().iterdir() if p.is_dir())
    assert groups == ["checkpoint", "data", "launcher", "logging", "model", "optim", "parallel", "task"]
    for group in groups:
        for option in available_presets(group):
            config = load_config([f"{group}={option}"])
            assert config.run.dir.startswith("runs/")  # interpolations resolved


@pytest.mark.parametrize("preset", sorted(SHAPES))
def test_preset_shapes(preset):
    model = load_config([f"model={preset}"]).model
    assert (model.num_layers, model.hidden_size, model.num_heads) == SHAPES[preset]
    if preset in PUBLISHED:
        assert (model.vocab_size, model.seq_length) == (250880, 2048)
    if preset == "bloom-small":
        assert (model.vocab_size, model.seq_length) == (32000, 512)
    if preset == "bloom-tiny":
        assert (model.vocab_size, model.seq_length) == (1024, 128)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_count_equals_published(preset):
    model = load_config([f"model={preset}"]).model
    assert model.num_parameters() == PUBLISHED[preset]
    with torch.device("meta"):  # the real module tree, without allocating a single weight
        module = BloomForCausalLM(model)
    assert sum(p.numel() for p in module.parameters()) == PUBLISHED[preset]


def test_parameter_count_includes_vocabulary_padding():
    model = load_config(["model=bloom-tiny", "model.vocab_size=1000"]).model
    assert model.padded_vocab_size() == 1024 and model.padded_vocab_size(tp=4) == 1024
    assert load_config(["model.vocab_size=1100"]).model.padded_vocab_size(tp=2) == 1280
    with torch.device("meta"):
        module = BloomForCausalLM(model)
    assert sum(p.numel() for p in module.parameters()) == model.num_parameters()


def test_launcher_and_sections_are_typed():
    config = load_config(["launcher=slurm", "slurm.nodes=4", "slurm.partition=gpu", "parallel.tp=4",
                          "precision=fp16", "optim.lr=1e-4", "logging.wandb.mode=offline"])
    assert config.launcher.name == "slurm" and config.slurm.nodes == 4 and config.slurm.partition == "gpu"
    assert config.parallel.tp == 4 and config.precision == "fp16" and config.optim.lr == 1e-4
    assert config.logging.wandb.mode == "offline"


def test_resolved_yaml_round_trips():
    config = load_config(["model=bloom-tiny", "train.iters=7", "data.paths=[0.3,a,0.7,b]"])
    again = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(type(config)),
                                                OmegaConf.create(to_yaml(config))))
    assert again == config
    assert config.data.paths == [0.3, "a", 0.7, "b"]


@pytest.mark.parametrize("overrides, fragments", [
    (["model.foo=1"], ["model.foo is not a config key", "--help lists every key"]),
    (["train.iter=5", "model=bloom-tiny"], ["train.iter is not a config key; did you mean train.iters"]),
    (["parallel.tpp=2"], ["did you mean parallel.tp"]),
    (["model=bloom-9b"], ["bloom-9b", "bloom-560m"]),
    (["model.num_layers=abc"], ["model.num_layers", "abc"]),
    (["parallel.tp=3"], ["model.num_heads (16)", "parallel.tp (3)"]),
    (["model=bloom-tiny", "parallel.pp=5"], ["model.num_layers (4)", "parallel.pp (5)"]),
    (["parallel.pp=2", "zero.stage=2"], ["zero.stage=2", "parallel.pp=2"]),
    (["train.global_batch_size=7", "train.micro_batch_size=2"], ["train.global_batch_size (7)"]),
    (["parallel.dp=3", "train.global_batch_size=8"], ["parallel.dp (3)"]),
    (["precision=fp8"], ["precision", "fp8"]),
    (["sched.decay_style=step"], ["sched.decay_style", "cosine"]),
    (["model.hidden_size=1000"], ["model.hidden_size (1000)", "model.num_heads (16)"]),
    (["model.seq_length=0"], ["model.seq_length"]),
    (["optim.min_lr=1"], ["optim.min_lr"]),
    (["checkpoint.load=auto"], ["checkpoint.dir"]),
    (["launcher=pbs"], ["launcher/pbs"]),
    (["parallel.sequence_parallel=true"], ["parallel.tp > 1"]),
    (["data.split='a,b'"], ["data.split must be up to three non-negative weights"]),
    (["data.temperature=0"], ["data.temperature must be positive"]),
    (["logging.wandb.mode=cloud"], ["logging.wandb.mode"]),
])
def test_bad_config_is_one_clear_message(overrides, fragments):
    with pytest.raises(ConfigError) as error:
        load_config(overrides)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_typo_names_only_the_key_at_fault():
    with pytest.raises(ConfigError) as error:
        load_config(["model=bloom-tiny", "train.iter=5", "parallel.tp=2"])
    assert "parallel.tp=2" not in str(error.value) and "schema.py" not in str(error.value)


@pytest.mark.parametrize("command", ["train", "eval", "generate", "launch", "plan"])
def test_help_lists_every_config_key_with_its_default(command, capsys):
    """--help of each command that takes overrides lists every key of the schema, generated from it."""
    main = importlib.import_module(f"megatron_bloom.cli.{command}").main
    with pytest.raises(SystemExit) as exit_status:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_status.value.code == 0 and out.startswith(f"usage: mbloom-{command}")
    listed = set(re.findall(r"^  ([a-z0-9_.]+)=", out, flags=re.MULTILINE))
    leaves = {key.key for key in config_keys()}
    assert leaves == listed and {"model.vocab_size", "checkpoint.save_interval"} <= listed
    assert "model.vocab_size=250880  (int)" in out and "model=bloom-176b|" in out


def test_config_dir_can_be_moved(tmp_path, monkeypatch):
    import shutil

    shutil.copytree(config_dir(), tmp_path / "configs")
    (tmp_path / "configs" / "model" / "bloom-mine.yaml").write_text(
        "num_layers: 2\nhidden_size: 32\nnum_heads: 2\nvocab_size: 256\nseq_length: 16\n")
    monkeypatch.setenv("MBLOOM_CONFIG_DIR", str(tmp_path / "configs"))
    assert load_config(["model=bloom-mine"]).model.hidden_size == 32
