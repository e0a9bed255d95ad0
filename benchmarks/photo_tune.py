"""The photo pipeline's tuning split: the sheet-photo generators of tests/imagesets.py with seeds and
digits that no reported set uses, to change serving/photo.py against without looking at the test
rows of benchmarks/preprocess_report.py (MNIST test digits 500..999 with seed 3, pen digits with
seed 4).

Here: MNIST digits from the `val` split (never test) with seed 31, synthetic-pen digits with seed
41.  Prints accuracy and ms/image per paper kind and writes a grid of the failures (the sheet, the
pipeline's ink map, what the model saw, label -> prediction) to look at.

    python benchmarks/photo_tune.py --model models/default.onnx [--n 300] [--kinds shadow,pencil]
        [--grid /tmp/photo_fail.png]
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import imagesets as S

from serving import photo
from serving import preprocess as pp
from serving.model import ModelOptions, load_model

MNIST_SEED, PEN_SEED = 31, 41  # the tuning split's seeds (the report's test rows use 3 and 4)


def tuning_sets(mnist, kinds, n: int, other: bool = False) -> dict[str, list[tuple[bytes, int]]]:
    vx, vy = mnist.split("val")
    sets = {}
    for kind in kinds:
        sets[f"mnist-val {kind}"] = S.paper_set(kind, n, vx, vy, seed=MNIST_SEED)
        sets[f"pen {kind}"] = S.paper_set(kind, n, seed=PEN_SEED)
    if other:  # the report's other rows, on the same split: what a change must not make worse
        for kind in S.MNIST_KINDS:
            sets[f"mnist-val {kind}"] = S.mnist_set(vx, vy, kind, n, seed=MNIST_SEED)
        for kind in ("clean", "thin", "thick", "lowres", "photo"):
            sets[f"pen {kind}"] = S.pen_set(n, kind, seed=PEN_SEED)
        sets["fonts"] = S.font_set(MNIST_SEED)
        sets["fonts photo"] = S.font_set(MNIST_SEED, kind="photo")
    return sets


def ink_map(blob: bytes) -> np.ndarray:
    """The soft ink map the pipeline thresholds at the working size (for looking at, 0..255)."""
    g = pp.to_gray(pp.open_image(blob))
    ink, paper = photo._ink_bright(g)
    v = photo._soft_threshold(photo._flatten(ink, photo._background(ink, False), paper))
    return np.zeros_like(g) if v is None else v * 255


def grid(fails: list[tuple[str, bytes, np.ndarray, int, int]], path: str, cols: int = 6) -> None:
    cell = 96
    rows = -(-len(fails) // cols)
    out = Image.new("RGB", (cols * cell * 3, max(1, rows) * (cell + 14)), (40, 40, 40))
    d = ImageDraw.Draw(out)
    for i, (name, blob, seen, label, pred) in enumerate(fails):
        x, y = (i % cols) * cell * 3, (i // cols) * (cell + 14)
        sheet = Image.open(io.BytesIO(blob)).convert("RGB")
        sheet.thumbnail((cell, cell))
        out.paste(sheet, (x, y))
        out.paste(Image.fromarray(ink_map(blob).clip(0, 255).astype(np.uint8)).resize((cell, cell)), (x + cell, y))
        out.paste(Image.fromarray(seen).resize((cell, cell), Image.Resampling.NEAREST), (x + 2 * cell, y))
        d.text((x + 2, y + cell), f"{name[:18]} {label}->{pred}", fill=(255, 255, 0))
    out.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=300, help="images per (digits, kind) set")
    ap.add_argument("--kinds", default=",".join(S.PAPER_KINDS))
    ap.add_argument("--grid", default="/tmp/photo_fail.png", help="failures grid PNG ('' for none)")
    ap.add_argument("--max-fail", type=int, default=60)
    ap.add_argument("--other", action="store_true", help="also the report's non-sheet rows on this split")
    a = ap.parse_args()

    from training.data import load

    model = load_model(a.model, ModelOptions(warmup_batch_sizes=(1,)))
    sets = tuning_sets(load(verbose=False), a.kinds.split(","), a.n, a.other)
    fails = []
    print(f"{'set':<24}{'images':>8}{'accuracy':>10}{'ms/image':>10}")
    for name, items in sets.items():
        t = time.perf_counter()
        pixels, _ = pp.decode_many([b for b, _ in items])
        ms = (time.perf_counter() - t) / len(items) * 1e3
        labels = np.array([label for _, label in items])
        pred = model.predict(pp.pixels_to_input(pixels))[1].argmax(1)
        print(f"{name:<24}{len(items):>8}{np.mean(pred == labels):>10.2%}{ms:>10.2f}", flush=True)
        fails += [(name, items[i][0], pixels[i], labels[i], pred[i]) for i in np.nonzero(pred != labels)[0]]
    if a.grid and fails:
        grid(fails[:a.max_fail], a.grid)
        print(f"{len(fails)} failures, first {min(len(fails), a.max_fail)} in {a.grid}")


if __name__ == "__main__":
    main()
