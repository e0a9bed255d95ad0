"""serving/preprocess.py: decoding (formats, modes, limits, errors) and MNIST's normalisation on
real-world-looking images, judged by the exported model's answers."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

import imagesets as S
from serving import photo
from serving import preprocess as pp
from serving.errors import InvalidInput, Overloaded, TooLarge


def png(a: np.ndarray) -> bytes:
    return S.encode(Image.fromarray(a))


def accuracy(predict, items) -> float:
    """The share of (file, label) items the model gets right; every file must decode."""
    pixels, errors = pp.decode_many([b for b, _ in items])
    assert all(e is None for e in errors), [e for e in errors if e][:3]
    y = np.array([label for _, label in items])
    return float(np.mean(predict(pixels) == y))


# ---- the contract ----

def test_pixels_to_input_contract():
    x = pp.pixels_to_input(np.array([[0, 255] * 392], np.uint8))
    assert x.shape == (1, 1, 28, 28) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    with pytest.raises(InvalidInput, match="uint8"):
        pp.pixels_to_input(np.zeros((1, 784), np.float32))
    with pytest.raises(InvalidInput, match="multiple of 784"):
        pp.pixels_to_input(np.zeros(783, np.uint8))


def test_mnist_pngs_decode_to_their_own_pixels(mnist):
    """MNIST-format files (our demo samples) come back exactly: already normalised, left alone."""
    x = mnist.test_x[:300]
    blobs = [png(a) for a in x]
    assert all(np.array_equal(pp.decode_image(b), a) for b, a in zip(blobs[:50], x))
    pixels, errors = pp.decode_many(blobs)
    assert errors == [None] * 300
    assert np.array_equal(pixels, x)


def test_normalisation_is_mnists_own(mnist, predict):
    """The full pipeline on MNIST digits (forced past the fast path) keeps the model's accuracy:
    what it does is what MNIST did (fit 20x20, centre of mass at the centre)."""
    x, y = mnist.test_x[:1000], mnist.test_y[:1000]
    again = np.stack([pp.normalize(a) for a in x])
    assert again.shape == x.shape and again.dtype == np.uint8
    before, after = predict(x), predict(again)
    print(f"renormalised: accuracy {np.mean(after == y):.1%} (was {np.mean(before == y):.1%}), "
          f"same answer as before on {np.mean(after == before):.1%}")
    assert np.mean(after == y) >= np.mean(before == y) - 0.005
    # The same digits, not just as many right.  The test model (random features, not a CNN) is
    # touchy about a pixel's shift, so a few of its answers change; a pipeline that misplaced or
    # mis-scaled the digit would change most of them.
    assert np.mean(after == before) >= 0.93
    rows, cols = again.any(2), again.any(1)
    longest = np.maximum(rows.sum(1), cols.sum(1))
    assert np.percentile(longest, 5) >= 19 and longest.max() <= 22
    m = again.astype(float)
    cy = (m.sum(2) @ np.arange(28)) / m.sum((1, 2))
    assert abs(np.median(cy) - 14) <= 0.5


# ---- photos and scans made from MNIST digits ----

def test_real_world_variants_of_mnist_digits(mnist, predict):
    """MNIST test digits dressed as the files people send (inverted, scaled up, off-centre, in
    colour, JPEG, photographed) come back as the digits the model reads in the originals.

    The issue's bar (97% of 1,000 right, with the trained network) is for that network and is
    measured by benchmarks/preprocess_report.py; the test model here (random features, weaker) is
    held to its own answers on the clean digits."""
    x, y = mnist.test_x, mnist.test_y
    per_kind = 1000 // len(S.MNIST_KINDS) + 1
    agree, right, clean_right = {}, {}, {}
    for k, kind in enumerate(S.MNIST_KINDS):
        sl = slice(1000 + k * per_kind, 1000 + (k + 1) * per_kind)
        items = S.mnist_set(x[sl], y[sl], kind, per_kind, seed=k)
        pixels, errors = pp.decode_many([b for b, _ in items])
        assert errors == [None] * len(items), kind
        got, clean = predict(pixels), predict(x[sl])
        agree[kind], right[kind] = np.mean(got == clean), np.mean(got == y[sl])
        clean_right[kind] = np.mean(clean == y[sl])
    overall, clean_overall = np.mean(list(right.values())), np.mean(list(clean_right.values()))
    print("MNIST digits as files, same answer as on the clean digit:", {k: f"{v:.1%}" for k, v in agree.items()},
          f"accuracy {overall:.1%} (clean {clean_overall:.1%})")
    assert overall >= clean_overall - 0.02
    assert min(agree.values()) >= 0.88, agree


# ---- digits that never came from MNIST ----

@pytest.mark.parametrize("kind,floor", [("clean", 0.85), ("thin", 0.85), ("thick", 0.85),
                                        ("lowres", 0.85), ("photo", 0.85)])
def test_synthetic_pen_digits(predict, kind, floor):
    """A jittery synthetic pen (random style, slant, width), dark on paper.  The floors sit well
    below what the pipeline reaches (README table); '1' written with a long flag reads as 7 to a
    model that learned MNIST's American ones."""
    acc = accuracy(predict, S.pen_set(200, kind, seed=7))
    print(f"pen-{kind}: {acc:.1%}")
    assert acc >= floor


@pytest.mark.parametrize("kind", S.PAPER_KINDS)
def test_harder_sheet_photos(mnist, predict, kind):
    """Pencil, ruled and squared paper, a hard shadow, a form's box, a tilted camera, JPEG at
    quality 20: MNIST's digits and the synthetic pen's, 60 of each."""
    items = S.paper_set(kind, 60, mnist.test_x[3000:], mnist.test_y[3000:], seed=8) + S.paper_set(kind, 60, seed=9)
    acc = accuracy(predict, items)
    print(f"sheet photo {kind}: {acc:.1%}")
    assert acc >= 0.85


def test_shadow_sheets_of_the_tuning_split(mnist, predict):
    """A hard shadow across the sheet (half of it or so, often over most of the border): MNIST
    validation digits and the pen's, on seeds of the photo pipeline's tuning split (the report's
    test rows use MNIST test digits with seeds 3 and 4).  The test model read 94.5% of these
    before the ink's side and the shadow's edge were found reliably (`_stroke_votes`,
    `_wide_shadow`), 98.0% after: the floor sits between."""
    vx, vy = mnist.split("val")
    items = S.paper_set("shadow", 100, vx[1000:], vy[1000:], seed=51) + S.paper_set("shadow", 100, seed=61)
    acc = accuracy(predict, items)
    print(f"shadow sheets (tuning split): {acc:.1%}")
    assert acc >= 0.96


def _sheet(rng: np.random.Generator, digit: int, shadow: float = 1.0, ang: float = 0.0, off: float = 0.0) -> np.ndarray:
    """A 240x200 grey sheet (paper 210, grain) with an 8 (two rings) or a 7 written on it in
    strokes 9 px wide, and the half-plane (x, y) . (cos ang, sin ang) > off from the centre
    darkened to `shadow` of the light (a hard shadow's edge)."""
    H, W = 240, 200
    im = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(im)
    cx, cy = int(rng.integers(70, 130)), int(rng.integers(80, 160))
    if digit == 8:
        d.ellipse((cx - 18, cy - 44, cx + 18, cy - 4), outline=255, width=9)
        d.ellipse((cx - 22, cy - 6, cx + 22, cy + 40), outline=255, width=9)
    else:
        d.line((cx - 25, cy - 40, cx + 25, cy - 40, cx - 5, cy + 40), fill=255, width=9)
    g = (210 + rng.normal(0, 4, (H, W))) * (1 - 0.8 * np.asarray(im, np.float32) / 255)
    yy, xx = np.mgrid[0:H, 0:W]
    side = (xx - W / 2) * np.cos(ang) + (yy - H / 2) * np.sin(ang) > off
    return g * np.where(side, shadow, 1.0)


@pytest.mark.parametrize("digit", [8, 7])
def test_a_shadow_over_the_border_does_not_flip_the_ink(digit):
    """With a hard shadow over more than half the border, the border cannot say which side the
    ink is on and the strokes decide (`_stroke_votes`).  The old vote, by the strongest top-hat
    contrast, tied the paper inside an 8's loops with the ink around them and read the lit paper
    as ink on 8 of these 40 eights and 4 of the 40 sevens; now on none."""
    rng = np.random.default_rng(0)
    dark = 0
    for _ in range(40):
        ang, off = rng.uniform(0, np.pi), rng.uniform(-40, 0)
        dark += photo._ink_bright(_sheet(rng, digit, 0.5, ang, off))[1]
    assert dark == 40


@pytest.mark.parametrize("digit", [8, 7])
def test_a_hard_shadow_is_not_ink(digit):
    """A hard shadow's edge anywhere across the sheet, over a corner or strip of it or over most
    of it, leaves the digit as it was without the shadow: the background follows the edge
    (`_background`, `_wide_shadow`) instead of leaving it as a band of false ink, which the old
    pipeline did on about half of these sheets: 19 of the 40 eights and 19 of the 40 sevens came
    out like the unshadowed sheet's digit (correlation over 0.8), now 39 and 39."""
    rng = np.random.default_rng(1)
    same = 0
    for i in range(40):
        ang, off = rng.uniform(0, np.pi), rng.choice([-1, 1]) * rng.uniform(40, 90)
        clean = pp.normalize(_sheet(np.random.default_rng(i), digit)).astype(float)
        shaded = pp.normalize(_sheet(np.random.default_rng(i), digit, 0.5, ang, off)).astype(float)
        same += np.corrcoef(clean.ravel(), shaded.ravel())[0, 1] > 0.8
    assert same >= 35


def test_font_digits(predict):
    """Every font on this machine (DejaVu and matplotlib's Computer Modern and STIX at least).
    Printed digits are far from MNIST's handwriting, and the test model (random features, not the
    trained network, which benchmarks/preprocess_report.py measures) is weaker on them than on
    MNIST: a lower floor than the pen's."""
    items = S.font_set(5)
    assert len(items) >= 100  # matplotlib ships fonts: this set never comes out empty
    acc = accuracy(predict, items)
    print(f"fonts ({len(items)} glyphs): {acc:.1%}")
    assert acc >= 0.7


def test_uci_handwritten_digits_if_available(predict):
    """1,797 8x8 digits by 43 other writers (scikit-learn's copy of UCI's set, fetched by `make
    test`: tests/uci.py).  The floor is this test model's (random features: 75.5% on 2026-12-01),
    far under the trained network's (docs/results.md): it guards the pipeline, not the net."""
    path = S.uci_digits_path()
    if path is None:
        pytest.skip("UCI digits not fetched: run `python tests/uci.py` (make test does)")
    acc = accuracy(predict, list(S.uci_set(path, "scan")))
    print(f"UCI 8x8: {acc:.1%}")
    assert acc >= 0.7


def test_small_digit_on_a_large_photo(mnist, predict):
    """A digit filling a twentieth of a 2,000 px photo is cut out of the full-resolution image."""
    rng = np.random.default_rng(3)
    hits = 0
    for i in range(10):
        sheet = S.paper(rng, 2000, 1500, noise=5, shade=30)
        big = np.asarray(Image.fromarray(mnist.test_x[i]).resize((84, 84), Image.Resampling.BICUBIC), np.float32) / 255
        y0, x0 = rng.integers(100, 1300), rng.integers(100, 1800)
        a = np.zeros(sheet.shape[:2] + (1,), np.float32)
        a[y0:y0 + 84, x0:x0 + 84, 0] = big
        img = (sheet * (1 - a) + 30 * a).clip(0, 255).astype(np.uint8)
        blob = S.encode(Image.fromarray(img, "RGB"), "JPEG", quality=90)
        hits += int(predict(pp.decode_image(blob)[None])[0] == mnist.test_y[i])
    assert hits >= 9


# ---- formats, modes, metadata ----

@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "1"),
                                      ("PNG", "I;16"), ("JPEG", "L"), ("JPEG", "RGB"), ("BMP", "RGB"),
                                      ("GIF", "P"), ("TIFF", "L"), ("TIFF", "I;16"), ("WEBP", "RGB")])
def test_every_format_and_mode(mnist, predict, fmt, mode):
    """The same dark-on-light digits in each format and mode come out as the same digits."""
    x, y = mnist.test_x[:20], mnist.test_y[:20]
    blobs = []
    for a in x:
        ink = Image.fromarray(255 - a).resize((56, 56), Image.Resampling.BICUBIC)
        if mode == "I;16":
            img = Image.fromarray(np.asarray(ink).astype(np.uint16) * 257)
        elif mode == "1":
            img = ink.point(lambda v: 255 if v > 128 else 0).convert("1")
        else:
            img = ink.convert(mode)
        kw = {"lossless": True} if fmt == "WEBP" else {}
        blobs.append(S.encode(img, fmt, **kw))
    pixels, errors = pp.decode_many(blobs)
    assert errors == [None] * 20
    assert np.mean(predict(pixels) == y) >= 0.9


def test_transparent_background_either_ink(mnist, predict):
    """Ink drawn on a transparent sheet reads right whether the ink is black or white."""
    x, y = mnist.test_x[:20], mnist.test_y[:20]
    for ink in (0, 255):
        blobs = []
        for a in x:
            rgba = np.zeros((28, 28, 4), np.uint8)
            rgba[..., :3] = ink
            rgba[..., 3] = a  # opaque where the digit is
            blobs.append(S.encode(Image.fromarray(rgba, "RGBA").resize((84, 84))))
        pixels, errors = pp.decode_many(blobs)
        assert errors == [None] * 20
        assert np.mean(predict(pixels) == y) >= 0.9, f"ink {ink}"


def test_exif_orientation_is_applied(mnist, predict):
    """Phone photos are stored sideways with an Orientation tag; the digit is read upright."""
    x, y = mnist.test_x[:20], mnist.test_y[:20]
    blobs = []
    for a in x:
        img = Image.fromarray(255 - a).resize((112, 112)).rotate(90, expand=True)  # stored turned left
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to view"
        blobs.append(S.encode(img, "JPEG", quality=95, exif=exif))
    pixels, errors = pp.decode_many(blobs)
    assert errors == [None] * 20
    assert np.mean(predict(pixels) == y) >= 0.9


# ---- bad input ----

def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels: a decompression bomb's header, with one tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(TooLarge, match="pixels"):
        pp.decode_image(_png_header_only(30_000, 30_000))  # 900 MP: refused from the header alone
    with pytest.raises(TooLarge, match="over the limit"):
        pp.decode_image(_png_header_only(2000, 2000), max_pixels=1_000_000)
    blob = png(np.zeros((1001, 1000), np.uint8))
    with pytest.raises(TooLarge):
        pp.decode_image(blob, max_pixels=1_000_000)


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"hello, world", "known format"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not|decodable|known"),
])
def test_undecodable_bytes(data, match):
    with pytest.raises(InvalidInput, match=match):
        pp.decode_image(data)


def test_truncated_and_zero_sized_images(mnist):
    blob = S.encode(Image.fromarray(255 - mnist.test_x[0]).resize((300, 300)), "JPEG")
    with pytest.raises(InvalidInput):
        pp.decode_image(blob[: len(blob) // 2])
    with pytest.raises(InvalidInput):
        pp.decode_image(_png_header_only(0, 10))


def test_formats_outside_the_list_are_refused(mnist):
    """Only PNG, JPEG, BMP, GIF, TIFF and WebP decoders are reachable (EPS would run Ghostscript)."""
    for fmt in ("PPM", "PCX", "ICO"):
        with pytest.raises(InvalidInput, match="known format"):
            pp.decode_image(S.encode(Image.fromarray(mnist.test_x[0]), fmt))


def test_a_blank_page_gives_a_blank_input():
    for blob in (png(np.full((100, 100), 255, np.uint8)), png(np.zeros((28, 28), np.uint8))):
        assert not pp.decode_image(blob).any()


def test_decode_many_reports_each_failure_in_place(mnist):
    blobs = [png(mnist.test_x[0]), b"junk", png(mnist.test_x[1]), _png_header_only(5000, 5000)]
    pixels, errors = pp.decode_many(blobs, max_pixels=1_000_000)
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], InvalidInput) and isinstance(errors[3], TooLarge)
    assert np.array_equal(pixels[2], mnist.test_x[1]) and not pixels[1].any()
    with pytest.raises(InvalidInput, match="image 1"):
        pp.images_to_input(blobs[:3])
    assert pp.images_to_input([blobs[0], blobs[2]]).shape == (2, 1, 28, 28)


def test_decode_many_takes_mixed_items(mnist, predict):
    """Files, MNIST-format pixels and errors from before decoding, in one list: pixels pass
    through, errors stay in their place, bad pixel arrays get their own error."""
    a, b = mnist.test_x[0], mnist.test_x[1]
    unreadable = InvalidInput("cannot read x.png")
    items = [png(a), b, unreadable, np.zeros((5, 5), np.uint8), b"junk", b.astype(np.float32), b.reshape(-1)]
    pixels, errors = pp.decode_many(items)
    assert errors[:2] == [None, None] and errors[2] is unreadable and errors[6] is None
    assert all(isinstance(e, InvalidInput) for e in errors[3:6]) and "784" in str(errors[3])
    assert np.array_equal(pixels[0], a) and np.array_equal(pixels[1], b) and np.array_equal(pixels[6], b)
    assert not pixels[2:6].any()
    assert predict(pixels[[0, 1]]).tolist() == predict(mnist.test_x[:2]).tolist()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_domain_errors(data):
    try:
        out = pp.decode_image(data)
    except (InvalidInput, Overloaded):
        return
    assert out.shape == (28, 28) and out.dtype == np.uint8


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**32 - 1), st.sampled_from(["noise", "blob", "flat"]))
def test_normalize_any_picture(h, w, seed, kind):
    """Any 2-D picture becomes a valid 28x28 uint8 input: the pipeline never fails on content."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        g = rng.uniform(0, 255, (h, w))
    elif kind == "blob":
        g = np.full((h, w), 230.0)
        g[rng.integers(0, h):, rng.integers(0, w):] = 20
    else:
        g = np.full((h, w), float(rng.integers(0, 256)))
    out = pp.normalize(g)
    assert out.shape == (28, 28) and out.dtype == np.uint8
