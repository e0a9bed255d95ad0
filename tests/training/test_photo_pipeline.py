"""The photo pipeline judged by a real network3 net: the bars the preprocessing must reach with
the trained model (tests/serving/test_preprocess.py checks the same pipeline against the small
test model, by agreement with its answers on the clean digits).

These need the trained `onnx_model` of tests/training/conftest.py (one epoch of `default`), so
they run in `make test`, not in `make test-serving`."""
from __future__ import annotations

import numpy as np
import pytest

import imagesets as S
from serving import preprocess as pp


def accuracy(predict, items) -> float:
    pixels, errors = pp.decode_many([b for b, _ in items])
    assert all(e is None for e in errors), [e for e in errors if e][:3]
    y = np.array([label for _, label in items])
    return float(np.mean(predict(pixels) == y))


def test_real_world_variants_of_mnist_digits(mnist, predict):
    """Scans and photos made from 1,000 MNIST test digits: 97% overall, 94% for every kind."""
    x, y = mnist.test_x, mnist.test_y
    per_kind = 1000 // len(S.MNIST_KINDS) + 1
    results, all_items = {}, []
    for k, kind in enumerate(S.MNIST_KINDS):
        sl = slice(1000 + k * per_kind, 1000 + (k + 1) * per_kind)
        items = S.mnist_set(x[sl], y[sl], kind, per_kind, seed=k)
        results[kind] = accuracy(predict, items)
        all_items += items
    overall = accuracy(predict, all_items[:1000])
    assert overall >= 0.97, (overall, results)
    assert min(results.values()) >= 0.94, results


@pytest.mark.parametrize("kind", ["clean", "thin", "thick", "lowres", "photo"])
def test_synthetic_pen_digits(predict, kind):
    """A jittery synthetic pen (random style, slant, width), dark on paper: digits that never
    came from MNIST."""
    assert accuracy(predict, S.pen_set(200, kind, seed=7)) >= 0.85


@pytest.mark.parametrize("kind", S.PAPER_KINDS)
def test_harder_sheet_photos(mnist, predict, kind):
    """Pencil, ruled and squared paper, a hard shadow, a form's box, a tilted camera, JPEG at
    quality 20: MNIST's digits and the synthetic pen's, 60 of each."""
    items = S.paper_set(kind, 60, mnist.test_x[3000:], mnist.test_y[3000:], seed=8) + S.paper_set(kind, 60, seed=9)
    assert accuracy(predict, items) >= 0.85


def test_font_digits(predict):
    """Every font installed where the tests run (DejaVu and matplotlib's Computer Modern and STIX at least)."""
    items = S.font_set(5)
    assert len(items) >= 100
    assert accuracy(predict, items) >= 0.85
