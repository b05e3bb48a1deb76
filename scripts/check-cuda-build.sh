#!/usr/bin/env bash
# Compile herd's `cuda` build on a machine without a GPU (not part of CI).
#
# The CUDA toolkit comes from NVIDIA's Python wheels when the machine has no
# nvcc (scripts/cuda-env.sh). candle-kernels compiles its CUDA kernels to PTX
# with that nvcc for CUDA_COMPUTE_CAP (default 90: H100/H200; there is no GPU
# to ask).
#
#     scripts/check-cuda-build.sh            # the engine and daemon libraries (compiled, not linked)
#     LINK=1 scripts/check-cuda-build.sh     # also link the binaries (needs libcuda.so, the driver's)
#
# Prints what it compiled and where it stopped; exit status 0 when the cuda
# build compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source "$root/scripts/cuda-env.sh"
echo "== $(nvcc --version | tail -2 | head -1)"
echo "== CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"

start=$(date +%s)
echo "== cargo build --release --features cuda --lib -p herd-engine -p herd-daemon"
cargo build --release --features cuda --lib -p herd-engine -p herd-daemon
if [ -n "${LINK:-}" ]; then
    echo "== cargo build --release --features cuda --bins (linking against libcuda.so)"
    cargo build --release --features cuda --bins
fi
echo "== the cuda build compiled in $(( $(date +%s) - start )) s"
