"""The KServe v2 / Triton tensor codec: v2 tensors <-> numpy arrays, apart from any transport.

The gRPC servicer (serving.api.inference), the benchmarks and an HTTP front end all use it:

  * `input_array(name, datatype, shape, data, max_images)`: one input tensor -> float32
    [N, 1, 28, 28] in [0, 1], or InvalidInput / TooLarge naming what is wrong.  `data` is the
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
    the ModelInferResponse, serialized, outputs in `raw_output_contents` (what tritonclient
    reads); `stream_response(response)` wraps it for ModelStreamInfer.

The REST (HTTP/JSON) form of the same, with Triton's binary tensor data extension:

  * `rest_split(body, header_length)`: a body -> (JSON header, binary data after it), as the
    `Inference-Header-Content-Length` header says (absent: all of it is JSON).
  * `rest_request(header, binary, max_images)`: -> RestRequest(id, images, outputs, timeout_s):
    the input as float32 [N, 1, 28, 28] (JSON `data` flat or nested, or `binary_data_size`
    bytes of the binary data), the outputs asked for as [(name, k, binary)].
  * `rest_response(rest_request, logits, probabilities, labels, model_name, model_version)`:
    -> (body, JSON header length or None when no output is binary).

The image model's input (contract.IMAGE_MODEL_NAME: `images` BYTES [N], one encoded image file
per element): `request_encoded(request, max_images)` (gRPC: raw_input_contents as 4-byte
little-endian length-prefixed elements, or contents.bytes_contents) and
`rest_request(..., encoded=True)` (REST: binary data in the same layout, or JSON `data` as
base64 strings) give the N files as bytes; the adapters decode them (preprocess.decode_many).
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
import struct
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from protos.inference import grpc_service_pb2 as pb

from . import preprocess
from .contract import CLASSES, IMAGE_MODEL_NAME, INPUT_NAME, INPUT_SHAPE, OUTPUT_NAMES, PIXELS
from .errors import InvalidInput, TooLarge
from .model import top_k

BYTES = "BYTES"  # the image model's input datatype: one encoded image file per element
DATATYPES = {"FP32": "<f4", "UINT8": "u1"}  # the input datatypes accepted, as numpy dtypes
ITEM_BYTES = {name: np.dtype(dt).itemsize for name, dt in DATATYPES.items()}
INPUT_DIMS = f"[N, {', '.join(map(str, INPUT_SHAPE))}]"
_ONE_BITS = 0x3F800000  # 1.0f as uint32


def images_declared(request: pb.ModelInferRequest, limit: int = 1 << 31) -> int:
    """The images a request declares, for the counters: 0 for a batch size we refuse, so that a
    hostile shape ([-2**63, ...] or [2**62, ...]) cannot move them."""
    inputs = request.inputs
    shape = inputs[0].shape if inputs else ()
    n = shape[0] if shape else 0
    return n if 0 < n <= limit else 0


# ---------------------------------------------------------------------------------- input --

def check_input(name: str, datatype: str, shape: Sequence[int], max_images: int) -> int:
    """Name, shape and datatype of the input tensor; returns N, the number of images."""
    if name != INPUT_NAME:
        raise InvalidInput(f"inputs[0]: unknown input {name!r}; the model's input is {INPUT_NAME!r}")
    if datatype == BYTES:
        raise InvalidInput(f"input {INPUT_NAME!r}: datatype BYTES (encoded image files) is the input of model "
                           f"{IMAGE_MODEL_NAME!r}; this model takes FP32 (in [0, 1]) or UINT8 {INPUT_DIMS}")
    if len(shape) != 1 + len(INPUT_SHAPE) or tuple(shape[1:]) != INPUT_SHAPE or shape[0] < 1:
        raise InvalidInput(f"input {INPUT_NAME!r}: shape {list(shape)}, expected {INPUT_DIMS} with N >= 1")
    n = shape[0]
    if n > max_images:
        raise TooLarge(f"input {INPUT_NAME!r}: {n} images in one request, over --max-images-per-request {max_images}")
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
    # (np.maximum.reduce: the same reduction as .max() without its Python wrapper, 0.5 us less.)
    if np.maximum.reduce(values.view(np.uint32)) > _ONE_BITS and not (x.min() >= 0.0 and x.max() <= 1.0):
        if np.isnan(x).any():
            what = "NaN"
        elif np.isinf(x).any():
            what = "infinity"
        else:
            what = f"values outside [0, 1] (min {float(x.min()):g}, max {float(x.max()):g})"
        raise InvalidInput(f"input {INPUT_NAME!r}: FP32 input contains {what}; pixels must lie in [0, 1]")
    return x


def _one_input(request: pb.ModelInferRequest):
    inputs = request.inputs
    if len(inputs) != 1:
        if not inputs:
            raise InvalidInput(f"inputs: the request has no inputs; the model takes {INPUT_NAME!r}")
        raise InvalidInput(f"inputs: {len(inputs)} inputs {[i.name for i in inputs]}; the model takes one, {INPUT_NAME!r}")
    return inputs[0]


def request_input(request: pb.ModelInferRequest, max_images: int) -> np.ndarray:
    """A gRPC ModelInferRequest's `images` tensor as float32 [N, 1, 28, 28] in [0, 1]."""
    t = _one_input(request)
    n = check_input(t.name, t.datatype, t.shape, max_images)
    raw = _raw_contents(request, t)
    if raw is not None:
        return _array(n, t.datatype, t.shape, raw, "raw_input_contents")
    field = "fp32_contents" if t.datatype == "FP32" else "uint_contents"
    return _array(n, t.datatype, t.shape, getattr(t.contents, field), f"contents.{field}")


def _raw_contents(request: pb.ModelInferRequest, t) -> bytes | None:
    """The one input's raw bytes, or None when its data is in typed `contents`; InvalidInput
    when it has both or neither."""
    raw = request.raw_input_contents
    typed = t.HasField("contents")
    if raw and typed:
        raise InvalidInput(f"input {INPUT_NAME!r}: both raw_input_contents and contents are set; send one")
    if raw:
        if len(raw) != 1:
            raise InvalidInput(f"raw_input_contents: {len(raw)} entries for 1 input")
        return raw[0]
    if not typed:
        raise InvalidInput(f"input {INPUT_NAME!r}: no data (neither raw_input_contents nor contents)")
    return None


# ----------------------------------------------------------- encoded images: a BYTES input --
# The image model (contract.IMAGE_MODEL_NAME) takes `images` as BYTES [N], one encoded image
# file per element.  These turn the tensor into N `bytes`; decoding them is the adapters' (in
# the decode pool, through preprocess.decode_many), not the codec's.

def check_encoded_input(name: str, datatype: str, shape: Sequence[int], max_images: int) -> int:
    """Name, shape [N] and datatype BYTES of the image model's input; returns N."""
    if name != INPUT_NAME:
        raise InvalidInput(f"inputs[0]: unknown input {name!r}; the model's input is {INPUT_NAME!r}")
    shape = list(shape)
    if datatype != BYTES:
        raise InvalidInput(f"input {INPUT_NAME!r}: datatype {datatype!r}, expected {BYTES} (one encoded image "
                           f"file per element); send pixels as FP32 or UINT8 [N, {', '.join(map(str, INPUT_SHAPE))}] "
                           f"to the tensor model")
    if len(shape) != 1 or shape[0] < 1:
        raise InvalidInput(f"input {INPUT_NAME!r}: shape {shape}, expected [N] with N >= 1 (one encoded image per element)")
    n = shape[0]
    if n > max_images:
        raise TooLarge(f"input {INPUT_NAME!r}: {n} images in one request, over --max-images-per-request {max_images}")
    return n


def split_bytes(data: bytes | memoryview, n: int, where: str) -> list[bytes]:
    """BYTES raw contents (each element a 4-byte little-endian length, then its bytes) -> n elements."""
    view, out, at = memoryview(data), [], 0
    while at < len(view):
        if len(out) == n:
            raise InvalidInput(f"input {INPUT_NAME!r}: {where} holds more than the {n} elements of its shape "
                               f"({len(view) - at} bytes left after element {n - 1})")
        if at + 4 > len(view):
            raise InvalidInput(f"input {INPUT_NAME!r}: {where}: element {len(out)} has a truncated 4-byte length")
        size = struct.unpack_from("<I", view, at)[0]
        at += 4
        if at + size > len(view):
            raise InvalidInput(f"input {INPUT_NAME!r}: {where}: element {len(out)} declares {size} bytes, "
                               f"{len(view) - at} are left")
        out.append(bytes(view[at:at + size]))
        at += size
    if len(out) != n:
        raise InvalidInput(f"input {INPUT_NAME!r}: {where} holds {len(out)} elements, shape [{n}] needs {n}")
    return out


def request_encoded(request: pb.ModelInferRequest, max_images: int) -> list[bytes]:
    """A gRPC ModelInferRequest's BYTES `images` tensor as N encoded image files."""
    t = _one_input(request)
    n = check_encoded_input(t.name, t.datatype, t.shape, max_images)
    raw = _raw_contents(request, t)
    if raw is not None:
        return split_bytes(raw, n, "raw_input_contents")
    items = list(t.contents.bytes_contents)
    if len(items) != n:
        raise InvalidInput(f"input {INPUT_NAME!r}: contents.bytes_contents has {len(items)} elements, "
                           f"shape [{n}] needs {n}")
    return items


def json_encoded(data, n: int) -> list[bytes]:
    """REST JSON `data` of the BYTES input -> n files.  A JSON string cannot carry arbitrary
    bytes, and an image file is never UTF-8 text, so here each string is the file in base64
    (RFC 4648, standard alphabet, padded); Triton's own reading (the string's UTF-8 bytes)
    could not hold a PNG or a JPEG.  To send files as they are, use the binary data extension."""
    where = f"input {INPUT_NAME!r}: data"
    if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
        raise InvalidInput(f"{where} must be a JSON array of strings (each an image file in base64), got {_short(data)}")
    if len(data) != n:
        raise InvalidInput(f"{where} has {len(data)} elements, shape [{n}] needs {n}")
    out = []
    for i, v in enumerate(data):
        try:
            out.append(base64.b64decode(v, validate=True))
        except (ValueError, binascii.Error):
            raise InvalidInput(f"{where}[{i}]: not base64 (a JSON string holds an image file in base64; "
                               f"send raw files with the binary data extension)") from None
    return out


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


def output_tensor(name: str, k: int, logits: np.ndarray, probs: np.ndarray, labels: Sequence[str], raw: bool = True):
    """(name, datatype, shape, data) of one requested output: data as raw bytes, or (raw=False)
    as a flat list of values (JSON)."""
    return (name, *output_spec(k, len(logits)), output_data(name, k, logits, probs, labels, raw))


def output_data(name: str, k: int, logits: np.ndarray, probs: np.ndarray, labels: Sequence[str], raw: bool = True):
    """One requested output's data: raw bytes, or (raw=False) a flat list of values."""
    values = logits if name == OUTPUT_NAMES[0] else probs
    if not k:
        return values.astype("<f4", copy=False).tobytes() if raw else values.ravel().tolist()
    rows = classification(values, k, labels)
    return bytes_tensor(rows) if raw else [s for row in rows for s in row]


def output_spec(k: int, n: int) -> tuple[str, list[int]]:
    """Datatype and shape of an output for N images: FP32 [N, 10], or with the classification
    extension's k, BYTES [N, k]."""
    return ("BYTES", [n, k]) if k else ("FP32", [n, CLASSES])


def response(request: pb.ModelInferRequest, outputs: list[tuple[str, int]], logits: np.ndarray, probs: np.ndarray,
             labels: Sequence[str], model_name: str, model_version: str) -> bytes:
    """The ModelInferResponse, serialized (what the gRPC servicer sends as it is).

    Building the message and serializing it cost about 9.5 us for a 1-image request, a large
    part of the event loop's time per request at high concurrency.  So the part that repeats
    (model name, version, the outputs' names, datatypes and shapes) is built by protobuf once
    per (model, outputs asked for, N) and kept serialized, and the per-request fields (`id`,
    `raw_output_contents`) are appended as bytes: the wire format lets a message's fields come
    in any order, so this parses to exactly the message protobuf would build (0.6 us).
    """
    head, raw_heads = _response_head(model_name, model_version, tuple(outputs), len(logits))
    parts = [head]
    if request.id:
        rid = request.id.encode()
        parts += (_field_head(_RESPONSE_ID, len(rid)), rid)
    for (name, k), raw_head in zip(outputs, raw_heads):
        raw = output_data(name, k, logits, probs, labels)
        parts += (raw_head or _field_head(_RESPONSE_RAW, len(raw)), raw)
    return b"".join(parts)


# Field numbers of ModelInferResponse (protos/inference/grpc_service.proto) written by hand.
_RESPONSE_ID = pb.ModelInferResponse.ID_FIELD_NUMBER
_RESPONSE_RAW = pb.ModelInferResponse.RAW_OUTPUT_CONTENTS_FIELD_NUMBER
_STREAM_RESPONSE = pb.ModelStreamInferResponse.INFER_RESPONSE_FIELD_NUMBER


@functools.lru_cache(maxsize=1024)
def _response_head(model_name: str, model_version: str, outputs: tuple, n: int) -> tuple[bytes, tuple]:
    """The fields of a response that depend only on the model, the outputs asked for and N,
    serialized; and per output the head of its raw_output_contents field where its length is
    fixed too (FP32 [N, 10]), else None (the classification extension's strings)."""
    T = pb.ModelInferResponse.InferOutputTensor
    tensors, raw_heads = [], []
    for name, k in outputs:
        datatype, shape = output_spec(k, n)
        tensors.append(T(name=name, datatype=datatype, shape=shape))
        raw_heads.append(None if k else _field_head(_RESPONSE_RAW, n * CLASSES * ITEM_BYTES["FP32"]))
    head = pb.ModelInferResponse(model_name=model_name, model_version=model_version, outputs=tensors).SerializeToString()
    return head, tuple(raw_heads)


def stream_response(infer_response: bytes) -> bytes:
    """A serialized ModelInferResponse wrapped as a ModelStreamInferResponse, serialized."""
    return _field_head(_STREAM_RESPONSE, len(infer_response)) + infer_response


def _field_head(number: int, length: int) -> bytes:
    """The head of a length-delimited protobuf field: its tag (wire type 2; field numbers under
    16 fit in one byte), then the payload's length as a varint."""
    if length < 0x80:
        return bytes(((number << 3) | 2, length))
    head = bytearray(((number << 3) | 2,))
    while length > 0x7F:
        head.append((length & 0x7F) | 0x80)
        length >>= 7
    head.append(length)
    return bytes(head)


# --------------------------------------------------------------------- REST: JSON and binary --

HEADER_LENGTH = "Inference-Header-Content-Length"


class RestRequest(NamedTuple):
    id: str | None
    images: np.ndarray | list[bytes]  # float32 [N, 1, 28, 28] in [0, 1]; encoded=True: N image files
    outputs: list[tuple[str, int, bool]]  # (name, classification count or 0, binary)
    timeout_s: float | None  # Triton's `timeout` request parameter (given in microseconds)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _object(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {_short(value)}")
    return value


def rest_split(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    """(JSON header, binary data after it) of a REST inference body."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH}: {_short(header_length)} must be a whole number from 0 to the "
                           f"body's length ({len(body)} bytes)")
    view = memoryview(body)
    return view[:n], view[n:]


def rest_request(header: bytes | memoryview, binary: memoryview, max_images: int, encoded: bool = False) -> RestRequest:
    """A REST inference request (its JSON header and the binary data after it) -> RestRequest.
    encoded: the image model's request (a BYTES input of image files; see rest_input)."""
    try:
        request = json.loads(bytes(header))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise InvalidInput(f"request body: not a JSON inference request ({str(e)[:100]})") from None
    if not isinstance(request, dict):
        raise InvalidInput(f"request body: expected a JSON object with 'inputs', got {_short(request)}")
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidInput(f"id: must be a string, got {_short(rid)}")
    params = _object(request.get("parameters"), "parameters")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput(f"parameters.binary_data_output: must be true or false, got {_short(binary_default)}")
    timeout = params.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0):
        raise InvalidInput(f"parameters.timeout: must be a whole number of microseconds, got {_short(timeout)}")
    x = rest_input(request.get("inputs"), binary, max_images, encoded)
    outputs = rest_outputs(request.get("outputs"), binary_default)
    return RestRequest(rid, x, outputs, None if not timeout else timeout / 1e6)


def rest_input(inputs, binary: memoryview, max_images: int, encoded: bool = False) -> np.ndarray | list[bytes]:
    """The REST request's `inputs` (and binary data) as float32 [N, 1, 28, 28] in [0, 1], or
    (encoded) the image model's BYTES [N] as N files: binary data as raw contents carry BYTES
    (4-byte lengths), JSON `data` as base64 strings (json_encoded)."""
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput(f"inputs: the request has no inputs; the model takes {INPUT_NAME!r}")
    if len(inputs) != 1:
        names = [i.get("name") if isinstance(i, dict) else i for i in inputs]
        raise InvalidInput(f"inputs: {len(inputs)} inputs {_short(names)}; the model takes one, {INPUT_NAME!r}")
    t = inputs[0]
    if not isinstance(t, dict):
        raise InvalidInput(f"inputs[0]: expected an object with name, shape, datatype and data, got {_short(t)}")
    name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if not isinstance(name, str):
        raise InvalidInput(f"inputs[0]: name must be a string, got {_short(name)}")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of integers, got {_short(shape)}")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r}: datatype must be a string, got {_short(datatype)}")
    n = (check_encoded_input if encoded else check_input)(name, datatype, shape, max_images)
    size = _object(t.get("parameters"), "inputs[0].parameters").get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"input {INPUT_NAME!r}: parameters.binary_data_size must be a whole number, got {_short(size)}")
        if "data" in t:
            raise InvalidInput(f"input {INPUT_NAME!r}: both data and binary_data_size are set; send one")
        if size != len(binary):
            raise InvalidInput(f"input {INPUT_NAME!r}: binary_data_size is {size} but {len(binary)} bytes of binary "
                               f"data follow the JSON header ({HEADER_LENGTH})")
        if encoded:
            return split_bytes(binary, n, "binary data")
        return _array(n, datatype, shape, bytes(binary), "binary data")  # a copy: aligned
    if len(binary):
        raise InvalidInput(f"{len(binary)} bytes of binary data follow the JSON header, but no input has "
                           f"parameters.binary_data_size")
    if "data" not in t:
        raise InvalidInput(f"input {INPUT_NAME!r}: no data (neither data nor parameters.binary_data_size)")
    if encoded:
        return json_encoded(t["data"], n)
    return _array(n, datatype, shape, _json_values(t["data"], datatype), "data")


def _json_values(data, datatype: str) -> np.ndarray:
    """JSON `data`, flat or nested as the shape, -> a flat numeric array (not yet range-checked)."""
    where = f"input {INPUT_NAME!r}: data"
    if not isinstance(data, list):
        raise InvalidInput(f"{where} must be a JSON array of numbers, got {_short(data)}")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError):  # ragged nesting
        raise InvalidInput(f"{where} is not a regular array of numbers (ragged nesting?)") from None
    if values.size and values.dtype.kind not in ("iu" if datatype == "UINT8" else "iuf"):
        raise InvalidInput(f"{where} must hold " + ("integers from 0 to 255" if datatype == "UINT8" else "numbers")
                           + f" for {datatype}")
    return values.reshape(-1)


def rest_outputs(outputs, binary_default: bool = False) -> list[tuple[str, int, bool]]:
    """[(name, classification count or 0, binary)]: all outputs when none are asked for."""
    if outputs is None or outputs == []:
        return [(name, 0, binary_default) for name in OUTPUT_NAMES]
    if not isinstance(outputs, list):
        raise InvalidInput(f"outputs: expected a list of objects, got {_short(outputs)}")
    out = []
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInput(f"outputs[{i}]: expected an object with a name, got {_short(o)}")
        params = _object(o.get("parameters"), f"outputs[{i}].parameters")
        name, k = requested_output(i, o["name"], params.get("classification"))
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidInput(f"outputs[{i}].parameters.binary_data: must be true or false, got {_short(binary)}")
        out.append((name, k, binary))
    return out


def rest_response(request: RestRequest, logits: np.ndarray, probs: np.ndarray, labels: Sequence[str],
                  model_name: str, model_version: str) -> tuple[bytes, int | None]:
    """(body, JSON header length): the JSON response, then the binary outputs' bytes in order
    (the header length is None when no output is binary)."""
    tensors, blobs = [], []
    for name, k, binary in request.outputs:
        name, datatype, shape, data = output_tensor(name, k, logits, probs, labels, raw=binary)
        t = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            t["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            t["data"] = data
        tensors.append(t)
    answer = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = tensors
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
