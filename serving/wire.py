"""The client's conversions between gRPC and serving.predictions: protos to and from
`Prediction` and images, and grpc.RpcError to `ClientError` (the status code by name).  The only
client-side module besides serving.client and serving.stream that imports grpc, so the
in-process backend (`network3 classify --local`) never loads it."""
from __future__ import annotations

import grpc
import numpy as np

from protos.network3.v1 import classifier_pb2 as pb

from .contract import PIXELS, SIDE
from .predictions import ClientError, Prediction

# gRPC's numeric status codes (what a per-image error in a response carries) -> names.
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def code_name(number: int) -> str:
    return CODE_NAMES.get(number, str(number))


def client_error(e: grpc.RpcError, address: str = "") -> ClientError:
    """A failed call as our one exception: the status by name and the first line of its details."""
    code = e.code() if hasattr(e, "code") else None
    details = ((e.details() if hasattr(e, "details") else str(e)) or "").strip()
    return ClientError(code.name if code is not None else "UNKNOWN",
                       details.splitlines()[0] if details else "", address)


def from_proto(p: pb.Prediction) -> Prediction:
    if p.HasField("error"):
        return Prediction(id=p.id, error=p.error.message, code=code_name(p.error.code))
    return Prediction(digit=p.digit, probability=p.probability, probabilities=list(p.probabilities),
                      label=p.label, top_k=[(c.digit, c.probability) for c in p.top_k], id=p.id,
                      unsure=p.unsure)


def image(item: bytes | np.ndarray, id: str = "") -> pb.Image:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(item), id=id)
    a = np.asarray(item)
    if a.dtype != np.uint8 or a.size != PIXELS:
        raise ValueError(f"pixels must be uint8 with {PIXELS} values ({SIDE}x{SIDE}), got {a.dtype} {a.shape}")
    return pb.Image(pixels=a.tobytes(), id=id)
