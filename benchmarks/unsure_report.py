"""What the service answers on things that are not digits, and how the `unsure` flag sorts them.

Every image goes the way a file sent to the server goes (serving.preprocess.decode_many, then
the model), and the flag is serving.unsure's rule: blank input, or a top probability below
the threshold.  Sets (seeded; tests/imagesets.py):

  digits   MNIST test 28x28 PNGs; MNIST digits dressed as files people send; the synthetic pen;
           sheets of paper photographed; every font's digits; UCI 8x8 ($NETWORK3_UCI_DIGITS)
  letters  A-Z and a-z from the machine's text fonts, clean and photographed; the letters a
           careful reader could take for a digit (O, l, Z, S, B...) apart
  blank    white, black and grey pages, a photographed empty sheet
  noise    uniform, gaussian, salt-and-pepper, 1/f texture

Two disjoint splits.  `--split calibration` (fonts 0, 2, 4... for letters; other seeds
everywhere) is where the rule and UNSURE_RATE were chosen: it prints the flagged fraction at the
thresholds several rates would give.  `--split held-out` (fonts 1, 3, 5...; other seeds) is the
report, with the model file's own threshold (metadata `unsure_below`; computed here by the
exporter's rule when the file has none).  The clean MNIST test digits are what the exporter
calibrates on, so their flagged fraction is the rate by construction; the half-split line
calibrates on test[:5000] and counts test[5000:].

    python benchmarks/unsure_report.py --model models/default.onnx [--split held-out] [--n 500] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import imagesets as S  # noqa: E402
from serving import preprocess as pp  # noqa: E402
from serving.contract import UNSURE_RATE  # noqa: E402
from serving.model import ModelOptions, load_model  # noqa: E402
from serving.unsure import calibrate, flags  # noqa: E402

SEEDS = {"calibration": 100, "held-out": 200}
CANDIDATE_RATES = (0.005, 0.01, 0.02, 0.05)


def build_sets(split: str, n: int, mnist) -> dict[str, tuple[str, list, list]]:
    """{name: (kind, files, labels or None)}; kind is digits, letters, lookalikes, blank or noise."""
    seed = SEEDS[split]
    fonts = S.letter_fonts()[0 if split == "calibration" else 1::2]
    # Disjoint MNIST test digits for the dressed sets: the first n in one split, the last n in the other.
    part = slice(0, n) if split == "calibration" else slice(-n, None)
    x, y = mnist.test_x[part], mnist.test_y[part]
    sets = {}

    def digits(name, items):
        sets[name] = ("digits", [b for b, _ in items], [label for _, label in items])

    for kind in ("photo", "jpeg", "offcentre"):
        digits(f"MNIST digits: {kind}", S.mnist_set(x, y, kind, n, seed=seed + 1))
    for kind in ("clean", "thin", "photo"):
        digits(f"synthetic pen: {kind}", S.pen_set(n, kind, seed=seed + 2))
    for kind in ("pencil", "ruled", "shadow"):
        digits(f"sheet photo, pen: {kind}", S.paper_set(kind, n // 2, seed=seed + 3))
    digits("fonts' digits", S.font_set(seed + 4))
    digits("fonts' digits, photographed", S.font_set(seed + 5, kind="photo"))
    uci = S.uci_digits_path()
    if uci is not None:
        digits("UCI 8x8 handwritten", list(S.uci_set(uci, "scan")))
    for kind in ("clean", "photo"):
        items = S.letter_set(fonts, kind=kind, seed=seed + 6)
        sets[f"letters ({kind})"] = ("letters", [b for b, c in items if c not in S.LOOKALIKES], None)
        sets[f"letters ({kind}), digit lookalikes"] = ("lookalikes", [b for b, c in items if c in S.LOOKALIKES], None)
    for kind in S.BLANK_KINDS:
        sets[f"blank: {kind}"] = ("blank", S.nothing_set(kind, n // 5, seed=seed + 7), None)
    for kind in S.NOISE_KINDS:
        sets[f"noise: {kind}"] = ("noise", S.nothing_set(kind, n // 2, seed=seed + 8), None)
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "default.onnx"))
    ap.add_argument("--split", choices=tuple(SEEDS), default="held-out")
    ap.add_argument("--n", type=int, default=500, help="images per MNIST-derived and pen set")
    ap.add_argument("--json", help="also write the table here")
    a = ap.parse_args()

    from training.data import load

    mnist = load(verbose=False)
    model = load_model(a.model, ModelOptions(warmup_batch_sizes=(1,)))

    def run(items):
        pixels, errors = pp.decode_many(items)
        ok = np.array([e is None for e in errors])
        x = pp.pixels_to_input(pixels[ok])
        probs = np.concatenate([model.predict(x[i:i + 512])[1] for i in range(0, len(x), 512)]) if len(x) \
            else np.zeros((0, 10), np.float32)
        return x, probs, ok

    # The exporter's calibration: the file's probabilities on MNIST's 10,000 test digits.
    test_x, test_probs, _ = run([S.encode(Image.fromarray(d)) for d in mnist.test_x])
    own = model.unsure_below
    source = "the file's metadata"
    if own is None:
        own, source = calibrate(test_probs), f"computed here by export's rule (the file has none), rate {UNSURE_RATE:.1%}"
    thresholds = {"file": own}
    if a.split == "calibration":
        thresholds = {f"{r:.1%}": calibrate(test_probs, r) for r in CANDIDATE_RATES}
    print(f"model {a.model}: unsure below {own:.4f} ({source}); split {a.split}")
    print("thresholds: " + ", ".join(f"{k} -> {v:.4f}" for k, v in thresholds.items()))
    half = calibrate(test_probs[:5000])
    print(f"half-split check: the threshold from MNIST test[:5000] ({half:.4f}) flags "
          f"{np.mean(test_probs[5000:].max(1) < half):.2%} of test[5000:] (target {UNSURE_RATE:.0%})")

    sets = {"MNIST test PNGs (export calibrates on them)": ("digits", None, list(mnist.test_y))}
    sets.update(build_sets(a.split, a.n, mnist))
    head = f"{'set':<46}{'images':>7}{'failed':>7}{'blank':>7}  {'top answer':<11}{'conf p10':>9}{'p50':>7}"
    head += "".join(f"{'flag@' + k:>12}" for k in thresholds) + f"{'acc all':>9}{'acc sure':>9}"
    print(head)
    rows = []
    for name, (kind, items, labels) in sets.items():
        t = time.perf_counter()
        if items is None:
            x, probs, ok = test_x, test_probs, np.ones(len(test_x), bool)
        else:
            x, probs, ok = run(items)
        top = probs.max(1)
        digit = probs.argmax(1)
        blank = flags(x, probs, None)
        common = np.bincount(digit, minlength=10)
        row = {"set": name, "kind": kind, "images": int(len(ok)), "failed": int((~ok).sum()),
               "blank": float(blank.mean()), "top_digit": int(common.argmax()),
               "top_share": float(common.max() / max(1, len(digit))),
               "confidence_p10": float(np.percentile(top, 10)), "confidence_p50": float(np.percentile(top, 50)),
               "flagged": {k: float(flags(x, probs, v).mean()) for k, v in thresholds.items()}}
        line = (f"{name:<46}{row['images']:>7}{row['failed']:>7}{row['blank']:>7.0%}  "
                f"{row['top_digit']}: {row['top_share']:<8.0%}{row['confidence_p10']:>9.3f}{row['confidence_p50']:>7.3f}")
        line += "".join(f"{f:>12.1%}" for f in row["flagged"].values())
        if labels is not None:
            right = digit == np.asarray(labels)[ok]
            sure = ~flags(x, probs, own)
            row["accuracy"] = float(right.mean())
            row["accuracy_sure"] = float(right[sure].mean()) if sure.any() else None
            line += f"{row['accuracy']:>9.2%}{row['accuracy_sure']:>9.2%}"
        rows.append(row)
        print(line + f"   ({time.perf_counter() - t:.1f} s)", flush=True)
    if S.uci_digits_path() is None:
        print("(UCI digits left out: pip install scikit-learn, or set NETWORK3_UCI_DIGITS)")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "split": a.split, "thresholds": thresholds,
                                            "half_split": half, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
