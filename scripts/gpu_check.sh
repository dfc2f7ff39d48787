#!/usr/bin/env bash
# The GPU-only paths, checked in one command on a machine with NVIDIA GPUs (run after `make setup`):
#   bash scripts/gpu_check.sh            # writes gpu_check/*.log and prints each step's last lines
# 1. the unit tests on a CUDA build of torch;
# 2. with >= 2 GPUs: the expert-parallel all-to-all over NCCL (scripts/bench_dispatch.py --backend nccl);
# 3. with >= 2 GPUs: DeepSpeed ZeRO 0-3 over NCCL, per-rank bytes and step time (scripts/bench_zero.py);
# 4. a short bf16 training run on one GPU.
# Each figure goes into docs/MEASUREMENTS.md with the command above it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $NGPU"; nvidia-smi -L 2>/dev/null || true
[ "$NGPU" -ge 1 ] || { echo "no CUDA device visible to torch"; exit 1; }
status=0
step() {  # step NAME COMMAND...: run, keep the log, show its tail
    local name=$1; shift
    echo "== $name: $*"
    if "$@" > "$OUT/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED"; status=1; fi
    tail -n 4 "$OUT/$name.log"
}
step unit "$PY" -m pytest -q tests/unit
if [ "$NGPU" -ge 2 ]; then
    EP_SIZES=2; [ "$NGPU" -ge 4 ] && EP_SIZES="2 4"
    # shellcheck disable=SC2086
    step dispatch_nccl "$PY" scripts/bench_dispatch.py --backend nccl --ep-sizes $EP_SIZES
    step zero_nccl "$TORCHRUN" --standalone --nproc_per_node="$NGPU" scripts/bench_zero.py trainer.device=cuda \
        "parallel.ep_size=2" "trainer.global_batch_size=$((NGPU * 4))"
fi
step train_bf16 "$PY" -m train model=tiny_deepseek_v3 precision=bf16 trainer.max_steps=20 \
    trainer.run_dir="$OUT/train_bf16" logging.progress=false
exit $status
