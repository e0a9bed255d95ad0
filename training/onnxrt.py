"""ONNX files on the training side: onnxruntime sessions and predictions, the file's metadata,
and ExportError, the one error for a model file that cannot be made or loaded.

Export, quantization and evaluation all use these; this module imports none of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from serving.contract import OUTPUT_NAMES


class ExportError(ValueError):
    """An export refused (bad arguments, bad checkpoint, failed parity or accuracy guard), or a
    model file onnxruntime cannot load."""


def onnx_session(model: str | Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; threads default to torch's setting so tests and benchmarks control both at once."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types: turn them into one clear line
        where = "model" if isinstance(model, bytes) else str(model)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{where}: onnxruntime cannot load it ({first[:200]})") from None


def onnx_predict(model: str | Path | ort.InferenceSession, x: np.ndarray, batch: int = 1000
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) for float32 [N,1,28,28], run in slices of `batch` images."""
    sess = model if isinstance(model, ort.InferenceSession) else onnx_session(model)
    name = sess.get_inputs()[0].name
    outs = [sess.run(list(OUTPUT_NAMES), {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def read_metadata(path: str | Path) -> dict[str, str]:
    return dict(onnx_session(path, threads=1).get_modelmeta().custom_metadata_map)


def onnx_predictor(path: str | Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """For `network3-train evaluate model.onnx`: a predict function (images -> probabilities) and facts."""
    sess = onnx_session(path)
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    facts = {"preset": meta.get("preset"), "data_sha256": meta.get("data_sha256"),
             "recorded_test_accuracy": float(meta["test_accuracy"]) if "test_accuracy" in meta else None}
    return (lambda x: onnx_predict(sess, x)[1]), facts


def set_metadata(model: onnx.ModelProto, meta: dict[str, object]) -> None:
    """metadata_props: strings as they are, everything else as JSON."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        text = value if isinstance(value, str) else json.dumps(value)
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, text


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
