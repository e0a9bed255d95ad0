"""The /v1 HTTP API against a real server on a free port: raw bodies as curl sends them,
multipart with a bad part, refusals, top_k, the input preview, /v1/model, every path of the
OpenAPI document, and the page's static files with path traversal refused."""
from __future__ import annotations

import base64
import hashlib
import http.client as hc
import io
import json
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from fixtures_serving import png, thread_server

LIMITS = {"max_pixels": 1_000_000, "max_images_per_request": 8}


@dataclass
class Http:
    base: str  # http://127.0.0.1:PORT
    serving: object  # serving.api.common.Serving

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])


@contextmanager
def http_server(model, limits=LIMITS, **kw):
    """A real server (tests/fixtures_serving.thread_server) with HTTP on a free port."""
    with thread_server(model, http_port=0, limits=dict(limits), **kw) as s:
        yield Http(s.http_url, s.server.serving)


@pytest.fixture(scope="module")
def http(onnx_model):
    with http_server(onnx_model) as h:
        yield h


@pytest.fixture(scope="module")
def model(onnx_model):
    from serving.model import load_model
    return load_model(onnx_model)


def predict(model, pixels: np.ndarray) -> np.ndarray:
    """The served model's own probabilities for uint8 MNIST-format images [N, 28, 28]."""
    from serving.preprocess import pixels_to_input
    return model.predict(pixels_to_input(pixels))[1]


# ------------------------------------------------------------------------------- helpers --

def request(base: str, path: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, headers, body bytes); urllib sends a body with curl --data-binary's default
    Content-Type, application/x-www-form-urlencoded."""
    req = urllib.request.Request(base + path, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post_json(base: str, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    status, _, body = request(base, path, data, headers)
    return status, json.loads(body)


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """[(name, filename or None, bytes)] -> (body, Content-Type)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, filename, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"Content-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (urllib would normalise some)."""
    conn = hc.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def check_prediction(p: dict, probs: np.ndarray) -> None:
    assert set(p) >= {"digit", "confidence", "probabilities"}
    assert p["digit"] == int(probs.argmax())
    assert len(p["probabilities"]) == 10
    np.testing.assert_allclose(p["probabilities"], probs, atol=2e-6)
    assert p["confidence"] == pytest.approx(float(probs.max()), abs=2e-6)


# --------------------------------------------------------------------------------- tests --

def test_raw_body_as_curl_sends_it(http, model, digits):
    x, _ = digits
    probs = predict(model, x[:8])
    for i in range(8):
        status, body = post_json(http.base, "/v1/classify", png(x[i]))
        assert status == 200, body
        assert len(body["predictions"]) == 1
        p = body["predictions"][0]
        check_prediction(p, probs[i])
        assert "error" not in p and "source" not in p and "input" not in p and "top_k" not in p


def test_raw_body_with_no_or_any_content_type(http, model, digits):
    x, _ = digits
    probs = predict(model, x[:1])[0]
    for headers in ({"Content-Type": "image/png"}, {"Content-Type": "text/plain"}):
        status, body = post_json(http.base, "/v1/classify", png(x[0]), headers)
        assert status == 200, body
        check_prediction(body["predictions"][0], probs)
    # no Content-Type header at all
    c = hc.HTTPConnection("127.0.0.1", http.port, timeout=30)
    try:
        c.putrequest("POST", "/v1/classify", skip_accept_encoding=True)
        data = png(x[0])
        c.putheader("Content-Length", str(len(data)))
        c.endheaders(data)
        r = c.getresponse()
        assert r.status == 200
        check_prediction(json.loads(r.read())["predictions"][0], probs)
    finally:
        c.close()


def test_multipart_answers_in_order_with_a_bad_part_in_place(http, model, digits):
    x, _ = digits
    probs = predict(model, x[:3])
    body, content_type = multipart([("a", "one.png", png(x[0])), ("whatever", "notes.txt", b"not an image at all"),
                                    ("b", None, png(x[1])), ("images", "three.png", png(x[2]))])
    status, answer = post_json(http.base, "/v1/classify", body, {"Content-Type": content_type})
    assert status == 200, answer
    ps = answer["predictions"]
    assert [p["source"] for p in ps] == ["one.png", "notes.txt", "b", "three.png"]
    check_prediction(ps[0], probs[0])
    assert "digit" not in ps[1] and ps[1]["code"] == "INVALID_ARGUMENT"
    assert "not an image" in ps[1]["error"]
    check_prediction(ps[2], probs[1])
    check_prediction(ps[3], probs[2])


def test_raw_body_that_is_not_an_image_is_400(http):
    for data in (b"hello, I am text", b"\x89PNG\r\n\x1a\n truncated"):
        status, body = post_json(http.base, "/v1/classify", data)
        assert status == 400, body
        assert set(body) == {"error"} and body["error"]
    status, body = post_json(http.base, "/v1/classify", b"", {"Content-Type": "image/png"})
    assert status == 400 and "empty" in body["error"]


def test_server_goes_on_after_bad_requests(http, model, digits):
    x, _ = digits
    for data, headers in ((b"--x\r\nbroken", {"Content-Type": "multipart/form-data; boundary=x"}),
                          (b"abc", {"Content-Type": "multipart/form-data"}),
                          (multipart([])[0], {"Content-Type": multipart([])[1]})):
        status, _, body = request(http.base, "/v1/classify", data, headers)
        assert status == 400, body
        assert json.loads(body)["error"]
    status, body = post_json(http.base, "/v1/classify", png(x[3]))
    assert status == 200 and body["predictions"][0]["digit"] == int(predict(model, x[3:4])[0].argmax())


def test_limits(http, digits):
    x, _ = digits
    n = http.serving.limits.max_images_per_request
    body, content_type = multipart([(f"p{i}", None, png(x[i])) for i in range(n + 1)])
    status, answer = post_json(http.base, "/v1/classify", body, {"Content-Type": content_type})
    assert status == 413, answer
    assert str(n) in answer["error"]
    big = Image.new("L", (1200, 1000))  # 1.2 MP, over the fixture's 1 MP
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    status, answer = post_json(http.base, "/v1/classify", buf.getvalue())
    assert status in (413, 429), answer
    assert "pixels" in answer["error"]


def test_top_k(http, model, digits):
    x, _ = digits
    probs = predict(model, x[4:5])[0]
    status, body = post_json(http.base, "/v1/classify?top_k=3", png(x[4]))
    assert status == 200, body
    p = body["predictions"][0]
    order = np.argsort(-probs, kind="stable")[:3]
    assert [t["digit"] for t in p["top_k"]] == order.tolist()
    np.testing.assert_allclose([t["confidence"] for t in p["top_k"]], probs[order], atol=2e-6)
    assert p["top_k"][0]["digit"] == p["digit"]
    for bad in ("0", "11", "x", "-1", "2.5"):
        status, body = post_json(http.base, f"/v1/classify?top_k={bad}", png(x[4]))
        assert status == 400 and "top_k" in body["error"], (bad, body)


def test_input_preview_is_the_image_the_model_saw(http, model):
    from serving.preprocess import decode_image

    # A photo-like image: dark ink on a light, larger canvas; the model sees it normalised.
    im = Image.new("L", (120, 90), 230)
    from PIL import ImageDraw
    ImageDraw.Draw(im).line([(40, 15), (80, 15), (55, 80)], fill=20, width=9)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    status, body = post_json(http.base, "/v1/classify?input=1", buf.getvalue())
    assert status == 200, body
    p = body["predictions"][0]
    seen = Image.open(io.BytesIO(base64.b64decode(p["input"])))
    assert seen.format == "PNG" and seen.size == (28, 28) and seen.mode == "L"
    pixels = np.asarray(seen)
    np.testing.assert_array_equal(pixels, decode_image(buf.getvalue()))
    check_prediction(p, predict(model, pixels[None])[0])
    status, body = post_json(http.base, "/v1/classify?input=2", buf.getvalue())
    assert status == 400 and "input" in body["error"]


def test_model(http, onnx_model, model):
    status, _, raw = request(http.base, "/v1/model")
    assert status == 200
    m = json.loads(raw)
    meta = model.metadata
    assert m["name"] == "network3" and m["version"] == "1"
    assert m["sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert m["labels"] == [str(d) for d in range(10)]
    assert m["preset"] == meta.get("preset")
    assert m["test_accuracy"] == pytest.approx(float(meta["test_accuracy"]))
    assert 0.9 < m["test_accuracy"] < 1
    assert m["input"]["shape"] == [-1, 1, 28, 28] and m["input"]["polarity"] == "white-on-black"
    assert m["limits"]["max_images_per_request"] == http.serving.limits.max_images_per_request
    assert m["limits"]["max_pixels"] == http.serving.limits.max_pixels
    assert m["limits"]["max_message_bytes"] == http.serving.limits.max_message_bytes
    assert m["loaded_at"].endswith("Z")


def test_every_openapi_path_answers(http, digits):
    status, _, raw = request(http.base, "/v1/openapi.json")
    assert status == 200
    doc = json.loads(raw)
    assert doc["openapi"].startswith("3.")
    assert {"/v1/classify", "/v1/model", "/v1/openapi.json", "/", "/web/{file}"} <= set(doc["paths"])
    x, _ = digits
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            url = path
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    url = url.replace("{" + param["name"] + "}", param["example"])
            data = png(x[0]) if method == "post" else None
            status, _, body = request(http.base, url, data, method=method.upper())
            assert status == 200, (method, path, body[:200])
            assert str(status) in op["responses"]


def test_page_and_its_files(http):
    status, headers, body = request(http.base, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'id="pad"' in body and b"/web/app.js" in body
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("index.html", "text/html")):
        status, headers, body = request(http.base, f"/web/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind), (name, headers)
        assert headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", [
    "/web/../pyproject.toml", "/web/../../pyproject.toml", "/web/..%2f..%2fpyproject.toml", "/web/..%2Fapi%2Fv1.py",
    "/web/%2e%2e/%2e%2e/pyproject.toml", "/web/%2e%2e%2f%2e%2e%2fpyproject.toml", "/web//etc/passwd",
    "/web/%2Fetc%2Fpasswd", "/web/..\\..\\pyproject.toml", "/web/", "/web/.", "/web/..", "/web/nothing.js",
    "/web/../api/v1.py", "/web/%2e%2e%5cserving%5c__init__.py", "/web/app.js%00.png", "/web/../__init__.py",
])
def test_static_path_traversal_is_refused(http, path):
    status, body = raw_get(http.port, path)
    assert status == 404, (path, status, body[:200])
    assert b"[build-system]" not in body and b"root:" not in body and b"import" not in body


def test_token_guards_v1_but_not_the_page(onnx_model, tmp_path, digits):
    x, _ = digits
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    with http_server(onnx_model, token_file=token) as h:
        for path, data in (("/v1/classify", png(x[0])), ("/v1/model", None), ("/v1/openapi.json", None)):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
                status, response_headers, body = request(h.base, path, data, headers)
                assert status == 401, (path, headers, body[:200])
                assert "token" in json.loads(body)["error"]
            status, _, body = request(h.base, path, data, {"Authorization": "Bearer s3cret-token"})
            assert status == 200, (path, body[:200])
        for path in ("/", "/web/app.js", "/web/style.css", "/web/index.html"):
            status, _, _ = request(h.base, path)
            assert status == 200, path
        status, _ = raw_get(h.port, "/web/../v1/model")
        assert status in (401, 404)


def _chunked_post(port: int, path: str, chunks, content_type: str) -> tuple[int, dict]:
    """POST with Transfer-Encoding: chunked (no Content-Length for a middleware to check)."""
    conn = hc.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=iter(chunks), headers={"Content-Type": content_type},
                     encode_chunked=True)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed before we finished
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_body_limit_holds_for_chunked_bodies(onnx_model, digits):
    x, _ = digits
    limit = 300_000
    with http_server(onnx_model, limits={**LIMITS, "max_message_bytes": limit}) as h:
        noise = np.random.default_rng(0).integers(0, 256, (400, 400), np.uint8)  # ~160 KB as PNG
        body, content_type = multipart([("a", None, png(noise)), ("b", None, png(noise)), ("c", None, png(x[0]))])
        assert len(body) > limit
        pieces = [body[i:i + 65536] for i in range(0, len(body), 65536)]
        status, answer = _chunked_post(h.port, "/v1/classify", pieces, content_type)
        assert status == 413, answer
        assert f"{limit:,}" in answer["error"]
        status, answer = _chunked_post(h.port, "/v1/classify", [png(noise) * 2], "image/png")
        assert status == 413, answer
        # under the limit, chunked, it works
        body, content_type = multipart([("a", None, png(x[0])), ("b", None, png(x[1]))])
        status, answer = _chunked_post(h.port, "/v1/classify", [body[:100], body[100:]], content_type)
        assert status == 200 and len(answer["predictions"]) == 2, answer


def test_v1_requests_are_counted_with_their_images(onnx_model, digits):
    x, _ = digits
    with http_server(onnx_model) as h:
        body, content_type = multipart([("a", None, png(x[0])), ("b", None, b"nope"), ("c", None, png(x[1]))])
        status, _ = post_json(h.base, "/v1/classify", body, {"Content-Type": content_type})
        assert status == 200
        status, _ = post_json(h.base, "/v1/classify", b"nope")
        assert status == 400
        counted = h.serving.stats.method("http", "Classify")
        assert counted.codes == {"200": 1, "400": 1} and counted.images == 4
        request(h.base, "/v1/model")
        assert h.serving.stats.method("http", "GetModelInfo").codes == {"200": 1}


@pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader")
@pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionParam")
def test_mangled_bodies_get_4xx_and_the_server_goes_on(http, model, digits):
    """Truncated, corrupted and odd multipart bodies: a 4xx with {"error"} or a 200 with the bad
    parts answered in place, never a 500, and the server keeps answering."""
    x, _ = digits
    rng = np.random.default_rng(1)
    good, content_type = multipart([("a", "a.png", png(x[0])), ("b", "b.png", png(x[1]))])
    bodies = [good[:n] for n in (10, 60, len(good) // 2, len(good) - 5)]
    for _ in range(20):
        b = bytearray(good)
        for i in rng.integers(0, len(b), 8):
            b[i] = int(rng.integers(0, 256))
        bodies.append(bytes(b))
    for body in bodies:
        status, _, raw = request(http.base, "/v1/classify", body, {"Content-Type": content_type})
        assert status in (200, 400), (status, raw[:300])
        answer = json.loads(raw)
        assert "error" in answer if status == 400 else len(answer["predictions"]) >= 1
    for ct in ("multipart/form-data; boundary=", "multipart/form-data; boundary=\"\"", "multipart/mixed; boundary=zz",
               "multipart/form-data; boundary=" + "x" * 5000):
        status, _, raw = request(http.base, "/v1/classify", good, {"Content-Type": ct})
        assert status in (200, 400), (ct[:60], status, raw[:300])
    status, body = post_json(http.base, "/v1/classify", png(x[5]))
    assert status == 200 and body["predictions"][0]["digit"] == int(predict(model, x[5:6])[0].argmax())


def test_a_server_process_serves_v1_and_the_page(process_server, model, digits):
    """`python -m serving.server` as deployed: the curl example and the page on its HTTP port."""
    x, _ = digits
    s = process_server()
    status, body = post_json(s.http_url, "/v1/classify", png(x[6]))
    assert status == 200, body
    assert body["predictions"][0]["digit"] == int(predict(model, x[6:7])[0].argmax())
    status, headers, page = request(s.http_url, "/")
    assert status == 200 and b'id="pad"' in page
