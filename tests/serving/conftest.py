"""The serving tests' model: a small real classifier built with numpy and onnx.helper
(tests/small_model.py), so these tests run on a host without PyTorch (`make test-serving`)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory, mnist) -> Path:
    from small_model import build
    return build(mnist, tmp_path_factory.mktemp("model") / "small.onnx")
