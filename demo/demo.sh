#!/usr/bin/env bash
# `make demo`'s last act: serve MODEL on a free loopback port, wait until it is healthy, classify
# SAMPLES with the network3 client (results table, accuracy, confusion matrix), and stop the
# server whatever happens (trap).  Env: BIN (venv bin dir), MODEL, SAMPLES, CLASSIFY_ARGS.
set -euo pipefail
BIN=${BIN:-.venv/bin}
MODEL=${MODEL:-models/default.onnx}
SAMPLES=${SAMPLES:-demo/samples}

log=$(mktemp -t network3-demo-server.XXXXXX)
"$BIN/network3" serve --model "$MODEL" --port 0 --no-access-log 2>"$log" &
pid=$!
stop() {
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true  # the server drains and exits 0 on SIGTERM
    wait "$pid" 2>/dev/null || true
  fi
  rm -f "$log"
}
trap stop EXIT
trap 'exit 130' INT TERM

# The server prints "network3 serving on HOST:PORT" once the model is loaded and warmed up.
address=""
for _ in $(seq 1 600); do
  address=$(sed -n 's/^network3 serving on \([0-9.]*:[0-9]*\)$/\1/p' "$log")
  [ -n "$address" ] && break
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "demo: the server did not start:" >&2; cat "$log" >&2; exit 1
  fi
  sleep 0.1
done
[ -n "$address" ] || { echo "demo: the server did not start within 60 s" >&2; cat "$log" >&2; exit 1; }

"$BIN/network3" health --server "$address" --timeout 10
"$BIN/network3" info --server "$address"
echo
"$BIN/network3" classify "$SAMPLES" --server "$address" --format table ${CLASSIFY_ARGS:-}
