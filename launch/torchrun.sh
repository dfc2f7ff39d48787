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
#
# SIGTERM (SLURM's preemption or time-limit signal, sent to every process of the job step; or `kill` of this
# script, which passes it on to the ranks): every rank finishes its step, saves a complete checkpoint, rank 0 writes
# RUN_DIR/status.json "stopped" and they exit. torchrun's agent waits SHUTDOWN_TIMEOUT s (100, under slurm.sbatch's
# 120 s notice) for that, then exits non-zero as it does on any signal; this script then exits 0 when status.json
# says the run stopped with its checkpoint after this launch (needs trainer.run_dir=...), so a scheduler requeues
# the job instead of recording a failure. Any other failure keeps torchrun's exit code.
set -euo pipefail
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
if [ "${NODE_RANK:-0}" = 0 ]; then IS_HOST=true; else IS_HOST=false; fi
# Workers get a fresh store each restart round (rank 0 hosts it) instead of sharing the rendezvous store, whose
# keys outlive a round: restarted ranks would otherwise read their dead predecessors' addresses when they
# create the expert-parallel groups (seen with torch 2.13 and gloo: "connectFullMesh ... Connection refused").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# How long torchrun's agent, on SIGTERM, waits for the ranks to save before it kills them (an environment variable
# rather than --shutdown-timeout, which older torchrun versions reject; they ignore the variable and wait 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-100}"
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
    exit 0
fi

run_dir=""
for arg in "$@"; do
    case "$arg" in trainer.run_dir=*|+trainer.run_dir=*|++trainer.run_dir=*) run_dir="${arg#*trainer.run_dir=}";; esac
done
launched=$(date +%s.%N)
got_term=""
agent=""
# The workers are the agent's children: a SIGTERM sent to this script alone reaches them (a second copy, when the
# scheduler signalled them too, only repeats the request); the agent is not signalled twice.
on_term() { got_term=1; pkill -TERM -P "$agent" 2>/dev/null || true; }
trap on_term TERM
"${cmd[@]}" &
agent=$!
set +e
while :; do
    wait "$agent"; rc=$?
    kill -0 "$agent" 2>/dev/null || break  # a trapped signal ended the wait early: the agent still runs
done
set -e

stopped_with_checkpoint() {  # status.json says "stopped" (written after the preemption save) since this launch
    [ -n "$run_dir" ] && [ -f "$run_dir/status.json" ] && python - "$run_dir/status.json" "$launched" <<'PY'
import json, sys
status = json.load(open(sys.argv[1]))
sys.exit(0 if status.get("state") == "stopped" and status.get("time", 0) >= float(sys.argv[2]) else 1)
PY
}
if [ "$rc" -ne 0 ] && stopped_with_checkpoint; then
    echo "moeforge: torchrun exited $rc after SIGTERM, but every rank stopped after saving a complete checkpoint" \
         "($run_dir/status.json: stopped): exiting 0; re-run the same command to continue" >&2
    rc=0
elif [ "$rc" -ne 0 ] && [ -n "$got_term" ] && [ -z "$run_dir" ]; then
    echo "moeforge: torchrun exited $rc after SIGTERM; pass trainer.run_dir=... so this script can tell a complete" \
         "preemption save from a failure" >&2
fi
exit "$rc"
