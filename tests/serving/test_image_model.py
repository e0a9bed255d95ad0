"""network3-image (issue 16): encoded image files over the v2 API, as Triton's users asked
(triton-inference-server/server#2059).  A BYTES [N] input `images` of PNG, JPEG, ... files,
decoded by the server's photo pipeline; network3's outputs and the classification extension;
on gRPC and REST, through the real tritonclient.grpc (in its own process: its generated
`inference.*` messages cannot share one with ours, see test_triton.py) and tritonclient.http
(in this one), against a real server on loopback.  network3 itself keeps its tensor input.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

from fixtures_serving import ROOT, png, thread_server
from serving.launch import perf_analyzer
from protos.inference import grpc_service_pb2 as pb
from serving.contract import IMAGE_MODEL_NAME, MODEL_NAME
from serving.preprocess import decode_many

th = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
if importlib.util.find_spec("tritonclient.grpc") is None:  # not imported here: see the docstring
    pytest.skip("tritonclient[grpc] is not installed", allow_module_level=True)
from tritonclient.utils import InferenceServerException  # noqa: E402

T = 30
MAX_PIXELS = 1_000_000


def jpeg(pixels: np.ndarray) -> bytes:
    """A digit as a photo would bring it: 4x larger, black ink on white paper, JPEG."""
    im = Image.fromarray(255 - pixels).resize((112, 112), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def too_large() -> bytes:
    """A PNG of a few KB that decodes to more than MAX_PIXELS pixels."""
    return png(np.zeros((1001, 1000), np.uint8))


@pytest.fixture(scope="module")
def srv(onnx_model):
    with thread_server(onnx_model, limits={"max_pixels": MAX_PIXELS, "max_images_per_request": 64}) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    c = th.InferenceServerClient(f"127.0.0.1:{srv.http_port}", network_timeout=T, connection_timeout=T)
    yield c
    c.close()


@pytest.fixture(scope="module")
def files(digits):
    """8 digits: PNG and JPEG alternating, and what the served model answers for each
    (the same decoder, preprocess.decode_many, then the model's own prediction)."""
    pixels = digits[0][:8]
    data = [png(p) if i % 2 == 0 else jpeg(p) for i, p in enumerate(pixels)]
    decoded, errors = decode_many(data)
    assert errors == [None] * 8
    return data, decoded


def bytes_input(data: list[bytes], binary: bool = True):
    i = th.InferInput("images", [len(data)], "BYTES")
    i.set_data_from_numpy(np.array(data, dtype=object), binary_data=binary)
    return i


def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.status(), e.value.message()


# ------------------------------------------------------------------------------- REST --

@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_png_and_jpeg_in_one_request(client, files, digits, predict, binary_out):
    data, decoded = files
    outputs = [th.InferRequestedOutput(name, binary_data=binary_out) for name in ("logits", "probabilities")]
    r = client.infer(IMAGE_MODEL_NAME, [bytes_input(data)], outputs=outputs, request_id="img")
    answer = r.get_response()
    assert answer["model_name"] == IMAGE_MODEL_NAME and answer["id"] == "img"
    probs = r.as_numpy("probabilities")
    assert probs.shape == (8, 10) and r.as_numpy("logits").shape == (8, 10)
    assert probs.argmax(1).tolist() == predict(decoded).tolist()
    # A PNG of an MNIST digit is that digit, pixel for pixel.
    assert probs.argmax(1)[::2].tolist() == predict(digits[0][:8:2]).tolist()
    # The same pixels sent to the tensor model answer the same probabilities.
    x = th.InferInput("images", [8, 1, 28, 28], "UINT8")
    x.set_data_from_numpy(decoded.reshape(8, 1, 28, 28))
    same = client.infer(MODEL_NAME, [x]).as_numpy("probabilities")
    np.testing.assert_allclose(probs, same, atol=1e-6)


def test_json_strings_are_base64_files(client, srv, files, predict):
    data, decoded = files
    # tritonclient.http sends BYTES as JSON strings when binary_data=False: base64 text is fine.
    b64 = [base64.b64encode(d) for d in data[:3]]
    r = client.infer(IMAGE_MODEL_NAME, [bytes_input(b64, binary=False)],
                     outputs=[th.InferRequestedOutput("probabilities", binary_data=False)])
    assert r.as_numpy("probabilities").argmax(1).tolist() == predict(decoded[:3]).tolist()
    # Plain HTTP: the JSON body alone.
    body = json.dumps({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                   "data": [s.decode() for s in b64[:2]]}]}).encode()
    status, answer = post(srv, f"/v2/models/{IMAGE_MODEL_NAME}/versions/1/infer", body)
    assert status == 200, answer
    out = {o["name"]: o for o in json.loads(answer)["outputs"]}
    assert out["probabilities"]["shape"] == [2, 10]
    assert np.array(out["probabilities"]["data"]).reshape(2, 10).argmax(1).tolist() == predict(decoded[:2]).tolist()
    # A string that is not base64 is refused, naming its index.
    body = json.dumps({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                   "data": [b64[0].decode(), "not base64!"]}]}).encode()
    status, answer = post(srv, f"/v2/models/{IMAGE_MODEL_NAME}/infer", body)
    assert status == 400 and "data[1]" in json.loads(answer)["error"] and "base64" in json.loads(answer)["error"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension(client, files, predict, binary):
    data, decoded = files
    out = th.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    rows = client.infer(IMAGE_MODEL_NAME, [bytes_input(data[:4])], outputs=[out]).as_numpy("probabilities")
    assert rows.shape == (4, 3)
    for row, digit in zip(rows, predict(decoded[:4])):
        parts = [(b if isinstance(b, str) else b.decode()).split(":") for b in row]
        assert int(parts[0][1]) == digit and parts[0][2] == parts[0][1]
        values = [float(v) for v, _, _ in parts]
        assert values == sorted(values, reverse=True)


def test_errors(client, files, srv):
    data, _ = files
    x = np.zeros((1, 1, 28, 28), np.float32)
    fp32 = th.InferInput("images", [1, 1, 28, 28], "FP32")
    fp32.set_data_from_numpy(x)
    status, message = status_of(lambda: client.infer(IMAGE_MODEL_NAME, [fp32]))
    assert status == "400" and "BYTES" in message
    status, message = status_of(lambda: client.infer(IMAGE_MODEL_NAME, [bytes_input([data[0], b"not an image", data[1]])]))
    assert status == "400" and "image 1" in message, message
    status, message = status_of(lambda: client.infer(IMAGE_MODEL_NAME, [bytes_input([data[0], b""])]))
    assert status == "400" and "image 1" in message and "empty" in message, message
    status, message = status_of(lambda: client.infer(IMAGE_MODEL_NAME, [bytes_input([])]))
    assert status == "400" and "shape [0]" in message, message
    status, message = status_of(lambda: client.infer(IMAGE_MODEL_NAME, [bytes_input([data[0], too_large()])]))
    assert status == "413" and "image 1" in message and "over the limit" in message, message
    # Files sent to the tensor model are refused with the right model named.
    status, message = status_of(lambda: client.infer(MODEL_NAME, [bytes_input(data[:1])]))
    assert status == "400" and IMAGE_MODEL_NAME in message, message
    status, message = status_of(lambda: client.infer("network3-images", [bytes_input(data[:1])]))
    assert status == "404" and "network3-images" in message
    # A body whose element lengths disagree with the shape.
    header = json.dumps({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 4 + len(data[0])}}]}).encode()
    blob = len(data[0]).to_bytes(4, "little") + data[0]
    status, answer = post(srv, f"/v2/models/{IMAGE_MODEL_NAME}/infer", header + blob,
                          {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "1 elements" in json.loads(answer)["error"]
    # The server goes on.
    r = client.infer(IMAGE_MODEL_NAME, [bytes_input(data[:1])])
    assert r.as_numpy("probabilities").shape == (1, 10)


def test_metadata_config_ready_and_index(client, srv):
    assert client.is_model_ready(MODEL_NAME) and client.is_model_ready(IMAGE_MODEL_NAME)
    assert client.is_model_ready(IMAGE_MODEL_NAME, "1") and not client.is_model_ready(IMAGE_MODEL_NAME, "2")
    meta = client.get_model_metadata(IMAGE_MODEL_NAME)
    assert meta["name"] == IMAGE_MODEL_NAME and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", [-1, 10]), ("probabilities", "FP32", [-1, 10])]
    assert client.get_model_metadata(MODEL_NAME)["inputs"] == [
        {"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]  # unchanged
    config = client.get_model_config(IMAGE_MODEL_NAME)
    assert config["name"] == IMAGE_MODEL_NAME and config["max_batch_size"] == 0
    (i,) = config["input"]
    assert (i["name"], i["data_type"], i["format"], i["dims"]) == ("images", "TYPE_STRING", "FORMAT_NONE", [-1])
    assert [o["dims"] for o in config["output"]] == [[-1, 10], [-1, 10]]
    assert "dynamic_batching" not in config or not config["dynamic_batching"]
    tensor_config = client.get_model_config(MODEL_NAME)
    assert tensor_config["input"][0]["dims"] == [1, 28, 28] and tensor_config["max_batch_size"] > 0
    index = client.get_model_repository_index()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        (MODEL_NAME, "1", "READY"), (IMAGE_MODEL_NAME, "1", "READY")]
    stats = client.get_inference_statistics()["model_stats"]
    assert [s["name"] for s in stats] == [MODEL_NAME, IMAGE_MODEL_NAME]
    assert stats[0]["inference_count"] == stats[1]["inference_count"]  # shared counters
    assert client.get_inference_statistics(IMAGE_MODEL_NAME)["model_stats"][0]["name"] == IMAGE_MODEL_NAME
    status, message = status_of(lambda: client.get_model_config("lenet"))
    assert status == "404" and IMAGE_MODEL_NAME in message


def post(srv, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=T)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------------- gRPC --

def test_grpc_typed_bytes_contents(srv, files, predict):
    """contents.bytes_contents (tritonclient always sends raw_input_contents), with our protos."""
    from protos.inference import grpc_service_pb2_grpc as pb_grpc

    data, decoded = files
    T_ = pb.ModelInferRequest.InferInputTensor
    request = pb.ModelInferRequest(model_name=IMAGE_MODEL_NAME, inputs=[T_(
        name="images", datatype="BYTES", shape=[4], contents=pb.InferTensorContents(bytes_contents=data[:4]))])
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        r = stub.ModelInfer(request, timeout=T)
        assert r.model_name == IMAGE_MODEL_NAME and [o.name for o in r.outputs] == ["logits", "probabilities"]
        probs = np.frombuffer(r.raw_output_contents[1], "<f4").reshape(4, 10)
        assert probs.argmax(1).tolist() == predict(decoded[:4]).tolist()
        del request.inputs[0].contents.bytes_contents[2:]
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=T)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes_contents has 2" in e.value.details()


PROBE = r'''
import json, queue, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

address, files_path, model = sys.argv[1], sys.argv[2], sys.argv[3]
files = json.load(open(files_path))
good = [bytes.fromhex(h) for h in files["good"]]
big = bytes.fromhex(files["big"])
out = {}


def bytes_input(data, name="images"):
    i = tc.InferInput(name, [len(data)], "BYTES")
    i.set_data_from_numpy(np.array(data, dtype=object))
    return i


def status_of(call):
    try:
        call()
    except InferenceServerException as e:
        return [e.status(), e.message()]
    return ["OK", ""]


with tc.InferenceServerClient(address) as c:
    for name in (model, "network3"):
        out[name] = {"ready": c.is_model_ready(name, client_timeout=30),
                     "metadata": c.get_model_metadata(name, as_json=True, client_timeout=30),
                     "config": c.get_model_config(name, as_json=True, client_timeout=30)["config"]}
    r = c.infer(model, [bytes_input(good)], request_id="g", client_timeout=30)
    out["id"], out["model_name"] = r.get_response().id, r.get_response().model_name
    out["digits"] = r.as_numpy("probabilities").argmax(1).tolist()
    out["logits_shape"] = list(r.as_numpy("logits").shape)
    r = c.infer(model, [bytes_input(good[:3])], outputs=[tc.InferRequestedOutput("probabilities", class_count=2)],
                client_timeout=30)
    out["classification"] = [[s.decode() for s in row] for row in r.as_numpy("probabilities")]
    results = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=60)
    c.async_stream_infer(model, [bytes_input(good[:2])], request_id="s0")
    c.async_stream_infer(model, [bytes_input([good[0], b"junk"])], request_id="s1")
    c.async_stream_infer(model, [bytes_input(good[2:4])], request_id="s2")
    stream = [results.get(timeout=60) for _ in range(3)]
    c.stop_stream()
    out["stream"] = [{"error": str(err) if err else None,
                      "digits": res.as_numpy("probabilities").argmax(1).tolist() if res and not err else None}
                     for res, err in stream]
    fp32 = tc.InferInput("images", [1, 1, 28, 28], "FP32")
    fp32.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    out["errors"] = {
        "bad image": status_of(lambda: c.infer(model, [bytes_input([good[0], good[1], b"\x89PNG junk"])], client_timeout=30)),
        "too large": status_of(lambda: c.infer(model, [bytes_input([big])], client_timeout=30)),
        "empty": status_of(lambda: c.infer(model, [bytes_input([])], client_timeout=30)),
        "fp32": status_of(lambda: c.infer(model, [fp32], client_timeout=30)),
        "unknown": status_of(lambda: c.infer("lenet", [bytes_input(good[:1])], client_timeout=30)),
        "metadata unknown": status_of(lambda: c.get_model_metadata("lenet", client_timeout=30)),
    }
    out["fp32 to network3"] = c.infer("network3", [fp32], client_timeout=30).as_numpy("probabilities").shape[0]
    out["statistics"] = [s["name"] for s in c.get_inference_statistics(as_json=True, client_timeout=30)["model_stats"]]
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def probe(srv, files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("image-probe")
    (folder / "probe.py").write_text(PROBE)
    (folder / "files.json").write_text(json.dumps({"good": [d.hex() for d in files[0]], "big": too_large().hex()}))
    r = subprocess.run([sys.executable, str(folder / "probe.py"), srv.address, str(folder / "files.json"), IMAGE_MODEL_NAME],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_grpc_metadata_config_ready(probe):
    image, tensor = probe[IMAGE_MODEL_NAME], probe[MODEL_NAME]
    assert image["ready"] and tensor["ready"]
    assert image["metadata"]["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": ["-1"]}]
    assert image["metadata"]["name"] == IMAGE_MODEL_NAME
    assert [o["shape"] for o in image["metadata"]["outputs"]] == [["-1", "10"], ["-1", "10"]]
    assert tensor["metadata"]["inputs"] == [{"name": "images", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    config = image["config"]
    assert config["name"] == IMAGE_MODEL_NAME and config.get("max_batch_size", 0) == 0
    assert config["input"][0]["data_type"] == "TYPE_STRING" and config["input"][0]["dims"] == ["-1"]
    assert tensor["config"]["input"][0]["dims"] == ["1", "28", "28"] and "dynamic_batching" in tensor["config"]
    assert probe["statistics"] == [MODEL_NAME, IMAGE_MODEL_NAME]


def test_grpc_infer_stream_and_classification(probe, files, predict):
    expected = predict(files[1]).tolist()
    assert probe["id"] == "g" and probe["model_name"] == IMAGE_MODEL_NAME
    assert probe["digits"] == expected and probe["logits_shape"] == [8, 10]
    rows = probe["classification"]
    assert len(rows) == 3 and all(len(row) == 2 for row in rows)
    assert [int(row[0].split(":")[1]) for row in rows] == expected[:3]
    s0, s1, s2 = probe["stream"]
    assert s0["digits"] == expected[:2] and s2["digits"] == expected[2:4]
    assert s1["error"] and "image 1" in s1["error"]


def test_grpc_errors(probe):
    e = probe["errors"]
    assert e["bad image"][0] == "StatusCode.INVALID_ARGUMENT" and "image 2" in e["bad image"][1]
    assert e["too large"][0] == "StatusCode.RESOURCE_EXHAUSTED" and "image 0" in e["too large"][1]
    assert e["empty"][0] == "StatusCode.INVALID_ARGUMENT" and "shape [0]" in e["empty"][1]
    assert e["fp32"][0] == "StatusCode.INVALID_ARGUMENT" and "BYTES" in e["fp32"][1]
    assert e["unknown"][0] == "StatusCode.NOT_FOUND" and "lenet" in e["unknown"][1]
    assert e["metadata unknown"][0] == "StatusCode.NOT_FOUND"
    assert probe["fp32 to network3"] == 1  # the tensor model is unchanged


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_reads_the_config_and_sends_files(srv, files, tmp_path, protocol):
    """max_batch_size 0 and dims [-1] (api.inference._image_model_config): perf_analyzer sends
    batch 1 with --shape, and real files as b64 of the raw tensor (4-byte length, then the file)."""
    found = perf_analyzer()
    if found is None:
        pytest.skip("perf_analyzer cannot load here (needs libb64-0d and nvidia-cuda-runtime-cu12; `make bench-serve` installs them)")
    binary, env = found
    data = files[0][:2]
    raw = b"".join(len(d).to_bytes(4, "little") + d for d in data)
    (tmp_path / "input.json").write_text(json.dumps(
        {"data": [{"images": {"b64": base64.b64encode(raw).decode(), "shape": [len(data)]}}]}))
    url = srv.address if protocol == "grpc" else f"127.0.0.1:{srv.http_port}"
    failed = srv.stats.model_fail[0]
    r = subprocess.run([str(binary), "-m", IMAGE_MODEL_NAME, "-u", url, "-i", protocol, "--input-data",
                        str(tmp_path / "input.json"), "--shape", f"images:{len(data)}", "--concurrency-range", "1",
                        "--measurement-mode", "count_windows", "--measurement-request-count", "20", "-s", "1000"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Server:" in r.stdout and "Successful request count" in r.stdout
    assert srv.stats.model_fail[0] == failed  # every request it sent was answered


def test_codec_splits_bytes_elements_exactly():
    from serving import codec
    from serving.errors import InvalidInput, TooLarge

    def raw(*items: bytes) -> bytes:
        return b"".join(len(i).to_bytes(4, "little") + i for i in items)

    assert codec.split_bytes(raw(b"ab", b"", b"c"), 3, "x") == [b"ab", b"", b"c"]
    for data, n, why in [(raw(b"ab"), 2, "1 elements"), (raw(b"ab", b"c"), 1, "more than"),
                         (raw(b"ab")[:-1], 1, "declares 2 bytes"), (raw(b"ab") + b"\0\0", 2, "truncated")]:
        with pytest.raises(InvalidInput, match=why):
            codec.split_bytes(data, n, "x")
    with pytest.raises(TooLarge):
        codec.check_encoded_input("images", "BYTES", [65], 64)
    for shape in ([], [2, 1], [0], [-1]):
        with pytest.raises(InvalidInput, match="expected \\[N\\]"):
            codec.check_encoded_input("images", "BYTES", shape, 64)
    with pytest.raises(InvalidInput, match="unknown input 'image'"):
        codec.check_encoded_input("image", "BYTES", [1], 64)
    with pytest.raises(InvalidInput, match="network3-image"):
        codec.check_input("images", "BYTES", [1], 64)
