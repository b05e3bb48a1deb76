#!/usr/bin/env bash
# Rejection sampling's generation, herd against transformers, in one run on
# the same machine and threads: K=10 samples of each of two 128-token
# prompts, 128 new tokens, temperature 0.8, top-p 0.95, on the bench shape.
#
#     PYTHON=/path/to/venv/bin/python engine/benches/sample_side_by_side.sh [THREADS]
#
# The venv needs torch and transformers (not a dependency of the project).
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
python="${PYTHON:-python3}"
herd=$(RAYON_NUM_THREADS="$threads" cargo bench -q -p herd-engine --bench engine_bench -- sample | grep '^sample' | grep -o '[0-9]* new tokens/s' | cut -d' ' -f1)
torch=$("$python" engine/benches/torch_peer.py engine/benches/llama-bench.json "$threads" sample | sed 's/.*"sample_new_tokens_per_s": \([0-9]*\).*/\1/')
echo "sample K=10, $threads threads: herd $herd new tokens/s, transformers $torch new tokens/s, ratio $(python3 -c "print(round($herd / $torch, 2))")"
