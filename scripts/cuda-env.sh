# Sourced by check-cuda-build.sh and gpu-check.sh: puts a CUDA toolkit on
# PATH. The machine's own nvcc when there is one; otherwise NVIDIA's Python
# wheels (nvcc and the runtime; with LINK=1 also cuBLAS, cuRAND, NVRTC for
# linking) in a venv under target/,
# laid out as one toolkit directory (nvcc finds headers beside its binary).
# candle-kernels compiles its kernels to PTX for CUDA_COMPUTE_CAP (default
# 90: H100/H200) unless nvidia-smi says what the GPU is.
root=${root:-$PWD}
venv=${CUDA_VENV:-$root/target/cuda-venv}
toolkit=${CUDA_TOOLKIT_DIR:-$root/target/cuda-toolkit}
if [ -z "${CUDA_COMPUTE_CAP:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
    CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if ! command -v nvcc >/dev/null 2>&1 || [ -n "${CUDA_FROM_WHEELS:-}" ]; then
    if [ ! -x "$toolkit/bin/nvcc" ]; then
        echo "== CUDA toolkit from PyPI wheels into $venv"
        python3 -m venv "$venv"
        # nvcc and the runtime's headers compile the kernels; the libraries
        # are only for linking (LINK=1: cuBLAS alone is ~600 MB).
        wheels=("nvidia-cuda-nvcc-cu12==12.*" "nvidia-cuda-runtime-cu12==12.*")
        [ -n "${LINK:-}" ] && wheels+=("nvidia-cublas-cu12==12.*" "nvidia-curand-cu12==10.*" "nvidia-cuda-nvrtc-cu12==12.*")
        "$venv/bin/pip" install -q --disable-pip-version-check "${wheels[@]}"
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        rm -rf "$toolkit" && mkdir -p "$toolkit/include" "$toolkit/lib64"
        # nvcc's own tree (bin, nvvm, its headers) copied, so that it finds
        # the other packages' headers under its include/.
        cp -r "$site/nvidia/cuda_nvcc/." "$toolkit/"
        for pkg in cuda_runtime cublas curand cuda_nvrtc; do
            [ -d "$site/nvidia/$pkg/include" ] && cp -rn "$site/nvidia/$pkg/include/." "$toolkit/include/"
            for lib in "$site/nvidia/$pkg"/lib/*.so*; do
                [ -e "$lib" ] || continue
                ln -sf "$lib" "$toolkit/lib64/$(basename "$lib")"
                # Unversioned names for the linker (libcublas.so.12 -> libcublas.so).
                base=$(basename "$lib"); ln -sf "$lib" "$toolkit/lib64/${base%%.so*}.so"
            done
        done
        [ -d "$toolkit/lib" ] || ln -s lib64 "$toolkit/lib"
    fi
    export PATH="$toolkit/bin:$PATH" CUDA_HOME="$toolkit" CUDA_PATH="$toolkit" CUDA_ROOT="$toolkit"
    export LIBRARY_PATH="$toolkit/lib64:${LIBRARY_PATH:-}" LD_LIBRARY_PATH="$toolkit/lib64:${LD_LIBRARY_PATH:-}"
fi
