"""Domain errors, raised where a problem is found and mapped to gRPC status codes in one place.

Nothing below the servicers knows about gRPC: preprocessing, the batcher and the model raise
these, and `serving.api` turns them into statuses with `grpc_status()`.
"""
from __future__ import annotations


class Network3Error(Exception):
    """Base class: every error the service reports on purpose."""


class InvalidInput(Network3Error):
    """The request (an image, a tensor, a field) is malformed. Names the field or image index."""


class ModelNotFound(Network3Error):
    """The request names a model or version this server does not serve."""


class Overloaded(Network3Error):
    """A limit was hit: queue full, too many images, message or image too large."""


class Unavailable(Network3Error):
    """The server is shutting down or not ready yet."""


class Unauthenticated(Network3Error):
    """Missing or wrong credentials."""


class DeadlineExceeded(Network3Error):
    """The request's deadline passed before it was computed (it is dropped, never run)."""


class BadModel(Network3Error):
    """A model file that cannot be served: missing, not ONNX, wrong inputs or outputs."""


class ModelFailed(Network3Error):
    """The model raised while computing a batch: that batch's requests fail, the server goes on."""


# The one mapping from domain errors to gRPC status codes (by name, so this module stays
# importable without grpc: training imports serving.preprocess, which imports this).
STATUS_NAMES: dict[type[Network3Error], str] = {
    InvalidInput: "INVALID_ARGUMENT",
    ModelNotFound: "NOT_FOUND",
    Overloaded: "RESOURCE_EXHAUSTED",
    Unavailable: "UNAVAILABLE",
    Unauthenticated: "UNAUTHENTICATED",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
    BadModel: "FAILED_PRECONDITION",
    ModelFailed: "INTERNAL",
}


def grpc_status(exc: BaseException):
    """(grpc.StatusCode, message) for an exception; anything not ours is INTERNAL."""
    import grpc

    for cls in type(exc).__mro__:
        name = STATUS_NAMES.get(cls)
        if name is not None:
            return grpc.StatusCode[name], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
