"""IDX, MNIST's own file format: the one reader and writer, for the client and for training.

An IDX file is a 4-byte magic number (two zero bytes, a type byte, 0x08 for uint8, and the
number of dimensions), one big-endian uint32 per dimension, then the values.  MNIST ships
uint8 images [N, 28, 28] (magic 0x00000803) and uint8 labels [N] (0x00000801), often gzipped.

A gzipped file is inflated in pieces and refused once it would pass `max_bytes`: a few
kilobytes of zeros can claim gigabytes, and nothing is allocated for what is refused.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .contract import SIDE
from .errors import InvalidInput

IMAGES_MAGIC = b"\x00\x00\x08\x03"
LABELS_MAGIC = b"\x00\x00\x08\x01"
KINDS = {"images": (IMAGES_MAGIC, 3), "labels": (LABELS_MAGIC, 1)}
# The largest IDX file (after gunzip) we read: MNIST's training images are 47 MB, EMNIST's
# largest split about 550 MB.
MAX_BYTES = 1 << 30
_GZIP = b"\x1f\x8b"


def read_bytes(path: str | Path, max_bytes: int = MAX_BYTES) -> bytes:
    """A file's bytes, gunzipped when it is gzip; InvalidInput if it is damaged or too large."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] != _GZIP:
        if len(raw) > max_bytes:
            raise InvalidInput(f"{path}: {len(raw):,} bytes, over the limit of {max_bytes:,}")
        return raw
    return gunzip(raw, str(path), max_bytes)


def gunzip(raw: bytes, name: str, max_bytes: int = MAX_BYTES) -> bytes:
    """Inflate gzip bytes (several members too, as `gzip` allows), stopping past `max_bytes`."""
    out, size, data = [], 0, raw
    try:
        while data:
            d = zlib.decompressobj(zlib.MAX_WBITS | 16)
            while data:
                piece = d.decompress(data, 1 << 20)
                size += len(piece)
                if size > max_bytes:
                    raise InvalidInput(f"{name}: inflates to over {max_bytes:,} bytes")
                out.append(piece)
                data = d.unconsumed_tail
                if d.eof:
                    break
            if not d.eof:
                raise InvalidInput(f"{name}: corrupt gzip (truncated)")
            data = d.unused_data
            if data and data[:2] != _GZIP:
                break  # trailing garbage after the last member, which gzip itself also ignores
    except zlib.error as e:
        raise InvalidInput(f"{name}: corrupt gzip ({e})") from None
    return b"".join(out)


def parse(raw: bytes, kind: str, name: str = "IDX data") -> np.ndarray:
    """IDX bytes (already gunzipped) -> uint8 images [N, 28, 28] or labels [N] in 0..9."""
    magic, ndim = KINDS[kind]
    if len(raw) < 4 + 4 * ndim:
        raise InvalidInput(f"{name}: truncated IDX header ({len(raw)} bytes)")
    if raw[:4] != magic:
        raise InvalidInput(f"{name}: wrong magic number 0x{raw[:4].hex()}, expected 0x{magic.hex()} "
                           f"(uint8 {kind} file)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if kind == "images" and dims[1:] != [SIDE, SIDE]:
        raise InvalidInput(f"{name}: images are {dims[1]}x{dims[2]}, expected {SIDE}x{SIDE}")
    expected = int(np.prod(dims))
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise InvalidInput(f"{name}: header promises {expected} bytes of data, file has {len(body)}"
                           f" ({'truncated' if len(body) < expected else 'trailing bytes'})")
    arr = np.frombuffer(body, dtype=np.uint8).reshape(dims)
    if kind == "labels" and arr.size and arr.max() > 9:
        raise InvalidInput(f"{name}: label {int(arr.max())} out of range 0..9")
    return arr


def read(path: str | Path, kind: str, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """An IDX file on disk (gzipped or not) -> its array; InvalidInput naming the file."""
    return parse(read_bytes(path, max_bytes), kind, str(path))


def to_idx(arr: np.ndarray) -> bytes:
    """The inverse of `parse`: uint8 array -> IDX bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = (0x0800 + arr.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def is_images(path: str | Path) -> bool:
    """Does the file (gzipped or not) start like an IDX file of uint8 images?  Sniffed, whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head[:2] == _GZIP:
                f.seek(0)
                head = gzip.GzipFile(fileobj=f).read(4)
    except (OSError, EOFError, zlib.error):
        return False
    return head == IMAGES_MAGIC
