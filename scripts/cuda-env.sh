# Sourced by check-cuda-build.sh and gpu-check.sh: puts a CUDA toolkit on
# PATH. The machine's own nvcc when there is one; otherwise NVIDIA's Python
# wheels for CUDA 13.0 (nvcc and the runtime; with LINK=1 also cuBLAS,
# cuRAND, NVRTC for linking) in a venv under target/ (needs PyPI).
# candle-kernels compiles its kernels to PTX for CUDA_COMPUTE_CAP (default
# 90: H100/H200) unless nvidia-smi says what the GPU is.
root=${root:-$PWD}
venv=${CUDA_VENV:-$root/target/cuda-venv}
if [ -z "${CUDA_COMPUTE_CAP:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
    CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if ! command -v nvcc >/dev/null 2>&1 || [ -n "${CUDA_FROM_WHEELS:-}" ]; then
    # CUDA 13's wheels carry the whole nvcc (12.x's carry only ptxas), all
    # under one prefix, nvidia/cu13, laid out as a toolkit.
    if [ ! -x "$venv/cuda/bin/nvcc" ]; then
        echo "== CUDA toolkit from PyPI wheels into $venv"
        python3 -m venv "$venv"
        # nvcc (with its NVVM and CRT pinned to the same release: a newer
        # NVVM writes PTX this ptxas refuses), the runtime's and CCCL's
        # headers compile the kernels; the libraries
        # are only for linking (LINK=1).
        wheels=("nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*")
        [ -n "${LINK:-}" ] && wheels+=("nvidia-cublas==13.*" "nvidia-curand==10.*" "nvidia-cuda-nvrtc==13.0.*")
        "$venv/bin/pip" install -q --disable-pip-version-check "${wheels[@]}"
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        ln -sfn "$site/nvidia/cu13" "$venv/cuda"
        # Unversioned library names for the linker (libcudart.so.13 -> libcudart.so).
        for lib in "$venv/cuda"/lib/*.so.*; do
            [ -e "$lib" ] || continue
            base=$(basename "$lib"); [ -e "$venv/cuda/lib/${base%%.so*}.so" ] || ln -s "$base" "$venv/cuda/lib/${base%%.so*}.so"
        done
        [ -e "$venv/cuda/lib64" ] || ln -s lib "$venv/cuda/lib64"
    fi
    toolkit="$venv/cuda"
    export PATH="$toolkit/bin:$PATH" CUDA_HOME="$toolkit" CUDA_PATH="$toolkit" CUDA_ROOT="$toolkit"
    export LIBRARY_PATH="$toolkit/lib:${LIBRARY_PATH:-}" LD_LIBRARY_PATH="$toolkit/lib:${LD_LIBRARY_PATH:-}"
fi
