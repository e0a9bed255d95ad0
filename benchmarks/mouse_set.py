"""Mouse-drawn digits through the page (issue 19): record the test set, or score a model on it.

    python benchmarks/mouse_set.py record [--per-digit 20] [--model models/default.onnx]
    python benchmarks/mouse_set.py score  [--model models/default.onnx]

Both start a real `network3 serve` on loopback (serving.launch.ServerProcess) and drive its
page in headless Chromium with real pointer events (tests/mouse_digits.py: the templates, the
seeded writers, the browser).  For each digit the page's own path runs: pointer strokes on the
pad, the page POSTs the pad as a PNG to /v1/classify?input=1, the server preprocesses and
classifies it, the page shows the digit.

`record` writes tests/data/mouse/: png/D-II.png (the PNG the page sent, the pad's 280x280
pixels, stored as 8-bit grey, same pixels), seen/D-II.png (the 28x28 image the model saw,
as the server returned it) and manifest.jsonl (one line per drawing: label, template, writer
seed and parameters, the trajectory, the pixels' sha256, browser versions, date).  `score`
redraws the manifest's trajectories (checking that every pad comes out pixel for pixel as
recorded) and reports the page's answers.  Both write bench-results/mouse.json and
bench-results/mouse.md: accuracy per digit, total, and the misreads.

This is a TEST set: never train or tune on it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import mouse_digits as M  # noqa: E402
from serving.launch import ServerProcess  # noqa: E402

SET = ROOT / "tests" / "data" / "mouse"
RESULTS = ROOT / "bench-results"


def grey_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def sha(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def run(items: list[dict], model: Path, record: bool) -> tuple[list[dict], dict]:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    server = ServerProcess(model, "--host", "127.0.0.1", command=[str(Path(sys.executable).parent / "network3"), "serve"])
    try:
        with tempfile.TemporaryDirectory() as profile:
            driver = M.browser(profile)
            try:
                M.open_page(driver, server.http_url)
                info = {**M.versions(driver), "date": now}
                if record:
                    for sub in ("png", "seen"):
                        (SET / sub).mkdir(parents=True, exist_ok=True)
                for n, item in enumerate(items):
                    strokes = item.get("strokes") or M.trajectory(item["template"], item["seed"])
                    M.clear(driver)
                    M.draw(driver, strokes)
                    page = M.read_page(driver)
                    assert page["sent"] and page["answer"], (item, page["error"])
                    pixels = M.pad_pixels(page["sent"])
                    seen = page["answer"]["predictions"][0]["input"]
                    name = f"{item['label']}-{item['index']:02d}.png"
                    if record:
                        (SET / "png" / name).write_bytes(grey_png(pixels))
                        (SET / "seen" / name).write_bytes(Image_bytes(seen))
                        item = {"file": f"png/{name}", "seen": f"seen/{name}", **item, "writer": M.writer(item["seed"]),
                                "strokes": strokes, "pixels_sha256": sha(pixels), **info}
                    elif sha(pixels) != item["pixels_sha256"]:
                        raise SystemExit(f"{name}: the page drew other pixels than the recorded ones")
                    rows.append({"item": item, "digit": int(page["digit"]),
                                 "confidence": page["answer"]["predictions"][0]["confidence"]})
                    if (n + 1) % 20 == 0:
                        print(f"{n + 1}/{len(items)}", file=sys.stderr, flush=True)
            finally:
                driver.quit()
    finally:
        server.stop()
    return rows, info


def Image_bytes(b64: str) -> bytes:
    import base64
    return base64.b64decode(b64)


def report(rows: list[dict], info: dict, model: Path, mode: str) -> dict:
    per = {}
    for d in range(10):
        mine = [r for r in rows if r["item"]["label"] == d]
        per[d] = {"n": len(mine), "right": sum(r["digit"] == d for r in mine)}
    right = sum(v["right"] for v in per.values())
    misreads = [{"file": r["item"].get("file") or f"png/{r['item']['label']}-{r['item']['index']:02d}.png",
                 "label": r["item"]["label"], "read": r["digit"], "confidence": r["confidence"],
                 "template": r["item"]["template"], "seed": r["item"]["seed"]} for r in rows if r["digit"] != r["item"]["label"]]
    model_sha = hashlib.sha256(model.read_bytes()).hexdigest()
    out = {"mode": mode, "model": str(model), "model_sha256": model_sha, **info,
           "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "n": len(rows), "right": right, "accuracy": right / len(rows), "per_digit": per, "misreads": misreads}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mouse.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# mouse-drawn digits through the page ({mode}, {out['when']})", "",
             f"model {model} (sha256 {model_sha[:12]}), Chromium {info['chromium']}, "
             f"chromedriver {info['chromedriver']}, selenium {info['selenium']}", "",
             "| digit | right | of | accuracy |", "|---|---|---|---|"]
    lines += [f"| {d} | {v['right']} | {v['n']} | {v['right'] / max(1, v['n']):.1%} |" for d, v in per.items()]
    lines += [f"| all | {right} | {len(rows)} | **{out['accuracy']:.2%}** |", "", "misreads:", ""]
    lines += [f"- {m['file']}: {m['label']} read as {m['read']} ({m['confidence']:.0%}), template {m['template']}, "
              f"seed {m['seed']}" for m in misreads] or ["- none"]
    (RESULTS / "mouse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("record", "score"))
    ap.add_argument("--per-digit", type=int, default=20)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "default.onnx")
    args = ap.parse_args()
    why = M.missing()
    if why:
        raise SystemExit(why)
    t0 = time.monotonic()
    if args.mode == "record":
        items = M.plan(args.per_digit)
    else:
        items = [json.loads(line) for line in (SET / "manifest.jsonl").read_text().splitlines()]
    rows, info = run(items, args.model, record=args.mode == "record")
    if args.mode == "record":
        with open(SET / "manifest.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r["item"], separators=(",", ":")) + "\n")
    report(rows, info, args.model, args.mode)
    print(f"{len(rows)} drawings in {time.monotonic() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
