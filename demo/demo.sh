#!/usr/bin/env bash
# `make demo`'s last act: serve MODEL on a free loopback port and wait until it serves
# (serving.launch, the one way to start a server), ask its health and info, classify SAMPLES
# with the network3 client (results table, accuracy, confusion matrix), and stop the server
# whatever happens (SIGTERM: it drains and exits).  Env: BIN (venv bin dir), MODEL, SAMPLES,
# CLASSIFY_ARGS.
set -euo pipefail
export BIN=${BIN:-.venv/bin}
export MODEL=${MODEL:-models/default.onnx}
export SAMPLES=${SAMPLES:-demo/samples}
export CLASSIFY_ARGS=${CLASSIFY_ARGS:-}

exec "$BIN/python" - <<'PY'
import os
import shlex
import subprocess
import sys
import tempfile

from serving.launch import ServerProcess

network3 = os.path.join(os.environ["BIN"], "network3")
fd, log = tempfile.mkstemp(prefix="network3-demo-server.")
os.close(fd)
try:
    try:
        server = ServerProcess(os.environ["MODEL"], "--no-access-log", command=[network3, "serve"], log=log, timeout=60)
    except RuntimeError as e:
        sys.exit(f"demo: {e}")
    with server:
        subprocess.run([network3, "health", "--server", server.address, "--timeout", "10"], check=True)
        subprocess.run([network3, "info", "--server", server.address], check=True)
        print(flush=True)
        code = subprocess.run([network3, "classify", os.environ["SAMPLES"], "--server", server.address,
                               "--format", "table", *shlex.split(os.environ["CLASSIFY_ARGS"])]).returncode
except subprocess.CalledProcessError as e:
    code = e.returncode
except KeyboardInterrupt:
    code = 130
finally:
    os.unlink(log)
sys.exit(code)
PY
