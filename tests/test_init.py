"""Initialization: the scheme's statistics, and values that depend on the seed alone, never on the layout."""

import math

import torch

from megatron_bloom.model import TaskConfig, build_model, initial_value, meta_device
from tests.conftest import small_config


def test_same_seed_same_weights_other_seed_other_weights():
    config = small_config()
    first, again, other = build_model(config, seed=5), build_model(config, seed=5), build_model(config, seed=6)
    for (name, a), b, c in zip(first.state_dict().items(), again.state_dict().values(),
                               other.state_dict().values()):
        assert torch.equal(a, b), name
        if "weight" in name and "layernorm" not in name and "ln_f" not in name:
            assert not torch.equal(a, c), name


def test_values_depend_on_name_not_on_construction_order():
    """A pipeline stage building only layer 1 gets the full model's layer 1; a tp rank slices the full tensor."""
    config = small_config(num_layers=3)
    full = build_model(config, seed=11).state_dict()
    for name in ("transformer.h.1.self_attention.query_key_value.weight", "transformer.h.2.mlp.dense_4h_to_h.weight"):
        value = initial_value(name, full[name].shape, config, seed=11)
        assert torch.equal(value, full[name])


def test_trunk_is_the_same_for_every_head():
    config = small_config()
    lm = build_model(config, seed=3).state_dict()
    classifier = build_model(config, TaskConfig(name="sequence_classification", num_labels=3), seed=3).state_dict()
    for name, value in lm.items():
        assert torch.equal(value, classifier[name]), name


def test_vocabulary_padding_does_not_change_real_rows():
    """tp = 16 pads a 1000-token vocabulary to 2048 rows instead of 1024: the real rows keep their values."""
    config = small_config(vocab_size=1000)
    name = "transformer.word_embeddings.weight"
    tp1 = initial_value(name, (config.padded_vocab_size(1), config.hidden_size), config, seed=1)
    tp16 = initial_value(name, (config.padded_vocab_size(16), config.hidden_size), config, seed=1)
    assert tp1.shape[0] == 1024 and tp16.shape[0] == 2048
    assert torch.equal(tp1[:1000], tp16[:1000])
    assert tp1[1000:].abs().max().item() == 0 and tp16[1000:].abs().max().item() == 0


def test_megatron_scheme_statistics():
    config = small_config(hidden_size=256, num_heads=4, num_layers=8, init_std=0.02)
    state = build_model(config, seed=0).state_dict()
    scaled_std = 0.02 / math.sqrt(2 * 8)
    for name, value in state.items():
        if name.endswith("bias"):
            assert value.abs().max().item() == 0, name
        elif "layernorm" in name or "ln_f" in name:
            assert torch.all(value == 1), name
        elif name.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")):
            assert abs(value.std().item() - scaled_std) < 0.05 * scaled_std, name
        else:
            real = value[: config.vocab_size] if "word_embeddings" in name else value
            assert abs(real.std().item() - 0.02) < 0.05 * 0.02, name
            assert abs(real.mean().item()) < 0.002, name


def test_build_model_dtype_and_device_keep_alibi_in_fp32():
    model = build_model(small_config(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    attention = model.transformer.h[0].self_attention
    assert attention.alibi_slopes.dtype == torch.float32 and attention.alibi_slopes.device.type == "cpu"


class RandomFills(torch.overrides.TorchFunctionMode):
    """Records the random fills that reach it (entered outside `meta_device`, it sees what that lets through)."""

    def __init__(self):
        super().__init__()
        self.devices = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("uniform_", "normal_", "kaiming_uniform_"):
            self.devices.append((args[0] if args else kwargs["tensor"]).device.type)
        return func(*args, **kwargs)


def test_modules_built_on_the_meta_device_skip_torchs_own_initialization():
    """`meta_device()` builds on meta without torch's initializers (their random fills on meta tensors import
    torch._dynamo: 2 s of a process's start-up); initializers of real tensors still run inside it."""
    with RandomFills() as plain, torch.device("meta"):
        torch.nn.Linear(4, 4)
    assert "meta" in plain.devices  # what the context saves
    with RandomFills() as fills, meta_device():
        layer = torch.nn.Linear(4, 4)
        real = torch.nn.init.normal_(torch.zeros(4, device="cpu"))
    assert layer.weight.is_meta and fills.devices == ["cpu"] and real.abs().sum() > 0
