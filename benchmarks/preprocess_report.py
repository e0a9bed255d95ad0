"""How the photo pipeline (serving/preprocess.py) fares: accuracy of a model on digit images that
are not MNIST's 28x28 files, and the time the pipeline takes per image.

Sets (all made here, seeded; see tests/imagesets.py): MNIST test digits dressed as files people
send (inverted, scaled up, off-centre on a page, colour, JPEG, photographed paper); sheets of
paper photographed in harder ways (pencil, ruled and squared paper, a hard shadow, a form's
box, a tilted camera, heavy JPEG) with MNIST's or a synthetic pen's digits; digits that
never came from MNIST: a synthetic pen (clean, hairline, marker, 10-16 px scans, photographed),
every font on this machine (handwriting fonts when installed, e.g. Debian's fonts-dkg-handwriting
fonts-breip fonts-bwht fonts-humor-sans fonts-comic-neue fonts-dancingscript fonts-kristi
fonts-kaushanscript), and the UCI/sklearn 8x8 handwritten digits of 43 other writers when
scikit-learn is installed or $NETWORK3_UCI_DIGITS names its digits.csv.gz.

    python benchmarks/preprocess_report.py --model models/default.onnx [--n 1000] [--json out.json]
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
from serving.model import ModelOptions, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=1000, help="images per MNIST-derived and pen set")
    ap.add_argument("--json", help="also write the table here")
    a = ap.parse_args()

    from training.data import load

    mnist = load(verbose=False)
    model = load_model(a.model, ModelOptions(warmup_batch_sizes=(1,)))

    def predict(pixels):
        return np.concatenate([model.predict(pp.pixels_to_input(pixels[i:i + 512]))[1].argmax(1)
                               for i in range(0, len(pixels), 512)])

    x, y = mnist.test_x[:a.n], mnist.test_y[:a.n]
    sets = {"MNIST test digits, 28x28 PNG (reference)": [(S.encode(Image.fromarray(d)), int(l)) for d, l in zip(x, y)]}
    for kind in S.MNIST_KINDS:
        sets[f"MNIST digits: {kind}"] = S.mnist_set(x, y, kind, a.n, seed=1)
    for kind in ("clean", "thin", "thick", "lowres", "photo"):
        sets[f"synthetic pen: {kind}"] = S.pen_set(a.n, kind, seed=2)
    for kind in S.PAPER_KINDS:
        sets[f"sheet photo, MNIST digits: {kind}"] = S.paper_set(kind, a.n // 2, x[a.n // 2:], y[a.n // 2:], seed=3)
        sets[f"sheet photo, synthetic pen: {kind}"] = S.paper_set(kind, a.n // 2, seed=4)
    sets["fonts (all on this machine)"] = S.font_set(3)
    sets["fonts: handwriting only"] = S.font_set(3, handwriting_only=True)
    sets["fonts, photographed"] = S.font_set(3, kind="photo")
    uci = S.uci_digits_path()
    if uci is not None:
        sets["UCI 8x8 handwritten (43 writers)"] = list(S.uci_set(uci, "scan"))
        sets["UCI 8x8, printed and photographed"] = list(S.uci_set(uci, "photo"))

    rows = []
    print(f"{'set':<44}{'images':>8}{'accuracy':>10}{'ms/image':>10}")
    for name, items in sets.items():
        if not items:
            continue
        t = time.perf_counter()
        pixels, errors = pp.decode_many([b for b, _ in items])
        ms = (time.perf_counter() - t) / len(items) * 1e3
        labels = np.array([label for _, label in items])
        acc = float(np.mean(predict(pixels) == labels))
        rows.append({"set": name, "images": len(items), "accuracy": acc, "ms_per_image": round(ms, 3),
                     "errors": sum(e is not None for e in errors)})
        print(f"{name:<44}{len(items):>8}{acc:>10.2%}{ms:>10.2f}", flush=True)
    if uci is None:
        print("(UCI digits left out: pip install scikit-learn, or set NETWORK3_UCI_DIGITS)")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
