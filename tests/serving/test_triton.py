"""Compatibility proof: the real tritonclient 2.41.0 and perf_analyzer against our server.

The server runs in its own process (`python -m serving.server`), and so does tritonclient
(tests/triton_probe.py): its generated `inference.*` messages cannot share a process with
ours, which this test process imports.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from fixtures_serving import ROOT, ProcessServer
from serving.launch import perf_analyzer


@pytest.fixture(scope="module")
def triton_server(onnx_model, tmp_path_factory):
    s = ProcessServer(onnx_model, "--max-batch-size", "128", log=tmp_path_factory.mktemp("triton") / "server.log")
    yield s
    s.kill()


@pytest.fixture(scope="module")
def probe(triton_server, digits, tmp_path_factory):
    pixels, labels = digits
    data = tmp_path_factory.mktemp("probe") / "digits.npz"
    np.savez(data, pixels=pixels[:16], labels=labels[:16])
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_probe.py"), triton_server.address, str(data)],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_health_and_metadata(probe):
    assert probe["live"] and probe["ready"] and probe["model_ready"]
    assert "classification" in probe["extensions"]
    meta = probe["metadata"]
    assert meta["name"] == "network3" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]


def test_model_config_is_what_perf_analyzer_needs(probe):
    config = probe["config"]
    assert config["max_batch_size"] == 128  # the batcher's limit; dims exclude the batch
    assert config["input"][0]["dims"] == ["1", "28", "28"] and config["input"][0]["data_type"] == "TYPE_FP32"
    assert [o["dims"] for o in config["output"]] == [["10"], ["10"]]
    assert "dynamic_batching" in config


def test_infer_fp32_and_uint8(probe, digits, predict):
    assert probe["fp32_id"] == "fp32"
    assert probe["fp32_digits"] == predict(digits[0][:16]).tolist()  # the served model's own answers
    np.testing.assert_allclose(probe["fp32_sum"], 1.0, atol=1e-4)
    assert probe["logits_shape"] == [16, 10]
    assert probe["uint8_digits"] == probe["fp32_digits"]
    assert probe["uint8_outputs"] == ["probabilities"]


def test_classification_extension(probe):
    rows = probe["classification"]
    assert len(rows) == 4 and all(len(row) == 3 for row in rows)
    for row, digit in zip(rows, probe["fp32_digits"][:4]):
        values = [float(s.split(":")[0]) for s in row]
        value, index, label = row[0].split(":")
        assert int(index) == digit and label == index
        assert values == sorted(values, reverse=True) and 0 < values[0] <= 1


def test_stream_infer(probe):
    stream = probe["stream"]
    assert [s["id"] for s in stream[:4]] == ["s0", "s4", "s8", "s12"]
    assert [d for s in stream[:4] for d in s["digits"]] == probe["fp32_digits"]
    assert stream[4]["error"] and "NaN" in stream[4]["error"]


def test_errors_have_clear_statuses(probe, digits):
    errors = probe["errors"]
    assert errors["unknown model"].startswith("StatusCode.NOT_FOUND") and "lenet" in errors["unknown model"]
    assert errors["NaN"].startswith("StatusCode.INVALID_ARGUMENT") and "NaN" in errors["NaN"]
    assert errors["wrong shape"].startswith("StatusCode.INVALID_ARGUMENT") and "shape [2, 784]" in errors["wrong shape"]
    assert errors["unknown input"].startswith("StatusCode.INVALID_ARGUMENT") and "'pixels'" in errors["unknown input"]
    assert errors["unknown output"].startswith("StatusCode.INVALID_ARGUMENT") and "'softmax'" in errors["unknown output"]
    assert probe["after_errors"] == probe["fp32_digits"][0]


def test_statistics_count_what_was_served(probe):
    stats = probe["statistics"]
    assert stats["name"] == "network3" and stats["version"] == "1"
    # 16 + 16 + 4 images, 4 x 4 streamed, 1 after the errors; refused requests are not computed.
    assert int(stats["inference_count"]) == 16 + 16 + 4 + 16 + 1
    assert int(stats["inference_stats"]["success"]["count"]) >= 4


def test_perf_analyzer_runs_against_the_server(triton_server, tmp_path):
    found = perf_analyzer()
    if found is None:
        pytest.skip("perf_analyzer cannot load here (needs libb64-0d and nvidia-cuda-runtime-cu12; `make bench-serve` installs them)")
    binary, env = found
    out = tmp_path / "perf.csv"
    r = subprocess.run([str(binary), "-m", "network3", "-u", triton_server.address, "-i", "grpc", "--input-data", "zero",
                        "-b", "8", "--concurrency-range", "2", "--measurement-mode", "count_windows",
                        "--measurement-request-count", "30", "-s", "1000", "-f", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    row = next(csv.DictReader(out.open()))
    assert float(row["Inferences/Second"]) > 0
    assert "Server:" in r.stdout and "Inference count" in r.stdout  # it read our ModelStatistics
