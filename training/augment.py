"""Batched training augmentation on the device: what preprocessing cannot undo must come from training.

`augment_batch` takes a batch of MNIST images (float [N, 1, 28, 28] in [0, 1]) and returns
the same batch distorted the way real handwriting differs from MNIST's, every step a few
tensor operations with no per-image Python and no host round trip (the random numbers come
from the run's augmentation generator, on the device on CUDA):

- flags (before the warp, so the warp bends them too): with probability `cfg.flags` a 1 gets
  a European flag (a stroke down-left from its top) and a 7 a bar across its stem;
- one `grid_sample` for the random affine map (rotation, scale, shear, shift) plus, with
  `cfg.elastic` > 0, an elastic displacement (Simard et al. 2003): a coarse 4x4 field of
  random offsets, upsampled bicubically (one matmul) and added to the affine grid;
- stroke width (`cfg.thickness`): a thinner (2x2 min-pool) or thicker (3x3 max-pool) pen;
- broken strokes (`cfg.breaks`): a thin gap cut across the digit along a random line;
- low resolution (`cfg.lowres`): averaged down to 8-13 px, quantised to 17 grey levels like
  UCI's 8x8 counts, brought back up bicubically and soft-thresholded, as the photo pipeline
  turns an 8x8 scan into a 20x20 digit;
- block-count scans (`cfg.blockscan`): the digit made the way UCI's 8x8 digits were (binarised,
  its bounding box fitted into 32x32, "on" pixels counted in 4x4 blocks), then brought back the
  way serving.photo brings up a tiny scan (smoothed up, soft-thresholded, cut out, fitted into
  20x20 and centred by its centre of mass): the loops an 8x8 grid closes or loses.

Every knob at 0 gives exactly the old `affine` augmentation (the same random draws), so old
configs, which lack these fields, train as they did.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from serving.contract import SIDE
from serving.photo import BOX

from .model import AUGMENT_KNOBS

LOWRES_SIZES = (8, 10, 13)  # the digit's 20 px box becomes 6-9 px: UCI's 8x8, a 10-16 px scan
LOWRES_RAMP = (0.35, 0.7)  # brightness (of the brightest) from which a pixel is ink, and where it is full ink
LOWRES_LEVELS = 16  # UCI pixels count 0..16 "on" pixels of a 4x4 block
MAX_CUT = 0.3  # a broken stroke takes at most this share of a digit's ink
ELASTIC_GRID = 4  # the coarse displacement field's side: one offset every ~9 px
BLOCKS = 8  # a block-count scan's side in blocks ...
BLOCK = 4  # ... of this many binary pixels a side (UCI: 32x32 bitmaps counted in 4x4 blocks)
BLOCK_UP = 5  # the count image smoothed up this many times (40x40) before it is thresholded


def _rand(gen: torch.Generator, device: torch.device, *shape: int) -> torch.Tensor:
    """Uniform [0, 1) numbers from the augmentation generator, moved to the batch's device."""
    return torch.rand(*shape, generator=gen, device=gen.device).to(device)


def _affine_theta(r: torch.Tensor) -> torch.Tensor:
    """The old random affine: rotation +-10 deg, scale 0.9-1.1, shear +-0.15, shift +-2 px, from r in [-1, 1]."""
    angle = r[:, 0] * math.radians(10)
    scale = 1 + 0.1 * r[:, 1]
    shear = r[:, 2] * 0.15
    tx, ty = r[:, 3] * (2 / 14), r[:, 4] * (2 / 14)  # grid units: 14 px per unit
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


_UPSAMPLE: dict[torch.device, torch.Tensor] = {}


def _upsample_matrix(device: torch.device) -> torch.Tensor:
    """[G*G, 28*28]: bicubic upsampling of a GxG field as one matrix, so a batch's fields are one
    matmul (a tenth of the time F.interpolate takes on small CPU batches)."""
    if device not in _UPSAMPLE:
        eye = torch.eye(ELASTIC_GRID ** 2, device=device).view(-1, 1, ELASTIC_GRID, ELASTIC_GRID)
        _UPSAMPLE[device] = F.interpolate(eye, size=(SIDE, SIDE), mode="bicubic", align_corners=True).flatten(1)
    return _UPSAMPLE[device]


def random_affine(x: torch.Tensor, gen: torch.Generator, elastic: float = 0.0) -> torch.Tensor:
    """Batched random affine map, plus an elastic displacement of `elastic` px (std) when > 0: one grid_sample."""
    n = x.shape[0]
    theta = _affine_theta(_rand(gen, x.device, n, 5) * 2 - 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if elastic > 0:
        coarse = torch.randn(n * 2, ELASTIC_GRID ** 2, generator=gen, device=gen.device).to(x.device)
        field = (coarse * (elastic / 14)) @ _upsample_matrix(x.device)  # grid units: 14 px per unit
        grid = grid + field.view(n, 2, SIDE, SIDE).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def stroke_width(x: torch.Tensor) -> torch.Tensor:
    """A thinner pen (2x2 min-pool) for the first half of x, a marker (3x3 max-pool) for the rest, in place."""
    h = x.shape[0] // 2
    x[:h] = -F.max_pool2d(F.pad(-x[:h], (0, 1, 0, 1)), 2, 1)
    x[h:] = F.max_pool2d(x[h:], 3, 1, 1)
    return x


def low_resolution(x: torch.Tensor) -> torch.Tensor:
    """Each of LOWRES_SIZES for a share of x: area-averaged down, quantised, bicubic back up and
    soft-thresholded (LOWRES_RAMP) as the photo pipeline does; in place."""
    n, k = x.shape[0], len(LOWRES_SIZES)
    for i, s in enumerate(LOWRES_SIZES):
        a, b = i * n // k, (i + 1) * n // k
        if b > a:
            small = F.adaptive_avg_pool2d(x[a:b], s).mul_(LOWRES_LEVELS).round_().div_(LOWRES_LEVELS)
            up = F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False)
            up = up / up.amax((2, 3), keepdim=True).clamp_min(1e-3)
            # The photo pipeline (serving/photo.py) smooths a tiny scan up and splits ink from paper
            # with a soft threshold: crisp, blocky strokes rather than a blur.
            x[a:b] = ((up - LOWRES_RAMP[0]) / (LOWRES_RAMP[1] - LOWRES_RAMP[0])).clamp_(0, 1)
    return x


def _bounds(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a bool [N, 1, H, W]: the bounding box's centre (x, y) in pixels ([N, 2]), its longest
    side in pixels ([N]) and whether there is anything at all ([N])."""
    rows, cols = mask[:, 0].any(2), mask[:, 0].any(1)
    h, w = rows.shape[1], cols.shape[1]
    top, bottom = rows.float().argmax(1), h - 1 - rows.flip(1).float().argmax(1)
    left, right = cols.float().argmax(1), w - 1 - cols.flip(1).float().argmax(1)
    centre = torch.stack([(left + right) / 2, (top + bottom) / 2], 1).float()
    side = torch.maximum(bottom - top, right - left).float() + 1
    return centre, side, rows.any(1)


def _crop_theta(centre: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    """affine_grid's theta (align_corners=False) reading an output whose [-1, 1] spans `scale`
    input pixels around `centre` ([N, 2] pixels) of a size x size input."""
    t = (2 * centre + 1) / size - 1
    zero = torch.zeros_like(scale)
    k = scale / size
    return torch.stack([torch.stack([k, zero, t[:, 0]], 1), torch.stack([zero, k, t[:, 1]], 1)], 1)


def block_scan(x: torch.Tensor) -> torch.Tensor:
    """UCI's 8x8 digits as the service sees them, for each image of x (in place).

    Made as UCI's were: ink above half binarised, the digit's bounding box fitted into a
    BLOCKS*BLOCK square (aspect kept), the "on" pixels counted in BLOCK x BLOCK blocks.  Brought
    back as serving.photo brings back a tiny scan: smoothed up bicubically, soft-thresholded
    (LOWRES_RAMP), the ink's box fitted into 20x20 (box-averaged down from twice the size) with
    its centre of mass at the frame's centre.  Images with no ink are left as they are."""
    n, side = x.shape[0], x.shape[-1]
    centre, longest, some = _bounds(x > 0.5)
    fine = BLOCKS * BLOCK
    # Pixel edges: the box spans `longest` pixels; the fine bitmap's edge is the box's edge.
    grid = F.affine_grid(_crop_theta(centre, longest, side), [n, 1, fine, fine], align_corners=False)
    bits = (F.grid_sample(x, grid, align_corners=False) > 0.5).float()
    counts = F.avg_pool2d(bits, BLOCK)  # 0, 1/16 ... 1: UCI's 0..16
    up = F.interpolate(counts, scale_factor=BLOCK_UP, mode="bicubic", align_corners=False)
    up = up / up.amax((2, 3), keepdim=True).clamp_min(1e-3)
    v = ((up - LOWRES_RAMP[0]) / (LOWRES_RAMP[1] - LOWRES_RAMP[0])).clamp_(0, 1)
    size = v.shape[-1]
    _, longest_v, some_v = _bounds(v > 0.05)
    mass = v.sum((1, 2, 3)).clamp_min(1e-6)
    idx = torch.arange(size, device=x.device, dtype=v.dtype)
    com = torch.stack([(v.sum(2)[:, 0] * idx).sum(1), (v.sum(3)[:, 0] * idx).sum(1)], 1) / mass.view(-1, 1)
    # Output at twice the size, then 2x2 averaged (a box filter, as serving.photo's fit): the ink's
    # longest side becomes 2 * BOX pixels of the doubled frame and the centre of mass lands on pixel centre_px.
    centre_px = side // 2
    r = longest_v / (2 * BOX)  # input pixels per output pixel of the doubled frame
    # The doubled frame's pixel index q <-> input pixel com + (q - (2 * centre_px + 0.5)) * r; the frame's
    # centre (index side - 0.5) is then input pixel com + (side - 1 - 2 * centre_px) * r.
    mid = com + ((side - 0.5) - (2 * centre_px + 0.5)) * r.view(-1, 1)
    grid = F.affine_grid(_crop_theta(mid, r * 2 * side, size), [n, 1, 2 * side, 2 * side], align_corners=False)
    out = F.avg_pool2d(F.grid_sample(v, grid, align_corners=False, padding_mode="zeros"), 2)
    out = out / out.amax((2, 3), keepdim=True).clamp_min(1e-3)
    keep = (some & some_v).view(-1, 1, 1, 1)
    x.copy_(torch.where(keep, out, x))
    return x


def _coords(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres' (x, y), each [1, 28, 28]."""
    idx = torch.arange(SIDE, device=device, dtype=torch.float32)
    return idx.view(1, 1, SIDE).expand(1, SIDE, SIDE), idx.view(1, SIDE, 1).expand(1, SIDE, SIDE)


def segment_ink(a: torch.Tensor, b: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Anti-aliased ink [N, 1, 28, 28] of the segments from a to b ([N, 2] pixel (x, y)), `width` px wide."""
    px, py = _coords(a.device)
    ax, ay, dx, dy = (v.view(-1, 1, 1) for v in (a[:, 0], a[:, 1], b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]))
    t = (((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp(0, 1)
    dist = torch.hypot(px - ax - t * dx, py - ay - t * dy)
    return (width.view(-1, 1, 1) / 2 + 0.5 - dist).clamp(0, 1).unsqueeze(1)


def broken_strokes(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A 1-2.5 px gap along a random line within 5 px of the centre (r: [N, 3] uniform); where the
    line runs along a stroke (a 1 cut lengthwise) and takes more than MAX_CUT of the ink, none."""
    px, py = _coords(x.device)
    angle = r[:, 0] * math.pi
    c = (SIDE - 1) / 2 + (r[:, 1] * 2 - 1) * 5
    half = (1 + 1.5 * r[:, 2]).view(-1, 1, 1) / 2
    dist = ((px - c.view(-1, 1, 1)) * torch.sin(angle).view(-1, 1, 1)
            - (py - c.view(-1, 1, 1)) * torch.cos(angle).view(-1, 1, 1)).abs()
    cut = x * (dist - half).clamp(0, 1).unsqueeze(1)
    kept = cut.sum((1, 2, 3)) >= (1 - MAX_CUT) * x.sum((1, 2, 3))
    return torch.where(kept.view(-1, 1, 1, 1), cut, x)


def flags_and_bars(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """European forms (r: [N, 4] uniform): a 1 gets a flag, a stroke 4-9 px long 25-60 deg
    below the horizontal, down-left from its topmost ink; a 7 a bar, 6-10 px, across its stem at
    rows 13-17 (the stem's column there: the mean of that row's ink)."""
    n = x.shape[0]
    ink = x[:, 0] > 0.5
    rows = ink.any(2)
    top = rows.float().argmax(1)  # the first row with ink (0 if none: such an image gets nothing drawn)
    cols = torch.arange(SIDE, device=x.device, dtype=torch.float32)
    top_row = x[torch.arange(n, device=x.device), 0, top]  # [N, 28]
    top_x = (top_row * cols).sum(1) / top_row.sum(1).clamp_min(1e-6)
    length, angle = 4 + 5 * r[:, 0], math.radians(25) + math.radians(35) * r[:, 1]
    start = torch.stack([top_x, top.float()], 1)
    flag = segment_ink(start, start + torch.stack([-length * torch.cos(angle), length * torch.sin(angle)], 1),
                       1.5 + r[:, 2])
    bar_y = 13 + 4 * r[:, 3]
    bar_row = x[torch.arange(n, device=x.device), 0, bar_y.long()]
    bar_x = (bar_row * cols).sum(1) / bar_row.sum(1).clamp_min(1e-6)
    half = 3 + 2 * r[:, 0]
    tilt = (r[:, 1] - 0.5) * 2  # +-1 px from one end to the other
    bar = segment_ink(torch.stack([bar_x - half, bar_y + tilt], 1), torch.stack([bar_x + half, bar_y - tilt], 1),
                      1.5 + r[:, 2])
    drawn = torch.where((y == 1).view(-1, 1, 1, 1), flag, torch.where((y == 7).view(-1, 1, 1, 1), bar, 0))
    return torch.maximum(x, drawn)  # other digits: nothing drawn


def augment_batch(x: torch.Tensor, y: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """The config's augmentation of one batch (cfg: model.Config; its knobs are documented there).

    The batch comes in a random order (the loader shuffles), so a knob's share of it is a slice:
    `thickness` of the images from the front, `breaks` the next, `lowres` from the back, `flags`
    the 1s and 7s among the front ones.  Slices cost in proportion to what they change and need
    no per-image selection (a data-dependent index would wait for the GPU)."""
    n = x.shape[0]
    k = {name: round(getattr(cfg, name) * n) for name in AUGMENT_KNOBS if name != "elastic"}  # shares of the batch
    if k["flags"]:
        x = x.clone()
        x[:k["flags"]] = flags_and_bars(x[:k["flags"]], y[:k["flags"]], _rand(gen, x.device, k["flags"], 4))
    x = random_affine(x, gen, cfg.elastic)
    if k["thickness"]:
        x[:k["thickness"]] = stroke_width(x[:k["thickness"]])
    if k["breaks"]:
        a, b = k["thickness"], k["thickness"] + k["breaks"]
        x[a:b] = broken_strokes(x[a:b], _rand(gen, x.device, b - a, 3))
    if k["lowres"]:
        x[n - k["lowres"]:] = low_resolution(x[n - k["lowres"]:])
    if k["blockscan"]:
        b = n - k["lowres"]
        a = max(0, b - k["blockscan"])
        if b > a:
            x[a:b] = block_scan(x[a:b])
    return x
