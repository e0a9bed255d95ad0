"""The `unsure` flag (serving/unsure.py) on real loopback servers and the test model's real file:
MNIST digits are mostly sure; blank pages always, and letters and noise mostly, are flagged;
the threshold is the file's own metadata (and only blank inputs are flagged without one); the
v2 tensors stay as they were; gRPC, /v1/classify's JSON, `network3 classify` (server and
--local) and the page's data all carry the same flags."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

import imagesets as S
from fixtures_serving import ROOT, png, thread_server
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.network3.v1 import classifier_pb2 as pb
from protos.network3.v1 import classifier_pb2_grpc as pb_grpc
from serving.contract import OUTPUT_NAMES, UNSURE_KEY, UNSURE_RATE
from serving.errors import BadModel
from serving.model import load_model
from serving.preprocess import decode_many, pixels_to_input
from serving.unsure import calibrate
from test_cli import jsonl, run
from test_v1 import http_server, multipart, post_json

T = 60


@pytest.fixture(scope="module")
def model(onnx_model):
    return load_model(onnx_model)


@pytest.fixture(scope="module")
def nonsense() -> dict[str, list[bytes]]:
    """Blank pages, noise and letters (digit lookalikes left out), seeded, as encoded files."""
    fonts = S.letter_fonts()
    letters = [b for b, c in S.letter_set(fonts[:4], seed=5) if c not in S.LOOKALIKES] if fonts else []
    return {"blank": [b for kind in S.BLANK_KINDS for b in S.nothing_set(kind, 3, seed=3)],
            "noise": [b for kind in S.NOISE_KINDS for b in S.nothing_set(kind, 15, seed=4)],
            "letters": letters}


def classify(address: str, files: list[bytes], per_call: int = 100) -> list[pb.Prediction]:
    """Unary Classify calls of `per_call` images (the shared server takes 256 at most)."""
    out = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DigitClassifierStub(channel)
        for i in range(0, len(files), per_call):
            request = pb.ClassifyRequest(images=[pb.Image(encoded=f) for f in files[i:i + per_call]])
            out += stub.Classify(request, timeout=T).predictions
    return out


def with_metadata(source: Path, out: Path, value: str | None) -> Path:
    """A copy of the model file with its unsure_below entry set to `value` (None: removed)."""
    proto = onnx.load(str(source))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != UNSURE_KEY]
    del proto.metadata_props[:]
    for key, v in kept + ([(UNSURE_KEY, value)] if value is not None else []):
        proto.metadata_props.add(key=key, value=v)
    out.write_bytes(proto.SerializeToString())
    return out


def test_calibrate_flags_at_most_the_rate_and_no_fewer_than_it_must():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(10, 0.3), 1000)
    for rate in (0.0, 0.01, UNSURE_RATE, 0.1):
        t = calibrate(probs, rate)
        top = probs.max(1)
        assert np.mean(top < t) <= rate < np.mean(top <= t)  # one more row would pass the rate
    with pytest.raises(ValueError):
        calibrate(probs[:0])


def test_the_threshold_is_the_files_own_and_every_api_shows_it(server, model, onnx_model, mnist):
    meta = {p.key: p.value for p in onnx.load(str(onnx_model)).metadata_props}
    assert model.unsure_below == float(meta[UNSURE_KEY])
    # It is export's rule on this file's own probabilities for the test digits.
    assert model.unsure_below == pytest.approx(calibrate(model.predict(pixels_to_input(mnist.test_x))[1]), abs=1e-6)
    with grpc.insecure_channel(server.address) as channel:
        info = pb_grpc.DigitClassifierStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=T)
        v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)
        v2_meta = v2_stub.ModelMetadata(v2.ModelMetadataRequest(name="network3"), timeout=T)
        config = v2_stub.ModelConfig(v2.ModelConfigRequest(name="network3"), timeout=T).config
    assert info.metadata[UNSURE_KEY] == meta[UNSURE_KEY]
    assert v2_meta.parameters[UNSURE_KEY].string_param == meta[UNSURE_KEY]
    assert config.parameters[UNSURE_KEY].string_value == meta[UNSURE_KEY]


def flagged(address: str, model, files: list[bytes]) -> np.ndarray:
    """The served flags, checked answer by answer against the rule run here on the same files."""
    got = classify(address, files)
    pixels, errors = decode_many(files)
    assert not any(errors)
    x = pixels_to_input(pixels)
    served = np.array([p.unsure for p in got])
    np.testing.assert_array_equal(served, model.unsure(x, model.predict(x)[1]))
    return served


def test_digits_are_sure_and_blank_noise_and_letters_are_not(server, model, mnist, nonsense):
    """The test model (random features, sharpened) is confident on much of anything, yet flags
    noise and letters far more often than digits, and every blank page."""
    digits = flagged(server.address, model, [png(x) for x in mnist.test_x[:300]])
    assert digits.mean() <= 2.5 * UNSURE_RATE  # calibrated on all 10,000 test digits
    assert flagged(server.address, model, nonsense["blank"]).all()  # whatever the net says
    assert flagged(server.address, model, nonsense["noise"]).mean() > 3 * digits.mean()
    if nonsense["letters"]:
        assert flagged(server.address, model, nonsense["letters"]).mean() > digits.mean()


def test_the_shipped_model_flags_most_nonsense_and_few_digits(tmp_path, mnist, nonsense):
    """models/default.onnx on a loopback server, its own threshold (or, for a file exported
    before it existed, the one `network3-train calibrate` would write)."""
    path = ROOT / "models" / "default.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    model = load_model(path)
    if model.unsure_below is None:
        threshold = calibrate(model.predict(pixels_to_input(mnist.test_x))[1])
        path = with_metadata(path, tmp_path / "default.onnx", repr(threshold))
        model = load_model(path)
    with thread_server(path, http_port=None) as s:
        digits = flagged(s.address, model, [png(x) for x in mnist.test_x[-300:]])
        assert digits.mean() <= 2.5 * UNSURE_RATE
        assert flagged(s.address, model, nonsense["blank"]).all()
        assert flagged(s.address, model, nonsense["noise"]).mean() >= 0.3
        if nonsense["letters"]:
            assert flagged(s.address, model, nonsense["letters"]).mean() >= 0.3


def test_pixels_of_a_blank_frame_are_unsure_too(server, mnist):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DigitClassifierStub(channel)
        request = pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784)), pb.Image(pixels=mnist.test_x[0].tobytes())])
        got = stub.Classify(request, timeout=T).predictions
        stream = list(stub.ClassifyStream(iter([request]), timeout=T))[0].predictions
    assert got[0].unsure and len(got[0].probabilities) == 10  # flagged, still answered
    assert [p.unsure for p in stream] == [p.unsure for p in got]


def test_the_file_decides_none_means_only_blank_and_garbage_is_refused(tmp_path, onnx_model, model, mnist, nonsense,
                                                                       caplog):
    files = [png(x) for x in mnist.test_x[:40]] + nonsense["blank"][:2] + nonsense["noise"]
    pixels, _ = decode_many(files)
    x = pixels_to_input(pixels)
    top = model.predict(x)[1].max(1)
    blank = pixels.reshape(len(pixels), -1).max(1) == 0
    # A file whose threshold is the median digit's confidence: half the digits become guesses.
    median = float(np.median(top[:40]))
    with thread_server(with_metadata(onnx_model, tmp_path / "median.onnx", repr(median)), http_port=None) as s:
        served = np.array([p.unsure for p in classify(s.address, files)])
    np.testing.assert_array_equal(served, (top < median) | blank)
    assert 0.3 <= served[:40].mean() <= 0.7
    with caplog.at_level("WARNING", logger="network3.model"):
        with thread_server(with_metadata(onnx_model, tmp_path / "none.onnx", None)) as s:
            served = np.array([p.unsure for p in classify(s.address, files)])
            _, described = post_json(s.http_url, "/v1/model", None)
    np.testing.assert_array_equal(served, blank)  # no threshold: blank inputs only
    assert blank[40:42].all() and described["unsure_below"] is None
    assert any("no 'unsure_below' metadata" in r.getMessage() for r in caplog.records)
    for bad in ("abc", "1.5", "nan"):
        with pytest.raises(BadModel, match=UNSURE_KEY):
            load_model(with_metadata(onnx_model, tmp_path / "bad.onnx", bad))


def test_v2_tensors_are_unchanged_on_nonsense(server, model):
    """The v2 API answers a blank or noisy image with the file's two tensors and nothing else."""
    x = pixels_to_input(np.stack([np.zeros((28, 28), np.uint8), np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)]))
    T_ = v2.ModelInferRequest.InferInputTensor
    request = v2.ModelInferRequest(model_name="network3", inputs=[T_(name="images", datatype="FP32", shape=list(x.shape))],
                                   raw_input_contents=[x.tobytes()])
    with grpc.insecure_channel(server.address) as channel:
        r = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=T)
        meta = v2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(v2.ModelMetadataRequest(name="network3"), timeout=T)
    assert [o.name for o in r.outputs] == list(OUTPUT_NAMES) and len(r.raw_output_contents) == 2
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [(n, [-1, 10]) for n in OUTPUT_NAMES]
    for i, want in enumerate(model.predict(x)):
        np.testing.assert_allclose(np.frombuffer(r.raw_output_contents[i], np.float32).reshape(2, 10), want,
                                   rtol=1e-5, atol=1e-6)


def test_json_cli_and_local_show_the_flag(server, model, onnx_model, mnist, nonsense, tmp_path):
    blank, digit = nonsense["blank"][0], png(mnist.test_x[0])
    sure = not model.unsure(pixels_to_input(mnist.test_x[:1]), model.predict(pixels_to_input(mnist.test_x[:1]))[1])[0]
    with http_server(onnx_model) as h:
        body, content_type = multipart([("a", "blank.png", blank), ("b", "digit.png", digit)])
        status, doc = post_json(h.base, "/v1/classify", body, {"Content-Type": content_type})
        _, described = post_json(h.base, "/v1/model", None)
    assert status == 200 and [p["unsure"] for p in doc["predictions"]] == [True, not sure]
    assert described["unsure_below"] == model.unsure_below
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a-blank.png").write_bytes(blank)
    (folder / "b-digit.png").write_bytes(digit)
    served = jsonl(run("classify", folder, "--server", server.address).stdout)
    local = jsonl(run("classify", folder, "--local", onnx_model).stdout)
    assert [d["unsure"] for d in served] == [d["unsure"] for d in local] == [True, not sure]
    rows = list(csv.DictReader(io.StringIO(run("classify", folder, "--server", server.address, "--format", "csv").stdout)))
    assert [r["unsure"] for r in rows] == ["true", "false" if sure else "true"]
    table = run("classify", folder, "--server", server.address, "--format", "table").stdout.splitlines()
    blank_line = next(line for line in table if "a-blank.png" in line)
    digit_line = next(line for line in table if "b-digit.png" in line)
    assert f"{served[0]['digit']}?" in blank_line.split()
    assert (f"{served[1]['digit']}?" in digit_line.split()) is not sure
    assert all(isinstance(d["unsure"], bool) for d in served + local)  # JSON true/false, not strings
