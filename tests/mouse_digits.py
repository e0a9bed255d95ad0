"""Mouse-drawn digits: pen trajectories for the page's pad, and the browser that draws them.

Issue 19 asks for a test set of digits drawn with a mouse on the page.  This module makes the
trajectories and drives the page; benchmarks/mouse_set.py records the set (tests/data/mouse/)
and tests/serving/test_mouse.py checks it.  It lives beside tests/imagesets.py, the other
maker of real-world-looking digit sets, and like it needs neither PyTorch nor a server.

- TEMPLATES: for each digit the ways people write it, as strokes (polylines) in a unit box,
  x to the right and y down: 1 plain / with a flag / with flag and base, 4 open and closed,
  7 with and without a bar, 9 with a straight or a curved tail...
- writer(seed): a person with a mouse, drawn from the seed: slant, rotation, aspect, size,
  position on the pad, a slow wobble of the hand, jitter, a small overshoot at the end of a
  stroke, and speed (how far the pointer goes between two mouse events: a fast hand gives
  few, far-apart events, which the page joins with straight segments).
- trajectory(template, seed): the strokes in the pad's pixels (integers, as mouse events are),
  the same for the same arguments on any machine (numpy's PCG64 and float64 only).
- browser(), draw(), read_page(): headless Chromium through chromedriver, real pointer
  events (ActionChains: press, move along the stroke, release), and what the page sent to the
  server (the pad as a PNG) and what it showed.
"""
from __future__ import annotations

import base64
import math
from pathlib import Path

import numpy as np

PAD = 280                # the pad's size in CSS pixels and in canvas pixels (serving/web/)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

Stroke = list[tuple[float, float]]


# ------------------------------------------------------------------------ the templates --

def arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 24) -> Stroke:
    """An elliptic arc from angle a0 to a1 in degrees (0 is to the right, 90 is down)."""
    return [(cx + rx * math.cos(math.radians(a0 + (a1 - a0) * i / n)),
             cy + ry * math.sin(math.radians(a0 + (a1 - a0) * i / n))) for i in range(n + 1)]


def eight(n: int = 48) -> Stroke:
    """A one-stroke 8: from the top, the upper loop to the right, the crossing, the lower loop."""
    return [(0.5 - 0.3 * math.sin(2 * t), 0.5 - 0.45 * math.cos(t))
            for t in (2 * math.pi * i / n + 0.15 for i in range(n + 1))]


TEMPLATES: dict[str, list[Stroke]] = {
    "0-oval": [arc(0.5, 0.5, 0.3, 0.45, -90, -450)],
    "0-overlap": [arc(0.5, 0.5, 0.34, 0.44, -60, -460)],
    "0-narrow": [arc(0.5, 0.5, 0.22, 0.46, -100, -440)],
    "1-plain": [[(0.52, 0.05), (0.48, 0.95)]],
    "1-flag": [[(0.3, 0.28), (0.56, 0.05), (0.5, 0.95)]],
    "1-flag-base": [[(0.32, 0.26), (0.56, 0.05), (0.52, 0.93)], [(0.28, 0.95), (0.76, 0.95)]],
    "2-curved": [arc(0.5, 0.3, 0.3, 0.25, -165, 25) + [(0.18, 0.93), (0.85, 0.93)]],
    "2-loop": [arc(0.5, 0.3, 0.3, 0.25, -165, 30) + [(0.25, 0.82)] + arc(0.3, 0.86, 0.08, 0.07, 200, -90, 10)[1:]
               + [(0.85, 0.9)]],
    "2-angular": [[(0.2, 0.25), (0.45, 0.06), (0.78, 0.2), (0.72, 0.42), (0.15, 0.94), (0.86, 0.94)]],
    "3-round": [arc(0.46, 0.28, 0.3, 0.22, -160, 90) + arc(0.46, 0.72, 0.34, 0.22, -90, 160)[1:]],
    "3-flat-top": [[(0.18, 0.08), (0.8, 0.08), (0.42, 0.45)] + arc(0.46, 0.7, 0.34, 0.25, -95, 160)[1:]],
    "4-open": [[(0.28, 0.05), (0.2, 0.58), (0.86, 0.58)], [(0.68, 0.12), (0.68, 0.95)]],
    "4-closed": [[(0.64, 0.05), (0.14, 0.66), (0.88, 0.66)], [(0.64, 0.05), (0.64, 0.95)]],
    "5-two-strokes": [[(0.27, 0.08), (0.24, 0.46)] + arc(0.48, 0.68, 0.32, 0.26, -145, 155)[1:],
                      [(0.27, 0.08), (0.82, 0.07)]],
    "5-one-stroke": [[(0.8, 0.07), (0.27, 0.08), (0.24, 0.46)] + arc(0.48, 0.68, 0.32, 0.26, -145, 155)[1:]],
    "6-round": [[(0.72, 0.06), (0.45, 0.2), (0.27, 0.48)] + arc(0.5, 0.7, 0.24, 0.24, 180, -150)[1:]],
    "6-straight": [[(0.62, 0.04), (0.27, 0.62)] + arc(0.5, 0.72, 0.24, 0.22, 160, -170)[1:]],
    "7-plain": [[(0.15, 0.1), (0.85, 0.1), (0.4, 0.95)]],
    "7-bar": [[(0.15, 0.1), (0.85, 0.1), (0.42, 0.95)], [(0.38, 0.52), (0.82, 0.5)]],
    "7-hook": [[(0.16, 0.26), (0.15, 0.1), (0.85, 0.1), (0.46, 0.95)]],
    "8-one-stroke": [eight()],
    "8-two-loops": [arc(0.5, 0.27, 0.24, 0.22, 90, 450), arc(0.5, 0.72, 0.3, 0.23, -90, 270)],
    "9-straight": [arc(0.5, 0.3, 0.3, 0.25, 0, -360) + [(0.76, 0.95)]],
    "9-curved": [arc(0.5, 0.3, 0.3, 0.25, 0, -360) + [(0.78, 0.68)] + arc(0.52, 0.7, 0.26, 0.24, 0, 130)[1:]],
}
LABELS = {name: int(name[0]) for name in TEMPLATES}


def templates_of(digit: int) -> list[str]:
    return [name for name in TEMPLATES if LABELS[name] == digit]


# --------------------------------------------------------------------------- the writer --

def writer(seed: int) -> dict:
    """One person's hand for one digit, drawn from the seed."""
    rng = np.random.default_rng(seed)
    return {
        "size": float(rng.uniform(0.5, 0.85)),        # the digit's height over the pad's
        "aspect": float(rng.uniform(0.6, 1.05)),      # width over height, against the template's
        "slant": float(rng.uniform(-0.12, 0.35)),     # shear: positive leans the top to the right
        "rotate": float(rng.normal(0, 4)),            # degrees
        "dx": float(rng.uniform(-0.12, 0.12)),        # the centre's offset, in pads
        "dy": float(rng.uniform(-0.1, 0.1)),
        "wobble": float(rng.uniform(0.0, 0.03)),      # a slow drift of the hand, in digit heights
        "jitter": float(rng.uniform(0.0, 0.006)),     # per mouse event, in digit heights
        "overshoot": float(rng.uniform(0.0, 0.08)),   # past each stroke's end, in digit heights
        "step": float(rng.uniform(3.0, 14.0)),        # pad pixels between two mouse events
        "noise_seed": int(rng.integers(2**31)),
    }


def _resample(points: np.ndarray, step: float) -> np.ndarray:
    """Points every `step` along the polyline, its first and last point kept."""
    seg = np.hypot(*np.diff(points, axis=0).T)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] == 0:
        return points[:1]
    n = max(1, int(math.ceil(s[-1] / step)))
    t = np.linspace(0, s[-1], n + 1)
    return np.stack([np.interp(t, s, points[:, 0]), np.interp(t, s, points[:, 1])], axis=1)


def trajectory(template: str, seed: int) -> list[list[tuple[int, int]]]:
    """The template's strokes as one writer (seed) draws them: integer pad pixels, one point per
    mouse event, inside the pad."""
    w = writer(seed)
    rng = np.random.default_rng(w["noise_seed"])
    h = w["size"] * PAD
    cos, sin = math.cos(math.radians(w["rotate"])), math.sin(math.radians(w["rotate"]))
    strokes = []
    for stroke in TEMPLATES[template]:
        p = np.array(stroke, dtype=np.float64) - 0.5          # centred unit box
        if len(p) >= 2 and w["overshoot"] > 0:                # carry on a little past the end
            d = p[-1] - p[-2]
            p = np.vstack([p, p[-1] + d / (np.hypot(*d) or 1) * w["overshoot"]])
        x = p[:, 0] * w["aspect"] - w["slant"] * p[:, 1]
        y = p[:, 1]
        p = np.stack([x * cos - y * sin, x * sin + y * cos], axis=1) * h
        p = _resample(p, w["step"])
        # The hand's slow drift: a random walk smoothed over ~8 events, plus per-event jitter.
        walk = np.cumsum(rng.normal(0, 1, p.shape), axis=0)
        kernel = np.ones(min(8, len(p))) / min(8, len(p))
        walk = np.stack([np.convolve(walk[:, k], kernel, mode="same") for k in (0, 1)], axis=1)
        walk -= walk[:1]
        p = p + walk * w["wobble"] * h / max(1.0, math.sqrt(len(p))) + rng.normal(0, w["jitter"] * h, p.shape)
        p = p + [PAD / 2 + w["dx"] * PAD, PAD / 2 + w["dy"] * PAD]
        p = np.clip(np.rint(p), 2, PAD - 3).astype(int)
        keep = np.concatenate([[True], np.any(np.diff(p, axis=0) != 0, axis=1)])  # no zero moves
        strokes.append([(int(a), int(b)) for a, b in p[keep]])
    return strokes


def plan(per_digit: int, base_seed: int = 19) -> list[dict]:
    """The set: per digit `per_digit` drawings, the digit's templates in turn, one writer each."""
    items = []
    for digit in range(10):
        names = templates_of(digit)
        for i in range(per_digit):
            seed = base_seed * 100_000 + digit * 1000 + i
            items.append({"label": digit, "index": i, "template": names[i % len(names)], "seed": seed})
    return items


# -------------------------------------------------------------------------- the browser --

def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install .[test])"
    return None


def browser(profile: str | Path, console_log: bool = False):
    """Headless Chromium (tests/serving/test_web.py's too); `console_log` keeps the page's
    console messages for driver.get_log("browser")."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=900,800", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


def versions(driver) -> dict:
    import selenium

    caps = driver.capabilities
    return {"chromium": caps.get("browserVersion"),
            "chromedriver": (caps.get("chrome") or {}).get("chromedriverVersion", "").split(" ")[0],
            "selenium": selenium.__version__}


# Wraps the page's fetch: the last body POSTed to /v1/classify (the pad as a PNG Blob) and the
# answer, so the recorder keeps exactly what the page sent and what came back.
_SPY = """
if (!window.__spy) {
  window.__spy = {sent: null, answer: null};
  const real = window.fetch;
  window.fetch = async (path, options) => {
    const response = await real(path, options);
    if (String(path).startsWith('/v1/classify') && options && options.body instanceof Blob) {
      const body = options.body;
      const answer = await response.clone().json().catch(() => null);
      window.__spy = {sent: body, answer};
    }
    return response;
  };
}
"""


def open_page(driver, base: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + "/")
    WebDriverWait(driver, 30).until(lambda d: "test accuracy" in d.find_element("id", "model").text)
    driver.execute_script(_SPY)
    w = driver.execute_script("const r = document.getElementById('pad').getBoundingClientRect(); return [r.width, r.height]")
    assert w == [PAD, PAD], f"the pad is {w} CSS pixels, not {PAD}: the trajectories assume a 1:1 pad"


def clear(driver) -> None:
    driver.find_element("id", "clear").click()
    driver.execute_script("window.__spy.sent = null; window.__spy.answer = null;")


def draw(driver, strokes: list[list[tuple[int, int]]]) -> None:
    """Each stroke: the pointer to its first point, the button pressed, one pointer move per
    point, the button released.  Points are pad pixels from its top-left corner."""
    from selenium.webdriver.common.action_chains import ActionChains

    pad = driver.find_element("id", "pad")
    for points in strokes:
        chain = ActionChains(driver, duration=0)
        x, y = points[0]
        chain.move_to_element_with_offset(pad, x - PAD // 2, y - PAD // 2).click_and_hold()
        for nx, ny in points[1:]:
            chain.move_by_offset(nx - x, ny - y)
            x, y = nx, ny
        chain.release().perform()


def read_page(driver, timeout: float = 30) -> dict:
    """Once the page has no request scheduled or on its way: the digit it shows, the PNG it
    sent (bytes), the server's answer (with `input`, the 28x28 image the model saw)."""
    from selenium.webdriver.support.ui import WebDriverWait

    digit = driver.find_element("id", "digit")
    WebDriverWait(driver, timeout).until(
        lambda d: digit.get_attribute("data-pending") == "false" and (digit.text or d.find_element("id", "error").text))
    sent = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const blob = window.__spy.sent;
        if (!blob) { done(null); return; }
        const r = new FileReader();
        r.onload = () => done(r.result);
        r.readAsDataURL(blob);""")
    answer = driver.execute_script("return window.__spy.answer")
    return {"digit": digit.text, "error": driver.find_element("id", "error").text,
            "sent": base64.b64decode(sent.split(",", 1)[1]) if sent else None,
            "answer": answer}


def pad_pixels(png: bytes) -> np.ndarray:
    """The pad's PNG as uint8 grey [280, 280]; the page draws white on opaque black, so the
    three channels are equal and alpha is 255 (checked)."""
    import io

    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    assert (a[..., 3] == 255).all() and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0].copy()
