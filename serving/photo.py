"""MNIST's own normalisation for any picture of a digit: a scan, a photo, a drawing.

`normalize(gray)` takes a 2-D grayscale array (any size, either polarity) to uint8 [28, 28]
white-on-black: find the ink (polarity, background and shadows, threshold, stray blobs), cut it
out, bring slant and stroke width into MNIST's range, fit it into 20x20 keeping the aspect ratio
and put its centre of mass at the centre of 28x28.  Plain numpy and Pillow.  The contract and the
decoding around it are in `serving.preprocess`, which is what callers use.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from .contract import SIDE
from .errors import InvalidInput

BOX = 20  # MNIST's frame (contract.SIDE) ... in which the digit is fitted into 20x20 ...
CENTRE = SIDE // 2  # ... and put with its centre of mass here (row and column index, rounded)
WORK = 256  # longest side while finding the digit; the digit itself is cut out at up to 4x that
STROKE = 2.0  # MNIST's median stroke width in pixels (2 * area / perimeter of the ink >= 128)
SLANT = (-0.74, 0.52)  # MNIST's 1st..99th percentile of the shear moment mu11/mu02 (y down)
SMALL = 64  # images smaller than this are upsampled before thresholding (low-resolution scans)


def normalize(gray: np.ndarray, _refine: bool = True) -> np.ndarray:
    """2-D grayscale (any size, either polarity, float or uint8 0..255) -> uint8 [28, 28].

    Steps: shrink to a working size; turn the ink white (the side of the background, read on
    the border, that holds the extreme pixels is the ink); take away the background (shading,
    vignetting, shadows; on paper the ink is measured against the sheet's local brightness);
    Otsu splits ink from paper and a soft ramp keeps the
    stroke edges; small or stray connected blobs (dust, paper texture, a table edge) are
    dropped; the ink is cut out, its stroke width brought near MNIST's, fitted into 20x20
    keeping the aspect ratio and placed by centre of mass in 28x28."""
    g = np.asarray(gray, dtype=np.float32)
    if g.ndim != 2 or g.size == 0:
        raise InvalidInput(f"expected a 2-D grayscale image, got shape {g.shape}")
    upsampled = max(g.shape) < SMALL
    if upsampled:
        # A tiny scan (8x8, 16x16...): thresholding its few pixels would lose the grey levels that
        # carry the shape, so smooth it up first and treat it like any other picture.
        k = -(-2 * SMALL // max(g.shape))
        g = _resize(g, (g.shape[1] * k, g.shape[0] * k), Image.Resampling.BICUBIC)
    full = g
    scale = max(g.shape) / WORK
    if scale > 1:
        g = _resize(g, (max(1, round(g.shape[1] / scale)), max(1, round(g.shape[0] / scale))))
    else:
        scale = 1.0
    ink, paper = _ink_bright(g)
    v = _soft_threshold(_flatten(ink, _background(ink, upsampled), paper))
    box = _digit_box(v) if v is not None else None
    if box is None:
        return np.zeros((SIDE, SIDE), np.uint8)  # a blank page: nothing to centre
    y0, y1, x0, x1 = box
    if _refine and scale > 1 and max(y1 - y0, x1 - x0) < WORK / 4:
        # A small digit on a large photo: cut it out of the full-resolution image, with a margin
        # of paper around it, and normalise that (its background is then local too).
        m = max(y1 - y0, x1 - x0) // 2 + 2
        Y0, Y1 = int(max(0, (y0 - m) * scale)), int(min(full.shape[0], (y1 + m) * scale))
        X0, X1 = int(max(0, (x0 - m) * scale)), int(min(full.shape[1], (x1 + m) * scale))
        return normalize(full[Y0:Y1, X0:X1], _refine=False)
    return _fit(v[y0:y1, x0:x1])


def _resize(a: np.ndarray, size: tuple[int, int], resample=Image.Resampling.BOX) -> np.ndarray:
    """Float image resize through Pillow's 32-bit float mode (no rounding to uint8 on the way)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32), "F").resize(size, resample))


def _ink_bright(g: np.ndarray) -> tuple[np.ndarray, bool]:
    """(the picture with its ink bright, whether that meant inverting it)."""
    border = np.concatenate([g[0], g[-1], g[1:-1, 0], g[1:-1, -1]])
    back = float(np.median(border))
    # Dark ink on light paper (the usual photo or scan) has its extreme pixels below the paper.
    # Extreme enough that a small digit on a large, unevenly lit sheet still decides it.
    lo, hi = np.percentile(g, [0.05, 99.95])
    dark, light = back - lo, hi - back
    if min(g.shape) >= 48 and 0.5 < dark / max(light, 1e-3) < 2.0:
        dark, light = _stroke_votes(g)
    if dark > light:
        return 255.0 - g, True
    return g, False


def _stroke_votes(g: np.ndarray) -> tuple[float, float]:
    """(dark, light) votes for the ink's side when the border cannot tell (a shadow across it):
    the thin strong strokes on each side, found by a top-hat (what a k x k opening or closing
    removes) of the log picture and counted by area above half the stronger side's top
    contrast (its 99.99th percentile: a small digit on a large photo has few pixels).

    The log, since light falls on ink and paper alike: a stroke in a shadow then stands out
    from its paper as much as one in full light, and a shadow's edge less than either.  By
    area, and with the paper that one side's strokes enclose counted for that side: the inside
    of a 0's, 6's or 8's loop is a thin light stroke of the top-hat as strong as the ink around
    it, so by contrast alone the two sides tied and a shadow made it a coin toss (lost, the
    paper was read as ink).  Ink encloses the paper of its loops; paper does not enclose ink."""
    k = max(g.shape) // 10 | 1
    g = np.log(np.maximum(g, 0.0) + 16.0)  # (a resampled picture can undershoot 0 a little)
    light = g - _rank(_rank(g, k, np.minimum), k, np.maximum)
    dark = _rank(_rank(g, k, np.maximum), k, np.minimum) - g
    t = 0.5 * max(float(np.percentile(light, 99.99)), float(np.percentile(dark, 99.99)))
    dark, light = dark > t, light > t
    return (float(np.count_nonzero(dark) + np.count_nonzero(light & _holes(dark))),
            float(np.count_nonzero(light) + np.count_nonzero(dark & _holes(light))))


def _holes(mask: np.ndarray) -> np.ndarray:
    """The pixels outside `mask` that it encloses (not 4-connected to the picture's border)."""
    labels, boxes = _components(~mask, connectivity=4)
    h, w = mask.shape
    inner = np.array([True] + [y0 > 0 and x0 > 0 and y1 < h and x1 < w for y0, y1, x0, x1 in boxes])
    return inner[labels] & ~mask


def _flatten(ink: np.ndarray, back: np.ndarray | float, paper: bool) -> np.ndarray:
    """Take the background away.  Light falls on paper and ink alike, so on paper (`paper`: the
    picture was dark ink on a light sheet) the ink's strength is measured against the local
    brightness of the sheet, the same in a shadow as in full light."""
    flat = ink - back
    if paper and not np.isscalar(back):
        flat *= 255.0 / np.maximum(255.0 - back, 16.0)
    return flat


def _background(ink: np.ndarray, upsampled: bool) -> np.ndarray | float:
    """The background of an ink-bright picture.

    A low percentile over a coarse grid of blocks (robust to ink covering most of a block),
    smoothed and stretched back over the picture.  Being smooth, it would leave a hard shadow's
    edge (a phone or a hand over the page) in the picture as a band of false ink.  A grey-level
    opening (min then max over k x k) follows such edges and removes only what is thinner than
    k, the strokes; but it also takes strokes wider than k (a marker digit cropped tight) for
    background.  So the opening is used only where it differs from the grid over a large region
    that reaches the picture's edge (light and shadow come from outside the frame, ink does
    not), or where a region too wide to be a stroke stands above the grid (`_wide_shadow`)."""
    h, w = ink.shape
    n = 6
    if min(h, w) < 2 * n:
        return float(np.percentile(ink, 20))
    bh, bw = h // n, w // n  # the last few rows and columns are left out of the estimate
    blocks = ink[:bh * n, :bw * n].reshape(n, bh, n, bw).transpose(0, 2, 1, 3).reshape(n, n, -1)
    k = int(0.2 * (bh * bw - 1))
    grid = np.partition(blocks, k, axis=2)[:, :, k]
    if grid.max() - grid.min() < 1.0:
        return float(grid.min())  # flat background (a rendered image): nothing to model
    # A digit may still cover a whole block: take the darker of each block and its neighbours.
    pad = np.pad(grid, 1, mode="edge")
    grid = np.min([pad[dy:dy + n, dx:dx + n] for dy in range(3) for dx in range(3)], axis=0)
    smooth = _resize(grid, (w, h), Image.Resampling.BILINEAR)
    if min(h, w) < 48 or upsampled:
        return smooth  # a tiny scan: no shadow to follow
    k = max(h, w) // 10 | 1
    opened = None
    if grid.max() - grid.min() >= 16:  # unevenly lit: a shadow's edge along the border?
        opened = _rank(_rank(ink, k, np.minimum), k, np.maximum)
        differs = opened - smooth > 25
        edge = np.concatenate([differs[0], differs[-1], differs[:, 0], differs[:, -1]])
        if differs.mean() > 0.08 and edge.mean() > 0.1:
            return opened
    if _wide_shadow(ink, grid, 3 * k):
        return opened if opened is not None else _rank(_rank(ink, k, np.minimum), k, np.maximum)
    return smooth


def _wide_shadow(ink: np.ndarray, grid: np.ndarray, k: int) -> bool:
    """Whether a region of the ink-bright picture at least k wide and running from one side of
    the picture to another stands above the grid's background over a twentieth of the picture:
    a shadow the border test above misses.  The grid takes each block's darkest neighbour, so a
    shadow over a corner or a strip of the sheet (the minority of the blocks) vanishes from it,
    or its edge runs along border blocks that lie all in the shadow; left as background, its
    edge became a band of false ink, often heavier than the digit.  With k three times the
    opening's no stroke survives this opening, except one along the picture's edge (the edge is
    repeated outward): such a stroke touches one side, a shadow over a corner or a strip two or
    more (light and shadow come from outside the frame).  At a quarter of the size: it only
    has to find a wide region."""
    h, w = ink.shape
    size = (max(1, w // 4), max(1, h // 4))
    small = _rank(_rank(_resize(ink, size), k // 4 | 1, np.minimum), k // 4 | 1, np.maximum)
    raised = small - _resize(grid, size, Image.Resampling.BILINEAR) > 25
    if raised.mean() <= 0.05:
        return False
    labels, boxes = _components(raised)
    sh, sw = raised.shape
    sides = np.array([0] + [(y0 == 0) + (x0 == 0) + (y1 == sh) + (x1 == sw) for y0, y1, x0, x1 in boxes])
    return bool((sides[labels] >= 2).mean() > 0.05)


def _rank(a: np.ndarray, k: int, op) -> np.ndarray:
    """k x k min or max filter (op: np.minimum or np.maximum), edges padded, separable; van Herk /
    Gil-Werman running extremes, so the cost does not grow with k."""
    for axis in (0, 1):
        a = _run(np.moveaxis(a, axis, -1), k, op)
        a = np.moveaxis(a, -1, axis)
    return a


def _run(a: np.ndarray, k: int, op) -> np.ndarray:
    n, r = a.shape[-1], k // 2
    length = n + 2 * r
    m = -(-length // k) * k
    a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(r, m - n - r)], mode="edge")
    blocks = a.reshape(*a.shape[:-1], m // k, k)
    prefix = op.accumulate(blocks, axis=-1).reshape(a.shape)
    suffix = op.accumulate(blocks[..., ::-1], axis=-1)[..., ::-1].reshape(a.shape)
    return op(suffix[..., :length - k + 1], prefix[..., k - 1:length])


def _soft_threshold(ink: np.ndarray) -> np.ndarray | None:
    """Otsu's threshold separates ink from paper; below the paper's noise is 0, at the ink's
    typical level is 1, and a linear ramp between keeps anti-aliased edges.  None if blank."""
    q = np.clip(ink, 0, 255).astype(np.uint8)
    hist = np.bincount(q.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    t = int(np.argmax(between))
    # Otsu splits badly when the ink is a tiny fraction of the picture (a small digit on a page):
    # it cuts into the paper's own noise.  The paper's level (the histogram's peak) and its noise
    # (measured on the dark side of the peak, where no ink is) put a floor under the threshold.
    peak = int(np.argmax(np.convolve(hist, [1.0, 2.0, 1.0], "same")[:t + 1]))  # paper is the dark class
    left = ink[ink <= peak]
    sigma = float(np.sqrt(np.mean((left - peak) ** 2))) if left.size > 16 else 0.0
    t = max(t, int(min(peak + 5 * sigma, 254)))
    back, fore = q[q <= t], q[q > t]
    if fore.size == 0 or back.size == 0:
        return None
    floor = float(np.percentile(back, 99))
    top = float(np.percentile(fore, 90))
    # Too little contrast to be ink (a blank sheet, pure noise): report nothing found.
    if top - floor < 24 or fore.size < 4:
        return None
    return np.clip((ink - floor) / (top - floor), 0.0, 1.0)


def _components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, list[list[int]]]:
    """8- (or 4-) connected components by union-find over horizontal runs (a digit has a few
    runs a row, so the Python loop is short).  Returns (labels, boxes): label 0 is background,
    label c has bounding box boxes[c - 1] = [y0, y1, x0, x1]."""
    diag = int(connectivity == 8)  # runs [cs, ce) in rows next to each other touch at a corner
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rs, cs = np.nonzero(d == 1)
    _, ce = np.nonzero(d == -1)  # same row order: every run starts and ends in its row
    parent = list(range(len(rs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev_lo = prev_hi = 0  # runs of the row above: indices [prev_lo, prev_hi)
    i = 0
    while i < len(rs):
        row = rs[i]
        j = i
        while j < len(rs) and rs[j] == row:
            j += 1
        if prev_hi > prev_lo and rs[prev_lo] == row - 1:
            k = prev_lo
            for r in range(i, j):
                while k < prev_hi and ce[k] + diag <= cs[r]:  # run above ends before this one starts
                    k += 1
                kk = k
                while kk < prev_hi and cs[kk] < ce[r] + diag:
                    a, b = find(r), find(kk)
                    if a != b:
                        parent[a] = b
                    kk += 1
        prev_lo, prev_hi = i, j
        i = j
    roots = [find(r) for r in range(len(rs))]
    uniq = {r: n + 1 for n, r in enumerate(dict.fromkeys(roots))}
    labels = np.zeros((h, w), np.int32)
    boxes = [[h, 0, w, 0] for _ in uniq]  # y0, y1, x0, x1 per label
    for r, root in enumerate(roots):
        c = uniq[root]
        y, x0, x1 = int(rs[r]), int(cs[r]), int(ce[r])
        labels[y, x0:x1] = c
        b = boxes[c - 1]
        b[0], b[1], b[2], b[3] = min(b[0], y), max(b[1], y + 1), min(b[2], x0), max(b[3], x1)
    return labels, boxes


def _digit_box(v: np.ndarray) -> tuple[int, int, int, int] | None:
    """The bounding box of the digit's blobs in the soft ink map, or None.  Blobs that are tiny
    next to the biggest, far from it, or that run along the image border are dropped; the
    pixels of dropped blobs are zeroed in `v`."""
    mask = v > 0.5
    if not mask.any():
        return None
    labels, boxes = _components(mask)
    n = len(boxes)
    h, w = mask.shape
    mass = np.bincount(labels.ravel(), weights=v.ravel(), minlength=n + 1)
    mass[0] = 0
    if n > 1:
        # A blob that runs along the border (most of its ink in the outer band, spanning most of a
        # side) is the paper's edge, the table or a shadow, not a tightly cropped digit.
        b = max(2, int(0.1 * min(h, w)))
        band = np.ones((h, w), bool)
        band[b:h - b, b:w - b] = False
        in_band = np.bincount(labels[band], weights=v[band], minlength=n + 1)
        for c, (y0, y1, x0, x1) in enumerate(boxes, 1):
            long = y1 - y0 > 0.8 * h or x1 - x0 > 0.8 * w
            if long and in_band[c] > 0.5 * mass[c] and mass[c] < mass.sum():
                mass[c] = 0
    _drop_frames(labels, boxes, mass)
    if mass.max() <= 0:  # everything looked like an edge or a frame: a digit cropped tight after all
        mass = np.bincount(labels.ravel(), weights=v.ravel(), minlength=n + 1)
        mass[0] = 0
    main = int(np.argmax(mass))
    if mass[main] <= 0:
        return None
    my0, my1, mx0, mx1 = boxes[main - 1]
    reach = 0.3 * max(my1 - my0, mx1 - mx0)
    keep = np.zeros(n + 1, bool)
    for c, (y0, y1, x0, x1) in enumerate(boxes, 1):
        if mass[c] < 0.02 * mass[main]:
            continue
        gap = max(my0 - y1, y0 - my1, mx0 - x1, x0 - mx1, 0)
        if c == main or gap <= reach or mass[c] >= 0.3 * mass[main]:
            keep[c] = True
    kept = keep[labels]
    ys, xs = np.nonzero(kept)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    # Soft edge pixels (v <= 0.5) of kept blobs stay; everything of dropped blobs goes.
    v[(labels > 0) & ~kept] = 0.0
    # Include the soft rim around the kept ink: grow the box by one pixel where there is ink.
    y0, x0 = max(0, y0 - 1), max(0, x0 - 1)
    y1, x1 = min(h, y1 + 1), min(w, x1 + 1)
    sub = v[y0:y1, x0:x1] > 0.05
    if not sub.any():
        return None
    r, c = np.nonzero(sub.any(1))[0], np.nonzero(sub.any(0))[0]
    return y0 + r[0], y0 + r[-1] + 1, x0 + c[0], x0 + c[-1] + 1


def _drop_frames(labels: np.ndarray, boxes: list[list[int]], mass: np.ndarray) -> None:
    """A box drawn around the digit (a form's field, a frame) is a big blob whose ink lies along
    its own bounding box and that holds other blobs inside: not the digit.  Its mass goes to 0."""
    for c, (y0, y1, x0, x1) in enumerate(boxes, 1):
        bh, bw = y1 - y0, x1 - x0
        if mass[c] <= 0 or min(bh, bw) < 12:
            continue
        b = max(2, int(0.12 * min(bh, bw)))
        ys, xs = np.nonzero(labels[y0:y1, x0:x1] == c)
        inner = (ys >= b) & (ys < bh - b) & (xs >= b) & (xs < bw - b)
        if inner.mean() > 0.1:
            continue  # ink inside its own box: a digit (a 0, an 8...), not a frame
        enclosed = sum(mass[d] for d, (v0, v1, u0, u1) in enumerate(boxes, 1)
                       if d != c and v0 >= y0 and v1 <= y1 and u0 >= x0 and u1 <= x1)
        if enclosed >= 0.1 * mass[c]:
            mass[c] = 0.0


def _stroke_width(v: np.ndarray) -> float:
    m = v > 0.5
    area = m.sum()
    perim = (m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum() + 2 * (m[0].sum() + m[-1].sum()
                                                                             + m[:, 0].sum() + m[:, -1].sum())
    return 2.0 * area / perim if perim else 0.0


def _trim(a: np.ndarray, level: float) -> np.ndarray:
    rows, cols = np.nonzero((a > level).any(1))[0], np.nonzero((a > level).any(0))[0]
    if rows.size == 0:
        return a
    return a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _deslant(crop: np.ndarray) -> np.ndarray:
    """Shear a digit slanted further than MNIST's writers ever do (the 1st..99th percentile of
    MNIST's shear moment mu11/mu02 is -0.74..0.52) back to the edge of that range."""
    h, w = crop.shape
    mass = crop.sum()
    if mass <= 0 or h < 3:
        return crop
    iy, ix = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    cy, cx = (crop.sum(1) @ iy) / mass, (crop.sum(0) @ ix) / mass
    dy = iy - cy
    mu02 = float(crop.sum(1) @ (dy * dy))
    mu11 = float(dy @ crop @ (ix - cx))
    skew = mu11 / mu02 if mu02 > 0 else 0.0
    excess = skew - np.clip(skew, *SLANT)
    if abs(excess) < 0.05:
        return crop
    # Output pixel (x, y) reads input (x + excess * (y - cy) - shift, y): slant reduced by `excess`.
    pad = int(np.ceil(abs(excess) * h)) + 1
    shift = pad / 2
    im = Image.fromarray(np.ascontiguousarray(crop, np.float32), "F")
    out = im.transform((w + pad, h), Image.Transform.AFFINE,
                       (1.0, excess, -excess * cy - shift, 0.0, 1.0, 0.0), Image.Resampling.BILINEAR)
    return _trim(np.asarray(out), 0.02)


def _fit(crop: np.ndarray) -> np.ndarray:
    """The cut-out ink (soft, 0..1) -> uint8 [28, 28]: slant and stroke width brought into MNIST's
    range, longest side 20 keeping the aspect ratio, centre of mass at (14, 14)."""
    crop = _deslant(crop)
    h, w = crop.shape
    f = BOX / max(h, w)
    width = _stroke_width(crop) * f  # in pixels of the final 20x20 box
    if width < 0.75 * STROKE or width > 2.0 * STROKE:
        # Re-draw at 4x the final size, where a 3x3 max (min) filter widens (narrows) strokes by
        # half a final pixel, so a hairline pen or a felt marker ends up like MNIST's pen.
        k = 4
        big = _resize(crop, (max(1, round(w * f * k)), max(1, round(h * f * k))), Image.Resampling.BILINEAR)
        thin = width < STROKE
        steps = min(8, int(round(((STROKE - width) if thin else (width - 1.5 * STROKE)) / 0.5)))
        im = Image.fromarray(np.pad(big, steps + 1), "F")  # room to grow
        for _ in range(steps):
            im = im.filter(ImageFilter.MaxFilter(3) if thin else ImageFilter.MinFilter(3))
        crop = _trim(np.asarray(im), 0.02 * float(big.max()))
        h, w = crop.shape
        f = BOX / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    if size != (w, h):
        crop = _resize(crop, size, Image.Resampling.BOX if f < 1 else Image.Resampling.BICUBIC)
    crop = np.clip(crop, 0.0, None)
    top = float(crop.max())
    if top <= 0:
        return np.zeros((SIDE, SIDE), np.uint8)
    crop = crop * (255.0 / top)
    mass = crop.sum()
    cy = float(crop.sum(1) @ np.arange(crop.shape[0])) / mass
    cx = float(crop.sum(0) @ np.arange(crop.shape[1])) / mass
    oy = int(np.clip(np.floor(CENTRE - cy + 0.5), 0, SIDE - crop.shape[0]))
    ox = int(np.clip(np.floor(CENTRE - cx + 0.5), 0, SIDE - crop.shape[1]))
    out = np.zeros((SIDE, SIDE), np.uint8)
    out[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = np.round(crop).astype(np.uint8)
    return out
