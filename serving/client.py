"""Talk to a network3 server from Python, or run the same model in-process.

    with Client("127.0.0.1:50051") as c:
        for p in c.classify([open("seven.png", "rb").read()]):
            print(p.digit, p.probability)

Like tritonclient: a context manager, a deadline on every call, and every grpc.RpcError turned
into one exception, `ClientError`, which carries the status code.  UNAVAILABLE (a server
restarting, a dropped connection) is retried with backoff until `timeout` seconds have passed
without an answer; nothing else is retried.

An image is encoded file bytes (PNG, JPEG, ...; the server decodes it) or a uint8 [28, 28]
array already in MNIST format (see `serving.preprocess`); in a stream an item may also be an
Exception, which comes back as that item's error, in its place.  `LocalClassifier` has the same
methods and runs `serving.preprocess` and onnxruntime in this process.
"""
from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.network3.v1 import classifier_pb2 as pb
from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

from . import preprocess
from .errors import STATUS_NAMES, Network3Error, Overloaded

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Item = Union[bytes, np.ndarray, BaseException]

# Codes that mean "the server is not there for us" (the CLI's exit code 3), as opposed to a
# problem with one request or image.
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.DEADLINE_EXCEEDED})


class ClientError(Network3Error):
    """A call failed.  `code` is the grpc.StatusCode, `details` the server's (or gRPC's) message."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str = ""):
        self.code, self.details, self.address = code, details, address
        super().__init__(f"{code.name}: {details}" if details else code.name)

    @property
    def unreachable(self) -> bool:
        """The server could not be reached, refused us (auth, TLS) or stopped answering."""
        return self.code in UNREACHABLE

    @classmethod
    def from_rpc(cls, e: grpc.RpcError, address: str = "") -> "ClientError":
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else str(e)) or ""
        return cls(code or grpc.StatusCode.UNKNOWN, details.strip().splitlines()[0] if details.strip() else "", address)


@dataclass
class Prediction:
    """One image's answer.  On failure `error` is set (and `code`, a status name) and the rest empty."""

    digit: int = -1
    probability: float = 0.0
    probabilities: list[float] = field(default_factory=list)
    label: str = ""  # the model's label for `digit`
    top_k: list[tuple[int, float]] = field(default_factory=list)
    id: str = ""
    error: str | None = None
    code: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _failed(e: BaseException, id: str = "") -> Prediction:
    if isinstance(e, ClientError):
        code = e.code.name
    else:  # our domain errors by their status name; anything else (a file that cannot be read) is bad input
        code = next((STATUS_NAMES[c] for c in type(e).__mro__ if c in STATUS_NAMES), "INVALID_ARGUMENT")
    return Prediction(id=id, error=str(e) or type(e).__name__, code=code)


def _from_proto(p: pb.Prediction) -> Prediction:
    if p.HasField("error"):
        return Prediction(id=p.id, error=p.error.message, code=_code_name(p.error.code))
    return Prediction(digit=p.digit, probability=p.probability, probabilities=list(p.probabilities),
                      label=p.label, top_k=[(c.digit, c.probability) for c in p.top_k], id=p.id)


def _code_name(number: int) -> str:
    for c in grpc.StatusCode:
        if c.value[0] == number:
            return c.name
    return str(number)


def _image(item: bytes | np.ndarray, id: str = "") -> pb.Image:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(item), id=id)
    a = np.asarray(item)
    if a.dtype != np.uint8 or a.size != preprocess.PIXELS:
        raise ValueError(f"pixels must be uint8 with {preprocess.PIXELS} values (28x28), got {a.dtype} {a.shape}")
    return pb.Image(pixels=a.tobytes(), id=id)


def _flat(items: Iterable[Item]) -> Iterator[Item]:
    """Items one by one; a uint8 [N, 28, 28] stack counts as N items."""
    for item in items:
        if isinstance(item, np.ndarray) and item.ndim == 3:
            yield from item
        else:
            yield item


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in _flat(items):
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Client:
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

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # -- unary calls ------------------------------------------------------------------------

    def _call(self, method, request, timeout: float | None = None):
        """One unary call with a deadline; UNAVAILABLE is retried with backoff until the budget
        (timeout seconds from the first try) runs out."""
        budget = self.timeout if timeout is None else timeout
        end = time.monotonic() + budget
        backoff = _Backoff()
        while True:
            left = end - time.monotonic()
            try:
                return method(request, timeout=max(left, 0.001), metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and backoff.wait(end):
                    continue
                raise ClientError.from_rpc(e, self.address) from None

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
            images = list(images.reshape(-1, preprocess.SIDE, preprocess.SIDE))
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            names = ids[start:start + batch_size] if ids is not None else [""] * len(chunk)
            req = pb.ClassifyRequest(images=[_image(im, i) for im, i in zip(chunk, names)])
            if top_k:
                req.top_k = top_k
            resp = self._call(self._stub.Classify, req)
            out += [_from_proto(p) for p in resp.predictions]
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
        feed = _Feed(iter(images), batch_size, window, top_k,
                     max_request_bytes or int(self.max_message_bytes * 0.9))
        stream = _Stream(self, feed)
        try:
            answers: Iterator[Prediction] = iter(())
            while True:
                token = feed.next_token()
                if token is _END:
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


_END = object()


class _Stream:
    """The response side: one ClassifyStream call at a time, reopened (and the unanswered
    requests sent again) when the server goes away, within the client's timeout."""

    def __init__(self, client: Client, feed: "_Feed"):
        self._client, self._feed = client, feed
        self._backoff = _Backoff()
        self._retry_end: float | None = None
        self._open()

    def _open(self) -> None:
        c = self._client
        self._call = c._stub.ClassifyStream(self._feed.requests(), metadata=c._metadata)
        self._watchdog = _Watchdog(self._call, self._feed, c.timeout)

    def next_answers(self) -> Iterator[Prediction]:
        """The predictions of the next answered request (one per image it carried)."""
        c = self._client
        while True:
            try:
                resp = next(self._call)
            except StopIteration:
                self._feed.raise_source_error()
                raise ClientError(grpc.StatusCode.INTERNAL, "the server ended the stream early", c.address) from None
            except grpc.RpcError as e:
                self._feed.raise_source_error()
                if self._watchdog.fired:
                    raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                      f"no answer from the server in {c.timeout:g}s", c.address) from None
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise ClientError.from_rpc(e, c.address) from None
                self._retry_end = self._retry_end or time.monotonic() + c.timeout
                if not self._backoff.wait(self._retry_end):
                    raise ClientError.from_rpc(e, c.address) from None
                self._watchdog.stop()
                self._feed.rewind()  # the unanswered requests go first on the next stream
                self._open()
                continue
            self._watchdog.progress()
            self._backoff.reset()
            self._retry_end = None
            n = len(self._feed.answered().images)
            if resp.HasField("error"):
                failure = Prediction(error=resp.error.message, code=_code_name(resp.error.code))
                return iter([failure] * n)
            if len(resp.predictions) != n:
                raise ClientError(grpc.StatusCode.INTERNAL,
                                  f"the server answered {len(resp.predictions)} predictions for {n} images", c.address)
            return map(_from_proto, resp.predictions)

    def close(self) -> None:
        self._watchdog.stop()
        self._call.cancel()  # a no-op when the stream already ended


class _Feed:
    """The request side of a stream.  gRPC pulls `requests()` from its own thread: it reads the
    caller's items, turns each batch of good ones into a request (at most `window` unanswered)
    and leaves one token per item, in order, for the caller's thread: None for an image that was
    sent, the exception for one that failed here.  After a broken stream `rewind()` puts the
    unanswered requests first in line for the next one (an old stream's iterator, if gRPC is
    still blocked in it, sees the new epoch and stops)."""

    def __init__(self, items: Iterator[Item], batch_size: int, window: int, top_k: int | None, max_bytes: int):
        self._items, self._batch_size, self._window, self._top_k = _flat(items), batch_size, window, top_k
        self._max_bytes = max_bytes
        self._carry: pb.Image | None = None  # the image that did not fit in the last request
        self._cond = threading.Condition()
        self._read_lock = threading.Lock()
        self._tokens: collections.deque = collections.deque()
        self._pending: collections.deque = collections.deque()  # sent, unanswered requests
        self._resend: collections.deque = collections.deque()
        self._epoch = 0
        self._done = False  # every item has been read (or the caller's iterator failed)
        self._closed = False
        self._error: BaseException | None = None

    # -- gRPC's thread ---------------------------------------------------------------------

    def requests(self) -> Iterator[pb.ClassifyRequest]:
        with self._cond:
            epoch = self._epoch
        stale = lambda: self._closed or self._epoch != epoch  # noqa: E731
        while True:
            with self._cond:
                self._cond.wait_for(lambda: stale() or len(self._pending) < self._window)
                if stale():
                    return
                request = self._resend.popleft() if self._resend else None
                if request is None and self._done:
                    return
                if request is not None:
                    self._pending.append(request)
            if request is None:
                # One reader at a time, and the requests queued for resending always go first:
                # an old stream's reader that finishes a batch after a rewind queues it there.
                with self._read_lock:
                    with self._cond:
                        if stale():
                            return
                        if self._resend:
                            continue
                        if self._done:
                            return
                    request = self._read_batch()  # outside the condition: reading files takes time
                    with self._cond:
                        if request is None:
                            return
                        if stale():
                            self._resend.append(request)
                            return
                        self._pending.append(request)
            yield request

    def _read_batch(self) -> pb.ClassifyRequest | None:
        """The next request (None at the end): up to batch_size images and max_bytes of image
        data.  Items that fail here (or alone exceed max_bytes) only leave their token."""
        while True:
            images: list[pb.Image] = []
            tokens: list[BaseException | None] = []
            size = 0
            try:
                while len(images) < self._batch_size:
                    if self._carry is not None:
                        image, self._carry = self._carry, None
                    else:
                        try:
                            item = next(self._items)
                        except StopIteration:
                            self._done = True
                            break
                        if isinstance(item, BaseException):
                            tokens.append(item)
                            continue
                        try:
                            image = _image(item)
                        except ValueError as e:
                            tokens.append(e)
                            continue
                    n = len(image.encoded) + len(image.pixels)
                    if n > self._max_bytes:
                        tokens.append(Overloaded(f"{n:,} bytes: more than one request may carry ({self._max_bytes:,})"))
                        continue
                    if images and size + n > self._max_bytes:
                        self._carry = image  # it opens the next request
                        break
                    images.append(image)
                    tokens.append(None)
                    size += n
            except BaseException as e:  # the caller's iterator failed: end the job, re-raise there
                self._error, self._done = e, True
            with self._cond:
                self._tokens.extend(tokens)
                self._cond.notify_all()
            if images:
                request = pb.ClassifyRequest(images=images)
                if self._top_k:
                    request.top_k = self._top_k
                return request
            if self._done:
                return None

    # -- the caller's thread ---------------------------------------------------------------

    def next_token(self):
        with self._cond:
            self._cond.wait_for(lambda: self._tokens or self._done)
            if self._tokens:
                return self._tokens.popleft()
        self.raise_source_error()
        return _END

    def answered(self) -> pb.ClassifyRequest:
        with self._cond:
            request = self._pending.popleft()
            self._cond.notify_all()
            return request

    def in_flight(self) -> int:
        with self._cond:
            return len(self._pending)

    def rewind(self) -> None:
        with self._cond:
            self._resend.extendleft(reversed(self._pending))
            self._pending.clear()
            self._epoch += 1
            self._cond.notify_all()

    def raise_source_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Watchdog:
    """Cancels a stream that has had requests in flight and no answer for `timeout` seconds: the
    stream's deadline is per answer, since a bulk job may rightly run for hours."""

    def __init__(self, call, feed: _Feed, timeout: float):
        self._call, self._feed, self._timeout = call, feed, timeout
        self._last = time.monotonic()
        self._stop = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="network3-stream-watchdog", daemon=True)
        self._thread.start()

    def progress(self) -> None:
        self._last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(0.25, self._timeout / 4)):
            if self._feed.in_flight() == 0:
                self._last = time.monotonic()
            elif time.monotonic() - self._last > self._timeout:
                self.fired = True
                self._call.cancel()
                return

    def stop(self) -> None:
        self._stop.set()


class _Backoff:
    """Exponential backoff with jitter: 50 ms doubling to 1 s, never past `end`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._delay = 0.05

    def wait(self, end: float) -> bool:
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, self._delay * random.uniform(0.5, 1.0)))
        self._delay = min(self._delay * 2, 1.0)
        return True


def _read(x: str | Path | bytes | None) -> bytes | None:
    if x is None or isinstance(x, bytes):
        return x
    return Path(x).read_bytes()


class LocalClassifier:
    """The same answers with no server: `serving.preprocess` and onnxruntime in this process."""

    def __init__(self, model_path: str | Path, *, intra_op_threads: int = 0):
        from .model import ModelOptions, load_model  # onnxruntime is only needed here
        self.model = load_model(model_path, ModelOptions(intra_op_threads=intra_op_threads,
                                                         warmup_batch_sizes=(1, 64)))
        self.address = f"local:{model_path}"

    def __enter__(self) -> "LocalClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def health(self, service: str = "", timeout: float | None = None) -> str:
        return "SERVING"

    def info(self, timeout: float | None = None) -> dict:
        d = self.model.describe()
        return {"name": "network3", "version": "1", "sha256": d["sha256"], "loaded_at": d["loaded_at"],
                "labels": d["labels"], "providers": d["providers"], "path": d["path"], "limits": {},
                "metadata": d["metadata"]}

    def _predict(self, items: list[Item], top_k: int | None) -> list[Prediction]:
        good = [i for i, it in enumerate(items) if not isinstance(it, BaseException)]
        pixels = np.zeros((len(good), preprocess.SIDE, preprocess.SIDE), np.uint8)
        failed: dict[int, BaseException] = {}
        encoded = [k for k, i in enumerate(good) if isinstance(items[i], (bytes, bytearray, memoryview))]
        for k, i in enumerate(good):
            if k not in encoded:
                pixels[k] = np.asarray(items[i], np.uint8).reshape(preprocess.SIDE, preprocess.SIDE)
        if encoded:
            decoded, errors = preprocess.decode_many([items[good[k]] for k in encoded])
            pixels[encoded] = decoded
            failed = {good[k]: e for k, e in zip(encoded, errors) if e is not None}
        probs = self.model.predict(preprocess.pixels_to_input(pixels))[1] if len(good) else np.zeros((0, 10))
        return _rows(items, good, probs, self.model.labels, top_k, failed)

    def classify(self, images, *, top_k: int | None = None, ids=None, batch_size: int = 256) -> list[Prediction]:
        if isinstance(images, np.ndarray):
            images = list(images.reshape(-1, preprocess.SIDE, preprocess.SIDE))
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            out += self._predict(list(images[start:start + batch_size]), top_k)
        for p in out:
            if p.error is not None:
                raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, p.error, self.address)
        return out

    def classify_stream(self, images: Iterable[Item], *, batch_size: int = 64, window: int = 2,
                        top_k: int | None = None, max_request_bytes: int | None = None) -> Iterator[Prediction]:
        """Like Client.classify_stream.  Batches are decoded and computed in a worker thread
        (onnxruntime lets go of the GIL) while the caller reads the next ones and writes results."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="network3-local") as pool:
            pending: collections.deque = collections.deque()
            for batch in _batches(images, batch_size):
                pending.append(pool.submit(self._predict, batch, top_k))
                while len(pending) >= window:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()


def _rows(items, good, probs, labels, top_k, failed) -> list[Prediction]:
    digits = probs.argmax(1).tolist() if len(probs) else []
    rows = probs.tolist()
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k].tolist() if top_k and len(probs) else None
    out: list[Prediction] = [None] * len(items)  # type: ignore[list-item]
    for k, i in enumerate(good):
        if i in failed:
            out[i] = _failed(failed[i])
            continue
        d, row = digits[k], rows[k]
        out[i] = Prediction(digit=d, probability=row[d], probabilities=row, label=labels[d],
                            top_k=[(j, row[j]) for j in order[k]] if order else [])
    for i, it in enumerate(items):
        if isinstance(it, BaseException):
            out[i] = _failed(it)
    return out
