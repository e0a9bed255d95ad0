"""inference.GRPCInferenceService: the KServe v2 / Triton protocol, as tritonclient and
perf_analyzer speak it.  Tensors in, numpy arrays to the batcher, tensors out.

Two models.  `network3` (contract.MODEL_NAME, or --model-name): one tensor `images`
[N, 1, 28, 28], FP32 in [0, 1] or UINT8 (scaled by 1/255), in `raw_input_contents` or typed
`contents` (never both).  `network3-image` (contract.IMAGE_MODEL_NAME): one tensor `images`
BYTES [N], each element an encoded image file (PNG, JPEG, ...: preprocess.FORMATS) that goes
through the photo pipeline (preprocess.decode_many in the decode pool, off the event loop;
Limits.max_pixels), in `raw_input_contents` (4-byte little-endian length-prefixed elements)
or `contents.bytes_contents`; the first bad file fails the request naming its index.  Both
answer the same outputs from the same batcher and model.  Outputs go back in
`raw_output_contents`, which is what tritonclient reads.  The classification extension: an
output requested with the int64 parameter `classification` = k answers BYTES [N, k] of
"<value>:<index>:<label>", most probable first.
"""
from __future__ import annotations

import asyncio
import datetime
import os

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc

from .. import __version__, codec, preprocess
from ..contract import IMAGE_MODEL_NAME, INPUT_NAME, MODEL_NAME, OUTPUT_NAMES, UNSURE_KEY
from ..errors import ModelNotFound, Network3Error
from .common import Servicer, deadline_of, now, pipelined, rpc

API = "inference.GRPCInferenceService"
EXTENSIONS = ["classification", "model_configuration", "statistics"]


def _images(servicer: "InferenceServicer", request: pb.ModelInferRequest) -> int:
    return codec.images_declared(request, servicer.serving.limits.max_images_per_request)


class InferenceServicer(Servicer, pb_grpc.GRPCInferenceServiceServicer):
    API = API

    # -- health and metadata ----------------------------------------------------------------

    @rpc(pb.ServerLiveRequest)
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc(pb.ServerReadyRequest)
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.serving.is_ready())

    @rpc(pb.ModelReadyRequest)
    async def ModelReady(self, request, context):
        s = self.serving
        known = request.name in model_names(s) and request.version in ("", s.model_version)
        return pb.ModelReadyResponse(ready=known and s.is_ready())

    @rpc(pb.ServerMetadataRequest)
    async def ServerMetadata(self, request, context):
        return server_metadata()

    @rpc(pb.ModelMetadataRequest)
    async def ModelMetadata(self, request, context):
        return model_metadata(self.serving, request.name, request.version)

    @rpc(pb.ModelConfigRequest)
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=model_config(self.serving, request.name, request.version))

    @rpc(pb.ModelStatisticsRequest)
    async def ModelStatistics(self, request, context):
        context.set_trailing_metadata(((STATISTICS_SCOPE, statistics_scope(self.serving)),))
        return model_statistics(self.serving, request.name, request.version)

    # -- inference --------------------------------------------------------------------------

    @rpc(pb.ModelInferRequest, images=_images, model_call=True, request_id=lambda r: r.id)
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> bytes:
        return await self._infer(request, deadline_of(context))

    @rpc(pb.ModelInferRequest, images=_images)
    async def ModelStreamInfer(self, request_iterator, context):
        deadline = deadline_of(context)
        stats = self.serving.stats

        async def one(request):
            t0 = now()
            try:
                response = codec.stream_response(await self._infer(request, deadline))
                stats.record_model_request(True, now() - t0)
                return response
            except Network3Error as e:
                stats.record_model_request(False, now() - t0)
                return pb.ModelStreamInferResponse(error_message=str(e),
                                                   infer_response=pb.ModelInferResponse(id=request.id))

        async for response in pipelined(request_iterator, one):
            yield response

    async def _infer(self, request: pb.ModelInferRequest, deadline) -> bytes:
        """The serialized ModelInferResponse (codec.response): ModelInfer and ModelStreamInfer
        send it as it is."""
        s = self.serving
        encoded = check_model(s, request.model_name, request.model_version)
        limit = s.limits.max_images_per_request
        if encoded:
            files = codec.request_encoded(request, limit)
            outputs = codec.requested_outputs(request)  # checked before any decoding
            x = await decode_images(s, files)
        else:
            x = codec.request_input(request, limit)
            outputs = codec.requested_outputs(request)
        logits, probs, model = await s.batcher.infer(x, deadline)
        return codec.response(request, outputs, logits, probs, model.labels, request.model_name, s.model_version)


async def decode_images(s, files: list[bytes]):
    """The image model's files -> float32 [N, 1, 28, 28]: decoded in the decode pool (off the
    event loop) by preprocess.decode_many; the first bad file fails the request naming its index
    ("image 3: ..."), InvalidInput, or TooLarge over Limits.max_pixels."""
    return await asyncio.get_running_loop().run_in_executor(s.decode_pool, preprocess.images_to_input, files,
                                                            s.limits.max_pixels)


# ---------------------------------------------------------------------------------------------
# What the v2 metadata, config and statistics calls answer, as protos: the gRPC servicer sends
# them as they are, the HTTP adapter (api/http.py) as JSON.  Built here once.

def model_names(s) -> tuple[str, str]:
    """The models served: the tensor model (s.model_name) and the image model, in that order."""
    return s.model_name, IMAGE_MODEL_NAME


def check_model(s, name: str, version: str) -> bool:
    """Which model `name` is: False for the tensor model, True for the image model (BYTES input
    of encoded files).  ModelNotFound unless it is one of them (and `version`, "" for any, theirs)."""
    names = model_names(s)
    if name not in names:
        raise ModelNotFound(f"model_name: unknown model {name!r}; this server serves {' and '.join(map(repr, names))}")
    if version not in ("", s.model_version):
        raise ModelNotFound(f"model_version: {name!r} has no version {version!r} (only {s.model_version!r})")
    return name != s.model_name


def server_metadata() -> pb.ServerMetadataResponse:
    # The server is named after the one model it serves, as the distribution is.
    return pb.ServerMetadataResponse(name=MODEL_NAME, version=__version__, extensions=EXTENSIONS)


def model_metadata(s, name: str, version: str = "") -> pb.ModelMetadataResponse:
    encoded = check_model(s, name, version)
    model = s.model
    T = pb.ModelMetadataResponse.TensorMetadata
    # Both models are the one ONNX graph run by onnxruntime; the image model decodes first.
    return pb.ModelMetadataResponse(
        name=name, versions=[s.model_version], platform="onnxruntime_onnx",
        inputs=[T(name=INPUT_NAME, datatype=codec.BYTES, shape=[-1]) if encoded
                else T(name=INPUT_NAME, datatype="FP32", shape=model.input_shape)],
        outputs=[T(name=name, datatype="FP32", shape=model.output_shapes[name]) for name in OUTPUT_NAMES],
        parameters={k: pb.InferParameter(string_param=v) for k, v in model_facts(model).items()},
    )


def model_config(s, name: str, version: str = "") -> mc.ModelConfig:
    encoded = check_model(s, name, version)
    model, o = s.model, s.batcher.options
    gpu = any(p.startswith("CUDA") for p in model.providers)
    if encoded:
        return _image_model_config(s, model, o, gpu)
    config = mc.ModelConfig(
        name=s.model_name, platform="onnxruntime_onnx", backend="onnxruntime",
        max_batch_size=o.max_batch_size,
        # As in Triton: with max_batch_size > 0 the dims leave out the batch dimension.
        input=[mc.ModelInput(name=INPUT_NAME, data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NCHW,
                             dims=model.input_shape[1:])],
        output=[mc.ModelOutput(name=name, data_type=mc.TYPE_FP32, dims=model.output_shapes[name][1:])
                for name in OUTPUT_NAMES],
        instance_group=[mc.ModelInstanceGroup(name=s.model_name, count=o.instances,
                                              kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)],
        default_model_filename=model.path.name,
        parameters={k: mc.ModelParameter(string_value=v) for k, v in model_facts(model).items()},
    )
    if o.batching:
        config.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(
            max_queue_delay_microseconds=o.max_queue_delay_us,
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=o.max_queue_size)))
    return config


def _image_model_config(s, model, o, gpu: bool) -> mc.ModelConfig:
    """The image model's config.  Triton writes a BYTES input as TYPE_STRING.  With
    max_batch_size > 0 a config's dims leave out the batch dimension, so one string per image
    would be dims [1], the tensor [N, 1], and no dims describe the [N] the metadata shows (a
    `reshape` would only change what the backend sees, not what clients send).  So, as Triton
    writes a model that takes a variable-length batch as its own dimension: max_batch_size 0,
    dims [-1] (the full shape, as the outputs' [-1, 10]), and no dynamic_batching section,
    which Triton allows only with max_batch_size > 0.  Our batcher still batches this model's
    requests with the tensor model's (statistics' batch_stats).  tritonclient reads it as it
    is; perf_analyzer sends -b 1 (it cannot scale a max_batch_size 0 model's batch) and needs
    the element count and real files: `--shape images:N` and `--input-data` JSON
    {"data": [{"images": {"b64": ..., "shape": [N]}}]}, the b64 being the tensor as raw
    contents carry it (each file after its 4-byte little-endian length); its random strings
    are not images (400).  tests/serving/test_image_model.py runs it so, over gRPC and HTTP."""
    return mc.ModelConfig(
        name=IMAGE_MODEL_NAME, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=0,
        input=[mc.ModelInput(name=INPUT_NAME, data_type=mc.TYPE_STRING, format=mc.ModelInput.FORMAT_NONE, dims=[-1])],
        output=[mc.ModelOutput(name=name, data_type=mc.TYPE_FP32, dims=model.output_shapes[name])
                for name in OUTPUT_NAMES],
        instance_group=[mc.ModelInstanceGroup(name=IMAGE_MODEL_NAME, count=o.instances,
                                              kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)],
        default_model_filename=model.path.name,
        parameters={k: mc.ModelParameter(string_value=v) for k, v in model_facts(model).items()},
    )


# ModelStatistics answers with this metadata (gRPC trailing metadata, an HTTP header) saying
# what its numbers count: `server`, or with `serve --workers N` (N > 1) `worker pid=<pid> of <N>`:
# only the requests of the worker that answered (the whole server's: /metrics).
STATISTICS_SCOPE = "network3-statistics-scope"


def statistics_scope(s) -> str:
    return "server" if s.workers == 1 else f"worker pid={os.getpid()} of {s.workers}"


def model_statistics(s, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
    """The statistics of model `name`, or ("") of every model, the tensor model first.  Both
    models share one batcher and one set of counters, so their entries carry the same numbers:
    each counts the requests and images of both (do not add them up)."""
    if name:
        check_model(s, name, version)
    names = [name] if name else list(model_names(s))
    st = s.stats
    D = pb.StatisticDuration
    ns = lambda seconds: int(seconds * 1e9)  # noqa: E731
    ok, fail, comp = st.model_ok, st.model_fail, st.request_compute
    stats = pb.ModelStatistics(
        name=names[0], version=s.model_version, last_inference=st.last_inference_ms,
        inference_count=st.inference_count(), execution_count=st.execution_count(),
        inference_stats=pb.InferStatistics(
            success=D(count=ok[0], ns=ns(ok[1])), fail=D(count=fail[0], ns=ns(fail[1])),
            queue=D(count=st.queue.count, ns=ns(st.queue.sum)),
            compute_input=D(count=comp[0]), compute_infer=D(count=comp[0], ns=ns(comp[1])),
            compute_output=D(count=comp[0])),
        batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=D(count=b[0], ns=ns(b[1])))
                     for size, b in sorted(st.batches.items())],
    )
    entries = [stats]
    for other in names[1:]:
        entries.append(pb.ModelStatistics())
        entries[-1].CopyFrom(stats)
        entries[-1].name = other
    return pb.ModelStatisticsResponse(model_stats=entries)


def model_facts(model) -> dict[str, str]:
    """The loaded file's identity, shown by ModelMetadata and ModelConfig: a reload is visible.
    `unsure_below` (serving.unsure) is there for v2 callers who want network3.v1's flag: the
    tensor outputs stay the file's own."""
    loaded = datetime.datetime.fromtimestamp(model.loaded_at, datetime.timezone.utc).isoformat(timespec="milliseconds")
    facts = {"sha256": model.sha256, "loaded_at": loaded, "path": str(model.path)}
    for key in ("test_accuracy", "preset", "exported_at", "git_commit", "network3_version", UNSURE_KEY):
        if key in model.metadata:
            facts[key] = model.metadata[key]
    return facts
