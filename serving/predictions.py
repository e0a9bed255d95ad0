"""What a classifier hands back, the one exception every failed call becomes, and the shape of a
job's input; no gRPC here (`serving.wire` converts to and from the protos and gRPC's codes).

`Prediction` is one image's answer (or failure); `ClientError` carries the status as a name
("UNAVAILABLE", "INVALID_ARGUMENT", ...: gRPC's code names, which the in-process backend uses
too).  Shared by the server client (serving.client), its stream (serving.stream), the
in-process backend (serving.local) and the CLI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Union

import numpy as np

from .errors import STATUS_NAMES, Network3Error

Item = Union[bytes, np.ndarray, BaseException]

# Status names that mean "the server is not there for us" (it cannot be reached, refused us, or
# stopped answering), as opposed to a problem with one request or image.
UNREACHABLE = frozenset({"UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED", "DEADLINE_EXCEEDED"})


class ClientError(Network3Error):
    """A call failed.  `code` is the status name ("UNAVAILABLE", ...), `details` the server's (or
    gRPC's) message, `address` whom we asked."""

    def __init__(self, code: str, details: str, address: str = ""):
        self.code, self.details, self.address = str(code), details, address
        super().__init__(f"{self.code}: {details}" if details else self.code)

    @property
    def unreachable(self) -> bool:
        """The server could not be reached, refused us (auth, TLS) or stopped answering."""
        return self.code in UNREACHABLE


@dataclass
class Prediction:
    """One image's answer.  On failure `error` is set (and `code`, a status name) and the rest empty."""

    digit: int = -1
    probability: float = 0.0
    probabilities: list[float] = field(default_factory=list)
    label: str = ""  # the model's label for `digit`
    top_k: list[tuple[int, float]] = field(default_factory=list)
    # A guess, not an answer: a blank image, or `probability` below the model's threshold
    # (serving.unsure).
    unsure: bool = False
    id: str = ""
    error: str | None = None
    code: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _failed(e: BaseException, id: str = "") -> Prediction:
    if isinstance(e, ClientError):
        code = e.code
    else:  # our domain errors by their status name; anything else (a file that cannot be read) is bad input
        code = next((STATUS_NAMES[c] for c in type(e).__mro__ if c in STATUS_NAMES), "INVALID_ARGUMENT")
    return Prediction(id=id, error=str(e) or type(e).__name__, code=code)


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
