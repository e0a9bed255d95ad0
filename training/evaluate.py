"""Accuracy, per-digit accuracy and the confusion matrix, for a checkpoint or an ONNX file.

Both go through the same preprocessing contract (`serving.preprocess.pixels_to_input`), so a
number printed here means the same thing as the one the server's model file carries; the
confusion matrix is counted and printed by `serving.confusion`, as `network3 classify` does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from serving.confusion import confusion_matrix, format_confusion
from serving.preprocess import pixels_to_input
from .checkpoint import load_checkpoint
from .onnxrt import onnx_predictor

Predict = Callable[[np.ndarray], np.ndarray]  # float32 [N,1,28,28] -> scores [N,10]


def summarize(pred: np.ndarray, labels: np.ndarray) -> dict:
    """Every accuracy a fraction in [0, 1]; confusion rows are true digits, columns predictions."""
    labels = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    confusion = confusion_matrix(labels, pred)
    per_digit = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "count": int(len(labels)),
        "per_digit_accuracy": [round(float(a), 6) for a in per_digit],
        "confusion": confusion.tolist(),
    }


def torch_predict(model: torch.nn.Module, device: torch.device | str = "cpu", batch: int = 2000) -> Predict:
    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        out = [model(torch.from_numpy(x[i:i + batch]).to(device)).float().cpu() for i in range(0, len(x), batch)]
        return torch.cat(out).numpy()
    return predict


def scores(predict: Predict, pixels: np.ndarray, batch: int = 10_000) -> np.ndarray:
    """Scores for uint8 pixels, converted in slices so memory stays flat for large sets."""
    return np.concatenate([predict(pixels_to_input(pixels[i:i + batch])) for i in range(0, len(pixels), batch)])


def evaluate(predict: Predict, pixels: np.ndarray, labels: np.ndarray) -> dict:
    return summarize(scores(predict, pixels).argmax(axis=1), labels)


def load_predictor(path: str | Path, device: str = "cpu") -> tuple[Predict, dict]:
    """A checkpoint (.pt) or an exported model (.onnx) as one predict function plus its facts."""
    path = Path(path)
    if path.suffix == ".onnx":
        return onnx_predictor(path)  # onnxruntime only; no torch model needed
    model, ckpt = load_checkpoint(path, device)
    return torch_predict(model, device), {"preset": ckpt["config"].get("preset"), "data_sha256": ckpt.get("data_sha256")}


def format_report(result: dict) -> str:
    lines = [f"test accuracy {result['accuracy']:.4f} ({result['count']} images)", "per digit: " +
             "  ".join(f"{d}:{a:.4f}" for d, a in enumerate(result["per_digit_accuracy"])),
             *format_confusion(result["confusion"])]
    return "\n".join(lines)
