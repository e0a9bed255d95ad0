"""Session fixtures shared by every test module: real MNIST, one real training run, its ONNX file.

The model is trained once per test session (one epoch of `default` on all 60,000 training
images) and shared, so every server, client and export test works with a real network.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores are shared by the trainer, the server under test and its client: keep torch modest.
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins: list[str] = ["fixtures_serving", "fixtures_client"]


@pytest.fixture(scope="session")
def mnist():
    from training.data import load
    return load(verbose=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mnist) -> Path:
    from training.presets import get
    from training.train import RunOptions, fit
    out = tmp_path_factory.mktemp("run")
    fit(get("default", epochs=1), RunOptions(out=out, device="cpu", seed=0, plots=False, quiet=True), mnist)
    return out


@pytest.fixture(scope="session")
def checkpoint(trained_run) -> Path:
    return trained_run / "best.pt"


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory, checkpoint, mnist) -> Path:
    from training.export import export_onnx
    out = tmp_path_factory.mktemp("model") / "model.onnx"
    export_onnx([checkpoint], out, data=mnist)
    return out
