"""Talk to a network3 server from Python, or run the same model in-process.

    with Client("127.0.0.1:50051") as c:
        for p in c.classify([open("seven.png", "rb").read()]):
            print(p.digit, p.probability)

Like tritonclient: a context manager, a deadline on every call, and every grpc.RpcError turned
into one exception, `ClientError`, which carries the status code by name ("UNAVAILABLE").  UNAVAILABLE (a server
restarting, a dropped connection) is retried with backoff until `timeout` seconds have passed
without an answer, and so, in a stream, is a request refused whole because the server is busy
(RESOURCE_EXHAUSTED: its queue is full); nothing else is retried.

An image is encoded file bytes (PNG, JPEG, ...; the server decodes it) or a uint8 [28, 28]
array already in MNIST format (see `serving.preprocess`); in a stream an item may also be an
Exception, which comes back as that item's error, in its place.  `LocalClassifier` has the same
interface (`serving.classifier.Classifier`) and runs `serving.preprocess` and onnxruntime in
this process.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.network3.v1 import classifier_pb2 as pb
from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

from .classifier import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, Classifier
from .contract import MAX_MESSAGE_BYTES, SIDE
from .local import LocalClassifier
from .predictions import ClientError, Item, Prediction, _failed
from .stream import END, Backoff, Feed, Stream
from .wire import client_error, from_proto, image

__all__ = ["Classifier", "Client", "ClientError", "LocalClassifier", "Prediction", "DEFAULT_ADDRESS",
           "DEFAULT_TIMEOUT"]


class Client(Classifier):
    """A network3.v1.DigitClassifier client.  Thread-safe for unary calls; one stream at a time
    per thread."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float = DEFAULT_TIMEOUT,
                 tls: bool = False, tls_ca: str | Path | bytes | None = None,
                 tls_cert: str | Path | bytes | None = None, tls_key: str | Path | bytes | None = None,
                 tls_server_name: str | None = None, token: str | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.address, self.timeout = address, float(timeout)
        self.max_message_bytes = max_message_bytes
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Reconnect quickly after a server restart; gRPC's default waits up to two minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls or tls_ca or tls_cert or tls_key:
            creds = grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))
            self._channel = grpc.secure_channel(address, creds, options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.DigitClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- lifecycle (a context manager: Classifier's __enter__ and __exit__) -------------------

    def close(self) -> None:
        self._channel.close()

    # -- unary calls ------------------------------------------------------------------------

    def _call(self, method, request, timeout: float | None = None):
        """One unary call with a deadline; UNAVAILABLE is retried with backoff until the budget
        (timeout seconds from the first try) runs out."""
        budget = self.timeout if timeout is None else timeout
        end = time.monotonic() + budget
        backoff = Backoff()
        unreachable = None  # the last UNAVAILABLE: the truth if a retry then runs out of time
        while True:
            left = end - time.monotonic()
            try:
                return method(request, timeout=max(left, 0.001), metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    unreachable = e
                    if backoff.wait(end):
                        continue
                elif e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and unreachable is not None:
                    # The budget ended while the channel was still reconnecting: the server was
                    # never reached, which is what the caller needs to hear (not "too slow").
                    e = unreachable
                raise client_error(e, self.address) from None

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ... (grpc.health.v1)."""
        r = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def info(self, timeout: float | None = None) -> dict:
        """The served model: name, version, sha256, loaded_at, labels, providers, limits, path and
        the ONNX metadata (preset, test_accuracy, input contract, provenance...)."""
        m = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return {
            "name": m.name, "version": m.version, "sha256": m.sha256,
            "loaded_at": m.loaded_at.ToDatetime().isoformat() + "Z" if m.HasField("loaded_at") else "",
            "labels": list(m.labels), "providers": list(m.providers), "path": m.path,
            "limits": {"max_batch_size": m.limits.max_batch_size,
                       "max_images_per_request": m.limits.max_images_per_request,
                       "max_message_bytes": m.limits.max_message_bytes, "max_pixels": m.limits.max_pixels},
            "metadata": dict(m.metadata),
        }

    def classify(self, images: Sequence[bytes | np.ndarray] | np.ndarray, *, top_k: int | None = None,
                 ids: Sequence[str] | None = None, batch_size: int = 256) -> list[Prediction]:
        """Classify images with unary calls of up to batch_size images.  Any bad image fails its
        call: a ClientError (INVALID_ARGUMENT naming the image).  For per-image errors and big
        jobs use classify_stream."""
        if isinstance(images, np.ndarray):
            images = list(images.reshape(-1, SIDE, SIDE))
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            names = ids[start:start + batch_size] if ids is not None else [""] * len(chunk)
            req = pb.ClassifyRequest(images=[image(im, i) for im, i in zip(chunk, names)])
            if top_k:
                req.top_k = top_k
            resp = self._call(self._stub.Classify, req)
            out += [from_proto(p) for p in resp.predictions]
        return out

    # -- streaming --------------------------------------------------------------------------

    def classify_stream(self, images: Iterable[Item], *, batch_size: int = 64, window: int = 8,
                        top_k: int | None = None, max_request_bytes: int | None = None) -> Iterator[Prediction]:
        """Classify any number of images over one ClassifyStream, `batch_size` images (and at
        most max_request_bytes, default 90% of the message limit) a request and at most
        `window` requests in flight, so memory stays flat; predictions come back in
        input order, one per item, failures included (an item that is an Exception, or an
        image the server could not read, comes back with `error` set).

        If the server goes away, the requests it had not answered are sent again on a new
        stream once it is back (UNAVAILABLE is retried for up to `timeout` seconds); if no
        answer comes for `timeout` seconds while requests are in flight, ClientError
        DEADLINE_EXCEEDED."""
        if window < 1 or batch_size < 1:
            raise ValueError("window and batch_size must be at least 1")
        feed = Feed(iter(images), batch_size, window, top_k,
                    max_request_bytes or int(self.max_message_bytes * 0.9))
        stream = Stream(self._stub.ClassifyStream, self._metadata, self.timeout, self.address, feed)
        try:
            answers: Iterator[Prediction] = iter(())
            while True:
                token = feed.next_token(stream.revive)
                if token is END:
                    return
                if token is not None:  # this item failed before it could be sent
                    yield _failed(token)
                    continue
                p = next(answers, None)
                while p is None:
                    answers = stream.next_answers()
                    p = next(answers, None)
                yield p
        finally:
            feed.close()
            stream.close()


def _read(x: str | Path | bytes | None) -> bytes | None:
    if x is None or isinstance(x, bytes):
        return x
    return Path(x).read_bytes()
