"""The training tests' model: one epoch of `default` on all 60,000 training images, trained once
per test session, and its exported ONNX file."""
from __future__ import annotations

from pathlib import Path

import pytest


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
