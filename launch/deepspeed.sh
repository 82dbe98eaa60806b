#!/usr/bin/env bash
# Train with the deepspeed launcher: this node, or every host of a hostfile (it starts them over ssh/pdsh).
#
#   launch/deepspeed.sh model=bloom-1b7 data.paths=[data/corpus] parallel.tp=4 ...   (Hydra overrides)
#
# Environment:
#   HOSTFILE        DeepSpeed's hostfile ("host slots=N" per line) for several nodes (default: this node only)
#   NPROC_PER_NODE  processes per node (default: DeepSpeed's count of this node's accelerators)
#   MASTER_ADDR     host of the first rank (default: the hostfile's first host); MASTER_PORT (default 29500)
# Without a GPU the CPU accelerator is used (DS_ACCELERATOR=cpu), as everywhere in megatron_bloom.
set -euo pipefail

if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

args=(--master_port "${MASTER_PORT:-29500}")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${NPROC_PER_NODE:-}" ]] && args+=(--num_gpus "$NPROC_PER_NODE")

# The node's cores shared by its ranks, unless told otherwise.
ranks=${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 ))}

# --no_local_rank: each rank reads LOCAL_RANK from its environment; its arguments stay Hydra overrides.
exec deepspeed "${args[@]}" --no_local_rank --module megatron_bloom.cli.train "$@"
