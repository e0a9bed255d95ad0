"""The one preprocessing contract: an image becomes float32 [N, 1, 28, 28] in [0, 1].

MNIST format: white ink on black, the digit fitted into 20x20 and centred by its centre of
mass in a 28x28 frame, pixels uint8 scaled by 1/255.  Training, evaluation, export checks,
the server and the client all go through this module, so the contract is written once.
"""
from __future__ import annotations

import numpy as np

from .errors import InvalidInput

SIDE = 28
INPUT_SHAPE = (1, SIDE, SIDE)
PIXELS = SIDE * SIDE
SCALE = 1.0 / 255.0

# Written into the ONNX metadata by export and read back by the server.
CONTRACT = {
    "name": "images",
    "shape": [-1, 1, SIDE, SIDE],
    "dtype": "float32",
    "range": [0.0, 1.0],
    "polarity": "white-on-black",
    "scale": "uint8/255",
    "centring": "MNIST: fit into 20x20 keeping aspect ratio, centre of mass at the centre of 28x28",
}


def pixels_to_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 MNIST-format pixels [N, 28, 28] or [N, 784] -> float32 [N, 1, 28, 28] in [0, 1]."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise InvalidInput(f"pixels must be uint8, got {pixels.dtype}")
    if pixels.size % PIXELS:
        raise InvalidInput(f"pixel count {pixels.size} is not a multiple of {PIXELS}")
    x = pixels.reshape(-1, *INPUT_SHAPE).astype(np.float32)
    x *= np.float32(SCALE)
    return x
