"""The thinnest v2 REST server, bench_http.py's reference: aiohttp (network3's HTTP stack),
onnxruntime called inline in the handler, no batcher, no metrics, no access log, no auth, no
limits beyond aiohttp's own.  Just enough of the protocol for perf_analyzer -i http and
tritonclient.http: /v2/health/{live,ready}, /v2 (server metadata), the model's metadata, config, ready and stats
(the protos reference_server.py answers over gRPC, as JSON, built once) and
POST /v2/models/network3[/versions/1]/infer with JSON or Triton's binary tensor data both ways
(serving.codec's REST parsing and response writing, which check the input as network3 does).

    python benchmarks/reference_http.py --model model.onnx --port 8000 [--stack starlette]

`--stack starlette` serves the same handlers with Starlette under uvicorn in the same asyncio
loop (KServe's model server's stack; uvicorn and starlette are not network3's dependencies:
`pip install uvicorn starlette` for this comparison only).  `--http h11|httptools` is uvicorn's
HTTP parser (uvicorn[standard] brings httptools; plain `pip install uvicorn` has only h11).

Prints `reference http serving on 127.0.0.1:PORT` on stderr once it serves.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_server import Reference  # noqa: E402  (the gRPC reference: its session and protos)
from serving import codec  # noqa: E402
from serving.api.http import proto_json  # noqa: E402
from serving.contract import INPUT_NAME, LABELS, MAX_IMAGES_PER_REQUEST, MODEL_NAME, MODEL_VERSION  # noqa: E402
from serving.errors import Network3Error, http_status  # noqa: E402

JSON = "application/json"
OCTETS = "application/octet-stream"


class Handlers:
    """What both stacks serve: (status, body, headers) from the path's model and the body."""

    def __init__(self, model: str, threads: int) -> None:
        ref = Reference(model, threads)
        self.session = ref.session

        def answer(coro, field=None) -> bytes:
            message = asyncio.run(coro)
            return json.dumps(proto_json(getattr(message, field) if field else message), separators=(",", ":")).encode()

        self.server = answer(ref.ServerMetadata(None, None))
        self.metadata = answer(ref.ModelMetadata(None, None))
        self.config = answer(ref.ModelConfig(None, None), "config")  # REST answers the ModelConfig itself
        self.stats = answer(ref.ModelStatistics(None, None))
        self.ready = json.dumps({"name": MODEL_NAME, "ready": True}).encode()

    def infer(self, model: str, body: bytes, header_length: str | None) -> tuple[int, bytes, dict]:
        if model != MODEL_NAME:
            return 404, json.dumps({"error": f"no model {model[:100]!r}"}).encode(), {"Content-Type": JSON}
        try:
            header, binary = codec.rest_split(body, header_length)
            r = codec.rest_request(header, binary, MAX_IMAGES_PER_REQUEST)
            logits, probs = self.session.run(None, {INPUT_NAME: r.images})
            out, length = codec.rest_response(r, logits, probs, LABELS, MODEL_NAME, MODEL_VERSION)
        except Network3Error as e:
            status, message = http_status(e)
            return status, json.dumps({"error": message}).encode(), {"Content-Type": JSON}
        if length is None:
            return 200, out, {"Content-Type": JSON}
        return 200, out, {"Content-Type": OCTETS, codec.HEADER_LENGTH: str(length)}


# ------------------------------------------------------------------------------- aiohttp --

def aiohttp_app(h: Handlers):
    from aiohttp import web

    def fixed(body: bytes):
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=JSON)
        return handler

    async def infer(request: web.Request) -> web.Response:
        status, body, headers = h.infer(request.match_info["model"], await request.read(),
                                        request.headers.get(codec.HEADER_LENGTH))
        return web.Response(status=status, body=body, headers=headers)

    app = web.Application(client_max_size=1 << 30)
    r = app.router
    r.add_get("/v2/health/live", fixed(b'{"live":true}'))
    r.add_get("/v2/health/ready", fixed(b'{"ready":true}'))
    r.add_get("/v2", fixed(h.server))
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(base, fixed(h.metadata))
        r.add_get(f"{base}/config", fixed(h.config))
        r.add_get(f"{base}/ready", fixed(h.ready))
        r.add_get(f"{base}/stats", fixed(h.stats))
        r.add_post(f"{base}/infer", infer)
    return app


async def serve_aiohttp(h: Handlers, sock: socket.socket) -> None:
    from aiohttp import web

    runner = web.AppRunner(aiohttp_app(h), handle_signals=False, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    announce(sock)
    await asyncio.Event().wait()


# ----------------------------------------------------------------------------- starlette --

def starlette_app(h: Handlers):
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    def fixed(body: bytes):
        async def handler(request) -> Response:
            return Response(body, media_type=JSON)
        return handler

    async def infer(request) -> Response:
        status, body, headers = h.infer(request.path_params["model"], await request.body(),
                                        request.headers.get(codec.HEADER_LENGTH))
        return Response(body, status_code=status, headers=headers)

    routes = [Route("/v2/health/live", fixed(b'{"live":true}')), Route("/v2/health/ready", fixed(b'{"ready":true}')),
              Route("/v2", fixed(h.server))]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [Route(base, fixed(h.metadata)), Route(f"{base}/config", fixed(h.config)),
                   Route(f"{base}/ready", fixed(h.ready)), Route(f"{base}/stats", fixed(h.stats)),
                   Route(f"{base}/infer", infer, methods=["POST"])]
    return Starlette(routes=routes)


async def serve_starlette(h: Handlers, sock: socket.socket, http: str) -> None:
    import uvicorn

    config = uvicorn.Config(starlette_app(h), loop="none", http=http, lifespan="off", access_log=False,
                            log_level="warning")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # uvicorn < 0.29; newer ones look at the thread
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
        await asyncio.sleep(0.01)
    announce(sock)
    await task


# ---------------------------------------------------------------------------------- main --

def announce(sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    print(f"reference http serving on {host}:{port}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--intra-op-threads", type=int, default=1)
    ap.add_argument("--stack", choices=("aiohttp", "starlette"), default="aiohttp")
    ap.add_argument("--http", choices=("h11", "httptools"), default="h11", help="uvicorn's parser (--stack starlette)")
    args = ap.parse_args()
    h = Handlers(args.model, args.intra_op_threads)
    # IPPROTO_TCP, as asyncio's own create_server: only then does asyncio set TCP_NODELAY on the
    # connections (aiohttp sets it itself, uvicorn does not: with proto 0 each Starlette answer
    # waits ~40 ms for the client's delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    sock.setblocking(False)
    coro = serve_aiohttp(h, sock) if args.stack == "aiohttp" else serve_starlette(h, sock, args.http)
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
