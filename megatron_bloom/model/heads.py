"""The four task models of the Hugging Face BLOOM documentation on top of the shared trunk.

Names, pooling and losses follow `transformers` (`BloomForCausalLM`, `BloomForSequenceClassification`,
`BloomForTokenClassification`, `BloomForQuestionAnswering`) so that weights and results carry over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from megatron_bloom.errors import ConfigError
from megatron_bloom.model.config import TASKS, ModelConfig
from megatron_bloom.model.kv_cache import KVCache
from megatron_bloom.model.inference_linear import inference_linear
from megatron_bloom.model.transformer import BloomModel

IGNORE_INDEX = -100


@dataclass
class TaskConfig:
    """Which head sits on the trunk. `num_labels`/`labels` matter for the two classification heads."""

    name: str = "causal_lm"
    num_labels: int = 2
    problem_type: Optional[str] = None
    labels: Optional[List[str]] = None  # label names in index order (exported as id2label)

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ConfigError(f"task.name must be one of {', '.join(TASKS)}; got {self.name!r}.")
        if self.num_labels < 1:
            raise ConfigError(f"task.num_labels must be at least 1, got {self.num_labels}.")
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ConfigError(
                f"task.labels names {len(self.labels)} labels but task.num_labels is {self.num_labels}."
            )


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


@dataclass
class QuestionAnsweringOutput:
    start_logits: torch.Tensor
    end_logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1]; labels of -100 are ignored."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def last_token_index(input_ids: torch.Tensor, pad_token_id: Optional[int]) -> torch.Tensor:
    """Per row, the index of the rightmost token that is not padding (what sequence classification scores,
    as `transformers` finds it: by the pad id, so left and right padding both work)."""
    if pad_token_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    not_pad = (input_ids != pad_token_id).to(torch.int32)
    token_indices = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    return (token_indices * not_pad).argmax(-1)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int,
                                 problem_type: Optional[str] = None) -> torch.Tensor:
    """The loss of pooled logits [batch, num_labels]; an unset `problem_type` is inferred as `transformers`
    does (one label: regression; integer labels: single-label; else multi-label classification)."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels)
    return F.binary_cross_entropy_with_logits(logits, labels)


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not -100."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def question_answering_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
                            end_positions: torch.Tensor) -> torch.Tensor:
    """The mean of the start and end cross-entropies over the positions; a position outside the input (an
    answer cut off by truncation) is ignored, as in `transformers`."""
    ignored = start_logits.shape[1]
    start = start_positions.reshape(-1).clamp(0, ignored)
    end = end_positions.reshape(-1).clamp(0, ignored)
    return (F.cross_entropy(start_logits, start, ignore_index=ignored)
            + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2


class TiedLMHead(nn.Module):
    """Logits from the input embedding matrix (BLOOM ties its LM head to it), so no parameters of its own.

    Only the first `vocab_size` rows are scored: a view, so padding rows cost nothing and are never
    predicted. Tensor parallelism swaps in a vocab-parallel head with the same call.
    """

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.packed: Optional[nn.Module] = None  # inference on CPUs: a packed or int8 copy (`pack`)

    def pack(self, embedding_weight: torch.Tensor, rows: int, quantize: Optional[str] = None) -> None:
        """Score with a packed (or int8) copy of the embedding rows from now on (frozen weights; see
        inference_linear)."""
        self.packed = inference_linear(embedding_weight[: self.vocab_size], None, rows, quantize)

    def forward(self, hidden_states: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(hidden_states)
        return F.linear(hidden_states, embedding_weight[: self.vocab_size])


class CausalLMLoss(nn.Module):
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(logits, labels)


class BloomForCausalLM(nn.Module):
    """Language model: the trunk, then logits from the tied embedding matrix."""

    task = "causal_lm"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
        self.lm_head = TiedLMHead(config.vocab_size)
        self.loss_fn = CausalLMLoss()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                last_positions: Optional[int] = None) -> ModelOutput:
        """`last_positions`: score only the last so many positions (generation needs one: the LM head over a
        whole prompt is most of its first step's work); not with `labels`."""
        return self.head(self.transformer(input_ids, attention_mask, cache), input_ids, labels=labels,
                         last_positions=last_positions)

    def head(self, hidden_states: torch.Tensor, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
             last_positions: Optional[int] = None) -> ModelOutput:
        """The final hidden states -> logits (and the loss); what the last pipeline stage runs."""
        if last_positions is not None:
            if labels is not None:
                raise ValueError("last_positions leaves out logits the loss needs")
            hidden_states = hidden_states[:, -last_positions:]
        logits = self.lm_head(hidden_states, self.transformer.word_embeddings.weight)
        loss = self.loss_fn(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)


class BloomForSequenceClassification(nn.Module):
    """Scores the last non-padding token of each sequence (left or right padding)."""

    task = "sequence_classification"

    def __init__(self, config: ModelConfig, num_labels: int = 2, problem_type: Optional[str] = None) -> None:
        super().__init__()
        if problem_type not in (None, "regression", "single_label_classification",
                                "multi_label_classification"):
            raise ValueError(f"unknown problem_type {problem_type!r}")
        self.config = config
        self.num_labels = num_labels
        self.problem_type = problem_type
        self.transformer = BloomModel(config)
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> ModelOutput:
        return self.head(self.transformer(input_ids, attention_mask), input_ids, labels=labels)

    def head(self, hidden_states: torch.Tensor, input_ids: torch.Tensor,
             labels: Optional[torch.Tensor] = None) -> ModelOutput:
        token_logits = self.score(hidden_states)
        batch = torch.arange(input_ids.shape[0], device=input_ids.device)
        logits = token_logits[batch, last_token_index(input_ids, self.config.pad_token_id)]
        loss = self.loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sequence_classification_loss(logits, labels, self.num_labels, self.problem_type)


class BloomForTokenClassification(nn.Module):
    """A label per token (e.g. named entities); labels of -100 are ignored."""

    task = "token_classification"

    def __init__(self, config: ModelConfig, num_labels: int = 2,
                 classifier_dropout: Optional[float] = None) -> None:
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.transformer = BloomModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> ModelOutput:
        return self.head(self.transformer(input_ids, attention_mask), input_ids, labels=labels)

    def head(self, hidden_states: torch.Tensor, input_ids: torch.Tensor,
             labels: Optional[torch.Tensor] = None) -> ModelOutput:
        logits = self.classifier(self.dropout(hidden_states))
        loss = token_classification_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)


class BloomForQuestionAnswering(nn.Module):
    """Extractive QA: start and end logits per token; the loss averages the two cross-entropies."""

    task = "question_answering"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                start_positions: Optional[torch.Tensor] = None,
                end_positions: Optional[torch.Tensor] = None) -> QuestionAnsweringOutput:
        return self.head(self.transformer(input_ids, attention_mask), input_ids, start_positions=start_positions,
                         end_positions=end_positions)

    def head(self, hidden_states: torch.Tensor, input_ids: torch.Tensor, start_positions: Optional[torch.Tensor] = None,
             end_positions: Optional[torch.Tensor] = None) -> QuestionAnsweringOutput:
        logits = self.qa_outputs(hidden_states)
        start_logits, end_logits = (part.squeeze(-1) for part in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringOutput(start_logits=start_logits, end_logits=end_logits, loss=loss)


# The attribute holding each fine-tuning head's linear layer (its `transformers` name).
TASK_HEAD_NAMES: Dict[str, str] = {"sequence_classification": "score", "token_classification": "classifier",
                                   "question_answering": "qa_outputs"}

TASK_MODELS: Dict[str, Type[nn.Module]] = {
    model.task: model
    for model in (BloomForCausalLM, BloomForSequenceClassification, BloomForTokenClassification,
                  BloomForQuestionAnswering)
}
