"""The .proto files, their committed stubs and our servicers agree.

* the committed stubs are what `make protos` generates from the committed .proto files;
* the stubs round-trip messages of both APIs through the wire format;
* each generated client stub calls exactly the methods its service descriptor lists;
* our servicers implement every method of their service, with the right streaming kind, and
  the server registers them all.
"""
from __future__ import annotations

import filecmp
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.inference import model_config_pb2 as mc
from protos.network3.v1 import classifier_pb2 as pb
from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "protos").rglob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
SERVICES = {  # name: (service descriptor, generated client stub, generated servicer base)
    "DigitClassifier": (pb.DESCRIPTOR.services_by_name["DigitClassifier"], pb_grpc.DigitClassifierStub,
                        pb_grpc.DigitClassifierServicer),
    "GRPCInferenceService": (v2.DESCRIPTOR.services_by_name["GRPCInferenceService"], v2_grpc.GRPCInferenceServiceStub,
                             v2_grpc.GRPCInferenceServiceServicer),
}


def servicer_class(name: str):
    from serving.api.classifier import ClassifierServicer
    from serving.api.inference import InferenceServicer

    return {"DigitClassifier": ClassifierServicer, "GRPCInferenceService": InferenceServicer}[name]


def test_committed_stubs_are_fresh(tmp_path):
    assert {"protos/network3/v1/classifier.proto", "protos/inference/grpc_service.proto",
            "protos/inference/model_config.proto"} <= set(PROTOS)
    # The same command as the Makefile's `protos` target, into a scratch folder.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *PROTOS],
        cwd=ROOT, check=True,
    )
    stale = []
    for proto in PROTOS:
        for suffix in SUFFIXES:
            name = proto.removesuffix(".proto") + suffix
            if not (ROOT / name).exists() or not filecmp.cmp(tmp_path / name, ROOT / name, shallow=False):
                stale.append(name)
    assert not stale, f"stale or missing generated stubs {stale}: run `make protos` and commit them"


def test_classifier_messages_round_trip():
    request = pb.ClassifyRequest(images=[pb.Image(pixels=bytes(range(256)) * 3 + bytes(16), id="a"),
                                         pb.Image(encoded=b"\x89PNG\r\n\x1a\n...", id="b")], top_k=3)
    back = pb.ClassifyRequest.FromString(request.SerializeToString())
    assert back == request
    assert [im.WhichOneof("data") for im in back.images] == ["pixels", "encoded"]
    assert len(back.images[0].pixels) == 784 and back.HasField("top_k") and back.top_k == 3
    assert not pb.ClassifyRequest.FromString(pb.ClassifyRequest().SerializeToString()).HasField("top_k")
    response = pb.ClassifyResponse(model_sha256="ab" * 32, predictions=[
        pb.Prediction(id="a", digit=7, probability=0.9, probabilities=[0.01] * 9 + [0.91], label="7",
                      top_k=[pb.Class(digit=7, probability=0.9, label="7")]),
        pb.Prediction(id="b", error=pb.Error(code=3, message="images[1].encoded: not an image"))])
    back = pb.ClassifyResponse.FromString(response.SerializeToString())
    assert back == response and back.predictions[1].HasField("error") and not back.predictions[0].HasField("error")
    info = pb.ModelInfo(name="network3", labels=[str(i) for i in range(10)], metadata={"preset": "x"},
                        limits=pb.Limits(max_batch_size=256, max_pixels=40_000_000))
    info.loaded_at.FromNanoseconds(1_700_000_000_123_456_789)
    back = pb.ModelInfo.FromString(info.SerializeToString())
    assert back == info and back.loaded_at.ToNanoseconds() == 1_700_000_000_123_456_789


def test_inference_messages_round_trip():
    T = v2.ModelInferRequest.InferInputTensor
    request = v2.ModelInferRequest(
        model_name="network3", model_version="1", id="r1",
        inputs=[T(name="images", datatype="UINT8", shape=[2, 1, 28, 28])], raw_input_contents=[bytes(2 * 784)],
        outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(
            name="probabilities", parameters={"classification": v2.InferParameter(int64_param=3)})])
    back = v2.ModelInferRequest.FromString(request.SerializeToString())
    assert back == request
    assert list(back.inputs[0].shape) == [2, 1, 28, 28] and len(back.raw_input_contents[0]) == 2 * 784
    assert back.outputs[0].parameters["classification"].WhichOneof("parameter_choice") == "int64_param"
    typed = T(name="images", datatype="FP32", shape=[1, 1, 28, 28], contents=v2.InferTensorContents(fp32_contents=[0.5] * 784))
    assert T.FromString(typed.SerializeToString()).contents.fp32_contents == [0.5] * 784
    assert v2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number == 7  # tritonclient's wire
    config = mc.ModelConfig(name="network3", max_batch_size=256, input=[mc.ModelInput(name="images", data_type=mc.TYPE_FP32, dims=[1, 28, 28])],
                            dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=100))
    response = v2.ModelConfigResponse(config=config)
    back = v2.ModelConfigResponse.FromString(response.SerializeToString())
    assert back == response and back.config.HasField("dynamic_batching")


class _Recorder:
    """A channel that records the method paths a generated stub asks it for."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}

    def _record(self, kind):
        def make(path, *args, **kwargs):
            self.paths[path] = kind
            return lambda *a, **k: None
        return make

    def __getattr__(self, kind):
        if kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._record(kind)
        raise AttributeError(kind)


@pytest.mark.parametrize("name", list(SERVICES))
def test_stubs_call_the_methods_their_service_lists(name):
    service, stub_class, _ = SERVICES[name]
    channel = _Recorder()
    stub_class(channel)
    kinds = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary",
             (True, True): "stream_stream"}
    assert channel.paths == {f"/{service.full_name}/{m.name}": kinds[m.client_streaming, m.server_streaming]
                             for m in service.methods}


@pytest.mark.parametrize("name", list(SERVICES))
def test_servicers_implement_every_method_of_their_service(name):
    service, _, generated = SERVICES[name]  # the generated base's methods answer UNIMPLEMENTED
    servicer = servicer_class(name)
    assert servicer.API == service.full_name and issubclass(servicer, generated)
    for m in service.methods:
        ours = getattr(servicer, m.name)
        assert ours is not getattr(generated, m.name, None), f"{m.name} is not implemented"
        assert inspect.isasyncgenfunction(ours) == m.server_streaming, m.name
        assert inspect.iscoroutinefunction(ours) != m.server_streaming, m.name
        params = list(inspect.signature(ours).parameters)
        assert params[0] == "self" and len(params) == 3, (m.name, params)
    public = {n for n, v in vars(servicer).items() if inspect.isfunction(v) and n[0].isupper()}
    assert public == {m.name for m in service.methods}


def test_the_server_registers_every_method():
    """add_service registers one handler per method of each service, of the method's kind,
    with no request deserializer (our wrapper parses) and a response serializer."""
    import grpc

    from serving.api.common import Serving
    from serving.batcher import DynamicBatcher
    from serving.metrics import Stats
    from serving.server import add_service

    class Server:
        def __init__(self) -> None:
            self.generic, self.registered = [], {}

        def add_generic_rpc_handlers(self, handlers) -> None:
            self.generic.extend(handlers)

        def add_registered_method_handlers(self, service, handlers) -> None:
            self.registered[service] = handlers

    class Details:
        def __init__(self, method: str) -> None:
            self.method = method

    stats = Stats()
    serving = Serving(batcher=DynamicBatcher(object(), stats=stats), stats=stats)
    for name, (service, _, _) in SERVICES.items():
        server = Server()
        servicer = servicer_class(name)(serving)
        add_service(server, service, servicer)
        handlers = server.registered[service.full_name]
        assert set(handlers) == {m.name for m in service.methods}
        for m in service.methods:
            h = handlers[m.name]
            assert isinstance(h, grpc.RpcMethodHandler)
            assert (h.request_streaming, h.response_streaming) == (m.client_streaming, m.server_streaming)
            assert h.request_deserializer is None and h.response_serializer is not None
            behaviour = h.stream_stream if m.server_streaming else h.unary_unary
            assert behaviour == getattr(servicer, m.name)
            (generic,) = server.generic
            assert generic.service(Details(f"/{service.full_name}/{m.name}")) is not None
