"""The plain BLOOM model: no process groups, no collectives. `megatron_bloom.parallel` splits it."""

from megatron_bloom.model.alibi import alibi_slopes
from megatron_bloom.model.block import BloomBlock
from megatron_bloom.model.config import ModelConfig
from megatron_bloom.model.heads import (
    TASK_MODELS,
    TASKS,
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
    TaskConfig,
)
from megatron_bloom.model.kv_cache import KVCache
from megatron_bloom.model.init import build_model, create_task_model, initial_value, meta_device
from megatron_bloom.model.transformer import BloomModel

__all__ = [
    "BloomBlock", "BloomForCausalLM", "BloomForQuestionAnswering", "BloomForSequenceClassification",
    "BloomForTokenClassification", "BloomModel", "KVCache", "ModelConfig", "TASK_MODELS", "TASKS", "TaskConfig",
    "alibi_slopes", "build_model", "create_task_model", "initial_value", "meta_device",
]
