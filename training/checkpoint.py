"""Checkpoints: written atomically, read with `weights_only` (no code runs), versioned.

One reader for every use: `network3-train evaluate`, `export` and `train --resume` all go
through `read`, so a file that is not ours (or that carries code) is refused the same way,
with one clear line, wherever it is given.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from .data import atomic_write
from .model import Config, Network3

# 2: batch norm moved after the pool, so a version-1 net with batch norm no longer fits Network3.
CHECKPOINT_VERSION = 2


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save through a temporary file and a rename: `path` is never a half-written checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(Path(path), lambda f: f.write(buf.getbuffer()))


def read(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint's dict, tensors on `device`; ValueError (one line) if it is not a checkpoint.

    weights_only: tensors, numbers, strings and containers only; a pickle that would build any
    other object (and so could run code) is refused before it runs.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle errors (a file that carries code), zip errors: one clear line
        raise ValueError(f"{path}: not a network3 checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a network3 checkpoint (no config and model in it)")
    return ckpt


def check_version(ckpt: dict, path: str | Path) -> Config:
    """The checkpoint's Config, once its version is one this network3 can rebuild."""
    try:
        cfg = Config.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a network3 checkpoint ({_first_line(e)})") from None
    if ckpt.get("version", 1) < 2 and cfg.batchnorm:
        raise ValueError(f"{path}: a version-1 checkpoint with batch norm before the pool, which this network3 "
                         "no longer builds; retrain it (its exported .onnx still serves)")
    return cfg


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Network3, dict]:
    """Rebuild the net from the config stored beside its weights, in eval mode on `device`."""
    ckpt = read(path, device)
    cfg = check_version(ckpt, path)
    try:
        model = Network3(cfg)
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # missing or misshapen weights
        raise ValueError(f"{path}: not a network3 checkpoint ({_first_line(e)})") from None
    return model.to(device).eval(), ckpt


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
