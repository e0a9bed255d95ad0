"""Run by tests/test_triton.py in a separate process: the real tritonclient against our server.

tritonclient's generated `inference.*` messages and ours cannot share one process (protobuf
refuses duplicate symbols), so this script never imports `protos` or `serving`.  It prints one
JSON object of what it saw; the test asserts on it.

    python tests/triton_probe.py ADDRESS DIGITS.npz
"""
from __future__ import annotations

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

address, digits_file = sys.argv[1], sys.argv[2]
digits = np.load(digits_file)
pixels, labels = digits["pixels"], digits["labels"]
x = (pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
out: dict = {}


def infer_input(array: np.ndarray, datatype: str = "FP32", name: str = "images") -> tc.InferInput:
    i = tc.InferInput(name, list(array.shape), datatype)
    i.set_data_from_numpy(array)
    return i


def status_of(call) -> str:
    try:
        call()
    except InferenceServerException as e:
        return f"{e.status()} {e.message()}"
    return "OK"


with tc.InferenceServerClient(address) as client:
    out["live"] = client.is_server_live(client_timeout=30)
    out["ready"] = client.is_server_ready(client_timeout=30)
    out["model_ready"] = client.is_model_ready("network3", client_timeout=30)
    out["extensions"] = list(client.get_server_metadata(as_json=True, client_timeout=30)["extensions"])
    out["metadata"] = client.get_model_metadata("network3", as_json=True, client_timeout=30)
    out["config"] = client.get_model_config("network3", as_json=True, client_timeout=30)["config"]

    r = client.infer("network3", [infer_input(x[:16])], request_id="fp32", client_timeout=30)
    out["fp32_id"] = r.get_response().id
    out["fp32_digits"] = r.as_numpy("probabilities").argmax(1).tolist()
    out["fp32_sum"] = r.as_numpy("probabilities").sum(1).tolist()
    out["logits_shape"] = list(r.as_numpy("logits").shape)

    r = client.infer("network3", [infer_input(pixels[:16].reshape(-1, 1, 28, 28), "UINT8")],
                     outputs=[tc.InferRequestedOutput("probabilities")], client_timeout=30)
    out["uint8_digits"] = r.as_numpy("probabilities").argmax(1).tolist()
    out["uint8_outputs"] = [o.name for o in r.get_response().outputs]

    r = client.infer("network3", [infer_input(x[:4])],
                     outputs=[tc.InferRequestedOutput("probabilities", class_count=3)], client_timeout=30)
    out["classification"] = [[s.decode() for s in row] for row in r.as_numpy("probabilities")]

    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=60)
    for i in range(0, 16, 4):
        client.async_stream_infer("network3", [infer_input(x[i:i + 4])], request_id=f"s{i}")
    client.async_stream_infer("network3", [infer_input(np.full((1, 1, 28, 28), np.nan, np.float32))], request_id="nan")
    stream = [results.get(timeout=60) for _ in range(5)]
    client.stop_stream()
    out["stream"] = [{"id": res.get_response().id if res else None, "error": str(err) if err else None,
                      "digits": res.as_numpy("probabilities").argmax(1).tolist() if res and not err else None}
                     for res, err in stream]

    out["errors"] = {
        "unknown model": status_of(lambda: client.infer("lenet", [infer_input(x[:1])], client_timeout=30)),
        "NaN": status_of(lambda: client.infer("network3", [infer_input(np.full((1, 1, 28, 28), np.nan, np.float32))],
                                              client_timeout=30)),
        "wrong shape": status_of(lambda: client.infer("network3", [infer_input(x[:2].reshape(2, 784))], client_timeout=30)),
        "unknown input": status_of(lambda: client.infer("network3", [infer_input(x[:1], name="pixels")], client_timeout=30)),
        "unknown output": status_of(lambda: client.infer("network3", [infer_input(x[:1])],
                                                         outputs=[tc.InferRequestedOutput("softmax")], client_timeout=30)),
    }
    r = client.infer("network3", [infer_input(x[:1])], client_timeout=30)
    out["after_errors"] = int(r.as_numpy("probabilities").argmax())
    out["statistics"] = client.get_inference_statistics("network3", as_json=True, client_timeout=30)["model_stats"][0]

print(json.dumps(out))
