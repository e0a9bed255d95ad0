"""The real-world sets guard the gains (issue 19): the `handwriting` preset's augmentation must keep
paying on handwriting MNIST never saw.

Two short runs from the same seed on the same few thousand MNIST training digits, one with the
preset's recipe and one with its augmentation knobs at 0 (the affine warp only, `default`'s
recipe), are scored on UCI's 1,797 8x8 digits by 43 other writers (tests/uci.py, fetched by
`make test`) through the service's own decoding.  The recipe must beat the plain run by MARGIN
and reach FLOOR.  Both are set from measurements over five seeds (the numbers are beside them),
so that a knob that stops working, or a low-resolution step that no longer looks like what the
service makes of a tiny scan, fails the test while seed noise does not.  UCI is a test set: nothing here tunes on it, the test only checks a gain chosen
elsewhere (benchmarks/tune_sets.py) is still there.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import imagesets as S
from serving import preprocess as pp
from training.checkpoint import load_checkpoint
from training.evaluate import scores, torch_predict
from training.model import AUGMENT_KNOBS
from training.presets import get
from training.train import RunOptions, fit

LIMIT = 8000  # MNIST training digits per run
EPOCHS = 3  # the last one without augmentation, as the presets do (clean_epochs 1)
SEED = 0
# Measured 2026-12-02 (EPYC, 2 cores, one thread; benchmarks/guard_seeds.py 8000 3 0 1 2 3 4):
# the recipe 93.8 / 90.4 / 91.9 / 90.8 / 92.3% on UCI, plain 89.0 / 83.6 / 85.5 / 88.9 / 83.9%,
# gains 4.7 / 6.8 / 6.4 / 1.8 / 8.4 points.  The test runs seed 0 (deterministic on one machine); a
# platform whose arithmetic differs behaves like another seed, so the bounds sit under every seed's:
FLOOR = 0.89  # the recipe's lowest was 90.4%
MARGIN = 0.01  # 18 of 1,797 digits; the smallest gain was 1.8 points.  Knobs that did nothing: 0


def read_uci(path) -> tuple[np.ndarray, np.ndarray]:
    """UCI's digits as 8x8 scans through the service's decoding: (pixels, labels)."""
    items = list(S.uci_set(path, "scan"))
    pixels, errors = pp.decode_many([b for b, _ in items])
    assert not any(errors)
    return pixels, np.array([label for _, label in items])


@pytest.fixture(scope="module")
def uci_scans() -> tuple[np.ndarray, np.ndarray]:
    path = S.uci_digits_path()
    if path is None:
        pytest.skip("UCI digits not fetched: run `python tests/uci.py` (make test does)")
    return read_uci(path)


def uci_accuracy(cfg, mnist, uci, out, seed: int = SEED, limit: int = LIMIT) -> float:
    """Train `cfg` on the first `limit` training digits and score its delivered net on UCI."""
    fit(cfg, RunOptions(out=out, device="cpu", seed=seed, limit_train=limit, plots=False, quiet=True), mnist)
    model, _ = load_checkpoint(out / "best.pt")
    model.eval()
    pixels, labels = uci
    return float((scores(torch_predict(model), pixels).argmax(1) == labels).mean())


def recipes(epochs: int = EPOCHS):
    """(the handwriting preset cut to `epochs`, the same with every augmentation knob at 0)."""
    recipe = get("handwriting", epochs=epochs)
    assert any(getattr(recipe, k) for k in AUGMENT_KNOBS)
    return recipe, dataclasses.replace(recipe, **dict.fromkeys(AUGMENT_KNOBS, 0.0))


def test_the_handwriting_recipe_beats_plain_training_on_uci(tmp_path, mnist, uci_scans):
    recipe, plain = recipes()
    ours = uci_accuracy(recipe, mnist, uci_scans, tmp_path / "recipe")
    base = uci_accuracy(plain, mnist, uci_scans, tmp_path / "plain")
    print(f"UCI 8x8 after {EPOCHS} epochs on {LIMIT:,} digits: handwriting {ours:.2%}, plain {base:.2%}")
    assert ours >= FLOOR
    assert ours - base >= MARGIN
