"""deploy/image/check_model.py, the Containerfile's build-time check of the model it bakes in:
a good model passes, with its sha256 or without one; a file that is not a model, a missing file
or a sha256 that is not the file's fails the build with one line."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "image" / "check_model.py"


def check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_a_good_model_passes_with_its_sha256_or_none(onnx_model):
    sha = hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    for args in ((onnx_model,), (onnx_model, ""), (onnx_model, sha.upper())):
        r = check(*args)
        assert r.returncode == 0, r.stderr
        assert sha in r.stdout and "[-1, 1, 28, 28]" in r.stdout


def test_a_bad_model_fails_with_one_line(onnx_model, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    for args, says in (((junk,), "not a loadable ONNX model"), ((tmp_path / "missing.onnx",), "cannot read model"),
                       ((onnx_model, "0" * 64), "but MODEL_SHA256 is " + "0" * 64)):
        r = check(*args)
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("model check: ") and says in r.stderr, r.stderr
