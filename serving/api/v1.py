"""The /v1 HTTP API and the web page: /v1/classify, /v1/model, /v1/openapi.json, / and /web/*.

serving.api.http.build_app calls add_routes(app, serving) after its own routes; the handlers
raise domain errors (serving.errors) and rely on build_app's middlewares for auth, errors,
request ids, the access log and body limits.  Like the gRPC servicers, this module only turns
the wire into arrays and arrays back into the wire: decoding is serving.preprocess, inference
the batcher, ranking serving.model.top_k.

  POST /v1/classify[?top_k=K][&input=1]  one image as the raw body (any Content-Type), or
      several as multipart/form-data (any part names) -> {"predictions": [...]}, one per image in
      order, with the fields of a `network3 classify --format jsonl` line (digit, confidence,
      unsure, probabilities, top_k); in a multipart request a bad image is answered in place
      ({"error", "code"}), a raw body that is not an image is refused (400).  input=1 adds
      "input": the 28x28 image the model saw, as a base64 PNG.
  GET /v1/model          the model's metadata, input contract and the server's limits.
  GET /v1/openapi.json   the OpenAPI 3 description of the above (serving/web/openapi.json).
  GET / and /web/{file}  the page: only the files of the package's own serving/web/ folder.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
from importlib import resources

import numpy as np
from aiohttp import web

from .. import preprocess
from ..contract import CLASSES, INPUT_CONTRACT
from ..errors import STATUS_NAMES, InvalidInput, Network3Error, TooLarge
from ..model import top_k as rank
from .common import IMAGES, now

WEB_PACKAGE = "serving"
WEB_FOLDER = "web"
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".json": "application/json",
                 ".png": "image/png", ".svg": "image/svg+xml", ".ico": "image/x-icon"}
# The page loads its own script and style only; drawn digits and previews are data: URLs.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def add_routes(app: web.Application, serving) -> None:
    files = web_files()
    openapi = files.get("openapi.json")

    async def classify(request: web.Request) -> web.Response:
        k = _top_k(request.query.get("top_k"))
        want_input = _flag(request.query.get("input"), "input")
        limits = serving.limits
        multipart = request.content_type.startswith("multipart/")
        if multipart:
            names, items = await _parts(request, limits.max_images_per_request, limits.max_message_bytes)
        else:
            names, items = [None], [await request.read()]
        request[IMAGES] = len(items)  # for the access log and the metrics (api.http)
        t0, ok = now(), False
        try:
            pixels, errors, pngs = await asyncio.get_running_loop().run_in_executor(
                serving.decode_pool, _decode, items, limits.max_pixels, want_input)
            if not multipart and errors[0] is not None:
                raise errors[0]  # one raw body that is not an image: the request is wrong
            good = [i for i, e in enumerate(errors) if e is None]
            probs = np.empty((0, CLASSES), np.float32)
            x = preprocess.pixels_to_input(pixels[good])
            model = serving.model
            if good:
                _, probs, model = await serving.batcher.infer(x, None)
            ok = True
        finally:
            serving.stats.record_model_request(ok, now() - t0)
        answers = dict(zip(good, _predictions(probs, model.unsure(x, probs), k)))
        out = []
        for i, name in enumerate(names):
            p = answers.get(i) or _failed(errors[i])
            if name is not None:
                p = {"source": name, **p}
            if want_input and i in answers:
                p["input"] = pngs[i]
            out.append(p)
        return web.json_response({"predictions": out})

    async def model_info(request: web.Request) -> web.Response:
        return web.json_response(describe(serving))

    async def openapi_json(request: web.Request) -> web.Response:
        if openapi is None:
            raise web.HTTPNotFound(text="openapi.json is missing from the package")
        return web.Response(body=openapi[0], content_type="application/json")

    async def page(request: web.Request) -> web.Response:
        return _file(files, "index.html")

    async def static(request: web.Request) -> web.Response:
        return _file(files, request.match_info["name"])

    # The names are what the metrics and the access log call them (api "http").
    app.router.add_post("/v1/classify", classify, name="Classify")
    app.router.add_get("/v1/model", model_info, name="GetModelInfo")
    app.router.add_get("/v1/openapi.json", openapi_json, name="OpenAPI")
    app.router.add_get("/", page, name="Page")
    app.router.add_get("/web/{name}", static, name="WebFile")


# ------------------------------------------------------------------------------- the page --

def web_files() -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, content type)} of the package's serving/web/ folder, read once.
    Only these names are ever served, so no request path can reach another file."""
    folder = resources.files(WEB_PACKAGE) / WEB_FOLDER
    out = {}
    if folder.is_dir():
        for entry in folder.iterdir():
            suffix = entry.name[entry.name.rfind("."):] if "." in entry.name else ""
            if entry.is_file() and suffix in CONTENT_TYPES:
                out[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return out


def _file(files: dict, name: str) -> web.Response:
    found = files.get(name)
    if found is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no such file: /web/{name[:100]}"}),
                               content_type="application/json")
    body, content_type = found
    charset = "utf-8" if content_type.startswith("text/") or content_type.endswith("json") else None
    return web.Response(body=body, content_type=content_type, charset=charset, headers=PAGE_HEADERS)


# ------------------------------------------------------------------------------ /v1/model --

def describe(serving) -> dict:
    model, limits = serving.model, serving.limits
    meta = dict(model.metadata)
    return {
        "name": serving.model_name,
        "version": serving.model_version,
        "sha256": model.sha256,
        "loaded_at": datetime.datetime.fromtimestamp(model.loaded_at, datetime.timezone.utc)
                     .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "labels": list(model.labels),
        "preset": meta.get("preset"),
        "test_accuracy": _number(meta.get("test_accuracy")),
        "input": _json(meta.get("input")) or INPUT_CONTRACT,
        "unsure_below": model.unsure_below,  # null: the file has none, only blank images are flagged
        "providers": list(model.providers),
        "limits": {"max_images_per_request": limits.max_images_per_request, "max_pixels": limits.max_pixels,
                   "max_message_bytes": limits.max_message_bytes,
                   "max_batch_size": getattr(getattr(serving.batcher, "options", None), "max_batch_size", None)},
        "metadata": meta,
    }


def _number(value):
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _json(value):
    try:
        return json.loads(value) if value else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- /v1/classify --

def _top_k(value: str | None) -> int:
    if value is None:
        return 0
    try:
        k = int(value)
    except ValueError:
        k = -1
    if not 1 <= k <= CLASSES:
        raise InvalidInput(f"top_k: {value[:20]!r} must be a whole number from 1 to {CLASSES}")
    return k


def _flag(value: str | None, name: str) -> bool:
    if value is None or value.lower() in ("", "0", "false", "no"):
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    raise InvalidInput(f"{name}: {value[:20]!r} must be 1 or 0")


async def _parts(request: web.Request, max_images: int, max_bytes: int) -> tuple[list[str], list[bytes]]:
    """The parts of a multipart body, each one image: (their names, their bytes).  Counted as
    they arrive, so a request over the limits is refused before it is all read (aiohttp's
    client_max_size bounds read() and post(), not multipart(); a chunked body has no
    Content-Length for api.http to check)."""
    try:
        reader = await request.multipart()
    except Exception as e:  # no boundary, not multipart after all
        raise InvalidInput(f"multipart body: {_why(e)}") from None
    names, items, total = [], [], 0
    try:
        while True:
            part = await reader.next()
            if part is None:
                break
            if len(items) == max_images:
                raise TooLarge(f"more than {max_images} images in one request (--max-images-per-request)")
            chunks = []
            while chunk := await part.read_chunk(1 << 16):
                total += len(chunk)
                if max_bytes and total > max_bytes:
                    raise TooLarge(f"request body over the limit of {max_bytes:,} bytes (--max-message-bytes)")
                chunks.append(chunk)
            names.append(part.filename or part.name or f"part {len(items)}")
            items.append(b"".join(chunks))
    except (Network3Error, web.HTTPException):
        raise
    except Exception as e:  # aiohttp's parser raises several types for a body that breaks the format
        raise InvalidInput(f"multipart body: {_why(e)}") from None
    if not items:
        raise InvalidInput("multipart body: no parts; send one image per part")
    return names, items


def _why(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _decode(items: list[bytes], max_pixels: int, want_input: bool):
    """In the decode pool: (uint8 [N, 28, 28], errors, base64 PNGs of the good ones or None)."""
    pixels, errors = preprocess.decode_many(items, max_pixels)
    pngs = [_png(p) if e is None else None for p, e in zip(pixels, errors)] if want_input else None
    return pixels, errors, pngs


def _png(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _predictions(probs: np.ndarray, unsure: np.ndarray, k: int) -> list[dict]:
    """One dict per row, the fields and precision of a `classify --format jsonl` line."""
    if not len(probs):
        return []
    digits = probs.argmax(1)
    best = probs[np.arange(len(probs)), digits]
    rows = np.round(probs.astype(np.float64), 6).tolist()
    out = [{"digit": d, "confidence": round(p, 6), "unsure": u, "probabilities": row}
           for d, p, u, row in zip(digits.tolist(), best.astype(np.float64).tolist(), unsure.tolist(), rows)]
    if k:
        order, top = rank(probs, k)
        for p, o, t in zip(out, order.tolist(), np.round(top.astype(np.float64), 6).tolist()):
            p["top_k"] = [{"digit": j, "confidence": q} for j, q in zip(o, t)]
    return out


def _failed(e: Exception) -> dict:
    code = next((STATUS_NAMES[c] for c in type(e).__mro__ if c in STATUS_NAMES), "INVALID_ARGUMENT")
    return {"error": str(e) or type(e).__name__, "code": code}
