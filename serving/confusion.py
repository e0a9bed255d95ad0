"""Accuracy and the confusion matrix: counted once, printed once, for `network3 classify` and
`network3-train evaluate` alike."""
from __future__ import annotations

import numpy as np

from .contract import CLASSES


def confusion_matrix(labels, predicted) -> np.ndarray:
    """int64 [10, 10]: rows are true digits, columns predictions."""
    m = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    np.add.at(m, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    return m


def format_confusion(matrix) -> list[str]:
    """The matrix as aligned text lines, a title line first."""
    lines = ["confusion matrix (rows: true digit, columns: predicted digit)",
             "      " + "".join(f"{d:>6}" for d in range(CLASSES))]
    for d, row in enumerate(matrix):
        lines.append(f"{d:>6}" + "".join(f"{int(v):>6}" for v in row))
    return lines
