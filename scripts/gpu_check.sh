#!/usr/bin/env bash
# The GPU-only paths, checked in one command on a machine with NVIDIA GPUs (run after `make setup`):
#   bash scripts/gpu_check.sh            # writes gpu_check/*.log and prints each step's last lines
# 1. the unit tests on a CUDA build of torch;
# 2. with >= 2 GPUs: the expert-parallel all-to-all over NCCL (scripts/bench_dispatch.py --backend nccl, fp32 and
#    bf16 with FP8 dispatch) and our EP MoE layer against DeepSpeed's in bf16 (scripts/bench_ep.py --device cuda);
# 3. with >= 2 GPUs: DeepSpeed ZeRO 0-3 over NCCL, per-rank bytes and step time (scripts/bench_zero.py);
# 4. short bf16 and FP8 (each recipe) training runs on one GPU;
# 5. speed (issue 10): scripts/bench_moe.py at the default shapes and at 16K routed tokens, bf16, against the
#    per-expert loop and the peers; scripts/bench_step.py for a ~1.1B-total Mixtral-style model in bf16 and FP8,
#    and for hidden 4096 (mixtral_8x7b's widths, 2 layers) in bf16 and FP8 rowwise;
# 6. scripts/perf_report.py writes every figure of step 5 into docs/performance.md with the device name.
# The other figures go into docs/MEASUREMENTS.md with the command above them.
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
    # shellcheck disable=SC2086
    step dispatch_nccl_bf16_fp8 "$PY" scripts/bench_dispatch.py --backend nccl --ep-sizes $EP_SIZES --dtype bf16 \
        --a2a-dtype fp8
    step ep_nccl_bf16 "$TORCHRUN" --standalone --nproc_per_node="$NGPU" scripts/bench_ep.py --device cuda --dtype bf16 \
        --tokens 4096 --d-model 2048 --experts 16 --hidden 1408 --shared-hidden 2816 --top-k 4 --iters 10
    step zero_nccl "$TORCHRUN" --standalone --nproc_per_node="$NGPU" scripts/bench_zero.py trainer.device=cuda \
        "parallel.ep_size=2" "trainer.global_batch_size=$((NGPU * 4))"
fi
step train_bf16 "$PY" -m train model=tiny_deepseek_v3 precision=bf16 trainer.max_steps=20 \
    trainer.run_dir="$OUT/train_bf16" logging.progress=false
for recipe in tensorwise rowwise blockwise; do
    step "train_fp8_$recipe" "$PY" -m train model=tiny_deepseek_v3 precision=fp8 "precision.recipe=$recipe" \
        trainer.max_steps=20 trainer.run_dir="$OUT/train_fp8_$recipe" logging.progress=false
done

# Speed. bench_moe: the layer alone; bench_step: whole steps against transformers' MixtralForCausalLM loop.
TT=()
[ -n "${MOEFORGE_TORCHTITAN_PATH:-}" ] && TT=(--torchtitan-path "$MOEFORGE_TORCHTITAN_PATH")
step bench_moe_default "$PY" scripts/bench_moe.py --device cuda --dtype bf16 --repeats 20 --warmup 3 --compile "${TT[@]}"
step bench_moe_16k "$PY" scripts/bench_moe.py --device cuda --dtype bf16 --tokens 8192 --case default \
    --repeats 20 --warmup 3 "${TT[@]}"
MIXTRAL_1B=(model=mixtral_8x7b model.d_model=2048 model.num_layers=12 model.moe.expert_hidden=1408
            model.attention.num_heads=16 model.attention.num_kv_heads=4 model.vocab_size=32000)
for prec in bf16 "fp8 precision.recipe=rowwise" "fp8 precision.recipe=blockwise"; do
    tag=$(echo "$prec" | tr ' =.' '___')
    # shellcheck disable=SC2086
    step "bench_step_1b_$tag" "$PY" scripts/bench_step.py --steps 10 --warmup 3 --batch 8 --seq 2048 \
        "${MIXTRAL_1B[@]}" trainer.device=cuda precision=$prec
done
for prec in bf16 "fp8 precision.recipe=rowwise"; do
    tag=$(echo "$prec" | tr ' =.' '___')
    # shellcheck disable=SC2086
    step "bench_step_h4096_$tag" "$PY" scripts/bench_step.py --steps 6 --warmup 2 --batch 2 --seq 4096 \
        model=mixtral_8x7b model.num_layers=2 trainer.device=cuda precision=$prec
done
step perf_report "$PY" scripts/perf_report.py "$OUT"
exit $status
