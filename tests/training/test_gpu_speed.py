"""benchmarks/gpu_speed.py times a CUDA graph of the whole training step on the GPU machine,
where there is no time to find out that the graph trains something else.  Here, on a CPU, its
body runs uncaptured beside training.train's own step: with torch's SGD formulas the weights
are equal after every step of a short `fast` run (an epoch boundary, the clean epoch and the
moving average included), the device-side SGD the graph uses differs by rounding only, and the
step never reads a value back to the host (which would stop the capture)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_graphed_step_is_the_trainers_step():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "check", "--preset", "fast",
                        "--limit", "2048"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["steps"] == 8  # 2,048 digits at 512 a batch, two epochs: the second one clean
    assert out["exact"] == 0.0 and out["device_sgd"] <= 1e-4
    assert out["host_reads"] == 0  # a read back to the host inside the step would stop the capture
