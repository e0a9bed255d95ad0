"""The in-process backend (`network3 classify --local model.onnx`): the same preprocessing
and onnxruntime in this process, with the methods of serving.client.Client."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Iterable, Iterator

import grpc
import numpy as np

from . import preprocess
from .predictions import ClientError, Item, Prediction, _batches, _failed


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
