"""curves.png (accuracy and loss per epoch, as the seed post plotted) and errors.png."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .data import atomic_write


def _figure():
    # matplotlib is imported here, not at the top: it is slow to import and only runs that draw
    # plots need it (train.py imports this module for every run, --no-plots ones too), and the
    # backend must be chosen before pyplot is imported.
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    plt = _figure()
    rows = [r for r in history if not r.get("partial")]
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation"), ("test_accuracy", "test")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax1.plot(epochs, [np.nan if y is None else 100 * y for y in ys], marker=".", label=label)
    ax1.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title} accuracy")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(epochs, [r["train_loss"] for r in rows], marker=".", color="C3")
    ax2.set(xlabel="epoch", ylabel="training loss", title=f"{title} loss")
    ax2.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_errors(images: np.ndarray, labels: np.ndarray, pred: np.ndarray, path: Path, limit: int = 64) -> None:
    """A grid of misclassified test digits, each titled 'true -> predicted'."""
    plt = _figure()
    wrong = np.flatnonzero(pred != labels)[:limit]
    cols = 8
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{labels[i]} -> {pred[i]}", fontsize=8, color="C3")
    fig.suptitle(f"{int((pred != labels).sum())} misclassified test digits (first {len(wrong)})", fontsize=9)
    _save(fig, path)
    plt.close(fig)
