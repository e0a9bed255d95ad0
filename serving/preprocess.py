"""The one preprocessing contract: an image becomes float32 [N, 1, 28, 28] in [0, 1].

MNIST format: white ink on black, the digit fitted into 20x20 and centred by its centre of
mass in a 28x28 frame, pixels uint8 scaled by 1/255.  Training, evaluation, export checks,
the server and the client all go through this module, so the contract is written once.

An encoded image (a scan, a photo, a drawing; any size, colour or not, either polarity) is
brought into that format by `decode_image`: Pillow decodes it (with a pixel limit checked
from the header, before any pixel is decoded), then `normalize` does MNIST's own
normalisation on it.  Plain numpy and Pillow: a server host has nothing else.
"""
from __future__ import annotations

import io
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

from .contract import INPUT_SHAPE, MAX_PIXELS, PIXELS, SCALE, SIDE
from .errors import InvalidInput, Overloaded, TooLarge
from .photo import BOX, CENTRE, WORK, normalize

# Only these decoders are reachable from the network; Pillow's others (EPS runs Ghostscript)
# are not.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")


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


# ---- decoding ----

def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode one image file's bytes; the size is checked against `max_pixels` from the header
    first, so a decompression bomb costs nothing.  Multi-frame files give their first frame."""
    if not data:
        raise InvalidInput("empty image: no bytes")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise TooLarge(f"image too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise InvalidInput(f"not an image in a known format ({', '.join(FORMATS)})") from None
    except Exception as e:  # Pillow raises many types for malformed headers
        raise InvalidInput(f"not a decodable image ({', '.join(FORMATS)}): {_why(e)}") from None
    w, h = im.size
    if w * h <= 0:
        raise InvalidInput(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise TooLarge(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    if im.format == "JPEG" and max(w, h) > 4 * WORK:
        im.draft("L", (w * 4 * WORK // max(w, h), h * 4 * WORK // max(w, h)))  # DCT-domain downscale
    try:
        im.load()
        if im.format in ("JPEG", "TIFF", "WEBP") and im.getexif().get(0x0112, 1) != 1:
            im = ImageOps.exif_transpose(im)  # phone photos are stored sideways plus a tag
    except Exception as e:
        raise InvalidInput(f"corrupt or truncated {im.format} image: {_why(e)}") from None
    return im


def _why(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def to_gray(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> 2-D float32 luminance in [0, 255].  Transparency is flattened onto a
    background that contrasts with the opaque pixels, so ink on a transparent sheet shows."""
    if im.mode == "L":
        return np.asarray(im, dtype=np.float32)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit and float scans: stretch
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    if "A" in im.getbands():
        alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
        gray = np.asarray(im.convert("RGBA").convert("L"), dtype=np.float32)
        if alpha.min() < 1.0:
            shown = alpha > 0.5
            ink_is_dark = shown.any() and float(gray[shown].mean()) < 128
            back = 255.0 if ink_is_dark else 0.0
            gray = gray * alpha + back * (1.0 - alpha)
        return gray
    return np.asarray(im.convert("L"), dtype=np.float32)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 [28, 28] in MNIST format.

    Raises InvalidInput (undecodable, empty, 0x0) or TooLarge (more than max_pixels)."""
    im = open_image(data, max_pixels)
    if im.mode == "L" and im.size == (SIDE, SIDE):
        a = np.asarray(im)
        if _is_mnist(a[None])[0]:
            return a  # already MNIST format (our own demo samples, exported test digits)
    return normalize(to_gray(im))


def decode_many(items: Iterable[bytes | np.ndarray | BaseException], max_pixels: int = MAX_PIXELS
                ) -> tuple[np.ndarray, list[Exception | None]]:
    """Many images -> (uint8 [N, 28, 28], one error or None per image): the one place a list of
    images becomes pixels, for the server, `--local` and the client alike.

    An item is an encoded image file (bytes), MNIST-format pixels (a uint8 array of 784 values),
    or an exception (an image that could not even be read), which is passed through as that
    image's error.  A failed image leaves zeros and its error; the rest go on.  MNIST-format
    28x28 files (the common bulk case) are checked all at once and skip the photo pipeline."""
    items = list(items)
    out = np.zeros((len(items), SIDE, SIDE), np.uint8)
    errors: list[Exception | None] = [None] * len(items)
    small: list[int] = []

    def normalize_into(i: int, im: Image.Image) -> None:
        try:
            out[i] = normalize(to_gray(im))
        except Exception as e:  # never let one odd image sink the batch
            errors[i] = e if isinstance(e, (InvalidInput, Overloaded)) else InvalidInput(_why(e))

    for i, item in enumerate(items):
        if isinstance(item, BaseException):
            errors[i] = item
            continue
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.size != PIXELS:
                errors[i] = InvalidInput(f"pixels must be uint8 with {PIXELS} values ({SIDE}x{SIDE}), "
                                         f"got {item.dtype} {item.shape}")
            else:
                out[i] = item.reshape(SIDE, SIDE)
            continue
        try:
            im = open_image(item, max_pixels)
        except (InvalidInput, Overloaded) as e:
            errors[i] = e
            continue
        if im.mode == "L" and im.size == (SIDE, SIDE):
            out[i] = np.asarray(im)
            small.append(i)
        else:
            # At once, so only one decoded image is alive at a time: a request of many small
            # files that each decode to max_pixels (zlib packs 36 MP of zeros into 35 KB) must
            # not hold them all in memory together.
            normalize_into(i, im)
            del im
    if small:
        ok = _is_mnist(out[small])
        for i, good in zip(small, ok):
            if not good:
                normalize_into(i, Image.fromarray(out[i]))
    return out, errors


def images_to_input(datas: Iterable[bytes], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded images -> float32 [N, 1, 28, 28]; the first bad image raises, naming its index."""
    pixels, errors = decode_many(datas, max_pixels)
    for i, e in enumerate(errors):
        if e is not None:
            raise type(e)(f"image {i}: {e}")
    return pixels_to_input(pixels)


def _is_mnist(a: np.ndarray) -> np.ndarray:
    """For uint8 [N, 28, 28]: which are already MNIST format (clean black background, ink fitted
    to 20 px, centre of mass at the centre)?  Vectorised: no per-image Python."""
    f = a.astype(np.float32)
    mass = f.sum((1, 2))
    rows, cols = a.any(2), a.any(1)
    top, bottom = rows.argmax(1), SIDE - rows[:, ::-1].argmax(1)
    left, right = cols.argmax(1), SIDE - cols[:, ::-1].argmax(1)
    longest = np.maximum(bottom - top, right - left)
    idx = np.arange(SIDE, dtype=np.float32)
    safe = np.maximum(mass, 1.0)
    cy = (f.sum(2) @ idx) / safe
    cx = (f.sum(1) @ idx) / safe
    clean = (a == 0).mean((1, 2)) > 0.5  # most pixels exactly black: a rendered, not photographed, digit
    return ((mass > 0) & clean & (longest >= BOX - 1) & (longest <= BOX)
            & (np.abs(cy - CENTRE) <= 0.5) & (np.abs(cx - CENTRE) <= 0.5) & (a.max((1, 2)) >= 128))
