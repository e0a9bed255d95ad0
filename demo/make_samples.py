"""Write MNIST test digits as PNG files, demo/samples/<digit>/NNNN.png, for `make demo`.

The folder name is the true label (so `network3 classify` reports accuracy and a confusion
matrix) and NNNN the digit's index in MNIST's test set.  A dev/demo script: it may import
`training` (the serving code never does).

    python demo/make_samples.py [--out demo/samples] [--count 100] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training.data import DataError, load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo/samples"), help="folder to (re)write")
    ap.add_argument("--count", type=int, default=100, help="how many test digits (the first COUNT)")
    ap.add_argument("--data-dir", help="where MNIST is (default: the cache, else downloaded)")
    args = ap.parse_args(argv)
    if not 1 <= args.count <= 10_000:
        ap.error("--count must be between 1 and 10000")
    try:
        mnist = load(args.data_dir, verbose=False)
    except DataError as e:
        print(f"make_samples: {e}", file=sys.stderr)
        return 1
    # Written beside the target and swapped in whole: a half-written folder never stays behind.
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for i in range(args.count):
        folder = tmp / str(int(mnist.test_y[i]))
        folder.mkdir(exist_ok=True)
        Image.fromarray(mnist.test_x[i]).save(folder / f"{i:04d}.png")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {args.count} MNIST test digits to {args.out}/<digit>/NNNN.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
