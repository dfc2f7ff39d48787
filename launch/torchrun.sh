#!/usr/bin/env bash
# Launch `python -m train` on one node of a (multi-node) job, elastic: torchrun's c10d rendezvous restarts every
# rank after one dies (up to MAX_RESTARTS times), and the restarted ranks resume from the newest complete
# checkpoint (trainer.resume=auto), so a lost rank costs the steps since that checkpoint and nothing else.
#
# Driven by the usual variables (defaults give a single-node run):
#   NNODES (1)  NODE_RANK (0: this node hosts the rendezvous store)  NPROC_PER_NODE (GPUs on this node, else 1)
#   MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)  MAX_RESTARTS (3)  RDZV_ID (SLURM_JOB_ID, else "moeforge")
# Every argument is passed to the trainer as a Hydra override, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh model=deepseek_v2_lite parallel.ep_size=8
# Global ranks are assigned by the rendezvous (node order may change after a restart); moeforge depends only on
# the global rank. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
if [ "${NODE_RANK:-0}" = 0 ]; then IS_HOST=true; else IS_HOST=false; fi
# Workers get a fresh store each restart round (rank 0 hosts it) instead of sharing the rendezvous store, whose
# keys outlive a round: restarted ranks would otherwise read their dead predecessors' addresses when they
# create the expert-parallel groups (seen with torch 2.13 and gloo: "connectFullMesh ... Connection refused").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
cmd=(torchrun
    --nnodes="${NNODES:-1}"
    --nproc-per-node="${NPROC_PER_NODE}"
    --rdzv-backend=c10d
    --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
    --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-moeforge}}"
    --rdzv-conf="is_host=${IS_HOST}"
    --max-restarts="${MAX_RESTARTS:-3}"
    -m train "$@")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"; echo
else
    exec "${cmd[@]}"
fi
