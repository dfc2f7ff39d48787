#!/usr/bin/env bash
# Launch `python -m train` on one node of a multi-node job with torchrun's static rendezvous.
#
# Driven by the usual variables (defaults give a single-node run):
#   NNODES (1)  NODE_RANK (0)  NPROC_PER_NODE (GPUs on this node, else 1)
#   MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
# Every argument is passed to the trainer as a Hydra override, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh model=deepseek_v2_lite parallel.ep_size=8
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
cmd=(torchrun
    --nnodes="${NNODES:-1}"
    --node_rank="${NODE_RANK:-0}"
    --nproc_per_node="${NPROC_PER_NODE}"
    --master_addr="${MASTER_ADDR:-127.0.0.1}"
    --master_port="${MASTER_PORT:-29500}"
    -m train "$@")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"; echo
else
    exec "${cmd[@]}"
fi
