"""The page in a real browser (headless Chromium through chromedriver) against a real server:
draw digits with pointer strokes, upload an MNIST PNG and a file that is not an image; and the
page's files in a non-editable install."""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from fixtures_serving import ROOT, png
from mouse_digits import browser as start_browser, missing
from test_v1 import http_server, predict

SCREENSHOT = Path("/tmp/network3-page.png")
WEB_FILES = ("index.html", "app.js", "style.css")


@pytest.fixture(scope="module")
def http(onnx_model):
    with http_server(onnx_model) as h:
        yield h


@pytest.fixture(scope="module")
def model(onnx_model):
    from serving.model import load_model
    return load_model(onnx_model)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    driver = start_browser(tmp_path_factory.mktemp("chromium"), console_log=True)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(browser, http):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(http.base + "/")
    WebDriverWait(browser, 15).until(lambda d: "test accuracy" in d.find_element("id", "model").text)
    return browser


# ------------------------------------------------------------------------------- helpers --

def _el(driver, id_: str):
    return driver.find_element("id", id_)


def clear(driver) -> None:
    _el(driver, "clear").click()
    assert _el(driver, "digit").text == ""


def draw(driver, strokes: list[list[tuple[float, float]]]) -> None:
    """Pointer strokes on #pad; points in pad pixels from its centre, each stroke pressed,
    moved through its points in small steps, released."""
    from selenium.webdriver.common.action_chains import ActionChains

    pad = _el(driver, "pad")
    for points in strokes:
        chain = ActionChains(driver, duration=0)
        x0, y0 = points[0]
        chain.move_to_element_with_offset(pad, int(x0), int(y0)).click_and_hold()
        x, y = int(x0), int(y0)
        for (ax, ay), (bx, by) in zip(points, points[1:]):
            steps = max(1, int(math.hypot(bx - ax, by - ay) // 8))
            for s in range(1, steps + 1):
                nx, ny = int(round(ax + (bx - ax) * s / steps)), int(round(ay + (by - ay) * s / steps))
                chain.move_by_offset(nx - x, ny - y)
                x, y = nx, ny
        chain.release().perform()


def answer(driver, timeout: float = 15) -> str:
    """#digit once the page has no request scheduled or on its way."""
    from selenium.webdriver.support.ui import WebDriverWait

    digit = _el(driver, "digit")
    WebDriverWait(driver, timeout).until(
        lambda d: digit.get_attribute("data-pending") == "false" and (digit.text or _el(d, "error").text))
    return digit.text


ONE = [[(5, -95), (0, 95)]]
ZERO = [[(62 * math.sin(t / 24 * 2 * math.pi), -88 * math.cos(t / 24 * 2 * math.pi)) for t in range(25)]]
SEVEN = [[(-65, -85), (65, -85), (-5, 95)]]


# --------------------------------------------------------------------------------- tests --

@pytest.mark.parametrize("digit, strokes", [("1", ONE), ("0", ZERO), ("7", SEVEN)])
def test_drawn_digit(page, digit, strokes):
    clear(page)
    draw(page, strokes)
    assert answer(page) == digit
    assert _el(page, "error").text == ""
    assert _el(page, "seen").get_attribute("src").startswith("data:image/png;base64,")
    assert "%" in _el(page, "confidence").text
    widths = page.execute_script("return [...document.querySelectorAll('#bars .fill')]"
                                 ".map(e => e.getBoundingClientRect().width)")
    assert len(widths) == 10 and widths[int(digit)] == max(widths) > 0, widths


def test_the_answer_follows_the_pen_before_it_lifts(page):
    from selenium.webdriver.common.action_chains import ActionChains

    clear(page)
    pad = _el(page, "pad")
    chain = ActionChains(page, duration=0).move_to_element_with_offset(pad, 0, -95).click_and_hold()
    for y in range(-87, 96, 8):
        chain.move_by_offset(0, 8)
    chain.perform()
    try:
        assert answer(page) == "1"  # still pressed: no pointerup yet
    finally:
        ActionChains(page).release().perform()
    assert answer(page) == "1"


def test_upload_an_mnist_png(page, model, digits, tmp_path):
    x, _ = digits
    for i in (0, 1, 2):
        expected = str(int(predict(model, x[i:i + 1])[0].argmax()))
        path = tmp_path / f"mnist-{i}.png"
        path.write_bytes(png(x[i]))
        clear(page)
        _el(page, "file").send_keys(str(path))
        assert answer(page) == expected
        assert _el(page, "error").text == ""


def test_a_blank_page_says_not_sure(page, tmp_path):
    """serving.unsure flags a blank image whatever the net answers: the page says so in words."""
    from PIL import Image

    path = tmp_path / "blank.png"
    Image.new("L", (200, 150), 255).save(path)
    clear(page)
    _el(page, "file").send_keys(str(path))
    assert answer(page) != ""
    assert "not sure" in _el(page, "confidence").text
    assert "unsure" in _el(page, "digit").get_attribute("class")
    clear(page)
    draw(page, SEVEN)
    assert answer(page) == "7" and "not sure" not in _el(page, "confidence").text


def test_upload_something_that_is_not_an_image(page, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are notes, not a digit\n")
    clear(page)
    _el(page, "file").send_keys(str(path))
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 15).until(lambda d: _el(d, "error").text)
    assert "not an image" in _el(page, "error").text
    assert _el(page, "digit").text == ""


def test_no_script_errors_and_a_screenshot(page, tmp_path):
    clear(page)
    draw(page, SEVEN)
    assert answer(page) == "7"
    severe = [e for e in page.get_log("browser") if e["level"] == "SEVERE" and "400 (Bad Request)" not in e["message"]]
    assert severe == [], severe
    shot = tmp_path / "page.png"
    assert page.save_screenshot(str(shot))
    shutil.copyfile(shot, SCREENSHOT)
    assert shot.stat().st_size > 10_000


def test_the_page_asks_for_the_token(browser, onnx_model, tmp_path):
    """Last of the browser tests: it takes the browser to another server."""
    from selenium.webdriver.support.ui import WebDriverWait

    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    with http_server(onnx_model, token_file=token) as h:
        browser.get(h.base + "/")
        wait = WebDriverWait(browser, 15)
        wait.until(lambda d: _el(d, "auth").is_displayed())
        assert "token" in _el(browser, "error").text
        for given, shown in (("wrong", "refused"), ("s3cret-token", None)):
            field = _el(browser, "token")
            field.clear()
            field.send_keys(given)
            _el(browser, "auth").find_element("css selector", "button").click()
            if shown:
                wait.until(lambda d: shown in _el(d, "error").text and _el(d, "auth").is_displayed())
        wait.until(lambda d: "test accuracy" in _el(d, "model").text)
        assert not _el(browser, "auth").is_displayed()
        draw(browser, ONE)
        assert answer(browser) == "1"
        assert _el(browser, "error").text == ""


# ------------------------------------------------------------------------ package data --

def test_a_non_editable_install_has_the_page(tmp_path, onnx_model):
    """The wheel (what `pip install network3` installs) carries serving/web/, and a server run
    from that install (not from this source tree) serves the page.  Built from a copy of the
    sources, so the build leaves nothing in the working tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for package in ("serving", "training", "protos"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("network3-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (*WEB_FILES, "openapi.json"):
        assert f"serving/web/{name}" in names, sorted(n for n in names if n.startswith("serving/"))
    assert not any(n.startswith("tests/") for n in names)

    # Installed from the wheel (not the source tree), the server serves the page.
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site)}  # before the editable install's finder
    where = subprocess.run([sys.executable, "-c", "import serving.api.v1 as m; print(m.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(site)), (where.stdout, where.stderr[-1000:])
    log = tmp_path / "installed.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--model", str(onnx_model),
                                 "--port", "0", "--http-port", "0"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=f)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"network3 http on (http://\S+)", log.read_text(errors="replace"))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        for url, name in (("/", "index.html"), *((f"/web/{n}", n) for n in WEB_FILES)):
            with urllib.request.urlopen(m.group(1) + url, timeout=30) as answer:
                assert answer.status == 200 and answer.read() == (ROOT / "serving" / "web" / name).read_bytes(), url
    finally:
        proc.terminate()
        proc.wait(30)
