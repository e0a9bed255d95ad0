"""In-process onnxruntime cost of a model file, as the server loads it (serving.model, one
intra-op thread): microseconds per predict call of 1 and of 64 images, median of rounds.

    OMP_NUM_THREADS=1 python benchmarks/ensemble_cost.py models/a.onnx models/b.onnx ...
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serving.model import ModelOptions, load_model  # noqa: E402

rng = np.random.default_rng(0)
for path in sys.argv[1:]:
    model = load_model(path, ModelOptions(warmup_batch_sizes=(1, 64)))
    row = []
    for n, calls in ((1, 2000), (64, 300)):
        x = rng.random((n, 1, 28, 28), dtype=np.float32)
        rounds = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(calls):
                model.predict(x)
            rounds.append((time.perf_counter() - t) / calls * 1e6)
        row.append(f"{n}-image call {statistics.median(rounds):8.1f} us")
    print(f"{path}: " + ", ".join(row), flush=True)
