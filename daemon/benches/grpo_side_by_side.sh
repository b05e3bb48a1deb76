#!/usr/bin/env bash
# One GRPO step, herd against TRL's GRPOTrainer, in one run on the same
# machine, model, prompts, threads and hyperparameters (see grpo_bench.rs
# and grpo_trl_peer.py for the shape):
#
#     PYTHON=/path/to/venv/bin/python daemon/benches/grpo_side_by_side.sh [THREADS] [STEPS]
#
# The venv needs torch, transformers, datasets and trl (not dependencies of
# the project).
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
steps="${2:-4}"
python="${PYTHON:-python3}"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
RAYON_NUM_THREADS="$threads" cargo bench -q -p herd-daemon --bench grpo_bench -- --keep "$dir" --steps "$steps" | tee "$dir/herd.txt" | head -1
"$python" daemon/benches/grpo_trl_peer.py "$dir" "$threads" "$steps" 2>/dev/null | tail -1 > "$dir/trl.json"
"$python" - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
herd = json.loads(open(f"{d}/herd.txt").read().strip().splitlines()[-1])
trl = json.loads(open(f"{d}/trl.json").read())
for name, r in (("herd", herd), (f"TRL {trl['trl']} (torch {trl['torch']})", trl)):
    s, g = r["step_s"], r["generation_share"]
    print(f"{name}: {s:.2f} s/step, generation {s * g:.2f} s ({g:.0%}), training {s * (1 - g):.2f} s ({1 - g:.0%})")
print(f"herd / TRL step throughput: {trl['step_s'] / herd['step_s']:.2f}x")
PY
