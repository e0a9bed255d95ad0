"""Image sets for the preprocessing tests and report: real-world-looking digit images made here.

Two kinds:
- MNIST test digits dressed as photos or scans: inverted (dark ink on light paper), scaled up,
  padded off-centre, coloured, JPEG-compressed, photographed paper (shading, texture, noise).
- Digits that never came from MNIST: rendered from every font this machine has (handwriting
  fonts when installed), drawn by a jittery synthetic pen with random stroke widths, tiny
  low-resolution scans, noisy photographed paper, and the UCI/sklearn 8x8 handwritten digits
  (43 other writers) when a scikit-learn install provides them.

Every generator is seeded: the same call gives the same bytes.  Images come as encoded files
(bytes) because that is what users send; labels as ints.
"""
from __future__ import annotations

import glob
import gzip
import io
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from serving.contract import SIDE

import uci  # tests/uci.py: the UCI digits' file

Item = tuple[bytes, int]


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ---- paper and ink ----

def paper(rng: np.random.Generator, w: int, h: int, *, noise: float = 6.0, shade: float = 40.0,
          colour: bool = True) -> np.ndarray:
    """A photographed sheet: a tint, a linear light fall-off, a vignette, fibre texture, noise.
    Returns float32 [h, w, 3] in 0..255."""
    base = rng.uniform(190, 245)
    tint = rng.uniform(-12, 12, 3) if colour else np.zeros(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    ramp = ((xx / w - 0.5) * math.cos(ang) + (yy / h - 0.5) * math.sin(ang)) * shade
    vign = -shade * 0.5 * (((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2)
    texture = np.asarray(Image.fromarray(rng.normal(0, 1, (h // 4 + 1, w // 4 + 1)).astype(np.float32), "F")
                         .resize((w, h), Image.Resampling.BICUBIC)) * noise
    g = base + ramp + vign + texture + rng.normal(0, noise * 0.5, (h, w))
    return np.clip(g[..., None] + tint, 0, 255).astype(np.float32)


def ink_on_paper(ink: np.ndarray, rng: np.random.Generator, *, scale: int = 4, pad: float = 0.6,
                 noise: float = 6.0, shade: float = 40.0, blur: float = 0.8) -> Image.Image:
    """White-on-black ink (float 0..1, any size) -> an RGB photo of dark ink on paper: upscaled,
    placed off-centre on a larger sheet, pen colour, paper shading and noise, slight blur."""
    h, w = ink.shape
    big = np.asarray(Image.fromarray((ink * 255).astype(np.float32), "F")
                     .resize((w * scale, h * scale), Image.Resampling.BICUBIC)) / 255.0
    big = np.clip(big, 0, 1)
    H, W = int(big.shape[0] * (1 + pad)), int(big.shape[1] * (1 + pad))
    sheet = paper(rng, W, H, noise=noise, shade=shade)
    y, x = rng.integers(0, H - big.shape[0] + 1), rng.integers(0, W - big.shape[1] + 1)
    pen = np.array([rng.uniform(0, 60), rng.uniform(0, 60), rng.uniform(20, 140)])  # black to blue
    a = np.zeros((H, W, 1), np.float32)
    a[y:y + big.shape[0], x:x + big.shape[1], 0] = big * rng.uniform(0.75, 1.0)
    img = sheet * (1 - a) + pen * a
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return out.filter(ImageFilter.GaussianBlur(blur)) if blur else out


# ---- MNIST digits dressed up ----

MNIST_KINDS = ("inverted", "scaled", "offcentre", "colour", "jpeg", "photo")


def mnist_variant(kind: str, digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """One MNIST test digit (uint8 28x28, white on black) as the `kind` of file a user sends."""
    if kind == "inverted":  # dark ink on white paper, same size
        return encode(Image.fromarray(255 - digit))
    if kind == "scaled":  # a bigger scan, dark on light
        s = int(rng.integers(3, 9))
        return encode(Image.fromarray(255 - digit).resize((SIDE * s, SIDE * s), Image.Resampling.BICUBIC))
    if kind == "offcentre":  # the digit somewhere on a larger white page
        s = int(rng.integers(2, 5))
        d = Image.fromarray(255 - digit).resize((SIDE * s, SIDE * s), Image.Resampling.BICUBIC)
        W, H = int(SIDE * s * rng.uniform(1.5, 3)), int(SIDE * s * rng.uniform(1.5, 3))
        page = Image.new("L", (W, H), 255)
        page.paste(d, (int(rng.integers(0, W - d.width + 1)), int(rng.integers(0, H - d.height + 1))))
        return encode(page)
    if kind == "colour":  # coloured ink on coloured paper, either lighter or darker
        fg, bg = rng.integers(0, 90, 3), rng.integers(170, 256, 3)
        if rng.random() < 0.3:
            fg, bg = bg, fg
        a = (digit.astype(np.float32) / 255)[..., None]
        rgb = (bg * (1 - a) + fg * a).astype(np.uint8)
        return encode(Image.fromarray(rgb, "RGB").resize((84, 84), Image.Resampling.BICUBIC))
    if kind == "jpeg":
        s = int(rng.integers(2, 5))
        d = Image.fromarray(255 - digit).resize((SIDE * s, SIDE * s), Image.Resampling.BICUBIC)
        return encode(d, "JPEG", quality=int(rng.integers(40, 90)))
    if kind == "photo":
        return encode(ink_on_paper(digit / 255.0, rng, scale=int(rng.integers(3, 7))),
                      "JPEG", quality=85)
    raise ValueError(kind)


def mnist_set(x: np.ndarray, y: np.ndarray, kind: str, n: int, seed: int = 0) -> list[Item]:
    rng = np.random.default_rng(seed)
    return [(mnist_variant(kind, x[i], rng), int(y[i])) for i in range(n)]


# ---- digits that never came from MNIST ----

def font_files() -> list[str]:
    """Every TrueType/OpenType font on this machine with glyphs for 0-9: fontconfig's folders and
    matplotlib's bundled fonts.  Symbol and maths-only fonts are left out."""
    dirs = ["/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts")]
    try:
        import matplotlib
        dirs.append(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf"))
    except ImportError:
        pass
    found = []
    for d in dirs:
        for ext in ("ttf", "otf", "TTF", "OTF"):
            found += glob.glob(f"{d}/**/*.{ext}", recursive=True)
    skip = ("cmex", "cmsy", "cmmi", "Math", "Display", "Symbol", "STIXSize", "STIXNonUni", "STIXGeneral-",
            "DejaVuSansMono", "DejaVuSans-ExtraLight",
            "LastResort", "femkeklaver")  # a font of placeholder boxes; an outline-only font
    return sorted(f for f in set(found) if not any(s in os.path.basename(f) for s in skip))


def render_glyph(font_path: str, digit: int | str, rng: np.random.Generator, px: int = 96) -> np.ndarray | None:
    """A digit (or any character) drawn with a font, white on black float 0..1, slightly rotated;
    None if the font has no glyph for it (an empty or tofu box)."""
    try:
        font = ImageFont.truetype(font_path, px)
    except OSError:
        return None
    img = Image.new("L", (px * 2, px * 2), 0)
    ImageDraw.Draw(img).text((px // 2, px // 4), str(digit), fill=255, font=font)
    img = img.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR)
    a = np.asarray(img, np.float32) / 255
    return a if a.sum() > px else None


HANDWRITING_FONTS = ("dkg", "Breip", "bwht", "Femke", "Humor", "Comic", "Dancing", "Kristi", "Kaushan")


def font_set(rng_seed: int = 0, handwriting_only: bool = False, kind: str = "clean") -> list[Item]:
    """Every digit in every font, as dark ink on paper: 'clean' (a crisp scan), 'photo'."""
    rng = np.random.default_rng(rng_seed)
    items = []
    for f in font_files():
        if handwriting_only and not any(h.lower() in f.lower() for h in HANDWRITING_FONTS):
            continue
        for d in range(10):
            a = render_glyph(f, d, rng)
            if a is None:
                continue
            if kind == "clean":
                items.append((encode(Image.fromarray((255 - a * 255).astype(np.uint8))), d))
            else:
                items.append((encode(ink_on_paper(a, rng, scale=1, noise=8, shade=50), "JPEG", quality=80), d))
    return items


# Pen strokes for each digit in a unit box (x right, y down), a few ways people write them.
_STROKES: dict[int, list[list[list[tuple[float, float]]]]] = {}


def _arc(cx, cy, rx, ry, a0, a1, n=16):
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(a0, a1, n)]


def _strokes() -> dict[int, list[list[list[tuple[float, float]]]]]:
    if _STROKES:
        return _STROKES
    s = {
        0: [[_arc(0.5, 0.5, 0.32, 0.45, -90, 270, 28)]],
        1: [[[(0.5, 0.05), (0.5, 0.95)]], [[(0.3, 0.22), (0.55, 0.05), (0.55, 0.95)]],
            [[(0.32, 0.25), (0.55, 0.05), (0.55, 0.95)], [(0.35, 0.95), (0.75, 0.95)]]],
        2: [[_arc(0.5, 0.3, 0.3, 0.25, 200, 360, 12) + [(0.75, 0.45), (0.2, 0.95), (0.82, 0.95)]]],
        3: [[_arc(0.5, 0.28, 0.28, 0.23, 200, 450, 14) + _arc(0.5, 0.72, 0.3, 0.24, -90, 160, 14)]],
        4: [[[(0.62, 0.95), (0.62, 0.05), (0.15, 0.68), (0.85, 0.68)]],
            [[(0.3, 0.05), (0.2, 0.6), (0.85, 0.6)], [(0.65, 0.3), (0.65, 0.95)]]],
        5: [[[(0.78, 0.05), (0.3, 0.05), (0.26, 0.45)] + _arc(0.48, 0.67, 0.3, 0.27, -120, 150, 16)]],
        6: [[[(0.68, 0.05)] + _arc(0.45, 0.68, 0.28, 0.27, 240, 600, 24)]],
        7: [[[(0.18, 0.05), (0.82, 0.05), (0.4, 0.95)]],
            [[(0.18, 0.05), (0.82, 0.05), (0.4, 0.95)], [(0.35, 0.5), (0.72, 0.5)]]],
        8: [[_arc(0.5, 0.27, 0.24, 0.22, 90, 450, 20) + _arc(0.5, 0.72, 0.3, 0.23, -90, 270, 20)]],
        9: [[_arc(0.5, 0.3, 0.28, 0.25, 0, 360, 20) + [(0.78, 0.3), (0.7, 0.95)]],
            [_arc(0.5, 0.3, 0.28, 0.25, 0, 360, 20) + [(0.78, 0.3), (0.78, 0.95)]]],
    }
    _STROKES.update(s)
    return _STROKES


def draw_digit(digit: int, rng: np.random.Generator, px: int = 112, width: float | None = None) -> np.ndarray:
    """A digit written by a jittery synthetic pen: random style, slant, aspect, wobble and stroke
    width.  White on black float 0..1, px x px."""
    style = _strokes()[digit][int(rng.integers(len(_strokes()[digit])))]
    slant = rng.uniform(-0.25, 0.25)
    sx, sy = rng.uniform(0.55, 0.85), rng.uniform(0.75, 0.9)
    rot = math.radians(rng.uniform(-10, 10))
    width = width if width is not None else rng.uniform(0.04, 0.14)
    img = Image.new("L", (px * 2, px * 2), 0)  # drawn at 2x, shrunk: anti-aliased strokes
    draw = ImageDraw.Draw(img)
    S = px * 2
    for stroke in style:
        pts = np.array(stroke, np.float64)
        pts = pts + rng.normal(0, 0.012, pts.shape)  # a hand is not a plotter
        x, y = pts[:, 0] - 0.5, pts[:, 1] - 0.5
        x = x + slant * -y
        x, y = x * sx, y * sy
        x, y = x * math.cos(rot) - y * math.sin(rot), x * math.sin(rot) + y * math.cos(rot)
        xy = [(float((a + 0.5) * S), float((b + 0.5) * S)) for a, b in zip(x, y)]
        w = max(1, int(width * S))
        draw.line(xy, fill=255, width=w, joint="curve")
        for p in (xy[0], xy[-1]):
            draw.ellipse((p[0] - w / 2, p[1] - w / 2, p[0] + w / 2, p[1] + w / 2), fill=255)
    return np.asarray(img.resize((px, px), Image.Resampling.BOX), np.float32) / 255


def pen_set(n: int, kind: str, seed: int = 0) -> list[Item]:
    """Synthetic handwriting: 'clean' (dark on white), 'thin' (hairline pen), 'thick' (marker),
    'lowres' (a 10-16 px scan), 'photo' (noisy shaded paper, JPEG)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        d = i % 10
        width = {"thin": rng.uniform(0.012, 0.025), "thick": rng.uniform(0.16, 0.22)}.get(kind)
        a = draw_digit(d, rng, width=width)
        if kind == "lowres":
            s = int(rng.integers(10, 17))
            small = Image.fromarray((255 - a * 255).astype(np.uint8)).resize((s, s), Image.Resampling.BOX)
            items.append((encode(small), d))
        elif kind == "photo":
            items.append((encode(ink_on_paper(a, rng, scale=2, noise=10, shade=60, blur=1.2), "JPEG",
                                 quality=70), d))
        else:
            items.append((encode(Image.fromarray((255 - a * 255).astype(np.uint8))), d))
    return items


def uci_digits_path() -> Path | None:
    """The UCI/sklearn handwritten digits (1,797 8x8 images by 43 writers, none of them in MNIST):
    see tests/uci.py (fetched by `make test`; $NETWORK3_UCI_DIGITS names another copy)."""
    return uci.path()


def uci_set(path: Path, kind: str = "scan") -> Iterator[Item]:
    """Each 8x8 count image (0..16 'on' pixels per 4x4 block) as dark ink on paper: 'scan' is the
    8x8 file itself, 'photo' an upscaled print of it photographed."""
    rng = np.random.default_rng(0)
    rows = np.loadtxt(gzip.open(path, "rt"), delimiter=",")
    for r in rows:
        a = r[:64].reshape(8, 8) / 16.0
        if kind == "scan":
            yield encode(Image.fromarray((255 - a * 255).astype(np.uint8))), int(r[64])
        else:
            yield encode(ink_on_paper(a, rng, scale=12, noise=6, shade=40, blur=1.5), "JPEG", quality=85), int(r[64])


# ---- harder photographs of paper ----

PAPER_KINDS = ("pencil", "ruled", "grid", "shadow", "box", "rotated", "jpeg20")


def sheet_photo(ink: np.ndarray, rng: np.random.Generator, kind: str) -> bytes:
    """White-on-black ink (float 0..1) written on a 200x240 sheet and photographed: 'pencil'
    (faint grey), 'ruled' (blue lines), 'grid' (squared paper), 'shadow' (a hard-edged shadow
    across the page), 'box' (written in a form's box), 'rotated' (camera tilted up to 15
    degrees), 'jpeg20' (heavy compression)."""
    H, W = 240, 200
    big = np.clip(np.asarray(Image.fromarray((ink * 255).astype(np.float32), "F")
                             .resize((120, 120), Image.Resampling.BICUBIC)) / 255, 0, 1)
    sheet = paper(rng, W, H, noise=6, shade=40)
    if kind == "ruled":
        for yy in range(int(rng.integers(0, 25)), H, 25):
            sheet[yy:yy + 2] = sheet[yy:yy + 2] * 0.6 + np.array([120, 150, 230]) * 0.4
    if kind == "grid":
        for yy in range(int(rng.integers(0, 20)), H, 20):
            sheet[yy:yy + 1] = sheet[yy:yy + 1] * 0.5 + 75
        for xx in range(int(rng.integers(0, 20)), W, 20):
            sheet[:, xx:xx + 1] = sheet[:, xx:xx + 1] * 0.5 + 75
    y, x = int(rng.integers(20, H - 140)), int(rng.integers(10, W - 130))
    a = np.zeros((H, W, 1), np.float32)
    a[y:y + 120, x:x + 120, 0] = big
    pen, strength = (np.array([110, 110, 115.0]), 0.6) if kind == "pencil" else (np.array([30, 30, 60.0]), 0.95)
    img = sheet * (1 - a * strength) + pen * a * strength
    if kind == "shadow":
        yy, xx = np.mgrid[0:H, 0:W]
        ang, off = rng.uniform(0, math.pi), rng.uniform(-40, 40)
        side = (xx - W / 2) * math.cos(ang) + (yy - H / 2) * math.sin(ang) > off
        img = img * np.where(side, rng.uniform(0.45, 0.65), 1.0)[..., None]
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")
    if kind == "box":
        ImageDraw.Draw(out).rectangle((x - 8, y - 8, x + 128, y + 128), outline=(40, 40, 40), width=3)
    if kind == "rotated":
        out = out.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR,
                         fillcolor=tuple(int(v) for v in sheet[0, 0]))
    return encode(out.filter(ImageFilter.GaussianBlur(0.8)), "JPEG", quality=20 if kind == "jpeg20" else 85)


def paper_set(kind: str, n: int, x: np.ndarray | None = None, y: np.ndarray | None = None, seed: int = 0) -> list[Item]:
    """n sheet photos of `kind`: MNIST digits (x, y given) or the synthetic pen's."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        if x is not None:
            ink, label = x[i] / 255.0, int(y[i])
        else:
            label = i % 10
            ink = draw_digit(label, rng)
        items.append((sheet_photo(ink, rng, kind), label))
    return items


# ---- things that are not digits (what `unsure` must catch) ----

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Letters a careful reader could take for a digit in some fonts: O o D Q (0), I l i (1), Z z (2),
# S s (5), b G (6), B (8), g q (9).  Reported apart: flagging them is not expected.
LOOKALIKES = "OoDQIliZzSsbGBgq"


def letter_fonts() -> list[str]:
    """font_files() once per font name (matplotlib ships copies of DejaVu), text fonts only."""
    seen, out = set(), []
    for f in font_files():
        name = os.path.basename(f)
        if name in seen or name.startswith("STIXSiz"):  # STIX's size variants: brackets and integrals
            continue
        seen.add(name)
        out.append(f)
    return out


def letter_set(fonts: list[str], letters: str = LETTERS, kind: str = "clean", seed: int = 0) -> list[tuple[bytes, str]]:
    """Every letter in every font of `fonts`, as dark ink on paper the way font_set draws digits:
    'clean' (a crisp scan) or 'photo'.  Items are (file, the letter)."""
    rng = np.random.default_rng(seed)
    items = []
    for f in fonts:
        for ch in letters:
            a = render_glyph(f, ch, rng)
            if a is None:
                continue
            if kind == "clean":
                items.append((encode(Image.fromarray((255 - a * 255).astype(np.uint8))), ch))
            else:
                items.append((encode(ink_on_paper(a, rng, scale=1, noise=8, shade=50), "JPEG", quality=80), ch))
    return items


BLANK_KINDS = ("white", "black", "grey", "paper")


def blank_image(kind: str, rng: np.random.Generator) -> bytes:
    """A page with nothing on it, 28 to 400 px a side: 'white', 'black', 'grey' (one uniform
    level), 'paper' (a photographed empty sheet: shading, texture, sensor noise, JPEG)."""
    w, h = (int(v) for v in rng.integers(28, 401, 2))
    if kind == "paper":
        return encode(Image.fromarray(paper(rng, w, h).astype(np.uint8), "RGB"), "JPEG", quality=85)
    level = {"white": 255, "black": 0}.get(kind)
    level = int(rng.integers(40, 216)) if level is None else level
    return encode(Image.new("L", (w, h), level))


NOISE_KINDS = ("uniform", "gaussian", "salt-pepper", "texture")


def noise_image(kind: str, rng: np.random.Generator) -> bytes:
    """A picture of nothing, 28 to 256 px a side: 'uniform' and 'gaussian' pixel noise,
    'salt-pepper' (2-20% of a grey page's pixels black or white), 'texture' (1/f noise: octaves
    of smoothed noise, like clouds, bark or a carpet), in colour half the time."""
    w, h = (int(v) for v in rng.integers(28, 257, 2))
    if kind == "uniform":
        a = rng.uniform(0, 255, (h, w))
    elif kind == "gaussian":
        a = rng.normal(rng.uniform(80, 180), rng.uniform(20, 60), (h, w))
    elif kind == "salt-pepper":
        a = np.full((h, w), rng.uniform(60, 200))
        hit = rng.random((h, w)) < rng.uniform(0.02, 0.2)
        a[hit] = rng.choice([0.0, 255.0], int(hit.sum()))
    elif kind == "texture":
        a = np.zeros((h, w))
        for octave in range(1, 7):  # amplitude halves as the frequency doubles
            n = 2 ** octave
            layer = rng.normal(0, 1, (n + 1, n + 1)).astype(np.float32)
            a += np.asarray(Image.fromarray(layer, "F").resize((w, h), Image.Resampling.BICUBIC)) / octave
        a = 128 + a * (rng.uniform(30, 70) / a.std())
    else:
        raise ValueError(kind)
    a = np.clip(a, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:  # a colour picture: each channel the grey shifted
        a = np.clip(a[..., None].astype(np.int16) + rng.integers(-40, 41, 3), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(a))


def nothing_set(kind: str, n: int, seed: int = 0) -> list[bytes]:
    """n blank pages (a BLANK_KINDS kind) or noise pictures (a NOISE_KINDS kind), seeded."""
    rng = np.random.default_rng(seed)
    make = blank_image if kind in BLANK_KINDS else noise_image
    return [make(kind, rng) for _ in range(n)]
