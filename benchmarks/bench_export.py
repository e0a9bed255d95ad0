"""onnxruntime (float32 and int8) against PyTorch eager: images/s at batch 1, 64 and 256, same run.

    .venv/bin/python benchmarks/bench_export.py --checkpoint runs/default/best.pt

Exports the checkpoint twice with `training.export.export_onnx` (float32 with its parity check,
int8 with its accuracy guard) into a temporary folder, then times the three engines on real
test images, interleaved batch by batch so background load hits all three alike.  Prints a
markdown table and writes the figures as JSON (bench-results/export.json).  Only meaningful
on a quiet machine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from serving.preprocess import pixels_to_input  # noqa: E402
from serving.contract import INPUT_NAME  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.data import load  # noqa: E402
from training.export import export_onnx  # noqa: E402
from training.onnxrt import onnx_session  # noqa: E402


def measure(run, seconds: float, rounds: int = 3) -> tuple[float, float]:
    """(images/s, median ms per call): `rounds` timed loops of seconds/rounds each, median rate."""
    run()  # warm-up: first-call allocations and kernel selection stay out of the figure
    rates, calls = [], []
    for _ in range(rounds):
        n_images, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / rounds or not n_images:
            t = time.perf_counter()
            n_images += run()
            calls.append(time.perf_counter() - t)
        rates.append(n_images / elapsed)
    return statistics.median(rates), statistics.median(calls) * 1000


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/default/best.pt"), help="best.pt to export")
    ap.add_argument("--batches", default="1,64,256", help="comma-separated batch sizes")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per engine and batch size")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for torch and onnxruntime")
    ap.add_argument("--json", type=Path, default=Path("bench-results/export.json"), help="where to write figures")
    args = ap.parse_args()
    if not args.checkpoint.is_file():
        print(f"{args.checkpoint}: no checkpoint; run `make train` (or pass --checkpoint)", file=sys.stderr)
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    data = load(verbose=False)
    x = pixels_to_input(data.test_x[:max(batches)])

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        say = lambda m: print(f"  {m}", file=sys.stderr)  # noqa: E731
        f32 = export_onnx([args.checkpoint], Path(tmp) / "f32.onnx", data=data, log=say)
        q8 = export_onnx([args.checkpoint], Path(tmp) / "int8.onnx", data=data, quantize="int8", log=say)
        sessions = {"onnxruntime float32": onnx_session(f32["path"], args.threads),
                    "onnxruntime int8": onnx_session(q8["path"], args.threads)}
    model, _ = load_checkpoint(args.checkpoint, "cpu")

    def engine(name: str, xb: np.ndarray):
        if name == "PyTorch eager":
            tb = torch.from_numpy(xb)

            def run() -> int:
                with torch.inference_mode():
                    torch.softmax(model(tb), dim=1)  # same work as the graph: logits and probabilities
                return len(xb)
            return run
        sess = sessions[name]
        return lambda: (sess.run(None, {INPUT_NAME: xb}), len(xb))[1]

    names = ["PyTorch eager", *sessions]
    rows = []
    for b in batches:
        xb = np.ascontiguousarray(x[:b])
        for name in names:
            rate, ms = measure(engine(name, xb), args.seconds)
            rows.append({"batch": b, "engine": name, "images_per_s": round(rate, 1), "ms_per_batch": round(ms, 3)})
            print(f"  batch {b:>4} {name:<20} {rate:>10,.0f} images/s  {ms:8.3f} ms/batch", file=sys.stderr)

    def rate(b: int, name: str) -> float:
        return next(r["images_per_s"] for r in rows if r["batch"] == b and r["engine"] == name)

    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{cpu_name()}, {args.threads} thread(s); torch {torch.__version__}, onnxruntime {ort.__version__}; "
          f"{when}; {args.checkpoint} ({f32['test_accuracy']:.4f} float32, {q8['test_accuracy']:.4f} int8; "
          f"{f32['size_bytes']:,} vs {q8['size_bytes']:,} bytes)\n")
    print("| batch | PyTorch eager | ORT float32 | ORT int8 | float32 / eager | int8 / float32 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        e, f, q = (rate(b, n) for n in names)
        print(f"| {b} | {e:,.0f} | {f:,.0f} | {q:,.0f} | {f / e:.2f}x | {q / f:.2f}x |")
    print("\nimages/s, median of 3 timed loops per cell; real MNIST test images; CPU execution provider.")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "when": when, "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "onnxruntime": ort.__version__, "checkpoint": str(args.checkpoint), "seconds": args.seconds,
        "float32": {k: f32[k] for k in ("test_accuracy", "size_bytes", "opset")},
        "int8": {k: q8[k] for k in ("test_accuracy", "size_bytes")}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
