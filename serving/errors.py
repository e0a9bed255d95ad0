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
