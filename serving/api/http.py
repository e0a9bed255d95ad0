"""HTTP/1.1 beside gRPC, in the same process and event loop: the KServe v2 / Open Inference
Protocol REST API as tritonclient.http and perf_analyzer speak it, and the routes of api/v1.py
(/v1, the page).

    GET  /v2/health/live, /v2/health/ready          200, or 400 when not ready (as Triton)
    GET  /v2                                        server metadata
    GET  /v2/models/{model}[/versions/{version}]    model metadata; .../ready, .../config
                                                    (Triton's ModelConfig as JSON), .../stats
    GET  /v2/models/stats                           every model's statistics (both share counters)
    POST /v2/repository/index                       the models: network3 and network3-image
    POST /v2/models/{model}[/versions/{version}]/infer
         JSON tensors (`data` flat or nested), Triton's binary tensor data extension both ways
         (Inference-Header-Content-Length, binary_data_size, binary_data, binary_data_output),
         the classification extension (an output's `classification` parameter), and
         Triton's `timeout` request parameter (microseconds) as the deadline.
         network3-image (contract.IMAGE_MODEL_NAME) takes `images` BYTES [N] of encoded
         files: binary data as 4-byte little-endian length-prefixed elements (what
         tritonclient.http sends), or JSON `data` as strings, each a file in base64.

The metadata, config and statistics are the protos the gRPC servicer answers (built once, in
api/inference.py), written as JSON with int64 fields as numbers, as Triton writes them; the
tensors are converted by serving.codec.

The middlewares do for every route, ours and v1's, what api.common.rpc does for every RPC:
the request id (X-Request-ID, or a new one; echoed in the response), draining (503), the
token (`Authorization: Bearer <token>` on everything but /v2/health/*, / and /web/*), the body
limit (Limits.max_message_bytes: a Content-Length over it is refused before the body is read;
aiohttp's client_max_size bounds what read() returns, after gzip/deflate decompression),
errors as `{"error": "..."}` with the status of errors.http_status, and one count (api "http",
the route's name, the HTTP status), one access-log line and, with tracing on, one span
(serving.tracing) per request.  A handler reports the images of a request as
`request[api.common.IMAGES]`; the request id is `request[REQUEST_ID_KEY]`.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from .. import codec
from ..credentials import Token
from ..errors import InvalidInput, Network3Error, TooLarge, Unauthenticated, Unavailable, http_status
from . import inference, v1
from .common import DRAINING, IMAGES, REQUEST_ID_KEY, Serving, now, safe_id

log = logging.getLogger("network3.server")

API = "http"  # the api label of HTTP requests in the metrics
REQUEST_ID = "X-Request-ID"
OPEN_ROUTES = ("/v2/health/", "/web/")  # route prefixes served without a token (and "/")
PARSE_INLINE_BYTES = 256 * 1024  # larger JSON headers are parsed in the decode pool, off the loop
JSON = "application/json"
HTTP_VERSIONS = ((1, 0), (1, 1))
# CORS (--cors-origin): what a page of an allowed origin may send, and read back.
CORS_REQUEST_HEADERS = "Authorization, Content-Type, Content-Encoding, Inference-Header-Content-Length, X-Request-ID"
CORS_EXPOSED_HEADERS = "Inference-Header-Content-Length, X-Request-ID"


def build_app(serving: Serving, token: Token | None = None, cors_origins: tuple[str, ...] = ()) -> web.Application:
    """The HTTP application: the v2 REST routes, then v1.add_routes, behind the middlewares.
    `token`: the one gRPC asks too (None: no token); `cors_origins`: browser origins allowed to
    call the API (CORS is off without them)."""
    app = web.Application(client_max_size=serving.limits.max_message_bytes,
                          middlewares=[_observe(serving, cors_origins), _guard(serving, token, cors_origins)])
    v2 = V2(serving)
    r = app.router
    r.add_get("/v2/health/live", v2.live, name="ServerLive")
    r.add_get("/v2/health/ready", v2.ready, name="ServerReady")
    r.add_get("/v2", v2.server_metadata, name="ServerMetadata")
    r.add_get("/v2/models/stats", v2.statistics, name="ModelStatisticsAll")
    r.add_post("/v2/repository/index", v2.repository_index, name="RepositoryIndex")
    for base, suffix in (("/v2/models/{model}", ""), ("/v2/models/{model}/versions/{version}", "Version")):
        r.add_get(base, v2.model_metadata, name=f"ModelMetadata{suffix}")
        r.add_get(f"{base}/ready", v2.model_ready, name=f"ModelReady{suffix}")
        r.add_get(f"{base}/config", v2.model_config, name=f"ModelConfig{suffix}")
        r.add_get(f"{base}/stats", v2.statistics, name=f"ModelStatistics{suffix}")
        r.add_post(f"{base}/infer", v2.infer, name=f"ModelInfer{suffix}")
    v1.add_routes(app, serving)
    return app


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps({"error": message}).encode(), content_type=JSON,
                        headers=headers)


def json_response(value, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(value, separators=(",", ":")).encode(), content_type=JSON)


# ----------------------------------------------------------------------------- middlewares --

def _observe(serving: Serving, cors_origins: tuple[str, ...] = ()):
    """Outermost: request id, in-flight count, errors -> responses, CORS headers, metrics, access log, span."""
    access = serving.access
    if access is not None:
        new_id = access.new_id
    else:
        ids, prefix = itertools.count(1), f"{os.getpid():x}-h"
        new_id = lambda: f"{prefix}{next(ids)}"  # noqa: E731

    @web.middleware
    async def observe(request: web.Request, handler):
        t0 = now()
        given = request.headers.get(REQUEST_ID)
        rid = safe_id(given) if given else new_id()
        request[REQUEST_ID_KEY] = rid
        traced = serving.tracing.http(request, _method(request)) if serving.tracing is not None else None
        serving.inflight += 1
        status = 499  # the client went away (nginx's code), unless the handler answers
        try:
            try:
                response = await handler(request)
            except web.HTTPException as e:
                response = e if e.status < 400 else _from_aiohttp(e, request)
            except Network3Error as e:
                code, message = http_status(e)
                response = error_response(code, message)
                if isinstance(e, Unauthenticated):
                    response.headers["WWW-Authenticate"] = "Bearer"
            except web.RequestPayloadError as e:  # a body aiohttp cannot read (bad gzip data, say)
                response = error_response(400, f"request body: {str(e).split(chr(10))[-1].strip() or 'unreadable'}")
            except HttpProcessingError as e:
                response = error_response(e.code if 400 <= e.code < 500 else 400, f"request: {e.message}")
            except (asyncio.CancelledError, ConnectionError):  # ConnectionError: the client went away mid-body
                raise  # counted as 499 below, with no traceback: nothing went wrong here
            except Exception:
                log.exception("%s %s failed", request.method, request.path)
                response = error_response(500, f"internal error in {_method(request)}")
            status = response.status
            response.headers[REQUEST_ID] = rid
            if cors_origins:
                _allow_origin(request, response, cors_origins)
            return response
        finally:
            serving.inflight -= 1
            seconds, method, images = now() - t0, _method(request), request.get(IMAGES, 0)
            serving.stats.method(API, method).record(str(status), images, seconds)
            if access is not None:
                access.write(rid, f"{API}.{method}", str(status), images, seconds)
            if traced is not None:
                traced.end(str(status), images, serving.model_name)

    return observe


def _guard(serving: Serving, token: Token | None, cors_origins: tuple[str, ...] = ()):
    """Inside observe: HTTP version (505), transfer coding (501), draining (503), a CORS
    preflight (204, before the token: browsers send none with it), the token (401), the body
    limit before reading (413)."""
    limit = serving.limits.max_message_bytes

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.version not in HTTP_VERSIONS:  # aiohttp's parser lets HTTP/0.9 and HTTP/2.0 lines through
            if request.version.major == 0 and request.transport is not None:
                # HTTP/0.9 has no status line, so no refusal it could read: close the connection.
                request.transport.close()
            return error_response(505, f"HTTP version {request.version.major}.{request.version.minor} not "
                                       "supported: send HTTP/1.1 (or 1.0)")
        codings = [c.strip().lower() for c in request.headers.get("Transfer-Encoding", "").split(",") if c.strip()]
        if codings and codings != ["chunked"]:  # aiohttp would read `gzip, chunked` as plain chunked
            return error_response(501, f"Transfer-Encoding {', '.join(codings)!r} not supported: only chunked "
                                       "(compress the body with Content-Encoding instead)")
        if serving.draining:
            raise Unavailable(DRAINING)
        if (cors_origins and request.method == "OPTIONS" and request.headers.get("Origin") in cors_origins
                and "Access-Control-Request-Method" in request.headers):
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": CORS_REQUEST_HEADERS, "Access-Control-Max-Age": "600"})
        if token is not None and not _open(request):
            got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not token.matches(got):
                raise Unauthenticated("missing or wrong token: send `Authorization: Bearer <token>`" if got
                                      else "missing token: send `Authorization: Bearer <token>`")
        if request.content_length is not None and request.content_length > limit:
            raise TooLarge(f"request body of {request.content_length:,} bytes, over the limit of {limit:,} "
                           f"(--max-message-bytes)")
        return await handler(request)

    return guard


def _allow_origin(request: web.Request, response: web.StreamResponse, origins: tuple[str, ...]) -> None:
    """CORS: an allowed Origin may read the answer (and the headers a v2 client needs)."""
    response.headers.add("Vary", "Origin")
    origin = request.headers.get("Origin")
    if origin in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED_HEADERS


def _open(request: web.Request) -> bool:
    """Routes served without a token, judged by the route matched (not the raw path)."""
    resource = request.match_info.route.resource
    if resource is None:
        return False
    path = resource.canonical
    return path == "/" or path.startswith(OPEN_ROUTES)


def _method(request: web.Request) -> str:
    """The metrics' and access log's method: the route's name, its path pattern, or `unmatched`."""
    route = request.match_info.route
    if route.name:
        return route.name
    return route.resource.canonical if route.resource is not None else "unmatched"


def _from_aiohttp(e: web.HTTPException, request: web.Request) -> web.Response:
    """aiohttp's own refusals (no route, wrong method, body over client_max_size) as our errors."""
    if e.status == 404 and request.match_info.route.resource is None:
        message = f"no such path: {request.method} {request.path[:200]}"
    elif e.status == 405:
        message = f"method {request.method} not allowed on {request.path[:200]}"
    elif e.status == 413:
        message = f"request body over the limit of {request.client_max_size:,} bytes (--max-message-bytes)"
    elif e.content_type == JSON and e.text:
        return web.Response(status=e.status, text=e.text, content_type=JSON)
    else:
        message = e.text or e.reason
    return error_response(e.status, message)


# -------------------------------------------------------------------------------- v2 REST --

class V2:
    """The v2 REST handlers: the path and body to arrays and protos, and back."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.serving.is_ready()
        return json_response({"ready": ready}, 200 if ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(proto_json(inference.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        meta = proto_json(inference.model_metadata(self.serving, *_model(request)))
        # InferParameter {"string_param": v} -> v, as parameters are in REST.
        meta["parameters"] = {k: next(iter(v.values()), None) for k, v in meta.get("parameters", {}).items()}
        return json_response(meta)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        inference.check_model(self.serving, name, version)
        ready = self.serving.is_ready()
        return json_response({"name": name, "ready": ready}, 200 if ready else 400)

    async def repository_index(self, request: web.Request) -> web.Response:
        """Triton's repository index: every model with its version and state.  An optional
        JSON body {"ready": true} lists only the ready ones (all or none here)."""
        body = await request.read()
        try:
            options = json.loads(body) if body.strip() else {}
        except ValueError:
            options = None
        if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
            raise InvalidInput('request body: expected nothing or a JSON object such as {"ready": true}')
        s = self.serving
        ready = s.is_ready()
        if options.get("ready") and not ready:
            return json_response([])
        state = "READY" if ready else "UNAVAILABLE"
        return json_response([{"name": name, "version": s.model_version, "state": state}
                              for name in inference.model_names(s)])

    async def model_config(self, request: web.Request) -> web.Response:
        return json_response(proto_json(inference.model_config(self.serving, *_model(request))))

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = _model(request) if "model" in request.match_info else ("", "")
        response = json_response(proto_json(inference.model_statistics(self.serving, name, version)))
        response.headers[inference.STATISTICS_SCOPE] = inference.statistics_scope(self.serving)
        return response

    async def infer(self, request: web.Request) -> web.Response:
        s = self.serving
        t0, ok = now(), False
        try:
            name, version = _model(request)
            encoded = inference.check_model(s, name, version)
            body = await request.read()
            header, binary = codec.rest_split(body, request.headers.get(codec.HEADER_LENGTH))
            limit = s.limits.max_images_per_request
            if len(header) > PARSE_INLINE_BYTES:
                r = await asyncio.get_running_loop().run_in_executor(s.decode_pool, codec.rest_request, header,
                                                                     binary, limit, encoded)
            else:
                r = codec.rest_request(header, binary, limit, encoded)
            request[IMAGES] = len(r.images)
            x = await inference.decode_images(s, r.images) if encoded else r.images
            logits, probs, model = await s.batcher.infer(x, None if r.timeout_s is None else t0 + r.timeout_s)
            body, header_length = codec.rest_response(r, logits, probs, model.labels, name, s.model_version)
            ok = True
        finally:
            s.stats.record_model_request(ok, now() - t0)
        if header_length is None:
            response = web.Response(body=body, content_type=JSON)
        else:
            response = web.Response(body=body, content_type="application/octet-stream",
                                    headers={codec.HEADER_LENGTH: str(header_length)})
        if "Accept-Encoding" in request.headers:
            response.enable_compression()  # gzip or deflate, as the client accepts (tritonclient's option)
        return response


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


# ----------------------------------------------------------------------------- proto JSON --

_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def proto_json(message) -> dict:
    """A proto as JSON the way Triton's HTTP endpoints write it: proto field names, every field
    (zeros too: perf_analyzer reads statistics' counts), and int64 fields as numbers (protobuf's
    JSON mapping writes them as strings)."""
    d = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _int64_as_numbers(message, d)
    return d


def _int64_as_numbers(message, d: dict) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.name not in d:
            continue
        value, sub = d[field.name], getattr(message, field.name)
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                v = field.message_type.fields_by_name["value"]
                if v.message_type is not None:
                    for key, item in sub.items():
                        _int64_as_numbers(item, value[str(key)])
                elif v.type in _INT64:
                    d[field.name] = {key: int(item) for key, item in value.items()}
            elif field.is_repeated:
                for item, item_d in zip(sub, value):
                    _int64_as_numbers(item, item_d)
            else:
                _int64_as_numbers(sub, value)
        elif field.type in _INT64:
            d[field.name] = [int(v) for v in value] if field.is_repeated else int(value)
