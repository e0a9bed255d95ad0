"""The rule of the house, checked: the serving package imports neither torch nor training, so a
server host installs none of PyTorch.  `make test-serving` also proves it by running every
serving test in an environment where torch is not installed at all."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from fixtures_serving import ROOT

IMPORT_ALL = """
import importlib, pkgutil, sys
import serving
for m in pkgutil.walk_packages(serving.__path__, "serving."):
    importlib.import_module(m.name)
print(sorted({name.split(".")[0] for name in sys.modules} & {"torch", "training", "onnx", "matplotlib"}))
"""


def test_every_serving_module_imports_without_torch_or_training():
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_the_serving_environment_has_no_torch():
    """Set by `make test-serving`: there, torch must not even be installed."""
    if os.environ.get("NETWORK3_SERVING_ONLY") != "1":
        pytest.skip("only in the serving-only environment (make test-serving)")
    assert importlib.util.find_spec("torch") is None, "torch is installed in the serving-only environment"


def test_training_cli_without_torch_says_what_to_install(tmp_path):
    """On a server host `network3-train` is installed too (one distribution): without torch it
    ends with one line naming the extra to install, not a traceback."""
    if os.environ.get("NETWORK3_SERVING_ONLY") != "1":
        pytest.skip("only in the serving-only environment (make test-serving)")
    r = subprocess.run([sys.executable, "-m", "training.cli", "train", "--epochs", "1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "pip install 'network3[train]'" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
