"""Domain errors, raised where a problem is found and mapped to statuses in one place.

Nothing below the adapters knows about a transport: preprocessing, the batcher and the model
raise these; `serving.api` turns them into gRPC statuses with `grpc_status()` and into HTTP
statuses with `http_status()`, both read from the one table, STATUSES.
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


class TooLarge(Overloaded):
    """A request over a size limit (its body, or its images): RESOURCE_EXHAUSTED, HTTP 413."""


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


# The one mapping from domain errors to statuses: (gRPC status code by name, HTTP status as
# Triton answers it).  By name, so this module stays importable without grpc: training imports
# serving.preprocess, which imports this.  A subclass not listed takes its base's row.
STATUSES: dict[type[Network3Error], tuple[str, int]] = {
    InvalidInput: ("INVALID_ARGUMENT", 400),
    ModelNotFound: ("NOT_FOUND", 404),
    Overloaded: ("RESOURCE_EXHAUSTED", 429),
    TooLarge: ("RESOURCE_EXHAUSTED", 413),
    Unavailable: ("UNAVAILABLE", 503),
    Unauthenticated: ("UNAUTHENTICATED", 401),
    DeadlineExceeded: ("DEADLINE_EXCEEDED", 504),
    BadModel: ("FAILED_PRECONDITION", 500),
    ModelFailed: ("INTERNAL", 500),
}
STATUS_NAMES: dict[type[Network3Error], str] = {cls: grpc for cls, (grpc, _) in STATUSES.items()}


def _row(exc: BaseException) -> tuple[str, int] | None:
    for cls in type(exc).__mro__:
        row = STATUSES.get(cls)
        if row is not None:
            return row
    return None


def grpc_status(exc: BaseException):
    """(grpc.StatusCode, message) for an exception; anything not ours is INTERNAL."""
    import grpc

    row = _row(exc)
    if row is not None:
        return grpc.StatusCode[row[0]], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def http_status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, message) for an exception; anything not ours is 500."""
    row = _row(exc)
    if row is not None:
        return row[1], str(exc)
    return 500, f"internal error: {type(exc).__name__}"
