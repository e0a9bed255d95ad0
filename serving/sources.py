"""What `network3 classify PATH...` reads: PATHs -> a lazy stream of entries, then batches of images.

A PATH is an image file, a folder (walked recursively, sorted), a glob pattern, an IDX image
file (every image in it, labelled when the matching IDX label file sits beside it), or `-` for
a list of such paths on stdin.  Everything is lazy, so a million files cost the memory of one
batch.  Images in a folder named 0..9 are labelled with that digit.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np

from . import idx, preprocess
from .contract import MAX_PIXELS
from .errors import InvalidInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
GLOB_CHARS = re.compile(r"[*?\[]")


class PathError(Exception):
    """A PATH on the command line that names nothing (a usage error, exit 2)."""


@dataclass
class Entry:
    """One image to classify: where it came from, its label if known, and either a file to read,
    MNIST-format pixels (an IDX image) or the reason it cannot be had."""

    source: str
    label: int | None = None
    path: Path | None = None
    pixels: np.ndarray | None = None
    error: Exception | None = None


def check_paths(paths: Iterable[str]) -> None:
    """Fail before any work if a command-line PATH names nothing."""
    for p in paths:
        if p == "-" or os.path.exists(p):
            continue
        if GLOB_CHARS.search(p):
            if next(glob.iglob(p, recursive=True), None) is None:
                raise PathError(f"no files match {p!r}")
            continue
        raise PathError(f"no such file or folder: {p!r}")


def entries(paths: Iterable[str], stdin: TextIO | None = None) -> Iterator[Entry]:
    """Every image the PATHs name, in order: arguments as given, folders sorted."""
    for p in paths:
        if p == "-":
            for line in stdin or ():
                line = line.rstrip("\r\n")
                if line.strip():
                    yield from _expand(line, from_stdin=True)
        else:
            yield from _expand(p, from_stdin=False)


def _expand(p: str, from_stdin: bool) -> Iterator[Entry]:
    if os.path.isdir(p):
        yield from _walk(Path(p))
    elif os.path.exists(p):
        yield from _file(Path(p), p)
    elif GLOB_CHARS.search(p):
        matches = sorted(glob.iglob(p, recursive=True))
        if not matches:
            yield Entry(source=p, error=InvalidInput(f"no files match {p!r}"))
        for m in matches:
            yield from (_walk(Path(m)) if os.path.isdir(m) else _file(Path(m), m))
    else:
        yield Entry(source=p, error=InvalidInput(f"no such file or folder: {p!r}"))


def _walk(folder: Path) -> Iterator[Entry]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root, name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                yield Entry(source=str(path), label=_folder_label(path), path=path)
            elif idx.is_images(path):
                yield from _idx(path, str(path))


def _file(path: Path, given: str) -> Iterator[Entry]:
    if path.suffix.lower() not in IMAGE_SUFFIXES and idx.is_images(path):
        yield from _idx(path, given)
    else:
        yield Entry(source=given, label=_folder_label(path), path=path)


def _folder_label(path: Path) -> int | None:
    name = path.parent.name
    return int(name) if len(name) == 1 and name.isdigit() else None


# ---- IDX files (MNIST's own format; read by serving.idx) ----

def labels_beside(path: Path) -> Path | None:
    """The IDX label file that goes with an image file: t10k-images-idx3-ubyte ->
    t10k-labels-idx1-ubyte (with or without .gz), as MNIST names them."""
    name = path.name
    for a, b in (("images", "labels"), ("idx3", "idx1")):
        name = name.replace(a, b)
    stem = name[:-3] if name.endswith(".gz") else name
    for candidate in (stem, stem + ".gz"):
        p = path.with_name(candidate)
        if candidate != path.name and p.exists():
            return p
    return None


def _idx(path: Path, given: str) -> Iterator[Entry]:
    try:
        images = idx.read(path, "images")  # checks the 28x28 frame too
    except (OSError, InvalidInput) as e:
        yield Entry(source=given, error=e if isinstance(e, InvalidInput) else InvalidInput(f"cannot read {given}: {e}"))
        return
    labels = None
    lp = labels_beside(path)
    if lp is not None:
        try:
            labels = idx.read(lp, "labels")
            if len(labels) != len(images):
                labels = None  # not this file's labels
        except (OSError, InvalidInput):
            labels = None
    for i in range(len(images)):
        yield Entry(source=f"{given}#{i}", label=int(labels[i]) if labels is not None else None, pixels=images[i])


# ---- batches of images for the client ----

def batches(stream: Iterable[Entry], size: int, decode: bool, max_pixels: int = MAX_PIXELS
            ) -> Iterator[tuple[list[Entry], list]]:
    """Entries -> (entries, items) batches.  An item is MNIST-format pixels (IDX images, and
    files when `decode`: the photo pipeline runs here, in the client), a file's bytes (when
    not), or the exception that stopped it (an unreadable or undecodable file)."""
    batch: list[Entry] = []
    for e in stream:
        batch.append(e)
        if len(batch) == size:
            yield batch, _items(batch, decode, max_pixels)
            batch = []
    if batch:
        yield batch, _items(batch, decode, max_pixels)


def _items(batch: list[Entry], decode: bool, max_pixels: int) -> list:
    """Each entry's item: its error, its pixels, or its file's bytes (read here); when `decode`,
    the lot goes through preprocess.decode_many, which turns files into pixels."""
    items: list = []
    for e in batch:
        if e.error is not None:
            items.append(e.error)
        elif e.pixels is not None:
            items.append(e.pixels)
        else:
            try:
                items.append(e.path.read_bytes())
            except OSError as err:
                items.append(InvalidInput(f"cannot read {e.source}: {err.strerror or err}"))
    if not decode:
        return items
    pixels, errors = preprocess.decode_many(items, max_pixels)
    return [pixels[i] if err is None else err for i, err in enumerate(errors)]
