"""Check a model file for the image at build time, as `network3 serve` will at start: it loads in
onnxruntime, has the input and outputs serving/contract.py names, and warms up
(serving.model.load_model, the server's own check).  With an expected sha256 (the image's
`io.network3.model.sha256` label), the file must also have it.  One line on failure, exit 1.

    python deploy/image/check_model.py MODEL [SHA256]      (an empty SHA256: not checked)
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: check_model.py MODEL [SHA256]", file=sys.stderr)
        return 2
    path, want = args[0], (args[1] if len(args) == 2 else "").strip().lower()
    from serving.model import BadModel, load_model  # after the usage check: onnxruntime is slow to import
    try:
        model = load_model(path)
    except BadModel as e:
        print(f"model check: {e}", file=sys.stderr)
        return 1
    if want and want != model.sha256:
        print(f"model check: {path} has sha256 {model.sha256}, but MODEL_SHA256 is {want}", file=sys.stderr)
        return 1
    print(f"model check: {path} ok, input {model.input_shape}, labels {''.join(model.labels)}, sha256 {model.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
