#!/usr/bin/env bash
# Regenerates the README's pictures from a real run: docs/watch.txt (a
# `herd watch` screen, 80 columns, captured from tmux) and docs/overlay.png
# (three jobs' curves overlaid). herdd listens on a non-default port and
# herd finds it through the data directory alone. Needs tmux and a build:
# BIN=target/release by default.
set -euo pipefail
BIN=${BIN:-target/release}
D=$(mktemp -d)
trap 'tmux kill-session -t herdwatch 2>/dev/null || true; kill $(jobs -p) 2>/dev/null || true; rm -rf "$D"' EXIT
export HERD_DATA_DIR=$D/data HERD_LISTEN=127.0.0.1:7499
unset HERD_SERVER
"$BIN/herdd" --data-dir "$D/data" --cpu-jobs 2 2>/dev/null &
until "$BIN/herd" status >/dev/null 2>&1; do sleep 0.2; done
F=tests/fixtures/llama-tiny
BASE=$("$BIN/herd" -q import model $F/policy)
SFT=$("$BIN/herd" -q import dataset $F/sft.jsonl --kind sft)
PREFS=$("$BIN/herd" -q import dataset $F/preferences.jsonl --kind preference)
"$BIN/herd" -q experiment create demo >/dev/null
for lr in 1e-4 3e-4 1e-3; do
  "$BIN/herd" -q submit --kind sft --experiment demo --name "sft-lr$lr" --input model="$BASE" \
    --input data="$SFT" --set lr=$lr --set steps=${STEPS:-3000} >/dev/null
done
"$BIN/herd" -q submit --kind dpo --experiment demo --name dpo --input model="$BASE" \
  --input data="$PREFS" --set steps=${STEPS:-3000} >/dev/null
tmux new-session -d -s herdwatch -x 80 -y 8 \
  "HERD_DATA_DIR=$HERD_DATA_DIR $BIN/herd watch; sleep 60"
sleep ${CAPTURE_AFTER:-6}
tmux capture-pane -p -t herdwatch | sed -e "s/[[:space:]]*$//" | sed -e "/./,\$!d" -e :a -e "/^\n*$/{\$d;N;ba" -e "}" > docs/watch.txt
"$BIN/herd" wait demo/sft-lr1e-4 demo/sft-lr3e-4 demo/sft-lr1e-3 demo/dpo 2>/dev/null >/dev/null
"$BIN/herd" plot demo/sft-lr1e-4 demo/sft-lr3e-4 demo/sft-lr1e-3 --metric loss --metric grad_norm --out docs/overlay.png
cat docs/watch.txt
