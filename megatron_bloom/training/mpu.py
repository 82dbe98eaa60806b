"""The model-parallel-unit interface DeepSpeed asks for, answered from our `ParallelState`.

DeepSpeed uses it to keep ZeRO partitions and gradient averaging within the data-parallel group, and to
count tensor-parallel (replicated) parameters once in the gradient norm.
"""

from __future__ import annotations

from megatron_bloom.parallel import ParallelState


class DeepSpeedMPU:
    def __init__(self, state: ParallelState) -> None:
        self.state = state

    def get_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.state.tp

    def get_model_parallel_group(self):
        return self.state.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.state.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.state.dp

    def get_data_parallel_group(self):
        return self.state.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.state.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.state.pp

    def get_pipeline_model_parallel_group(self):
        return self.state.pp_group
