"""A checkpoint that carries code is refused by evaluate, export and resume, and nothing runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fixtures_serving import ROOT


def _evil_checkpoint(checkpoint: Path, path: Path, canary: Path) -> None:
    """A real checkpoint with one more entry whose unpickling would run a shell command."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["note"] = Payload()
    torch.save(ckpt, path)


def test_checkpoint_carrying_code_is_refused_everywhere(checkpoint, tmp_path):
    canary = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    _evil_checkpoint(checkpoint, evil, canary)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _evil_checkpoint(checkpoint, run_dir / "last.pt", canary)
    train = [sys.executable, "-m", "training.cli"]
    for args in (["evaluate", str(evil)], ["export", str(evil), "-o", str(tmp_path / "m.onnx")],
                 ["train", "--preset", "default", "--epochs", "2", "--limit-train", "640", "--device", "cpu",
                  "--no-plots", "--out", str(run_dir), "--resume"]):
        r = subprocess.run(train + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0, (args, r.stdout[-2000:])
        assert "Traceback" not in r.stderr, (args, r.stderr[-3000:])
        assert not canary.exists(), args
    assert not (tmp_path / "m.onnx").exists()
