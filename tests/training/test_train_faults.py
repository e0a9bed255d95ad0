"""Training under faults: killed mid-epoch and resumed, an output folder that is read-only or full."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TRAIN = [sys.executable, "-m", "training.cli", "train", "--preset", "default", "--device", "cpu", "--no-plots"]
ROOT = Path(__file__).resolve().parents[2]


def run_train(*args, **kw):
    return subprocess.run(TRAIN + list(map(str, args)), cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["--epochs", "3", "--batch-size", "64", "--limit-train", "6400", "--seed", "5"]
    straight = run_train(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(TRAIN + args + ["--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Kill it as soon as the first epoch's last.pt exists: written after the epoch's other files,
    # so the run is then inside epoch 2.
    deadline = time.monotonic() + 300
    while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] < 3
    assert not list(out.glob(".*.tmp"))  # a kill never leaves a half-written checkpoint behind

    resumed = run_train(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs")


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only filesystem: root ignores folder permissions, but not a read-only mount."""
    mnt = tmp_path / "ro"
    mount_tmpfs(mnt, "size=1m,ro")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 4 MiB filesystem, so a large checkpoint fails with ENOSPC as on a full disk."""
    mnt = tmp_path / "disk"
    mount_tmpfs(mnt, "size=4m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_output_folder_is_one_clear_line(read_only_dir):
    res = run_train("--epochs", "1", "--limit-train", "640", "--out", read_only_dir)
    assert res.returncode == 1
    assert "Read-only file system" in res.stderr and "Traceback" not in res.stderr


def test_full_disk_keeps_the_previous_good_checkpoint(tmp_path, tiny_disk):
    # A good run first (small net, fits), then a run of a big net into the same folder fills the disk.
    ok = run_train("--epochs", "1", "--limit-train", "640", "--out", tiny_disk)
    assert ok.returncode == 0, ok.stderr
    good = (tiny_disk / "last.pt").read_bytes()
    big = subprocess.run([sys.executable, "-m", "training.cli", "train", "--preset", "nielsen-dropout", "--epochs", "1",
                          "--limit-train", "100", "--batch-size", "50", "--device", "cpu", "--no-plots",
                          "--out", str(tiny_disk)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert big.returncode == 1
    assert "No space left on device" in big.stderr and "Traceback" not in big.stderr
    assert len(big.stderr.strip().splitlines()) <= 3  # progress lines aside, one error line
    assert (tiny_disk / "last.pt").read_bytes() == good
    assert not [p for p in tiny_disk.iterdir() if p.name.endswith(".tmp")]


def test_export_to_a_full_disk_keeps_the_previous_model(tiny_disk, checkpoint):
    from click.testing import CliRunner
    from training.cli import cli
    target = tiny_disk / "model.onnx"
    target.write_bytes(b"previous good model")
    # Fill the disk, leaving less room (about 200 KB) than an exported model needs (about 360 KB).
    (tiny_disk / "filler").write_bytes(b"\0" * ((4 << 20) - 200_000))
    res = CliRunner().invoke(cli, ["export", str(checkpoint), "-o", str(target)])
    assert res.exit_code == 1, res.output
    assert "No space left on device" in res.output and "Traceback" not in res.output
    assert target.read_bytes() == b"previous good model"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "model.onnx"]
