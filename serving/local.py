"""The in-process backend (`network3 classify --local model.onnx`): the same preprocessing and
onnxruntime in this process, behind the same interface as serving.client.Client
(serving.classifier.Classifier).  No gRPC: a local job never loads it."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from . import preprocess
from .classifier import Classifier
from .contract import CLASSES, MODEL_NAME, MODEL_VERSION, SIDE
from .predictions import ClientError, Item, Prediction, _batches, _failed


class LocalClassifier(Classifier):
    """The same answers with no server: `serving.preprocess` and onnxruntime in this process."""

    def __init__(self, model_path: str | Path, *, intra_op_threads: int = 0):
        from .model import ModelOptions, load_model  # onnxruntime is only needed here
        self.model = load_model(model_path, ModelOptions(intra_op_threads=intra_op_threads,
                                                         warmup_batch_sizes=(1, 64)))
        self.address = f"local:{model_path}"

    def close(self) -> None:
        pass

    def health(self, service: str = "", timeout: float | None = None) -> str:
        return "SERVING"

    def info(self, timeout: float | None = None) -> dict:
        d = self.model.describe()
        return {"name": MODEL_NAME, "version": MODEL_VERSION, "sha256": d["sha256"], "loaded_at": d["loaded_at"],
                "labels": d["labels"], "providers": d["providers"], "path": d["path"], "limits": {},
                "metadata": d["metadata"]}

    def _predict(self, items: list[Item], top_k: int | None, ids=None) -> list[Prediction]:
        pixels, errors = preprocess.decode_many(items)
        good = [i for i, e in enumerate(errors) if e is None]
        x = preprocess.pixels_to_input(pixels[good])
        probs = self.model.predict(x)[1] if good else np.zeros((0, CLASSES))
        out = _rows(probs, self.model.unsure(x, probs), self.model.labels, top_k)
        rows = iter(out)
        answers = [next(rows) if e is None else _failed(e) for e in errors]
        for p, id in zip(answers, ids or ()):
            p.id = id
        return answers

    def classify(self, images, *, top_k: int | None = None, ids=None, batch_size: int = 256) -> list[Prediction]:
        if isinstance(images, np.ndarray):
            images = list(images.reshape(-1, SIDE, SIDE))
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            out += self._predict(list(images[start:start + batch_size]), top_k,
                                 ids[start:start + batch_size] if ids is not None else None)
        for i, p in enumerate(out):
            if p.error is not None:  # as the server fails a unary call, naming the image
                raise ClientError("INVALID_ARGUMENT", f"images[{i}]: {p.error}", self.address)
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


def _rows(probs: np.ndarray, unsure: np.ndarray, labels, top_k: int | None) -> list[Prediction]:
    """Probabilities [N, 10] and unsure flags [N] -> one Prediction per row, with the top k when asked."""
    from .model import top_k as best  # loaded already: the model is

    digits = probs.argmax(1).tolist() if len(probs) else []
    rows = probs.tolist()
    best_k = best(probs, top_k)[0].tolist() if top_k and len(probs) else None
    return [Prediction(digit=d, probability=row[d], probabilities=row, label=labels[d], unsure=u,
                       top_k=[(j, row[j]) for j in best_k[k]] if best_k else [])
            for k, (d, row, u) in enumerate(zip(digits, rows, unsure.tolist()))]
