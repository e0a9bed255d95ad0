"""What the client hands back, and the conversions between it and the protos.

`Prediction` is one image's answer (or failure); `ClientError` is the one exception every
failed call becomes (it carries the gRPC status code).  Shared by the server client
(serving.client), its stream (serving.stream) and the in-process backend (serving.local).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Union

import grpc
import numpy as np

from protos.network3.v1 import classifier_pb2 as pb

from . import preprocess
from .errors import STATUS_NAMES, Network3Error

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
