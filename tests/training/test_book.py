"""benchmarks/book.py: the learning rate each preset gets at batch 100, and the README table it prints."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import book  # noqa: E402


def test_learning_rates_at_batch_100():
    assert book.lr_for("nielsen-relu", 10) is None  # the preset's own batch keeps its own eta
    assert book.lr_for("nielsen-sigmoid", 100) == 1.0  # eta 0.1 x 10
    assert book.lr_for("nielsen-expanded", 100) == 0.3  # eta 0.03 x 10
    for wide in ("nielsen-fc300", "nielsen-fc1000", "nielsen-2fc", "nielsen-dropout"):
        assert book.lr_for(wide, 100) == 0.1  # died at 0.3
    with pytest.raises(SystemExit, match="no learning rate known"):
        book.lr_for("nielsen-relu", 32)


def test_weight_decay_keeps_the_books_shrinkage_per_epoch():
    # lr x weight_decay x steps per epoch, the book's (batch 10) against batch 100's
    for preset in ("nielsen-relu", "nielsen-expanded", "nielsen-fc300", "nielsen-fc1000"):
        cfg, lr = book.PRESETS[preset], book.lr_for(preset, 100)
        wd = book.wd_for(preset, lr)
        assert lr * wd == pytest.approx(cfg.lr * cfg.weight_decay * 10)
    assert book.wd_for("nielsen-expanded", 0.3) == book.PRESETS["nielsen-expanded"].weight_decay
    assert book.wd_for("nielsen-fc300", 0.1) == 1.2e-5  # 3x the preset's 4e-6 at a third of eta x 10
    assert book.wd_for("nielsen-dropout", 0.1) is None  # no L2 in the book's dropout run
    assert book.wd_for("nielsen-relu", None) is None


def _fake_run(root: Path, preset: str, seed: int, acc: float, lr: float) -> None:
    d = root / f"{preset}-s{seed}"
    d.mkdir(parents=True)
    (d / "report.json").write_text(json.dumps({
        "preset": preset, "seed": seed, "test_accuracy": acc, "best_epoch": 50, "val_accuracy": acc,
        "config": {"batch_size": 100, "lr": lr, "weight_decay": 2e-5, "epochs": 60},
        "train_seconds": 1500.0 + seed, "device": "cpu", "torch": "x"}))
    (d / "metrics.jsonl").write_text(json.dumps({"test_accuracy": acc}) + "\n")


def test_table_shows_median_best_and_each_seeds_lr_when_they_differ(tmp_path):
    _fake_run(tmp_path, "nielsen-2fc", 0, 0.9939, 0.3)
    _fake_run(tmp_path, "nielsen-2fc", 1, 0.9941, 0.1)
    _fake_run(tmp_path, "nielsen-2fc", 2, 0.9938, 0.3)
    _fake_run(tmp_path, "nielsen-expanded", 0, 0.9932, 0.3)
    (tmp_path / "dead-nielsen-2fc-s1-lr0.3").mkdir()  # set aside: not a row
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "book.py"), "--root", str(tmp_path),
                          "table", "--jsonl", str(tmp_path / "rows.jsonl")],
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| `")}
    assert "| 99.39% | 99.41% | 3 | 60 | s0: 100, 0.3, 2e-05; s1: 100, 0.1, 2e-05; s2: 100, 0.3, 2e-05 | 1500-1502 |" in rows["`nielsen-2fc`"]
    assert "| 99.32% | 99.32% | 1 | 60 | 100, 0.3, 2e-05 |" in rows["`nielsen-expanded`"]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 4


def test_run_never_counts_a_run_of_another_batch_size_as_done(tmp_path):
    _fake_run(tmp_path, "nielsen-2fc", 0, 0.9939, 0.3)  # finished at batch 100
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "book.py"), "--root", str(tmp_path),
                          "run", "--presets", "nielsen-2fc", "--seeds", "0", "--batch-size", "10"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert f"skip {tmp_path / 'nielsen-2fc-s0'}: it finished at batch 100, not 10" in out
    assert not (tmp_path / "nielsen-2fc-s0.log").exists()  # nothing was started
