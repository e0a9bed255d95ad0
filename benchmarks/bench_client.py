"""Client benchmark: 10,000 PNG files classified through the server and with --local, one run.

What a user sees: the wall time of the whole `network3 classify FOLDER` command (process start,
file reads, decoding, the stream, output) and images/s, for
  - server:            files decoded in the client, pixels streamed to `network3 serve`
  - server (decode on server): file bytes streamed, the server decodes
  - local:             `--local model.onnx`, the same preprocessing and onnxruntime in-process
alternating, REPEAT times each; the best run of each counts (least disturbed by the machine).
Goals (issue 5): server >= 70% of local's images/s, and >= 3,000 images/s on a 2-core machine.

    python benchmarks/bench_client.py --model models/default.onnx [--count 10000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.launch import ServerProcess  # noqa: E402


def write_pngs(folder: Path, count: int, data_dir: str | None) -> None:
    from PIL import Image

    from training.data import load

    mnist = load(data_dir, verbose=False)
    for i in range(count):
        k = i % len(mnist.test_x)
        d = folder / str(int(mnist.test_y[k]))
        d.mkdir(exist_ok=True)
        Image.fromarray(mnist.test_x[k]).save(d / f"{i:05d}.png")


def classify(folder: Path, extra: list[str]) -> dict:
    exe = Path(sys.executable).with_name("network3")
    t0 = time.perf_counter()
    p = subprocess.run([str(exe), "classify", str(folder), "--output", os.devnull, *extra],
                       capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"network3 classify {' '.join(extra)} exited {p.returncode}:\n{p.stderr}")
    m = re.search(r"accuracy ([\d.]+)%.*\(([\d,]+) images in ([\d.]+) s", p.stderr)
    n, job = int(m.group(2).replace(",", "")), float(m.group(3))
    return {"wall_s": round(wall, 3), "images": n, "images_per_s": round(n / wall, 1),
            "job_s": job, "job_images_per_s": round(n / job, 1), "accuracy": float(m.group(1)) / 100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the ONNX file to serve and to run locally")
    ap.add_argument("--count", type=int, default=10_000, help="PNG files to classify")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each mode (best counts)")
    ap.add_argument("--data-dir", help="MNIST location (default: the cache)")
    ap.add_argument("--server-args", default="", help="extra `network3 serve` options, e.g. '--intra-op-threads 2'")
    ap.add_argument("--client-args", default="", help="extra `network3 classify` options, e.g. '--batch-size 128'")
    ap.add_argument("--out", default="bench-results/client.json", help="where the JSON results go")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="network3-bench-client-") as tmp:
        folder = Path(tmp) / "pngs"
        folder.mkdir()
        t = time.perf_counter()
        write_pngs(folder, a.count, a.data_dir)
        print(f"wrote {a.count:,} PNG files in {time.perf_counter() - t:.1f} s", flush=True)
        server = ServerProcess(a.model, "--no-access-log", *a.server_args.split(), log=Path(tmp) / "server.log")
        address = server.address
        extra = a.client_args.split()
        modes = {
            "server": ["--server", address, *extra],
            "server, decode on server": ["--server", address, "--decode", "server", *extra],
            "local": ["--local", a.model, *extra],
        }
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        try:
            classify(folder, modes["local"])  # warm the page cache and the imports once
            for r in range(a.repeat):
                for mode, args in modes.items():
                    res = classify(folder, args)
                    runs[mode].append(res)
                    print(f"run {r + 1}: {mode:<26} {res['wall_s']:6.2f} s  {res['images_per_s']:8,.0f} images/s"
                          f"  (in-job {res['job_images_per_s']:,.0f}/s)", flush=True)
        finally:
            server.stop(30)

    best = {m: max(rs, key=lambda r: r["images_per_s"]) for m, rs in runs.items()}
    local = best["local"]["images_per_s"]
    print(f"\n{a.count:,} PNG files, best of {a.repeat} ({platform.node()}, {os.cpu_count()} cores)")
    print(f"{'mode':<28}{'wall s':>8}{'images/s':>11}{'vs local':>10}{'accuracy':>10}")
    for m, r in best.items():
        print(f"{m:<28}{r['wall_s']:>8.2f}{r['images_per_s']:>11,.0f}{r['images_per_s'] / local:>10.0%}"
              f"{r['accuracy']:>10.2%}")
    ratio = best["server"]["images_per_s"] / local
    verdict = {"server_vs_local": round(ratio, 3), "goal_ratio_met": ratio >= 0.70,
               "goal_3000_met": best["server"]["images_per_s"] >= 3000}
    print(f"goals: server >= 70% of local: {'yes' if verdict['goal_ratio_met'] else 'NO'} ({ratio:.0%}); "
          f"server >= 3,000 images/s: {'yes' if verdict['goal_3000_met'] else 'NO'}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "count": a.count, "repeat": a.repeat,
                               "cores": os.cpu_count(), "runs": runs, "best": best, **verdict}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
