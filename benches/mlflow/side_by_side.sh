#!/usr/bin/env bash
# MLflow's client logging batches, into herd's MLflow door and into
# MLflow's own tracking server (sqlite backend), in one run on one machine:
#
#     PYTHON=/path/to/venv/bin/python benches/mlflow/side_by_side.sh [BATCHES]
#
# The venv needs the full `mlflow` package (its server: Flask, SQLAlchemy,
# gunicorn), not a dependency of the project. Same client, same payloads:
# BATCHES log_batch calls of 1,000 points (default 100 into herd; a tenth
# as many into MLflow, whose rate does not change with the count), through
# MLflow's client and straight on the wire (see log_batch.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
batches="${1:-100}"
python="${PYTHON:-python3}"
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null; rm -rf "$dir"' EXIT
cargo build -q --release --bin herdd
free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
herd_port=$(free_port)
mlflow_port=$(free_port)
target/release/herdd --data-dir "$dir/herd" --listen "127.0.0.1:$herd_port" 2>"$dir/herdd.log" &
pids+=($!)
"$(dirname "$python")/mlflow" server --backend-store-uri "sqlite:///$dir/mlflow.db" \
  --default-artifact-root "$dir/artifacts" --host 127.0.0.1 --port "$mlflow_port" --workers 1 \
  >"$dir/mlflow.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
  if curl -sf "http://127.0.0.1:$mlflow_port/health" >/dev/null && [ -s "$dir/herd/token" ]; then break; fi
  sleep 1
done
herd=$(MLFLOW_TRACKING_TOKEN=$(cat "$dir/herd/token") "$python" benches/mlflow/log_batch.py "http://127.0.0.1:$herd_port" "$batches" | tail -1)
mlflow=$("$python" benches/mlflow/log_batch.py "http://127.0.0.1:$mlflow_port" $(( (batches + 9) / 10 )) | tail -1)
version=$("$python" -c 'import mlflow; print(mlflow.__version__)')
"$python" - "$herd" "$mlflow" "$version" <<'PY'
import json, sys
herd, mlflow, version = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for how, what in (("client", "MLflow's client.log_batch"), ("wire", "the same requests, prebuilt, one connection")):
    print(f"{what}:")
    for name, r in (("herd (MLflow door)", herd), (f"MLflow {version} server (sqlite)", mlflow)):
        print(f"  {name}: {r['points']:,} points in {r[how + '_s']:.2f} s = {r[how]:,.0f} points/s")
    print(f"  herd / MLflow: {herd[how] / mlflow[how]:.1f}x the points/s")
PY
