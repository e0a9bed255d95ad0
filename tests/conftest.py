"""Session fixtures shared by every test module: real MNIST (read by training.data, which needs
numpy and nothing of PyTorch).

Each half has its own `onnx_model`: tests/training/conftest.py trains and exports a real
network3 net, tests/serving/conftest.py builds a small classifier without PyTorch.
"""
from __future__ import annotations

import os
import pytest

# Two cores are shared by the trainer, the server under test and its client: keep torch modest.
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins: list[str] = ["fixtures_serving", "fixtures_client"]


@pytest.fixture(scope="session")
def mnist():
    from training.data import load
    return load(verbose=False)
