"""training/augment.py on real MNIST digits: each augmentation does what it says, the batch keeps its
shape and range, a seed gives the same batch, all knobs at 0 is the old affine augmentation, and
the knobs travel in the checkpoint's config."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training import augment as A
from training.checkpoint import load_checkpoint
from training.model import AUGMENT_KNOBS, Config
from training.presets import get
from training.train import RunOptions, fit

KNOBS = {"elastic": 1.5, "thickness": 0.25, "breaks": 0.1, "lowres": 0.25, "flags": 0.5, "blockscan": 0.2}


@pytest.fixture(scope="module")
def batch(mnist):
    x = torch.from_numpy(mnist.train_x[:256]).float().unsqueeze(1) / 255
    return x, torch.from_numpy(mnist.train_y[:256].astype(np.int64))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mass(x: torch.Tensor) -> torch.Tensor:
    return x.sum((1, 2, 3))


def test_the_batch_keeps_shape_dtype_range_and_a_seed_gives_the_same_batch(batch):
    x, y = batch
    cfg = get("default", **KNOBS)
    a = A.augment_batch(x.clone(), y, cfg, gen(0))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, A.augment_batch(x.clone(), y, cfg, gen(0)))
    assert not torch.equal(a, A.augment_batch(x.clone(), y, cfg, gen(1)))
    assert torch.equal(x, batch[0])  # the loader's batch is not written over


def test_all_knobs_at_zero_is_the_old_affine_augmentation(batch):
    x, y = batch
    affine_only = get("default", **dict.fromkeys(AUGMENT_KNOBS, 0.0))
    assert torch.equal(A.augment_batch(x, y, affine_only, gen(3)), A.random_affine(x, gen(3)))


def test_elastic_moves_ink_locally_and_keeps_most_of_it(batch):
    x, _ = batch
    plain, bent = A.random_affine(x, gen(5)), A.random_affine(x, gen(5), elastic=1.5)
    assert (plain - bent).abs().amax((1, 2, 3)).min() > 0.2  # every image changed somewhere
    ratio = mass(bent) / mass(plain)
    assert 0.8 < float(ratio.median()) < 1.2


def test_stroke_width_thins_the_first_half_and_thickens_the_rest(batch):
    x, _ = batch
    out = A.stroke_width(x.clone())
    h = len(x) // 2
    assert bool((mass(out[:h]) < 0.9 * mass(x[:h])).all())
    assert bool((mass(out[h:]) > 1.3 * mass(x[h:])).all())


def test_low_resolution_loses_detail_the_more_the_lower_and_keeps_full_contrast(batch):
    x, _ = batch

    def roughness(t):  # neighbour-to-neighbour change per unit of ink: detail that a low resolution loses
        edges = (t[..., 1:, :] - t[..., :-1, :]).abs().sum((1, 2, 3)) + (t[..., 1:] - t[..., :-1]).abs().sum((1, 2, 3))
        return edges / mass(t)

    out = A.low_resolution(x.clone())
    assert float((roughness(out) / roughness(x)).median()) < 0.9
    thirds = [slice(i * len(x) // 3, (i + 1) * len(x) // 3) for i in range(3)]  # LOWRES_SIZES, lowest first
    change = [float((out[s] - x[s]).abs().mean()) for s in thirds]
    assert change == sorted(change, reverse=True)
    assert torch.allclose(out.amax((1, 2, 3)), torch.ones(len(x)))


def test_block_scan_is_what_the_service_makes_of_an_8x8_block_count_scan(batch):
    # The same digits made into UCI-style 8x8 count images (benchmarks/tune_sets.py's uci_like,
    # the tuning set's maker) and brought up by the service's own pipeline (serving.photo).
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from tune_sets import uci_like
    from serving import photo
    x, _ = batch
    x = x[:64]
    served = torch.from_numpy(np.stack([
        photo.normalize((255 - uci_like((d[0] * 255).round().to(torch.uint8).numpy()) * 255).astype(np.uint8)
                        .astype(np.float32)) for d in x]) / 255).float().unsqueeze(1)
    out = A.block_scan(x.clone())
    assert out.shape == x.shape and float(out.min()) >= 0 and torch.allclose(out.amax((1, 2, 3)), torch.ones(len(x)))
    # Much closer to the served scan than the digit it came from, and centred as the service centres.
    assert float((out - served).abs().mean()) < 0.7 * float((x - served).abs().mean())
    idx = torch.arange(28.0)
    cy, cx = (out[:, 0].sum(2) * idx).sum(1) / mass(out), (out[:, 0].sum(1) * idx).sum(1) / mass(out)
    assert float((cy - 14).abs().max()) < 0.5 and float((cx - 14).abs().max()) < 0.5
    # A blank image stays blank.
    assert torch.equal(A.block_scan(torch.zeros(2, 1, 28, 28)), torch.zeros(2, 1, 28, 28))


def test_broken_strokes_only_take_ink_away_along_a_line(batch):
    x, _ = batch
    out = A.broken_strokes(x, torch.rand(len(x), 3, generator=gen(2)))
    assert bool((out <= x).all())
    assert float((mass(out) < mass(x)).float().mean()) > 0.6  # a line within 5 px of the centre crosses most digits
    assert float((mass(out) / mass(x)).min()) >= 1 - A.MAX_CUT - 1e-4  # a cut along a stroke is not made


def test_flags_go_on_ones_and_bars_on_sevens_only(batch):
    x, y = batch
    out = A.flags_and_bars(x, y, torch.rand(len(x), 4, generator=gen(4)))
    ours = (y == 1) | (y == 7)
    assert torch.equal(out[~ours], x[~ours])
    gained = mass(out[ours]) - mass(x[ours])
    assert bool((gained >= 0).all()) and float(gained.median()) > 3  # a stroke of a few pixels (some 7s had a bar)
    ones = out[y == 1] - x[y == 1]
    rows, cols = torch.arange(28.0).view(1, 28, 1), torch.arange(28.0).view(1, 1, 28)
    added = ones[:, 0].clamp_min(0)
    # The flag goes down-left from the 1's top: its ink lies in the upper half, left of the centre.
    cy = (added * rows).sum((1, 2)) / mass(ones.clamp_min(0))
    cx = (added * cols).sum((1, 2)) / mass(ones.clamp_min(0))
    assert float(cy.median()) < 13.5 and float(cx.median()) < 13.5


def test_knobs_are_checked_and_travel_in_the_checkpoint(tmp_path, mnist):
    with pytest.raises(ValueError, match="need augment 'affine'"):
        Config(lowres=0.2)
    with pytest.raises(ValueError, match="need shuffle"):
        Config(augment="affine", flags=0.5)
    for name, bad in (("elastic", -1.0), ("thickness", 1.5), ("lowres", float("nan"))):
        with pytest.raises(ValueError, match=f"{name} .* out of range"):
            get("default", **{name: bad})
    cfg = get("default", epochs=1, batch_size=64, **KNOBS)
    fit(cfg, RunOptions(out=tmp_path, device="cpu", limit_train=640, plots=False, quiet=True), mnist)
    _, ckpt = load_checkpoint(tmp_path / "best.pt")
    assert Config.from_dict(ckpt["config"]) == cfg
    older = Config.from_dict({k: v for k, v in cfg.to_dict().items() if k not in KNOBS})  # a config from before them
    assert all(getattr(older, k) == 0 for k in KNOBS)
