"""`Classifier`: the one interface of the remote `serving.client.Client` and the in-process
`serving.local.LocalClassifier`, so the CLI (and any caller) drives either the same way.

No gRPC, no onnxruntime, no torch here: `network3 classify --local` imports this and never
loads grpc.

    with backend:                                   # Client(address) or LocalClassifier(path)
        backend.health()                            # "SERVING", ...
        for p in backend.classify_stream(items):    # one Prediction per item, in order
            ...

Every failed call raises `ClientError`, whose `code` is a status name ("UNAVAILABLE", ...).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from .predictions import ClientError, Item, Prediction

__all__ = ["Classifier", "ClientError", "Item", "Prediction", "DEFAULT_ADDRESS", "DEFAULT_TIMEOUT"]

DEFAULT_ADDRESS = "127.0.0.1:50051"  # `network3 serve`'s default host and port
DEFAULT_TIMEOUT = 10.0  # seconds a call may take (for a stream: the wait for each answer)


@runtime_checkable
class Classifier(Protocol):
    """A digit classifier behind a model: a server or this process.  A context manager."""

    address: str  # whom we ask: host:port, or local:<model file>

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The serving status name: "SERVING", "NOT_SERVING", ... (grpc.health.v1's names)."""
        ...

    def info(self, timeout: float | None = None) -> dict:
        """The model: name, version, sha256, loaded_at, labels, providers, path, limits (empty
        when nothing limits a request) and the ONNX metadata."""
        ...

    def classify(self, images: Sequence[bytes | np.ndarray] | np.ndarray, *, top_k: int | None = None,
                 ids: Sequence[str] | None = None, batch_size: int = 256) -> list[Prediction]:
        """Classify a list of images; any bad image fails the call with a ClientError."""
        ...

    def classify_stream(self, images: Iterable[Item], *, batch_size: int = 64, window: int = 8,
                        top_k: int | None = None, max_request_bytes: int | None = None) -> Iterator[Prediction]:
        """Classify any number of images, one Prediction per item in input order, failures in place."""
        ...

    def close(self) -> None:
        ...

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
