"""A small real model for the serving tests, built without PyTorch: `make test-serving` runs on a
host that has only the server's dependencies (and onnx, a test tool, to write the graph).

The net is a random-feature classifier fitted in closed form with numpy: 1,024 fixed random
ReLU features of the pixels and a ridge-regression readout on them, trained on MNIST's 50,000
training images.  It is a real classifier (about 95-96% on the test set; the exact figure is
measured at build time and written into the file) with network3's exact contract: input
`images` float32 [N, 1, 28, 28], outputs `logits` and `probabilities` [N, 10], metadata with
labels, input contract, accuracy and provenance.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from serving.contract import INPUT_CONTRACT, INPUT_NAME, LABELS, OUTPUT_NAMES, PIXELS, UNSURE_KEY
from serving.preprocess import pixels_to_input
from serving.unsure import calibrate

FEATURES = 1024
RIDGE = 10.0
TEMPERATURE = 12.0  # sharpens the ridge scores into probabilities a confident net would give


def fit(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 images [N, 28, 28] and labels -> the weights of images -> logits."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((PIXELS, FEATURES)) / np.sqrt(PIXELS / 4)).astype(np.float32)
    b1 = (rng.standard_normal(FEATURES) * 0.5).astype(np.float32)
    x = pixels_to_input(train_x).reshape(len(train_x), PIXELS)
    h = np.maximum(x @ w1 + b1, 0)
    y = np.eye(len(LABELS), dtype=np.float32)[train_y] * 2 - 1
    gram = (h.T @ h).astype(np.float64) + RIDGE * np.eye(FEATURES)
    w2 = np.linalg.solve(gram, (h.T @ y).astype(np.float64)).astype(np.float32) * TEMPERATURE
    return {"w1": w1, "b1": b1, "w2": w2, "b2": np.zeros(len(LABELS), np.float32)}


def logits_of(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The same computation in numpy, for the accuracy written into the file."""
    h = np.maximum(x.reshape(len(x), PIXELS) @ weights["w1"] + weights["b1"], 0)
    return h @ weights["w2"] + weights["b2"]


def build(mnist, path: Path) -> Path:
    """Fit on MNIST's training split, write the ONNX file with its metadata, return its path."""
    from onnx import TensorProto, helper, numpy_helper

    weights = fit(mnist.train_x, mnist.train_y)
    test_logits = logits_of(weights, pixels_to_input(mnist.test_x))
    accuracy = float((test_logits.argmax(1) == mnist.test_y).mean())
    e = np.exp(test_logits - test_logits.max(1, keepdims=True))
    unsure_below = calibrate(e / e.sum(1, keepdims=True))  # export's rule, on the same test digits
    logits, probabilities = OUTPUT_NAMES
    shape = np.array([-1, PIXELS], np.int64)
    nodes = [
        helper.make_node("Reshape", [INPUT_NAME, "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["s"]),
        helper.make_node("Add", ["s", "b2"], [logits]),
        helper.make_node("Softmax", [logits], [probabilities], axis=1),
    ]
    inits = [numpy_helper.from_array(shape, "flat_shape")] + [numpy_helper.from_array(v, k) for k, v in weights.items()]
    graph = helper.make_graph(
        nodes, "network3-test-random-features",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *INPUT_CONTRACT["shape"][1:]])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", len(LABELS)]) for name in OUTPUT_NAMES],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="network3 tests/small_model.py")
    model.ir_version = 9
    meta = {"labels": json.dumps(list(LABELS)), "input": json.dumps(INPUT_CONTRACT), "preset": "test-random-features",
            "test_accuracy": json.dumps(accuracy), "data_sha256": mnist.data_sha256,
            UNSURE_KEY: json.dumps(unsure_below),
            "notes": f"{FEATURES} random ReLU features + ridge readout, fitted with numpy by tests/small_model.py"}
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    path.write_bytes(model.SerializeToString())
    return path
