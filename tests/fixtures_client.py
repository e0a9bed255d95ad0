"""Client-side fixtures: the model as a plain function, sample folders and IDX files on disk.

Servers come from fixtures_serving (`server`, `thread_server`, `ProcessServer`).
"""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def predict(onnx_model):
    """uint8 MNIST-format pixels [N, 28, 28] -> predicted digits [N], through the folder's model.

    Module scope, not session: tests/serving and tests/training each have their own
    `onnx_model`, and pytest caches a session fixture once, whichever folder asked first."""
    from serving.contract import SIDE
    from serving.model import ModelOptions, load_model
    from serving.preprocess import pixels_to_input

    model = load_model(onnx_model, ModelOptions(intra_op_threads=1, warmup_batch_sizes=(1,)))

    def run(pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, np.uint8).reshape(-1, SIDE, SIDE)
        out = [model.predict(pixels_to_input(pixels[i:i + 512]))[1].argmax(1) for i in range(0, len(pixels), 512)]
        return np.concatenate(out) if out else np.zeros(0, int)

    return run


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory, mnist) -> Path:
    """300 MNIST test digits as PNG files in <digit>/NNNN.png folders, as `make demo` writes them."""
    root = tmp_path_factory.mktemp("samples")
    for i in range(300):
        d = root / str(int(mnist.test_y[i]))
        d.mkdir(exist_ok=True)
        Image.fromarray(mnist.test_x[i]).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory, mnist) -> Path:
    """MNIST's test set as the official IDX files (images and labels side by side)."""
    from serving.idx import to_idx

    root = tmp_path_factory.mktemp("idx")
    (root / "t10k-images-idx3-ubyte").write_bytes(to_idx(mnist.test_x))
    (root / "t10k-labels-idx1-ubyte").write_bytes(to_idx(mnist.test_y))
    return root


@pytest.fixture
def dead_address():
    """A loopback address where nothing answers: a socket bound there and never listening, held
    for the test, so every connect is refused at once (a port merely released could be taken by
    another socket before the test connects, or even be the client's own next ephemeral port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield "127.0.0.1:%d" % s.getsockname()[1]
