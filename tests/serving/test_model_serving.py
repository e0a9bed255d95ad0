"""The serving core's public pieces on their own: the v2 tensor codec (serving.codec), the
server launcher (serving.launch), the model wrapper and the `serve` defaults."""
from __future__ import annotations

import dataclasses
import signal
import struct

import click
import numpy as np
import pytest

from serving import codec
from serving.contract import CLASSES, INPUT_NAME, LABELS, OUTPUT_NAMES, PIXELS
from serving.errors import InvalidInput, Overloaded
from serving.model import top_k

SHAPE1 = [1, 1, 28, 28]


# ------------------------------------------------------------------------------- codec --

def test_input_array_fp32_and_uint8_raw_and_typed():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    x = (pixels / 255).astype(np.float32)
    for data in (x.tobytes(), x.ravel().tolist()):
        got = codec.input_array(INPUT_NAME, "FP32", [3, 1, 28, 28], data, max_images=8)
        assert got.dtype == np.float32 and got.shape == (3, 1, 28, 28)
        np.testing.assert_array_equal(got, x)
    for data in (pixels.tobytes(), pixels.ravel().tolist()):
        got = codec.input_array(INPUT_NAME, "UINT8", [3, 1, 28, 28], data, max_images=8)
        np.testing.assert_allclose(got, pixels / 255, atol=1e-7)


@pytest.mark.parametrize("args,error,words", [
    (("pixels", "FP32", SHAPE1, bytes(4 * PIXELS)), InvalidInput, "unknown input 'pixels'"),
    ((INPUT_NAME, "FP32", [1, 28, 28], bytes(4 * PIXELS)), InvalidInput, "shape [1, 28, 28]"),
    ((INPUT_NAME, "FP32", [0, 1, 28, 28], b""), InvalidInput, "N >= 1"),
    ((INPUT_NAME, "FP32", [2 ** 62, 1, 28, 28], b""), Overloaded, "--max-images-per-request 4"),
    ((INPUT_NAME, "INT32", SHAPE1, bytes(4 * PIXELS)), InvalidInput, "datatype 'INT32'"),
    ((INPUT_NAME, "FP32", [2, 1, 28, 28], bytes(4 * PIXELS)), InvalidInput, "3136 bytes"),
    ((INPUT_NAME, "FP32", SHAPE1, [0.0] * 700), InvalidInput, "700 values"),
    ((INPUT_NAME, "UINT8", SHAPE1, [256] * PIXELS), InvalidInput, "over 255"),
    ((INPUT_NAME, "FP32", SHAPE1, np.full(PIXELS, np.nan, np.float32).tobytes()), InvalidInput, "NaN"),
    ((INPUT_NAME, "FP32", SHAPE1, np.full(PIXELS, -np.inf, np.float32).tobytes()), InvalidInput, "infinity"),
    ((INPUT_NAME, "FP32", SHAPE1, [1.5] * PIXELS), InvalidInput, "outside [0, 1]"),
])
def test_input_array_refuses_with_a_clear_message(args, error, words):
    with pytest.raises(error) as e:
        codec.input_array(*args, max_images=4)
    assert words in str(e.value)


def test_negative_zero_and_one_are_in_range():
    data = np.array([-0.0, 1.0] * (PIXELS // 2), np.float32).tobytes()
    assert codec.input_array(INPUT_NAME, "FP32", SHAPE1, data, max_images=1).max() == 1.0


def test_requested_outputs_and_classification_parameter():
    from protos.inference import grpc_service_pb2 as v2

    Out = v2.ModelInferRequest.InferRequestedOutputTensor
    assert codec.requested_outputs(v2.ModelInferRequest()) == [(name, 0) for name in OUTPUT_NAMES]
    request = v2.ModelInferRequest(outputs=[Out(name="probabilities", parameters={"classification": v2.InferParameter(int64_param=3)}),
                                            Out(name="logits")])
    assert codec.requested_outputs(request) == [("probabilities", 3), ("logits", 0)]
    for bad in (v2.InferParameter(int64_param=0), v2.InferParameter(int64_param=CLASSES + 1), v2.InferParameter(string_param="3")):
        with pytest.raises(InvalidInput, match="classification"):
            codec.requested_outputs(v2.ModelInferRequest(outputs=[Out(name="logits", parameters={"classification": bad})]))
    with pytest.raises(InvalidInput, match="unknown output 'softmax'"):
        codec.requested_output(0, "softmax")


def test_classification_is_top_k_as_triton_writes_it():
    probs = np.array([[0.1, 0.5, 0.0, 0.4] + [0.0] * 6, [0.3, 0.3, 0.4] + [0.0] * 7], np.float32)
    rows = codec.classification(probs, 2, LABELS)
    assert rows == [["0.500000:1:1", "0.400000:3:3"], ["0.400000:2:2", "0.300000:0:0"]]  # ties: lower class first
    order, values = top_k(probs, 2)
    assert [[int(s.split(":")[1]) for s in row] for row in rows] == order.tolist()
    blob = codec.bytes_tensor(rows)
    items = []
    while blob:
        (n,), blob = struct.unpack("<I", blob[:4]), blob[4:]
        items.append(blob[:n].decode())
        blob = blob[n:]
    assert items == [s for row in rows for s in row]


def test_response_carries_the_requested_outputs():
    from protos.inference import grpc_service_pb2 as v2

    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    probs = np.eye(10, dtype=np.float32)[[3, 7]]
    request = v2.ModelInferRequest(id="r9")
    r = v2.ModelInferResponse.FromString(
        codec.response(request, [("logits", 0), ("probabilities", 1)], logits, probs, LABELS, "network3", "1"))
    assert r.id == "r9" and (r.model_name, r.model_version) == ("network3", "1")
    assert [(o.name, o.datatype, list(o.shape)) for o in r.outputs] == [("logits", "FP32", [2, 10]),
                                                                        ("probabilities", "BYTES", [2, 1])]
    np.testing.assert_array_equal(np.frombuffer(r.raw_output_contents[0], "<f4").reshape(2, 10), logits)
    assert b"1.000000:3:3" in r.raw_output_contents[1] and b"1.000000:7:7" in r.raw_output_contents[1]


@pytest.mark.parametrize("n, rid, outputs", [
    (1, "", [("logits", 0), ("probabilities", 0)]),
    (256, "é" * 300, [("probabilities", 3)]),  # lengths over 127 and 16383: two- and three-byte varints
    (7, "r", [("probabilities", 0), ("logits", 10)]),
])
def test_response_bytes_parse_to_the_message_protobuf_builds(n, rid, outputs):
    """codec.response appends id and raw contents by hand after a cached head: the result must
    be, byte for byte once parsed, the message built field by field."""
    from protos.inference import grpc_service_pb2 as v2

    rng = np.random.default_rng(n)
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    probs = rng.dirichlet(np.ones(10), size=n).astype(np.float32)
    wire = codec.response(v2.ModelInferRequest(id=rid), outputs, logits, probs, LABELS, "m", "7")
    tensors = [codec.output_tensor(name, k, logits, probs, LABELS) for name, k in outputs]
    T = v2.ModelInferResponse.InferOutputTensor
    expected = v2.ModelInferResponse(model_name="m", model_version="7", id=rid,
                                     outputs=[T(name=a, datatype=b, shape=c) for a, b, c, _ in tensors],
                                     raw_output_contents=[raw for *_, raw in tensors])
    assert v2.ModelInferResponse.FromString(wire) == expected
    stream = v2.ModelStreamInferResponse.FromString(codec.stream_response(wire))
    assert stream.infer_response == expected and not stream.error_message


def test_images_declared_ignores_hostile_shapes():
    from protos.inference import grpc_service_pb2 as v2

    T = v2.ModelInferRequest.InferInputTensor
    assert codec.images_declared(v2.ModelInferRequest()) == 0
    assert codec.images_declared(v2.ModelInferRequest(inputs=[T(shape=[5, 1, 28, 28])]), limit=10) == 5
    assert codec.images_declared(v2.ModelInferRequest(inputs=[T(shape=[-2 ** 63, 1, 28, 28])])) == 0
    assert codec.images_declared(v2.ModelInferRequest(inputs=[T(shape=[11, 1, 28, 28])]), limit=10) == 0


# ------------------------------------------------------------------------------- model --

def test_model_predict_is_onnxruntime_public_run(onnx_model, mnist):
    import onnxruntime as ort

    from serving.model import ModelOptions, load_model
    from serving.preprocess import pixels_to_input

    model = load_model(onnx_model, ModelOptions(warmup_batch_sizes=(1,)))
    x = pixels_to_input(mnist.test_x[:5])
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    want = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    for got, expected in zip(model.predict(x), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert model.labels == list(LABELS) and model.ready


def test_serve_defaults_are_the_option_dataclasses():
    """Each `network3 serve` default is the default of the dataclass field it sets."""
    from serving.api.common import Limits
    from serving.batcher import BatcherOptions
    from serving.model import ModelOptions
    from serving.server import ServerOptions, serve_command

    defaults = {p.name: p.default for p in serve_command.params}
    fields = {cls: {f.name: f.default for f in dataclasses.fields(cls)}
              for cls in (BatcherOptions, Limits, ModelOptions, ServerOptions)}
    option_field = {"max_batch_size": (BatcherOptions, "max_batch_size"), "max_queue_delay_us": (BatcherOptions, "max_queue_delay_us"),
                    "max_queue_size": (BatcherOptions, "max_queue_size"), "instances": (BatcherOptions, "instances"),
                    "batching": (BatcherOptions, "batching"), "inline_max_images": (BatcherOptions, "inline_max"),
                    "alone_min_images": (BatcherOptions, "alone_min"),
                    "intra_op_threads": (ModelOptions, "intra_op_threads"),
                    "max_message_bytes": (Limits, "max_message_bytes"), "max_images_per_request": (Limits, "max_images_per_request"),
                    "max_pixels": (Limits, "max_pixels"), "host": (ServerOptions, "host"), "port": (ServerOptions, "port"),
                    "model_name": (ServerOptions, "model_name"), "grace": (ServerOptions, "grace"),
                    "metrics_port": (ServerOptions, "metrics_port"), "access_log": (ServerOptions, "access_log")}
    for option, (cls, name) in option_field.items():
        assert defaults[option] == fields[cls][name], option
    assert ModelOptions().intra_op_threads == 1


def test_every_serve_option_has_its_environment_variable(onnx_model, tmp_path, monkeypatch):
    """Containers are configured by NETWORK3_<OPTION>; a flag on the command line still wins."""
    from click.testing import CliRunner

    from serving import server
    from serving.workers import cpu_count

    got = []

    async def capture(options):
        got.append(options)
        return 0

    monkeypatch.setattr(server, "serve", capture)
    names = {p.name: p.envvar for p in server.serve_command.params if isinstance(p, click.Option)}
    assert names["http_port"] == "NETWORK3_HTTP_PORT" and names["batching"] == "NETWORK3_BATCHING"
    assert names["cors_origins"] == "NETWORK3_CORS_ORIGIN" and len(set(names.values())) == len(names)
    token = tmp_path / "token"
    token.write_text("t")
    env = {"NETWORK3_MODEL": str(onnx_model), "NETWORK3_HOST": "0.0.0.0", "NETWORK3_PORT": "7001",
           "NETWORK3_HTTP_PORT": "7002", "NETWORK3_METRICS_PORT": "7003", "NETWORK3_GRACE": "31",
           "NETWORK3_MAX_BATCH_SIZE": "32", "NETWORK3_BATCHING": "false", "NETWORK3_INTRA_OP_THREADS": "2",
           "NETWORK3_MAX_PIXELS": "1000", "NETWORK3_TOKEN_FILE": str(token), "NETWORK3_ACCESS_LOG": "0",
           "NETWORK3_CORS_ORIGIN": "https://a.example https://b.example", "NETWORK3_MODEL_NAME": "digits"}
    r = CliRunner().invoke(server.serve_command, [], env=env)
    assert r.exit_code == 0, r.output
    o = got.pop()
    assert (o.model, o.host, o.port, o.http_port, o.metrics_port, o.grace) == (onnx_model, "0.0.0.0", 7001, 7002, 7003, 31)
    assert (o.batcher.max_batch_size, o.batcher.batching, o.model_options.intra_op_threads) == (32, False, 2)
    assert o.model_options.wide_threads == max(1, cpu_count())  # --wide-threads auto, one worker
    assert (o.limits.max_pixels, o.token_file, o.access_log, o.model_name) == (1000, token, False, "digits")
    assert o.cors_origins == ("https://a.example", "https://b.example")
    r = CliRunner().invoke(server.serve_command, ["--port", "7005"], env={**env, "NETWORK3_NO_HTTP": "1"})
    assert r.exit_code == 0 and got[-1].http_port is None, r.output
    assert (got.pop().port, got) == (7005, [])  # (and no HTTP)
    r = CliRunner().invoke(server.serve_command, [], env={**env, "NETWORK3_PORT": "http"})
    assert r.exit_code == 2 and "(env var: 'NETWORK3_PORT'): 'http' is not a valid integer" in r.output and not got
    r = CliRunner().invoke(server.serve_command, ["--wide-threads", "3"], env=env)
    assert r.exit_code == 0 and got.pop().model_options.wide_threads == 3, r.output
    for bad in ("0", "many"):
        r = CliRunner().invoke(server.serve_command, ["--wide-threads", bad], env=env)
        assert r.exit_code == 2 and f"{bad!r} is not a number of threads (1 or more) or auto" in r.output and not got


def test_a_wide_session_computes_large_batches_with_the_same_answers(onnx_model, mnist):
    """wide_threads: batches of wide_min images or more run on a second session with that many
    threads; its answers are the narrow session's.  The same thread count needs no second one."""
    from serving.model import ModelOptions, load_model
    from serving.preprocess import pixels_to_input

    narrow = load_model(onnx_model, ModelOptions(intra_op_threads=1))
    wide = load_model(onnx_model, ModelOptions(intra_op_threads=1, wide_threads=2, wide_min=8))
    assert narrow._wide is None and wide._wide is not None
    assert load_model(onnx_model, ModelOptions(intra_op_threads=2, wide_threads=2))._wide is None
    used = []
    real_run = wide._wide.run
    wide._wide = type("Spy", (), {"run": lambda self, *a: used.append(len(a[1]["images"])) or real_run(*a)})()
    for n in (1, 7, 8, 64):
        x = pixels_to_input(mnist.test_x[:n])
        for got, want in zip(wide.predict(x), narrow.predict(x)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert used == [8, 64]


# ------------------------------------------------------------------------------ launch --

def test_server_process_starts_serves_and_stops(onnx_model, tmp_path):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.launch import ServerProcess

    with ServerProcess(onnx_model, "--metrics-port", "0", "--no-access-log", log=tmp_path / "s.log") as s:
        assert s.address == f"127.0.0.1:{s.port}" and s.port > 0 and s.metrics_port and s.poll() is None
        with grpc.insecure_channel(s.address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        s.signal(signal.SIGHUP)
        s.wait_for_log(r"reloaded .* sha256")
    assert s.poll() == 0  # the context manager stopped it with SIGTERM: drained, exit 0
    assert "stopped" in s.log()


def test_server_process_reports_a_server_that_does_not_start(tmp_path):
    from serving.launch import ServerProcess

    with pytest.raises(RuntimeError, match=r"exited with 1[\s\S]*model.onnx"):
        ServerProcess(tmp_path / "model.onnx", log=tmp_path / "s.log", timeout=60)


def test_a_gpu_build_shadowed_by_the_cpu_one_is_named_with_its_fix(monkeypatch, caplog):
    """Both onnxruntime packages installed (pip install network3[gpu]): the CPU one's files can
    hide CUDA.  The server says so, with the command that mends it."""
    import importlib.metadata

    from serving import model

    assert not model.shadowed_gpu_build()  # this environment has the CPU build alone
    real = importlib.metadata.distribution

    def distribution(name):
        return object() if name == "onnxruntime-gpu" else real(name)

    monkeypatch.setattr(model.importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(model.ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level("WARNING", "network3.model"):
        assert model.default_providers() == ["CPUExecutionProvider"]
    assert model.GPU_FIX in caplog.text and "shadows it" in caplog.text
    monkeypatch.setattr(model.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    caplog.clear()
    assert model.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"] and not caplog.text


def test_access_log_formats_its_lines_at_flush_and_gives_each_unnamed_call_its_own_id():
    """AccessLog.write keeps fields; flush writes one line per call, a client's id as it came and
    a fresh id (`<pid hex>-<n>`) for each call that had none."""
    import asyncio
    import io
    import os
    import re

    from serving.api.common import AccessLog

    async def three_calls():  # in a running loop, as a server's: the flush is timed, not at once
        log = AccessLog(stream=out)
        log.write(None, "inference.GRPCInferenceService.ModelInfer", "OK", 1, 0.000512)
        log.write("client-7", "inference.GRPCInferenceService.ModelInfer", "INVALID_ARGUMENT", 0, 0.0001)
        log.write(None, "inference.GRPCInferenceService.ModelInfer", "OK", 64, 0.0123)
        assert out.getvalue() == ""  # nothing formatted or written before the flush
        log.flush()

    out = io.StringIO()
    asyncio.run(three_calls())
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    line = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z access id=(\S+) method=(\S+) code=(\S+) images=(\d+) ms=([\d.]+)$")
    fields = [line.fullmatch(text).groups() for text in lines]
    ids = [f[0] for f in fields]
    assert ids[1] == "client-7"
    assert ids[0] != ids[2] and all(i.startswith(f"{os.getpid():x}-") for i in (ids[0], ids[2]))
    assert [(f[2], f[3], f[4]) for f in fields] == [("OK", "1", "0.512"), ("INVALID_ARGUMENT", "0", "0.100"), ("OK", "64", "12.300")]
