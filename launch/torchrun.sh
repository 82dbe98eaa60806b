#!/usr/bin/env bash
# Train with torchrun on this node, or on several (run the same command on every node).
#
#   launch/torchrun.sh model=bloom-1b7 data.paths=[data/corpus] parallel.tp=4 ...   (Hydra overrides)
#
# Environment (the usual torchrun / cluster names):
#   NPROC_PER_NODE  processes on this node (default: its GPUs, or 1 without any)
#   NNODES          nodes in the job (default 1)
#   NODE_RANK       this node's index, 0 .. NNODES-1 (default 0)
#   MASTER_ADDR     host of node 0 (default 127.0.0.1); MASTER_PORT its port (default 29500)
#   MAX_RESTARTS    restarts of the ranks after one dies or hangs (default 0; launcher.max_restarts)
# One node and no MASTER_ADDR: torchrun's standalone mode (a free local port, no clash between jobs).
set -euo pipefail

ranks=${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}
nnodes=${NNODES:-1}
# The node's cores shared by its ranks (torchrun alone would give each rank one thread).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 ))}

if [[ "$nnodes" == 1 && -z "${MASTER_ADDR:-}" ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes "$nnodes" --node-rank "${NODE_RANK:-0}" --master-addr "${MASTER_ADDR:-127.0.0.1}"
                --master-port "${MASTER_PORT:-29500}")
fi

exec torchrun "${rendezvous[@]}" --nproc-per-node "$ranks" --max-restarts "${MAX_RESTARTS:-0}" \
    -m megatron_bloom.cli.train "$@"
