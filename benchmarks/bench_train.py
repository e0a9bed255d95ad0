"""bench-train: training seconds for `default` and `blog` to first reach 98.9% test accuracy.

Both run in one process on the same machine; test accuracy is measured every tenth of an
epoch with the clock stopped, so only training time counts.  `blog` may stop short of the
target (its recipe peaks near 98.9%): then its time to its best accuracy is used, and said.
`default` takes a few seconds, where a noisy machine or a lucky seed moves the figure by a
fifth, so it runs once per seed (0, 1, 2 by default) and the ratio uses the median.
On CUDA an untimed warm-up run comes first.  `--presets fast,default --target 0.99` times the
GPU goal (99% in under a second).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from training.data import load  # noqa: E402
from training.presets import get  # noqa: E402
from training.train import RunOptions, fit  # noqa: E402


def time_to(preset: str, target: float, device: str, seed: int, mnist, max_epochs: int | None,
            precision: str) -> dict:
    cfg = get(preset, epochs=max_epochs)
    with tempfile.TemporaryDirectory() as tmp:
        report = fit(cfg, RunOptions(out=Path(tmp), device=device, seed=seed, plots=False, quiet=False,
                                     target_accuracy=target, precision=precision, eval_every=0.1), mnist)
    points = [r for r in report["history"] if r.get("test_accuracy") is not None]
    hit = report["target_reached"]
    best = max(points, key=lambda r: r["test_accuracy"])
    row = hit or best
    return {"preset": preset, "seed": seed, "reached": bool(hit), "accuracy": row["test_accuracy"],
            "epoch": round(row["epoch"], 2), "train_seconds": row["train_seconds"], "device": report["device"],
            "precision": report["precision"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--target", type=float, default=0.989)
    ap.add_argument("--seeds", default="0,1,2", help="Seeds for `default` (the ratio uses the median).")
    ap.add_argument("--blog-seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--presets", default="default,blog")
    ap.add_argument("--blog-epochs", type=int, default=None, help="Cap blog's epochs (default: its 30).")
    ap.add_argument("--json", type=Path, default=Path("bench-results/train.json"))
    args = ap.parse_args()
    mnist = load(verbose=False)
    if args.device == "cuda":
        # Untimed warm-up: the first run in a process would otherwise time CUDA's and cuDNN's
        # set-up (handles, kernel loading), a fixed cost that dwarfs a run of a fraction of a second.
        with tempfile.TemporaryDirectory() as tmp:
            fit(get("fast", epochs=1), RunOptions(out=Path(tmp), device="cuda", plots=False, quiet=True,
                                                   limit_train=512 * 20, precision=args.precision), mnist)
    rows = []
    for preset in args.presets.split(","):
        cap = args.blog_epochs if preset == "blog" else None
        seeds = [args.blog_seed] if preset == "blog" else [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            rows.append(time_to(preset, args.target, args.device, seed, mnist, cap, args.precision))
            print(json.dumps(rows[-1]), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores" + (
        f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
    print(f"\nbench-train {datetime.date.today()} on {machine}, torch {torch.__version__}, target {args.target:.3f}\n")
    print("| preset | seed | device | precision | reached | test accuracy | epoch | training seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['seed']} | {r['device']} | {r['precision']} | {'yes' if r['reached'] else 'no (best)'} "
              f"| {r['accuracy']:.4f} | {r['epoch']} | {r['train_seconds']:.2f} |")
    median = {p: statistics.median(r["train_seconds"] for r in rows if r["preset"] == p)
              for p in {r["preset"] for r in rows}}
    if "default" in median and "blog" in median:
        print(f"\nspeed-up default (median of {len(args.seeds.split(','))} seeds, {median['default']:.2f} s) "
              f"vs blog ({median['blog']:.2f} s): {median['blog'] / median['default']:.1f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": str(datetime.date.today()), "machine": machine, "torch": torch.__version__,
                                           "target": args.target, "median_seconds": median, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
