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
    """Transformer blocks."""
    hidden_size: int = 1024
    """Width of the residual stream (h); the MLP is 4h wide."""
    num_heads: int = 16
    """Attention heads (each of hidden_size / num_heads dimensions, with its own ALiBi slope)."""
    vocab_size: int = 250880
    """The tokenizer's vocabulary; the embedding is padded to a multiple of make_vocab_size_divisible_by x tp."""
    seq_length: int = 2048
    """Tokens per training sample."""
    layer_norm_epsilon: float = 1e-5
    """The LayerNorms' epsilon."""
    init_std: float = 0.02
    """Standard deviation of the initial weights (the two residual-output projections / sqrt(2 layers))."""
    make_vocab_size_divisible_by: int = 128
    """The embedding's rows are a multiple of this x tp (Megatron-LM); padding rows are zero, never predicted."""
    hidden_dropout: float = 0.0
    """Dropout after the attention and MLP outputs."""
    attention_dropout: float = 0.0
    """Dropout of the attention probabilities."""
    pad_token_id: Optional[int] = 3
    """The padding token (BLOOM's `<pad>`)."""
    bos_token_id: Optional[int] = 1
    """The beginning-of-sequence token (BLOOM's `<s>`)."""
    eos_token_id: Optional[int] = 2
    """The end-of-sequence token (BLOOM's `</s>`): generation stops at it."""
    attention_impl: str = "eager"
    """How attention is computed, not what: `eager` is the reference (fp32 softmax over materialized scores,
    bit-identical to transformers); `sdpa` is the fast path of each device (torch's fused attention; ALiBi
    folded into q.k on GPUs, causal blocks on CPUs). Not recorded in checkpoints."""
    fused_kernels: bool = False
    """One-pass GeLU (3x faster than BLOOM's formula op by op, equal within float32 rounding), our CPU
    kernels for bf16, and compiled cross-entropy passes on GPUs. Not recorded in checkpoints."""

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
