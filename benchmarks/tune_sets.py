"""Tuning sets for the training recipe (issue 19): made from MNIST's validation digits and from seeds
no report or test uses, so the recipe is chosen without looking at any test set.

    python benchmarks/tune_sets.py train NAME [--set elastic=1.5 --set lowres=0.25 --set epochs=15 ...]
    python benchmarks/tune_sets.py score runs/tune/NAME/best.pt

`train` trains `default` with the overrides on MNIST's `train` split only (50,000; `val` is held
out), then scores it; `score` scores a checkpoint.  Both append a line to runs/tune/results.jsonl
and print the table.  The sets, each through the server's own decoding (serving.preprocess):

- val: MNIST's 10,000 validation digits as they are (MNIST must stay where it is);
- val as UCI 8x8: 2,000 val digits made the way UCI's were (binarised, fitted to 32x32, "on"
  pixels counted in 4x4 blocks: 8x8 images of 0..16), as a scan and printed and photographed
  (imagesets.ink_on_paper, as the UCI rows of the report do);
- pen: the synthetic pen (imagesets.pen_set) clean, thin, thick and low-resolution, seed 1001
  (the report uses 2, the tests 7);
- mouse (PIL): the mouse writers of tests/mouse_digits.py (base seed 77; the recorded test set
  is 19) drawn with PIL as the page draws them (round 20 px strokes on a 280 px pad).

Test sets (UCI, fonts, the recorded mouse set, the report's rows) are not here: they are
reported once, at the end, with benchmarks/preprocess_report.py and benchmarks/mouse_set.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import imagesets as S  # noqa: E402
import mouse_digits as M  # noqa: E402
from serving import preprocess as pp  # noqa: E402

OUT = ROOT / "runs" / "tune"
SEED = 1001  # the pen's and the photos' seed: the report uses 1-4, the tests 7-9
MOUSE_SEED = 77  # the mouse writers' base seed: the recorded test set is 19
UCI_FROM_VAL = 2000


def uci_like(digit: np.ndarray) -> np.ndarray:
    """An MNIST digit (uint8 28x28) made as UCI's were: binarised, fitted into 32x32 (aspect kept),
    'on' pixels counted in 4x4 blocks -> float 8x8 in [0, 1] (count / 16)."""
    ys, xs = np.nonzero(digit > 127)
    crop = digit[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    k = 32 / max(h, w)
    im = Image.fromarray(crop).resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BILINEAR)
    big = np.zeros((32, 32), np.float32)
    a = (np.asarray(im) > 127).astype(np.float32)
    y0, x0 = (32 - a.shape[0]) // 2, (32 - a.shape[1]) // 2
    big[y0:y0 + a.shape[0], x0:x0 + a.shape[1]] = a
    return big.reshape(8, 4, 8, 4).sum((1, 3)) / 16


def mouse_png(strokes: list[list[tuple[int, int]]]) -> bytes:
    """The page's pad: white round strokes 20 px wide on black, 280x280 (serving/web/app.js)."""
    img = Image.new("L", (M.PAD, M.PAD), 0)
    draw = ImageDraw.Draw(img)
    r = 10
    for stroke in strokes:
        for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
            draw.line((x0, y0, x1, y1), fill=255, width=2 * r)
        for x, y in stroke:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def build(mnist) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (uint8 pixels [N, 28, 28] as the server sees them, labels)."""
    def decoded(items: list[tuple[bytes, int]]) -> tuple[np.ndarray, np.ndarray]:
        pixels, errors = pp.decode_many([b for b, _ in items])
        assert not any(errors), [e for e in errors if e][:3]
        return pixels, np.array([label for _, label in items])

    vx, vy = mnist.val_x, mnist.val_y
    sets = {"val (MNIST, 10k)": (vx, vy)}
    rng = np.random.default_rng(SEED)
    small = [(uci_like(d), int(label)) for d, label in zip(vx[:UCI_FROM_VAL], vy[:UCI_FROM_VAL])]
    sets["val as UCI 8x8 scan"] = decoded([(S.encode(Image.fromarray((255 - a * 255).astype(np.uint8))), label)
                                           for a, label in small])
    sets["val as UCI 8x8, photographed"] = decoded(
        [(S.encode(S.ink_on_paper(a, rng, scale=12, noise=6, shade=40, blur=1.5), "JPEG", quality=85), label)
         for a, label in small])
    for kind in ("clean", "thin", "thick", "lowres"):
        sets[f"pen {kind}"] = decoded(S.pen_set(1000, kind, seed=SEED))
    plan = M.plan(30, base_seed=MOUSE_SEED)
    sets["mouse (PIL)"] = decoded([(mouse_png(M.trajectory(p["template"], p["seed"])), p["label"]) for p in plan])
    return sets


def load_sets(mnist) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The sets, built once and kept in runs/tune/sets.npz (they take a minute to make)."""
    cache = OUT / "sets.npz"
    if cache.exists():
        z = np.load(cache)
        names = json.loads(str(z["names"]))
        return {n: (z[f"x{i}"], z[f"y{i}"]) for i, n in enumerate(names)}
    sets = build(mnist)
    OUT.mkdir(parents=True, exist_ok=True)
    arrays = {f"{k}{i}": v for i, (x, y) in enumerate(sets.values()) for k, v in (("x", x), ("y", y))}
    np.savez_compressed(cache, names=json.dumps(list(sets)), **arrays)
    return sets


def score(checkpoint: Path, mnist, name: str, extra: dict) -> dict:
    from training.evaluate import load_predictor, scores
    predict, _ = load_predictor(checkpoint)
    row = {"name": name, "checkpoint": str(checkpoint), **extra}
    for set_name, (x, y) in load_sets(mnist).items():
        row[set_name] = float((scores(predict, x).argmax(1) == y).mean())
    proxies = [v for k, v in row.items() if k not in ("val (MNIST, 10k)",) and isinstance(v, float)
               and k in load_sets(mnist)]
    row["proxy mean"] = float(np.mean(proxies))
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    for k, v in row.items():
        print(f"{k:<32}{v:.4f}" if isinstance(v, float) else f"{k:<32}{v}")
    return row


def parse_overrides(pairs: list[str]) -> dict:
    from training.model import Config
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        if key not in types:
            raise SystemExit(f"--set {pair}: Config has no field {key!r}")
        out[key] = float(value) if types[key] == "float" else int(value) if types[key] == "int" else value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("name")
    t.add_argument("--set", action="append", default=[], help="a Config field=value over `default`")
    t.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("checkpoint", type=Path)
    a = ap.parse_args()

    from training.data import load
    mnist = load(verbose=False)
    if a.cmd == "score":
        score(a.checkpoint, mnist, a.checkpoint.parent.name, {})
        return
    from training.presets import get
    from training.train import RunOptions, fit
    overrides = parse_overrides(a.set)
    cfg = get("default", train_split="train", **overrides)
    out = OUT / a.name
    t0 = time.perf_counter()
    report = fit(cfg, RunOptions(out=out, device="cpu", seed=a.seed, plots=False, quiet=True), mnist)
    score(out / "best.pt", mnist, a.name, {"overrides": overrides, "seed": a.seed,
                                           "train_seconds": report["train_seconds"],
                                           "wall_seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
