"""`unsure`: telling a confident answer from a guess, for every prediction network3.v1 gives.

An answer is unsure when
  * the input holds no ink at all (every pixel 0): a blank page, which the photo pipeline
    turns into an empty frame, and on which the net still names a digit with high confidence
    (the default model says "1" at 0.86), so no threshold on probabilities could catch it; or
  * its top probability is below the model's threshold, the `unsure_below` entry of the ONNX
    file's metadata.

The threshold belongs to the model: export computes it with `calibrate` from the file's own
probabilities on MNIST's test digits (no preset trains on them), as the value that flags
`contract.UNSURE_RATE` of them.  The scale of a net's confidences depends on its recipe (label
smoothing caps the default model's near 0.93; an ensemble's are averages), so no constant would
do for every file.  A file exported before this rule has no threshold: only blank inputs are
flagged, and the server says so when it loads it (`network3-train calibrate FILE` adds one).

Plain numpy: the server, the in-process backend, export and the test model all use it.
"""
from __future__ import annotations

import math

import numpy as np

from .contract import UNSURE_KEY, UNSURE_RATE
from .errors import BadModel


def calibrate(probabilities: np.ndarray, rate: float = UNSURE_RATE) -> float:
    """The threshold that flags at most `rate` of these (held-out, real digit) rows: the
    floor(rate * N)-th smallest top probability, so exactly that many lie strictly below it
    (fewer with ties)."""
    top = np.sort(np.asarray(probabilities, np.float64).max(1))
    if not len(top) or not 0.0 <= rate < 1.0:
        raise ValueError(f"calibrate: need probabilities and 0 <= rate < 1, got {len(top)} rows, rate {rate}")
    return float(top[int(math.floor(rate * len(top)))])


def threshold_of(metadata: dict[str, str], where: str = "model") -> float | None:
    """The file's threshold (None when it has none); BadModel when the entry is not a number in [0, 1]."""
    raw = metadata.get(UNSURE_KEY)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise BadModel(f"{where}: metadata {UNSURE_KEY!r} must be a probability in [0, 1], found {raw[:40]!r}")
    return value


def flags(x: np.ndarray, probabilities: np.ndarray, threshold: float | None) -> np.ndarray:
    """bool [N]: which answers are unsure.  x: the model's input [N, 1, 28, 28] (or uint8
    pixels [N, ...]), probabilities [N, 10]."""
    x = np.asarray(x)
    blank = x.max(axis=tuple(range(1, x.ndim)), initial=0) == 0
    if threshold is None:
        return blank
    return blank | (np.asarray(probabilities).max(1) < threshold)
