"""Microseconds per in-process predict call, one onnxruntime thread against one per core.

    python benchmarks/bench_threads.py models/default.onnx

The figures behind `network3 serve --intra-op-threads` and `--wide-threads` (from which batch
size more threads pay: serving.model.ModelOptions.wide_min; docs/results.md); a quiet machine only.
"""
from __future__ import annotations

import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving.contract import INPUT_SHAPE  # noqa: E402
from serving.model import ModelOptions, load_model  # noqa: E402


def main(path: str) -> None:
    models = {threads: load_model(path, ModelOptions(intra_op_threads=threads)) for threads in (1, 0)}
    print("| batch | 1 thread (µs) | one per core (µs) | one per core / 1 thread |\n|---:|---:|---:|---:|")
    for n in (1, 2, 4, 8, 16, 64, 256):
        x = np.random.default_rng(0).random((n, *INPUT_SHAPE), dtype=np.float32)
        number = max(1, 2000 // n)
        us = [min(timeit.repeat(lambda m=m: m.predict(x), number=number, repeat=7)) / number * 1e6
              for m in models.values()]
        print(f"| {n} | {us[0]:,.0f} | {us[1]:,.0f} | {us[1] / us[0]:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/default.onnx")
