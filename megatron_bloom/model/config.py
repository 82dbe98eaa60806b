"""The shape of a BLOOM model: the one object every model, parallel and checkpoint function takes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_bloom.errors import ConfigError

ATTENTION_IMPLS = ("eager", "sdpa")
# How a run computes, not what: a run's own choice, never saved with a checkpoint's model.
RUNTIME_FIELDS = ("attention_impl", "fused_kernels")
# The heads a model can carry (megatron_bloom/model/heads.py); here, free of torch, for the config schema too.
TASKS = ("causal_lm", "sequence_classification", "token_classification", "question_answering")


@dataclass
class ModelConfig:
    """Architecture of a BLOOM decoder (field names follow Megatron-LM, values the Hugging Face configs).

    `vocab_size` is the tokenizer's vocabulary; the embedding holds `padded_vocab_size(tp)` rows so that
    every tensor-parallel rank gets an equal, GEMM-friendly slice (Megatron-LM's
    `--make-vocab-size-divisible-by`). Padding rows are zero and never predicted.
    """

    num_layers: int = 24
    hidden_size: int = 1024
    num_heads: int = 16
    vocab_size: int = 250880
    seq_length: int = 2048
    layer_norm_epsilon: float = 1e-5
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    pad_token_id: Optional[int] = 3
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    # How attention is computed, not what: "eager" is the reference (fp32 softmax over materialized scores,
    # bit-identical to transformers); "sdpa" is torch's fused scaled_dot_product_attention, with ALiBi as
    # its additive mask or, on GPUs for unpadded batches, folded into q.k for the causal flash kernel (no
    # fp32 score copies; equal within rounding). Runs default to "sdpa" (configs/train.yaml); checkpoints
    # do not record it.
    attention_impl: str = "eager"
    # GeLU through torch's one-pass tanh-GeLU kernel (forward and backward) instead of BLOOM's formula as
    # separate elementwise ops: 3x faster on CPU; its constant sqrt(2/pi) differs from BLOOM's 0.79788456
    # by 8e-10 relative, below float32 resolution. On GPUs the cross-entropy's passes over the logits are
    # also compiled (torch.compile) into one kernel each way. Runs default to true (configs/train.yaml).
    fused_kernels: bool = False

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads", "vocab_size", "seq_length",
                    "make_vocab_size_divisible_by"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                f"({self.num_heads}) so that every attention head has the same size."
            )
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key} must be in [0, 1), got {getattr(self, key)!r}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got "
                              f"{self.attention_impl!r}.")
        if self.init_std <= 0 or self.layer_norm_epsilon <= 0:
            raise ConfigError(
                f"model.init_std ({self.init_std}) and model.layer_norm_epsilon "
                f"({self.layer_norm_epsilon}) must be positive."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        return 4 * self.hidden_size

    def with_runtime_choices(self, run) -> "ModelConfig":
        """This architecture computed as `run` (a ModelConfig, or the `model` section of a run's config)
        chooses to: its RUNTIME_FIELDS."""
        return dataclasses.replace(self, **{key: getattr(run, key) for key in RUNTIME_FIELDS})

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rounded up to a multiple of `make_vocab_size_divisible_by * tp` (Megatron-LM rule)."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def layer_parameters(self) -> int:
        """Parameters of one transformer block: two LayerNorms, fused QKV, attention output, 4h MLP."""
        h, f = self.hidden_size, self.ffn_hidden_size
        layer_norms = 2 * 2 * h
        attention = (h * 3 * h + 3 * h) + (h * h + h)
        mlp = (h * f + f) + (f * h + h)
        return layer_norms + attention + mlp

    def num_parameters(self, tp: int = 1) -> int:
        """Exact parameter count of the causal LM (the LM head is tied to the embedding, so it adds none)."""
        h = self.hidden_size
        embedding = self.padded_vocab_size(tp) * h + 2 * h  # word embeddings + their LayerNorm
        final_norm = 2 * h
        return embedding + self.num_layers * self.layer_parameters() + final_norm
