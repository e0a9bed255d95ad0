"""The facts training and serving share, written once: tensor names, image size, labels, the
model's name on the v2 API and the server's default limits.

`training/` imports this module (it is plain Python, no torch, no onnxruntime) to export a
file that `serving/` will accept; nothing else retypes these values.  They are part of the
model file format and of the wire: changing one breaks every exported model or client.
"""
from __future__ import annotations

# ---- the image: MNIST's frame ----
SIDE = 28  # pixels on each side of an MNIST image
PIXELS = SIDE * SIDE  # 784 uint8 values per image
INPUT_SHAPE = (1, SIDE, SIDE)  # one image as the model takes it (channels, height, width)
SCALE = 1.0 / 255.0  # uint8 pixels -> [0, 1]

# ---- the graph's signature ----
INPUT_NAME = "images"  # float32 [N, 1, 28, 28] in [0, 1]
OUTPUT_NAMES = ("logits", "probabilities")  # float32 [N, 10] each
LABELS = tuple(str(d) for d in range(10))  # the label of class i (written into the file's metadata)
CLASSES = len(LABELS)

# The input contract, written into the ONNX metadata by export and shown by `network3 info`.
INPUT_CONTRACT = {
    "name": INPUT_NAME,
    "shape": [-1, *INPUT_SHAPE],
    "dtype": "float32",
    "range": [0.0, 1.0],
    "polarity": "white-on-black",
    "scale": "uint8/255",
    "centring": "MNIST: fit into 20x20 keeping aspect ratio, centre of mass at the centre of 28x28",
}

# ---- telling a confident answer from a guess (serving.unsure) ----
# The metadata key of a model's threshold: an answer whose top probability is below it is
# flagged `unsure`.  Export writes it, calibrated on that model's own outputs, because the scale
# of its confidences is a property of the recipe (label smoothing, ensembling, int8), not a
# constant: see serving/unsure.py for the rule.
UNSURE_KEY = "unsure_below"
# The calibration target: the fraction of MNIST's test digits the threshold flags.  Chosen on
# `benchmarks/unsure_report.py --split calibration` with the 99.62% default: at 1% only 55% of
# letters and 54-70% of noise were flagged, at 2% 73-74% and 66-82%, for 3-8% of photographed,
# pen and font digits flagged instead of 1-4% (they are less typical than MNIST's own).
UNSURE_RATE = 0.02

# ---- the model's name on the v2 (KServe / Triton) API ----
MODEL_NAME = "network3"
MODEL_VERSION = "1"
# The same model behind a BYTES input: `images` [N], one encoded image file (PNG, JPEG, ...)
# per element, decoded by the server's photo pipeline (serving.preprocess).
IMAGE_MODEL_NAME = "network3-image"

# ---- default limits (each is a `network3 serve` option) ----
MAX_PIXELS = 40_000_000  # per decoded image, width x height: a 48 MP photo needs more
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a gRPC message, either direction
MAX_IMAGES_PER_REQUEST = 1024
