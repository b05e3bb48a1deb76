#!/usr/bin/env bash
# The GPU checks, as one prepared script for a machine with an NVIDIA GPU
# (not part of CI): build with `--features cuda`, run the engine's fixture
# tests on the GPU (PyTorch/PEFT reference values, LoRA included), then the
# engine bench on the bench shape and the Llama-3.2-1B-shaped step (LoRA and
# full fine-tuning, f32 and bf16, with and without activation
# checkpointing): tokens/s, model FLOPs utilization, peak GPU memory. Writes
# $OUT/report.md (and every log beside it).
#
#     scripts/gpu-check.sh                 # everything (about 10 minutes on an H100/H200 after the build)
#     QUICK=1 scripts/gpu-check.sh         # the fixture tests and two 1B steps only
#     DEVICE=cpu QUICK=1 scripts/gpu-check.sh   # a dry run of the script itself on a CPU machine
#
# HERD_PEAK_TFLOPS_BF16 / _F32: the device's dense peak (defaults: H100/H200
# SXM, 989 bf16 and 67 f32) for MFU.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
DEVICE=${DEVICE:-cuda:0}
OUT=${OUT:-$root/target/gpu-check}
mkdir -p "$OUT"
report=$OUT/report.md
peak_bf16=${HERD_PEAK_TFLOPS_BF16:-989}
peak_f32=${HERD_PEAK_TFLOPS_F32:-67}
failed=0

say() { echo "$*" | tee -a "$report"; }
: > "$report"
say "# herd GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say ""
if [ "$DEVICE" = cpu ]; then
    features=""
    say "Dry run on the CPU (DEVICE=cpu)."
else
    features="--features cuda"
    say '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee -a "$report"
    say '```'
    source "$root/scripts/cuda-env.sh"
    say "nvcc: $(nvcc --version | tail -2 | head -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
fi

# Peak GPU memory while a command runs (nvidia-smi every 200 ms).
gpu_peak() {
    if [ "$DEVICE" = cpu ]; then "$@"; echo "peak GPU memory: n/a (cpu)"; return; fi
    local samples=$OUT/.gpu-samples
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "${DEVICE#cuda:}" -lms 200 > "$samples" &
    local sampler=$!
    "$@"; local rc=$?
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    echo "peak GPU memory: $(sort -n "$samples" | tail -1) MiB"
    return $rc
}

say ""
say "## Build"
start=$(date +%s)
if cargo test --release $features -p herd-engine --no-run > "$OUT/build.log" 2>&1 \
    && cargo bench $features -p herd-engine --no-run >> "$OUT/build.log" 2>&1; then
    say "engine tests and benches built in $(( $(date +%s) - start )) s"
else
    say "BUILD FAILED (tail of $OUT/build.log):"; tail -30 "$OUT/build.log" | tee -a "$report"; exit 1
fi

say ""
say "## Fixture tests on $DEVICE"
HERD_TEST_DEVICE=$DEVICE cargo test --release $features -p herd-engine --test fixtures --test lora \
    > "$OUT/fixtures.log" 2>&1 || failed=1
grep -E "^test |test result" "$OUT/fixtures.log" | tee -a "$report"

say ""
say "## Engine bench (engine/benches/llama-bench.json) on $DEVICE"
if [ -z "${QUICK:-}" ]; then
    HERD_BENCH_DEVICE=$DEVICE cargo bench $features -p herd-engine --bench engine_bench -- sft dpo \
        > "$OUT/engine_bench.log" 2>&1 || failed=1
    grep -vE "^(Compiling|Finished|Running)" "$OUT/engine_bench.log" | tail -8 | tee -a "$report"
else
    say "(skipped: QUICK)"
fi

say ""
say "## One training step on the Llama-3.2-1B shape (batch 1 x 512) on $DEVICE"
if [ "$DEVICE" = cpu ]; then
    configs=("bf16 ckpt")   # a dry run: full fine-tuning of 1B does not fit a CPU machine
elif [ -n "${QUICK:-}" ]; then
    configs=("bf16" "full bf16 ckpt")
else
    configs=("f32" "bf16" "bf16 ckpt" "full f32" "full bf16" "full bf16 ckpt")
fi
for cfg in "${configs[@]}"; do
    case $cfg in *bf16*) peak=$peak_bf16 ;; *) peak=$peak_f32 ;; esac
    [ "$DEVICE" = cpu ] && peak=""   # the peaks are a GPU's
    line=$(HERD_BENCH_DEVICE=$DEVICE HERD_PEAK_TFLOPS=$peak gpu_peak \
        cargo bench $features -p herd-engine --bench lora_1b -- $cfg 2> "$OUT/lora_1b-${cfg// /-}.err" \
        | tee "$OUT/lora_1b-${cfg// /-}.log" | grep -E "^lora_1b|^peak GPU") || failed=1
    say "- \`$cfg\`: $(echo "$line" | tr '\n' ' ')"
done

say ""
if [ $failed = 0 ]; then say "All checks ran."; else say "SOME CHECKS FAILED: see the logs in $OUT."; fi
exit $failed
