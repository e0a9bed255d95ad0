"""inference.GRPCInferenceService: the KServe v2 / Triton protocol, as tritonclient and
perf_analyzer speak it.  Tensors in, numpy arrays to the batcher, tensors out.

Inputs: one tensor `images` [N, 1, 28, 28], FP32 in [0, 1] or UINT8 (scaled by 1/255), in
`raw_input_contents` or typed `contents` (never both).  Outputs go back in
`raw_output_contents`, which is what tritonclient reads.  The classification extension: an
output requested with the int64 parameter `classification` = k answers BYTES [N, k] of
"<value>:<index>:<label>", most probable first.
"""
from __future__ import annotations

import datetime

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc

from .. import __version__, codec
from ..contract import INPUT_NAME, MODEL_NAME, OUTPUT_NAMES
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
        known = request.name == s.model_name and request.version in ("", s.model_version)
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
        return model_statistics(self.serving, request.name, request.version)

    # -- inference --------------------------------------------------------------------------

    @rpc(pb.ModelInferRequest, images=_images, model_call=True, request_id=lambda r: r.id)
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    @rpc(pb.ModelInferRequest, images=_images)
    async def ModelStreamInfer(self, request_iterator, context):
        deadline = deadline_of(context)
        stats = self.serving.stats

        async def one(request):
            t0 = now()
            try:
                response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))
                stats.record_model_request(True, now() - t0)
                return response
            except Network3Error as e:
                stats.record_model_request(False, now() - t0)
                return pb.ModelStreamInferResponse(error_message=str(e),
                                                   infer_response=pb.ModelInferResponse(id=request.id))

        async for response in pipelined(request_iterator, one):
            yield response

    async def _infer(self, request: pb.ModelInferRequest, deadline) -> pb.ModelInferResponse:
        s = self.serving
        check_model(s, request.model_name, request.model_version)
        x = codec.request_input(request, s.limits.max_images_per_request)
        outputs = codec.requested_outputs(request)
        logits, probs, model = await s.batcher.infer(x, deadline)
        return codec.response(request, outputs, logits, probs, model.labels, s.model_name, s.model_version)


# ---------------------------------------------------------------------------------------------
# What the v2 metadata, config and statistics calls answer, as protos: the gRPC servicer sends
# them as they are, the HTTP adapter (api/http.py) as JSON.  Built here once.

def check_model(s, name: str, version: str) -> None:
    """ModelNotFound unless `name` (and `version`, "" for any) is the model served."""
    if name != s.model_name:
        raise ModelNotFound(f"model_name: unknown model {name!r}; this server serves {s.model_name!r}")
    if version not in ("", s.model_version):
        raise ModelNotFound(f"model_version: {s.model_name!r} has no version {version!r} "
                            f"(only {s.model_version!r})")


def server_metadata() -> pb.ServerMetadataResponse:
    # The server is named after the one model it serves, as the distribution is.
    return pb.ServerMetadataResponse(name=MODEL_NAME, version=__version__, extensions=EXTENSIONS)


def model_metadata(s, name: str, version: str = "") -> pb.ModelMetadataResponse:
    check_model(s, name, version)
    model = s.model
    T = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=s.model_name, versions=[s.model_version], platform="onnxruntime_onnx",
        inputs=[T(name=INPUT_NAME, datatype="FP32", shape=model.input_shape)],
        outputs=[T(name=name, datatype="FP32", shape=model.output_shapes[name]) for name in OUTPUT_NAMES],
        parameters={k: pb.InferParameter(string_param=v) for k, v in model_facts(model).items()},
    )


def model_config(s, name: str, version: str = "") -> mc.ModelConfig:
    check_model(s, name, version)
    model, o = s.model, s.batcher.options
    gpu = any(p.startswith("CUDA") for p in model.providers)
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


def model_statistics(s, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
    """The served model's statistics (`name` "" for every model: the one there is)."""
    if name:
        check_model(s, name, version)
    st = s.stats
    D = pb.StatisticDuration
    ns = lambda seconds: int(seconds * 1e9)  # noqa: E731
    ok, fail, comp = st.model_ok, st.model_fail, st.request_compute
    stats = pb.ModelStatistics(
        name=s.model_name, version=s.model_version, last_inference=st.last_inference_ms,
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


def model_facts(model) -> dict[str, str]:
    """The loaded file's identity, shown by ModelMetadata and ModelConfig: a reload is visible."""
    loaded = datetime.datetime.fromtimestamp(model.loaded_at, datetime.timezone.utc).isoformat(timespec="milliseconds")
    facts = {"sha256": model.sha256, "loaded_at": loaded, "path": str(model.path)}
    for key in ("test_accuracy", "preset", "exported_at", "git_commit", "network3_version"):
        if key in model.metadata:
            facts[key] = model.metadata[key]
    return facts
