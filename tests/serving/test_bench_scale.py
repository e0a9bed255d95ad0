"""benchmarks/bench_scale.py: the Python load generator counts completions against a real
server, and the table has a row per point.  Nothing here is about speed."""
from __future__ import annotations

import sys

from fixtures_serving import ROOT, thread_server

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_scale  # noqa: E402


def test_worker_counts_end_at_the_cores():
    assert bench_scale.worker_counts(1) == [1]
    assert bench_scale.worker_counts(6) == [1, 2, 4, 6]
    assert bench_scale.worker_counts(16) == [1, 2, 4, 8, 16]


def test_python_load_counts_completions_and_the_table_has_the_rows(onnx_model):
    with thread_server(onnx_model, http_port=None) as server:
        r = bench_scale.run_python(server.address, 64, 2, 1.0, "1 workers", 2)
    assert r.requests_s > 0 and r.note == "" and 0 < r.p50_ms <= r.p99_ms
    results = [(1, r, ""), (2, r, "50%-50% (2)")]
    text = bench_scale.report(results, {1: 1.0, 64: 1.0}, "python", 1.0, 2, "m.onnx")
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "| 2 | 64 | 2 |" in text and "0.50" in rows[1]  # 2 workers at 1 worker's rate
    assert "CPU:" in text and "Goal:" in text
