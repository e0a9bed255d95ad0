"""The recorded set of mouse-drawn digits (tests/data/mouse/, issue 19): the manifest matches
the files and the trajectory generator, and redrawing recorded trajectories on the page in
headless Chromium gives the recorded pad pixels and the recorded 28x28 input, pixel for pixel.
No accuracy threshold here: the set is a test set, scored by benchmarks/mouse_set.py."""
from __future__ import annotations

import base64
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import mouse_digits as M
from fixtures_serving import ROOT
from test_v1 import http_server

SET = ROOT / "tests" / "data" / "mouse"


def manifest() -> list[dict]:
    return [json.loads(line) for line in (SET / "manifest.jsonl").read_text().splitlines()]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_the_manifest_matches_the_files_and_the_generator():
    items = manifest()
    assert Counter(i["label"] for i in items) == {d: 20 for d in range(10)}
    assert {i["template"] for i in items} == set(M.TEMPLATES)  # every way of writing each digit is in
    assert len({i["seed"] for i in items}) == len(items)
    files = sorted(p.name for p in (SET / "png").iterdir())
    assert files == sorted(i["file"].split("/")[1] for i in items)
    assert files == sorted(p.name for p in (SET / "seen").iterdir())
    import hashlib
    for i in items:
        assert M.LABELS[i["template"]] == i["label"]
        assert i["writer"] == M.writer(i["seed"])
        assert [[tuple(p) for p in s] for s in i["strokes"]] == M.trajectory(i["template"], i["seed"])
        pad = pixels(SET / i["file"])
        assert pad.shape == (M.PAD, M.PAD) and pad.dtype == np.uint8
        assert hashlib.sha256(pad.tobytes()).hexdigest() == i["pixels_sha256"], i["file"]
        seen = pixels(SET / i["seen"])
        assert seen.shape == (28, 28) and seen.dtype == np.uint8 and seen.max() > 128
        assert i["chromium"] and i["date"]


@pytest.fixture(scope="module")
def page(onnx_model, tmp_path_factory):
    why = M.missing()
    if why:
        pytest.skip(why)
    with http_server(onnx_model) as h:
        driver = M.browser(tmp_path_factory.mktemp("chromium"))
        try:
            M.open_page(driver, h.base)
            yield driver
        finally:
            driver.quit()


# One drawing per digit, a different template each, drawn again in the browser.
REDRAW = [f"{d}-{(3 * d) % 20:02d}.png" for d in range(10)]


@pytest.mark.parametrize("name", REDRAW)
def test_redrawing_a_recorded_trajectory_gives_the_recorded_images(page, name):
    item, = [i for i in manifest() if i["file"] == f"png/{name}"]
    M.clear(page)
    M.draw(page, [[tuple(p) for p in s] for s in item["strokes"]])
    got = M.read_page(page)
    assert got["error"] == "" and got["sent"], got["error"]
    assert np.array_equal(M.pad_pixels(got["sent"]), pixels(SET / item["file"])), name
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["answer"]["predictions"][0]["input"]))))
    assert np.array_equal(seen, pixels(SET / item["seen"])), name  # the server's preprocessing, not the model
