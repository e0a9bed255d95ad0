"""OnnxModel: the ONNX file in onnxruntime, apart from any transport (KServe's load/ready/predict).

The file is read once into memory: its sha256 is of exactly the bytes the session runs, and a
file replaced while we serve changes nothing until a reload.  Everything the server needs to
know about the model (labels, input contract, provenance, the `unsure` threshold) comes from the
file's metadata_props.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import CLASSES, INPUT_NAME, INPUT_SHAPE, LABELS, OUTPUT_NAMES, UNSURE_KEY
from .errors import BadModel
from .unsure import flags, threshold_of

INPUT_DIMS = f"[N, {', '.join(map(str, INPUT_SHAPE))}]"  # as messages write the input's shape
OUTPUT_DIMS = f"[N, {CLASSES}]"


@dataclass
class ModelOptions:
    # One thread by default: the server runs small batches inline on the event loop thread, and
    # a single onnxruntime thread leaves the other cores to gRPC (and to another batch).  0 asks
    # onnxruntime for one thread per core.  (Figures: docs/results.md.)
    intra_op_threads: int = 1
    # A batch of at least `wide_min` images runs on a second session with `wide_threads`
    # threads (None: no second session).  Threads pay from a few images up (two onnxruntime
    # threads against one, in-process, EPYC, benchmarks/bench_threads.py: 0.82x the time at 4
    # and 8 images, 0.55x at 64, 1.01-1.22x at 1); 8 leaves a margin for the cores gRPC uses.
    # Batches that large come mostly from large requests, computed in an executor thread while
    # the event loop goes on.  The server asks for the cores each worker has (serve
    # --wide-threads auto; docs/results.md).  KServe's lesson: it served 64-image requests
    # faster by computing each with every core.
    wide_threads: int | None = None
    wide_min: int = 8
    providers: tuple[str, ...] | None = None  # None: CUDA when present, else CPU
    warmup_batch_sizes: tuple[int, ...] = (1, 8, 64)


# onnxruntime and onnxruntime-gpu install the same `onnxruntime` package: with both (as
# `pip install network3[gpu]` leaves them) whichever was written last wins, often the CPU one,
# and the CUDA provider silently disappears (microsoft/onnxruntime#26996).  `make install-gpu`
# leaves the GPU build alone; a server that finds the mix says how to mend it.
GPU_FIX = "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu (make install-gpu)"


def shadowed_gpu_build() -> bool:
    """onnxruntime-gpu is installed, yet the onnxruntime that imports has no CUDA provider."""
    try:
        importlib.metadata.distribution("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return "CUDAExecutionProvider" not in ort.get_available_providers()


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    if shadowed_gpu_build():
        logging.getLogger("network3.model").warning(
            "onnxruntime-gpu is installed but the CPU onnxruntime shadows it, so no CUDA: %s", GPU_FIX)
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    return chosen + ["CPUExecutionProvider"]


@dataclass
class OnnxModel:
    path: Path
    options: ModelOptions = field(default_factory=ModelOptions)
    sha256: str = ""
    loaded_at: float = 0.0  # time.time() when the load finished
    metadata: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    # Answers with a lower top probability are flagged unsure (serving.unsure); None: the file
    # has no threshold, so only blank inputs are.
    unsure_below: float | None = None
    providers: list[str] = field(default_factory=list)
    ready: bool = False
    # Shapes as the file declares them, a symbolic (batch) dimension as -1.
    input_shape: list[int] = field(default_factory=list)
    output_shapes: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._session: ort.InferenceSession | None = None
        self._wide: ort.InferenceSession | None = None  # for batches of wide_min images or more
        self._outputs = list(OUTPUT_NAMES)

    # -- lifecycle --------------------------------------------------------------------------

    def load(self) -> "OnnxModel":
        """Read, check and open the file.  Raises BadModel with one clear line on any problem."""
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise BadModel(f"cannot read model {self.path}: {e.strerror or e}") from None
        providers = list(self.options.providers or default_providers())
        session = self._open(data, self.options.intra_op_threads, providers)
        self._check_signature(session)
        wide = self.options.wide_threads
        # On a GPU the batch runs there whatever the CPU threads: one session is enough.
        if wide is not None and wide != self.options.intra_op_threads and providers[0] == "CPUExecutionProvider":
            self._wide = self._open(data, wide, providers)
        self.metadata = dict(session.get_modelmeta().custom_metadata_map)
        self.labels = self._read_labels()
        self.unsure_below = threshold_of(self.metadata, str(self.path))
        if self.unsure_below is None:
            logging.getLogger("network3.model").warning(
                "%s has no %r metadata: only blank images will be flagged unsure "
                "(network3-train calibrate %s adds it)", self.path, UNSURE_KEY, self.path)
        self.providers = session.get_providers()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._session = session
        self.loaded_at = time.time()
        return self

    def _open(self, data: bytes, threads: int, providers: list[str]) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        # Inference is called from the event loop thread (small batches) and executor threads
        # (large ones); spinning intra-op threads would steal the cores gRPC needs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(data, so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types: one line is enough
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadModel(f"{self.path} is not a loadable ONNX model: {first[:300]}") from None

    def warmup(self) -> "OnnxModel":
        """Run every warm-up batch size once (allocations, kernel choice) and check the output."""
        for n in self.options.warmup_batch_sizes:
            logits, probs = self.predict(np.zeros((n, *INPUT_SHAPE), np.float32))
            if logits.shape != (n, CLASSES) or probs.shape != (n, CLASSES) or not np.isfinite(probs).all():
                raise BadModel(f"{self.path}: warm-up produced {probs.shape} outputs or non-finite values")
        self.ready = True
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N, 1, 28, 28] in [0, 1] -> (logits [N, 10], probabilities [N, 10])."""
        session = self._wide if len(x) >= self.options.wide_min and self._wide is not None else self._session
        logits, probs = session.run(self._outputs, {INPUT_NAME: x})
        return logits, probs

    def unsure(self, x: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """bool [N]: which of these answers (inputs x, probabilities probs) are guesses."""
        return flags(x, probs, self.unsure_below)

    # -- what the file says about itself ----------------------------------------------------

    def _check_signature(self, session: ort.InferenceSession) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        where = str(self.path)
        if set(inputs) != {INPUT_NAME}:
            raise BadModel(f"{where}: expected one input named {INPUT_NAME!r}, found {sorted(inputs)}")
        i = inputs[INPUT_NAME]
        if i.type != "tensor(float)" or len(i.shape) != 4 or list(i.shape[1:]) != list(INPUT_SHAPE):
            raise BadModel(f"{where}: input {INPUT_NAME!r} must be float32 {INPUT_DIMS}, found {i.type} {i.shape}")
        for name in OUTPUT_NAMES:
            o = outputs.get(name)
            if o is None:
                raise BadModel(f"{where}: missing output {name!r} (found {sorted(outputs)})")
            if o.type != "tensor(float)" or len(o.shape) != 2 or o.shape[1] != CLASSES:
                raise BadModel(f"{where}: output {name!r} must be float32 {OUTPUT_DIMS}, found {o.type} {o.shape}")
        dims = lambda shape: [d if isinstance(d, int) else -1 for d in shape]  # noqa: E731
        self.input_shape = dims(i.shape)
        self.output_shapes = {name: dims(outputs[name].shape) for name in OUTPUT_NAMES}

    def _read_labels(self) -> list[str]:
        raw = self.metadata.get("labels")
        if raw is None:
            return list(LABELS)
        try:
            labels = [str(v) for v in json.loads(raw)]
        except (ValueError, TypeError):
            raise BadModel(f"{self.path}: metadata 'labels' is not a JSON list") from None
        if len(labels) != CLASSES:
            raise BadModel(f"{self.path}: metadata 'labels' has {len(labels)} entries, expected {CLASSES}")
        return labels

    def describe(self) -> dict:
        """Plain facts for ModelInfo / ModelMetadata / logs."""
        return {
            "path": os.fspath(self.path),
            "sha256": self.sha256,
            "loaded_at": self.loaded_at,
            "providers": list(self.providers),
            "labels": list(self.labels),
            "unsure_below": self.unsure_below,
            "metadata": dict(self.metadata),
        }


def top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of each row, largest first (ties: the lower class first):
    (class indices int64 [N, k], values [N, k])."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(values, order, 1)


def load_model(path: str | os.PathLike, options: ModelOptions | None = None) -> OnnxModel:
    """Load, check and warm up: the model returned is ready to serve."""
    return OnnxModel(Path(path), options or ModelOptions()).load().warmup()
