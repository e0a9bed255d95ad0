"""The KServe v2 / Triton tensor codec: v2 tensors <-> numpy arrays, apart from any transport.

The gRPC servicer (serving.api.inference), the benchmarks and an HTTP front end all use it:

  * `input_array(name, datatype, shape, data, max_images)`: one input tensor -> float32
    [N, 1, 28, 28] in [0, 1], or InvalidInput / Overloaded naming what is wrong.  `data` is the
    tensor's raw little-endian bytes or its values as a flat sequence (typed `contents`, JSON).
    FP32 must lie in [0, 1]; UINT8 is scaled by 1/255 (serving.preprocess).
  * `request_input(request, max_images)`: the same for a gRPC ModelInferRequest (one input,
    raw_input_contents or typed contents, never both).
  * `requested_output(i, name, classification)` / `requested_outputs(request)`: the outputs
    asked for, as [(name, k)] with k the classification count (0: the plain tensor).
  * `classification(values, k, labels)`: the classification extension's strings, per row the
    top k as "<value>:<index>:<label>", most probable first (model.top_k);
    `bytes_tensor(strings)` serializes BYTES elements as raw contents do.
  * `response(request, outputs, logits, probabilities, labels, model_name, model_version)`:
    the ModelInferResponse, outputs in `raw_output_contents` (what tritonclient reads).
"""
from __future__ import annotations

import struct
from typing import Iterable, Sequence

import numpy as np

from protos.inference import grpc_service_pb2 as pb

from . import preprocess
from .contract import CLASSES, INPUT_NAME, INPUT_SHAPE, OUTPUT_NAMES, PIXELS
from .errors import InvalidInput, Overloaded
from .model import top_k

DATATYPES = {"FP32": "<f4", "UINT8": "u1"}  # the input datatypes accepted, as numpy dtypes
ITEM_BYTES = {name: np.dtype(dt).itemsize for name, dt in DATATYPES.items()}
INPUT_DIMS = f"[N, {', '.join(map(str, INPUT_SHAPE))}]"
_ONE_BITS = 0x3F800000  # 1.0f as uint32


def images_declared(request: pb.ModelInferRequest, limit: int = 1 << 31) -> int:
    """The images a request declares, for the counters: 0 for a batch size we refuse, so that a
    hostile shape ([-2**63, ...] or [2**62, ...]) cannot move them."""
    n = int(request.inputs[0].shape[0]) if request.inputs and request.inputs[0].shape else 0
    return n if 0 < n <= limit else 0


# ---------------------------------------------------------------------------------- input --

def check_input(name: str, datatype: str, shape: Sequence[int], max_images: int) -> int:
    """Name, shape and datatype of the input tensor; returns N, the number of images."""
    if name != INPUT_NAME:
        raise InvalidInput(f"inputs[0]: unknown input {name!r}; the model's input is {INPUT_NAME!r}")
    shape = list(shape)
    if len(shape) != 1 + len(INPUT_SHAPE) or shape[1:] != list(INPUT_SHAPE) or shape[0] < 1:
        raise InvalidInput(f"input {INPUT_NAME!r}: shape {shape}, expected {INPUT_DIMS} with N >= 1")
    n = shape[0]
    if n > max_images:
        raise Overloaded(f"input {INPUT_NAME!r}: {n} images in one request, over --max-images-per-request {max_images}")
    if datatype not in DATATYPES:
        raise InvalidInput(f"input {INPUT_NAME!r}: datatype {datatype!r}, expected FP32 (in [0, 1]) or UINT8")
    return n


def input_array(name: str, datatype: str, shape: Sequence[int], data: bytes | Sequence, max_images: int,
                where: str = "data") -> np.ndarray:
    """One input tensor -> float32 [N, 1, 28, 28] in [0, 1].  `data`: raw little-endian bytes,
    or the values as a flat sequence; `where` names it in messages."""
    return _array(check_input(name, datatype, shape, max_images), datatype, shape, data, where)


def _array(n: int, datatype: str, shape, data, where: str) -> np.ndarray:
    """input_array after check_input."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        expected = n * PIXELS * ITEM_BYTES[datatype]
        if len(data) != expected:
            raise InvalidInput(f"input {INPUT_NAME!r}: {where} has {len(data)} bytes, shape {list(shape)} "
                               f"{datatype} needs {expected}")
        values = np.frombuffer(data, DATATYPES[datatype])
    else:
        if len(data) != n * PIXELS:
            raise InvalidInput(f"input {INPUT_NAME!r}: {where} has {len(data)} values, shape {list(shape)} "
                               f"needs {n * PIXELS}")
        if datatype == "FP32":
            values = np.array(data, np.float32)
        else:
            try:
                wide = np.array(data, np.int64)
            except (TypeError, ValueError, OverflowError):
                raise InvalidInput(f"input {INPUT_NAME!r}: {where} must hold integers from 0 to 255 for UINT8") from None
            if wide.min() < 0 or wide.max() > 255:
                raise InvalidInput(f"input {INPUT_NAME!r}: {where} has values over 255 for UINT8")
            values = wide.astype(np.uint8)
    if datatype == "UINT8":
        return preprocess.pixels_to_input(values.reshape(n, *INPUT_SHAPE[1:]))
    return _checked_unit_range(values, n)


def _checked_unit_range(values: np.ndarray, n: int) -> np.ndarray:
    x = values.reshape(n, *INPUT_SHAPE)
    # One reduction in the common case: as uint32, +0.0..1.0 are exactly 0..0x3F800000 and
    # negatives, NaN and infinity are all larger.  Only a failure looks closer (-0.0 passes).
    if values.view(np.uint32).max() > _ONE_BITS and not (x.min() >= 0.0 and x.max() <= 1.0):
        if np.isnan(x).any():
            what = "NaN"
        elif np.isinf(x).any():
            what = "infinity"
        else:
            what = f"values outside [0, 1] (min {float(x.min()):g}, max {float(x.max()):g})"
        raise InvalidInput(f"input {INPUT_NAME!r}: FP32 input contains {what}; pixels must lie in [0, 1]")
    return x


def request_input(request: pb.ModelInferRequest, max_images: int) -> np.ndarray:
    """A gRPC ModelInferRequest's `images` tensor as float32 [N, 1, 28, 28] in [0, 1]."""
    inputs = request.inputs
    if len(inputs) != 1:
        if not inputs:
            raise InvalidInput(f"inputs: the request has no inputs; the model takes {INPUT_NAME!r}")
        raise InvalidInput(f"inputs: {len(inputs)} inputs {[i.name for i in inputs]}; the model takes one, {INPUT_NAME!r}")
    t = inputs[0]
    n = check_input(t.name, t.datatype, t.shape, max_images)
    raw = request.raw_input_contents
    typed = t.HasField("contents")
    if raw and typed:
        raise InvalidInput(f"input {INPUT_NAME!r}: both raw_input_contents and contents are set; send one")
    if raw:
        if len(raw) != 1:
            raise InvalidInput(f"raw_input_contents: {len(raw)} entries for 1 input")
        return _array(n, t.datatype, t.shape, raw[0], "raw_input_contents")
    if typed:
        field = "fp32_contents" if t.datatype == "FP32" else "uint_contents"
        return _array(n, t.datatype, t.shape, getattr(t.contents, field), f"contents.{field}")
    raise InvalidInput(f"input {INPUT_NAME!r}: no data (neither raw_input_contents nor contents)")


# -------------------------------------------------------------------------------- outputs --

def requested_output(i: int, name: str, classification: int | None = None) -> tuple[str, int]:
    """Output i of a request: (name, k), k the classification count or 0.  `classification`
    is the parameter's value when given (-1: given, but not an int64)."""
    if name not in OUTPUT_NAMES:
        raise InvalidInput(f"outputs[{i}]: unknown output {name!r}; the model has {list(OUTPUT_NAMES)}")
    if classification is None:
        return name, 0
    if isinstance(classification, bool) or not isinstance(classification, int) or not 1 <= classification <= CLASSES:
        raise InvalidInput(f"outputs[{i}] ({name}): parameter 'classification' must be an int64 from 1 to {CLASSES}")
    return name, classification


def requested_outputs(request: pb.ModelInferRequest) -> list[tuple[str, int]]:
    """[(output name, classification count or 0)]: all outputs when none are asked for."""
    if not request.outputs:
        return [(name, 0) for name in OUTPUT_NAMES]
    out = []
    for i, o in enumerate(request.outputs):
        k = None
        if "classification" in o.parameters:
            p = o.parameters["classification"]
            k = p.int64_param if p.WhichOneof("parameter_choice") == "int64_param" else -1
        out.append(requested_output(i, o.name, k))
    return out


def classification(values: np.ndarray, k: int, labels: Sequence[str]) -> list[list[str]]:
    """Triton's classification output: per row the top k as "<value>:<index>:<label>"."""
    order, top = top_k(values, k)
    return [[f"{v:f}:{j}:{labels[j]}" for j, v in zip(row_i, row_v)] for row_i, row_v in zip(order.tolist(), top.tolist())]


def bytes_tensor(rows: Iterable[Iterable[str]]) -> bytes:
    """BYTES elements as raw contents carry them: each a 4-byte little-endian length, then the bytes."""
    parts = []
    for row in rows:
        for s in row:
            b = s.encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
    return b"".join(parts)


def output_tensors(outputs: list[tuple[str, int]], logits: np.ndarray, probs: np.ndarray, labels: Sequence[str]):
    """[(name, datatype, shape, raw bytes)] for the requested outputs."""
    out, n = [], len(logits)
    for name, k in outputs:
        values = logits if name == OUTPUT_NAMES[0] else probs
        if not k:
            out.append((name, "FP32", [n, CLASSES], values.astype("<f4", copy=False).tobytes()))
        else:
            out.append((name, "BYTES", [n, k], bytes_tensor(classification(values, k, labels))))
    return out


def response(request: pb.ModelInferRequest, outputs: list[tuple[str, int]], logits: np.ndarray, probs: np.ndarray,
             labels: Sequence[str], model_name: str, model_version: str) -> pb.ModelInferResponse:
    T = pb.ModelInferResponse.InferOutputTensor
    tensors = output_tensors(outputs, logits, probs, labels)
    return pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id,
                                 outputs=[T(name=name, datatype=dt, shape=shape) for name, dt, shape, _ in tensors],
                                 raw_output_contents=[raw for *_, raw in tensors])
