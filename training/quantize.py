"""`--quantize int8`: onnxruntime static quantization, calibrated on training images, guarded by accuracy.

QDQ format, int8 weights per output channel in onnxruntime's reduced (7-bit) range, uint8
activations with MinMax ranges from 1,000 training images.  Only Conv, Gemm and MatMul are
quantized (where the weights and the time are); the classifier head (the Gemm whose output becomes the logits) stays float32, so the
logits and probabilities the server returns keep their precision and ties cannot appear from
rounding.  Parity within 1e-5 cannot hold for an int8 net, so its own guard replaces it: the
export is refused if test accuracy drops more than 0.1 percentage point below float32's.

Why 7-bit weights (`reduce_range=True`): on x86 CPUs without AVX-512 VNNI (AVX2 only),
onnxruntime's uint8 x int8 kernels multiply with `vpmaddubsw`, which adds two u8*s8 products
into a saturating int16.  With full-range weights (|q| up to 128) that pair can reach
2 * 255 * 128 = 65,280 and saturates at 32,767, so the same file loses accuracy on those CPUs
only; onnxruntime's quantization guide recommends reduce_range there.  With weights in
[-64, 64] the pair is at most 2 * 255 * 64 = 32,640: it cannot saturate, on any x86-64 CPU, so
the accuracy checked at export holds wherever the file is served, not only on a VNNI machine.
Activations keep their full uint8 range (reduce_range applies to weights only).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from serving.contract import INPUT_NAME
from serving.preprocess import pixels_to_input
from .data import Mnist
from .onnxrt import ExportError, onnx_predict, onnx_session, opset_of, set_metadata


MAX_DROP_PP = 0.1  # percentage points of test accuracy int8 may lose against float32
CALIBRATION_IMAGES = 1000
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]
# 7-bit weights: int8 values in [-64, 64] (onnxruntime's reduced range for QInt8), see above.
REDUCE_RANGE = True


class _Calibration(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch: int = 100):
        self._batches = iter([{INPUT_NAME: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Gemm/MatMul nodes whose output is a graph output or goes straight into a (log-)softmax."""
    outputs = {o.name for o in model.graph.output}
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    return [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")
            and (n.output[0] in outputs or consumers.get(n.output[0], set()) & {"Softmax", "LogSoftmax"})]


def images_per_second(sess: ort.InferenceSession, x: np.ndarray, batch: int, seconds: float = 0.5) -> float:
    """Best of three timed loops of about `seconds`/3 each: a rough figure for the export report."""
    xb = x[:batch]
    sess.run(None, {INPUT_NAME: xb})  # warm-up
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / 3 or n == 0:
            sess.run(None, {INPUT_NAME: xb})
            n += 1
        best = max(best, n * batch / elapsed)
    return best


def quantize_int8(model: onnx.ModelProto, data: Mnist, *, float32_accuracy: float,
                  calibration_images: int = CALIBRATION_IMAGES, log: Callable[[str], None] = lambda _m: None
                  ) -> tuple[onnx.ModelProto, dict]:
    """The int8 model (metadata updated) and a report; ExportError if the accuracy guard fails."""
    rng = np.random.default_rng(0)
    pick = rng.choice(len(data.train_x), size=min(calibration_images, len(data.train_x)), replace=False)
    calibration = pixels_to_input(data.train_x[np.sort(pick)])
    log(f"quantizing to int8, calibrated on {len(calibration):,} training images")
    with tempfile.TemporaryDirectory(prefix="network3-int8-") as tmp:
        src, dst = Path(tmp) / "float32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, src)
        root = logging.getLogger()
        level = root.level
        # The quantizer advises pre-processing on the root logger; tried on this graph it changed
        # nothing, so the advice would only be noise in the export's output.
        root.setLevel(logging.ERROR)
        try:
            quantize_static(src, dst, _Calibration(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            reduce_range=REDUCE_RANGE, op_types_to_quantize=QUANTIZED_OPS,
                            nodes_to_exclude=head_nodes(model))
        finally:
            root.setLevel(level)
        qmodel = onnx.load_model(dst)

    x = pixels_to_input(data.test_x)
    f32, q8 = onnx_session(model.SerializeToString()), onnx_session(qmodel.SerializeToString())
    pred = onnx_predict(q8, x)[1].argmax(1)
    accuracy = float((pred == data.test_y).mean())
    drop_pp = (float32_accuracy - accuracy) * 100
    if drop_pp > MAX_DROP_PP + 1e-9:
        raise ExportError(f"int8 refused, nothing written: test accuracy {accuracy:.4f} is {drop_pp:.2f} pp below "
                          f"float32's {float32_accuracy:.4f} (limit {MAX_DROP_PP} pp)")

    sizes = {"float32": model.ByteSize(), "int8": qmodel.ByteSize()}
    speed = {name: round(images_per_second(s, x, 256)) for name, s in (("float32", f32), ("int8", q8))}
    info = {
        "test_accuracy": accuracy, "float32_test_accuracy": float32_accuracy, "drop_pp": round(drop_pp, 4),
        "size_bytes": sizes, "size_ratio": round(sizes["int8"] / sizes["float32"], 3),
        "images_per_s_batch256": speed, "speedup": round(speed["int8"] / max(speed["float32"], 1), 2),
        "calibration_images": len(calibration),
    }
    # quantize_static keeps metadata_props; what changes is the accuracy and how it was made.
    set_metadata(qmodel, {
        "test_accuracy": json.dumps(accuracy), "opset": str(opset_of(qmodel)),
        "quantization": {"method": "onnxruntime static", "format": "QDQ", "weights": "int8 per-channel, 7-bit (reduce_range: values in [-64, 64])",
                         "reduce_range": REDUCE_RANGE,
                         "activations": "uint8", "ops": QUANTIZED_OPS, "calibration_images": len(calibration),
                         "calibration": "MinMax", "float32_test_accuracy": float32_accuracy},
    })
    qmodel.doc_string = model.doc_string + " [int8]"
    log(f"int8: test accuracy {accuracy:.4f} (float32 {float32_accuracy:.4f}), size {sizes['int8']:,} bytes vs "
        f"{sizes['float32']:,} ({info['size_ratio']:.2f}x), batch 256: {speed['int8']:,} vs {speed['float32']:,} "
        f"images/s ({info['speedup']:.2f}x)")
    return qmodel, info
