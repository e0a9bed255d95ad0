"""inference.GRPCInferenceService: the KServe v2 / Triton protocol, as tritonclient and
perf_analyzer speak it.  Tensors in, numpy arrays to the batcher, tensors out.

Inputs: one tensor `images` [N, 1, 28, 28], FP32 in [0, 1] or UINT8 (scaled by 1/255), in
`raw_input_contents` or typed `contents` (never both).  Outputs go back in
`raw_output_contents`, which is what tritonclient reads.  The classification extension: an
output requested with the int64 parameter `classification` = k answers BYTES [N, k] of
"<value>:<index>:<label>", most probable first.
"""
from __future__ import annotations

import struct

import numpy as np

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc

from .. import __version__, preprocess
from ..errors import InvalidInput, ModelNotFound, Network3Error, Overloaded
from ..model import CLASSES, INPUT_NAME, OUTPUT_NAMES
from .common import Serving, deadline_of, now, parser, pipelined, stream, unary

API = "inference.GRPCInferenceService"
EXTENSIONS = ["classification", "model_configuration", "statistics"]
SHAPE = [1, 28, 28]
ITEMS = preprocess.PIXELS  # values per image
RAW_BYTES = {"FP32": 4, "UINT8": 1}
ONE_BITS = 0x3F800000  # 1.0f as uint32


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, serving: Serving) -> None:
        self.s = serving
        zero = lambda r: 0  # noqa: E731
        for name, fn in [("ServerLive", self._server_live), ("ServerReady", self._server_ready),
                         ("ModelReady", self._model_ready), ("ServerMetadata", self._server_metadata),
                         ("ModelMetadata", self._model_metadata), ("ModelConfig", self._model_config),
                         ("ModelStatistics", self._model_statistics)]:
            setattr(self, name, unary(serving, API, name, fn, zero, parse=parser(getattr(pb, f"{name}Request"))))
        infer = parser(pb.ModelInferRequest)
        count = lambda r: _count(r, serving.limits.max_images_per_request)  # noqa: E731
        self.ModelInfer = unary(serving, API, "ModelInfer", self._model_infer, count, model_call=True,
                                rid_of=lambda r: r.id, parse=infer)
        self.ModelStreamInfer = stream(serving, API, "ModelStreamInfer", self._model_stream_infer, parse=infer)

    # -- health and metadata ----------------------------------------------------------------

    async def _server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def _server_ready(self, request, context):
        return pb.ServerReadyResponse(ready=self.s.is_ready())

    async def _model_ready(self, request, context):
        known = request.name == self.s.model_name and request.version in ("", self.s.model_version)
        return pb.ModelReadyResponse(ready=known and self.s.is_ready())

    async def _server_metadata(self, request, context):
        return pb.ServerMetadataResponse(name="network3", version=__version__, extensions=EXTENSIONS)

    async def _model_metadata(self, request, context):
        self._check_model(request.name, request.version)
        model = self.s.model
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.s.model_name, versions=[self.s.model_version], platform="onnxruntime_onnx",
            inputs=[T(name=INPUT_NAME, datatype="FP32", shape=model.input_shape)],
            outputs=[T(name=name, datatype="FP32", shape=model.output_shapes[name]) for name in OUTPUT_NAMES],
            parameters={k: pb.InferParameter(string_param=v) for k, v in _model_facts(model).items()},
        )

    async def _model_config(self, request, context):
        self._check_model(request.name, request.version)
        model, o = self.s.model, self.s.batcher.options
        gpu = any(p.startswith("CUDA") for p in model.providers)
        config = mc.ModelConfig(
            name=self.s.model_name, platform="onnxruntime_onnx", backend="onnxruntime",
            max_batch_size=o.max_batch_size,
            # As in Triton: with max_batch_size > 0 the dims leave out the batch dimension.
            input=[mc.ModelInput(name=INPUT_NAME, data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NCHW,
                                 dims=model.input_shape[1:])],
            output=[mc.ModelOutput(name=name, data_type=mc.TYPE_FP32, dims=model.output_shapes[name][1:])
                    for name in OUTPUT_NAMES],
            instance_group=[mc.ModelInstanceGroup(name=self.s.model_name, count=o.instances,
                                                  kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)],
            default_model_filename=model.path.name,
            parameters={k: mc.ModelParameter(string_value=v) for k, v in _model_facts(model).items()},
        )
        if o.batching:
            config.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(
                max_queue_delay_microseconds=o.max_queue_delay_us,
                default_queue_policy=mc.ModelQueuePolicy(max_queue_size=o.max_queue_size)))
        return pb.ModelConfigResponse(config=config)

    async def _model_statistics(self, request, context):
        if request.name:
            self._check_model(request.name, request.version)
        st = self.s.stats
        D = pb.StatisticDuration
        ns = lambda seconds: int(seconds * 1e9)  # noqa: E731
        ok, fail, comp = st.model_ok, st.model_fail, st.request_compute
        stats = pb.ModelStatistics(
            name=self.s.model_name, version=self.s.model_version, last_inference=st.last_inference_ms,
            inference_count=st.inference_count(), execution_count=st.execution_count(),
            inference_stats=pb.InferStatistics(
                success=D(count=ok[0], ns=ns(ok[1])), fail=D(count=fail[0], ns=ns(fail[1])),
                queue=D(count=st.queue.count, ns=ns(st.queue.sum)),
                compute_input=D(count=comp[0]), compute_infer=D(count=comp[0], ns=ns(comp[1])),
                compute_output=D(count=comp[0])),
            batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=D(count=b[0], ns=ns(b[1])))
                         for size, b in sorted(st.batches.items())],
        )
        return pb.ModelStatisticsResponse(model_stats=[stats])

    # -- inference --------------------------------------------------------------------------

    async def _model_infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        self._check_model(request.model_name, request.model_version)
        x = self._input(request)
        outputs = self._outputs(request)
        logits, probs, model = await self.s.batcher.infer(x, deadline_of(context))
        return self._response(request, outputs, logits, probs, model)

    async def _model_stream_infer(self, request_iterator, context, tally):
        deadline = deadline_of(context)
        stats = self.s.stats

        async def one(request):
            tally[0] += 1
            t0 = now()
            try:
                tally[1] += _count(request, self.s.limits.max_images_per_request)
                self._check_model(request.model_name, request.model_version)
                x = self._input(request)
                outputs = self._outputs(request)
                logits, probs, model = await self.s.batcher.infer(x, deadline)
                response = pb.ModelStreamInferResponse(infer_response=self._response(request, outputs, logits, probs, model))
                stats.record_model_request(True, now() - t0)
                return response
            except Network3Error as e:
                stats.record_model_request(False, now() - t0)
                return pb.ModelStreamInferResponse(error_message=str(e),
                                                   infer_response=pb.ModelInferResponse(id=request.id))

        async for response in pipelined(request_iterator, one):
            yield response

    def _check_model(self, name: str, version: str) -> None:
        if name != self.s.model_name:
            raise ModelNotFound(f"model_name: unknown model {name!r}; this server serves {self.s.model_name!r}")
        if version not in ("", self.s.model_version):
            raise ModelNotFound(f"model_version: {self.s.model_name!r} has no version {version!r} "
                                f"(only {self.s.model_version!r})")

    def _input(self, request: pb.ModelInferRequest) -> np.ndarray:
        """The request's `images` tensor as float32 [N, 1, 28, 28] in [0, 1], or InvalidInput."""
        inputs = request.inputs
        if len(inputs) != 1:
            if not inputs:
                raise InvalidInput(f"inputs: the request has no inputs; the model takes {INPUT_NAME!r}")
            raise InvalidInput(f"inputs: {len(inputs)} inputs {[i.name for i in inputs]}; the model takes one, {INPUT_NAME!r}")
        t = inputs[0]
        if t.name != INPUT_NAME:
            raise InvalidInput(f"inputs[0]: unknown input {t.name!r}; the model's input is {INPUT_NAME!r}")
        shape = list(t.shape)
        if len(shape) != 4 or shape[1:] != SHAPE or shape[0] < 1:
            raise InvalidInput(f"input {INPUT_NAME!r}: shape {shape}, expected [N, 1, 28, 28] with N >= 1")
        n = shape[0]
        limit = self.s.limits.max_images_per_request
        if n > limit:
            raise Overloaded(f"input {INPUT_NAME!r}: {n} images in one request, over --max-images-per-request {limit}")
        dtype = t.datatype
        if dtype not in RAW_BYTES:
            raise InvalidInput(f"input {INPUT_NAME!r}: datatype {dtype!r}, expected FP32 (in [0, 1]) or UINT8")
        raw = request.raw_input_contents
        typed = t.HasField("contents")
        if raw and typed:
            raise InvalidInput(f"input {INPUT_NAME!r}: both raw_input_contents and contents are set; send one")
        if raw:
            if len(raw) != 1:
                raise InvalidInput(f"raw_input_contents: {len(raw)} entries for 1 input")
            data = raw[0]
            expected = n * ITEMS * RAW_BYTES[dtype]
            if len(data) != expected:
                raise InvalidInput(f"input {INPUT_NAME!r}: raw_input_contents has {len(data)} bytes, shape {shape} "
                                   f"{dtype} needs {expected}")
            values = np.frombuffer(data, "<f4" if dtype == "FP32" else np.uint8)
        elif typed:
            c = t.contents
            field = "fp32_contents" if dtype == "FP32" else "uint_contents"
            got = getattr(c, field)
            if len(got) != n * ITEMS:
                raise InvalidInput(f"input {INPUT_NAME!r}: contents.{field} has {len(got)} values, shape {shape} needs {n * ITEMS}")
            if dtype == "FP32":
                values = np.array(got, np.float32)
            else:
                wide = np.array(got, np.uint32)
                if wide.max() > 255:
                    raise InvalidInput(f"input {INPUT_NAME!r}: contents.uint_contents has values over 255 for UINT8")
                values = wide.astype(np.uint8)
        else:
            raise InvalidInput(f"input {INPUT_NAME!r}: no data (neither raw_input_contents nor contents)")
        if dtype == "UINT8":
            return preprocess.pixels_to_input(values.reshape(n, 28, 28))
        x = values.reshape(n, *SHAPE)
        # One reduction in the common case: as uint32, +0.0..1.0 are exactly 0..0x3F800000 and
        # negatives, NaN and infinity are all larger.  Only a failure looks closer (-0.0 passes).
        if values.view(np.uint32).max() > ONE_BITS and not (x.min() >= 0.0 and x.max() <= 1.0):
            lo, hi = x.min(), x.max()
            if np.isnan(x).any():
                what = "NaN"
            elif np.isinf(x).any():
                what = "infinity"
            else:
                what = f"values outside [0, 1] (min {float(lo):g}, max {float(hi):g})"
            raise InvalidInput(f"input {INPUT_NAME!r}: FP32 input contains {what}; pixels must lie in [0, 1]")
        return x

    def _outputs(self, request: pb.ModelInferRequest) -> list[tuple[str, int]]:
        """[(output name, classification count or 0)]: all outputs when none are asked for."""
        if not request.outputs:
            return [(name, 0) for name in OUTPUT_NAMES]
        out = []
        for i, o in enumerate(request.outputs):
            if o.name not in OUTPUT_NAMES:
                raise InvalidInput(f"outputs[{i}]: unknown output {o.name!r}; the model has {list(OUTPUT_NAMES)}")
            k = 0
            if "classification" in o.parameters:
                p = o.parameters["classification"]
                k = p.int64_param if p.WhichOneof("parameter_choice") == "int64_param" else -1
                if not 1 <= k <= CLASSES:
                    raise InvalidInput(f"outputs[{i}] ({o.name}): parameter 'classification' must be an int64 "
                                       f"from 1 to {CLASSES}")
            out.append((o.name, k))
        return out

    def _response(self, request, outputs, logits, probs, model) -> pb.ModelInferResponse:
        T = pb.ModelInferResponse.InferOutputTensor
        tensors, raws = [], []
        n = len(logits)
        for name, k in outputs:
            values = logits if name == "logits" else probs
            if not k:
                tensors.append(T(name=name, datatype="FP32", shape=[n, CLASSES]))
                raws.append(values.tobytes())
            else:
                tensors.append(T(name=name, datatype="BYTES", shape=[n, k]))
                raws.append(_classification(values, k, model.labels))
        return pb.ModelInferResponse(model_name=self.s.model_name, model_version=self.s.model_version, id=request.id,
                                     outputs=tensors, raw_output_contents=raws)


def _count(request, limit: int = 1 << 31) -> int:
    """The images a request declares, for the counters: 0 for a batch size we refuse, so that a
    hostile shape ([-2**63, ...] or [2**62, ...]) cannot move them."""
    n = int(request.inputs[0].shape[0]) if request.inputs and request.inputs[0].shape else 0
    return n if 0 < n <= limit else 0


def _classification(values: np.ndarray, k: int, labels: list[str]) -> bytes:
    """Triton's classification output: per row the top k as "<value>:<index>:<label>",
    each serialized as a BYTES element (4-byte little-endian length, then the bytes)."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(values, order, 1)
    parts = []
    for row_i, row_v in zip(order.tolist(), top.tolist()):
        for j, v in zip(row_i, row_v):
            s = f"{v:f}:{j}:{labels[j]}".encode()
            parts.append(struct.pack("<I", len(s)))
            parts.append(s)
    return b"".join(parts)


def _model_facts(model) -> dict[str, str]:
    """The loaded file's identity, shown by ModelMetadata and ModelConfig: a reload is visible."""
    import datetime

    loaded = datetime.datetime.fromtimestamp(model.loaded_at, datetime.timezone.utc).isoformat(timespec="milliseconds")
    facts = {"sha256": model.sha256, "loaded_at": loaded, "path": str(model.path)}
    for key in ("test_accuracy", "preset", "exported_at", "git_commit", "network3_version"):
        if key in model.metadata:
            facts[key] = model.metadata[key]
    return facts
