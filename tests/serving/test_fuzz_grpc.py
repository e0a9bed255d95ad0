"""Hostile input: hypothesis throws random and mutated requests at both gRPC APIs of a real server
process on a loopback port (the file readers: tests/training/test_fuzz_data.py).

The server must answer every request with a clear status (OK for what is still a valid request,
else INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED; never INTERNAL or UNKNOWN), answer a
well-formed request right after, log no traceback, keep one access line per request, and keep
its resident memory bounded.

`make test` runs a small fixed set of examples (NETWORK3_FUZZ_EXAMPLES, default 40 per test,
derandomised so a run is repeatable); `make fuzz` runs thousands of fresh random ones.  Only our
own stubs are imported here: tritonclient's `inference.*` messages cannot share a process.
"""
from __future__ import annotations

import io
import os
import re
import struct
import urllib.request
import zlib

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fixtures_serving import ProcessServer, png
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.network3.v1 import classifier_pb2 as pb
from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

EXAMPLES = int(os.environ.get("NETWORK3_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="NETWORK3_FUZZ_EXAMPLES" not in os.environ, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
T = 30  # seconds: every call has a deadline
OK = grpc.StatusCode.OK
CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
CLEAR_NUMBERS = {c.value[0] for c in CLEAR}
# Small limits, so that each limit is cheap to reach (and a bomb's cost is small).
MAX_PIXELS, MAX_MESSAGE, MAX_IMAGES = 1_000_000, 4 * 1024 * 1024, 64
# Resident memory the fuzzing may add to the server's, all tests together (MiB).  A leak of a
# request's worth per example would pass it many times over.
RSS_GROWTH_MIB = 150
PEAK_GROWTH_MIB = 600


# --------------------------------------------------------------------------- the server --

class Target:
    """The server process, its channel and stubs, and what a healthy server answers."""

    def __init__(self, onnx_model, tmp_path_factory, digits) -> None:
        self.log_path = tmp_path_factory.mktemp("fuzz") / "server.log"
        self.server = ProcessServer(onnx_model, "--max-pixels", str(MAX_PIXELS), "--max-message-bytes", str(MAX_MESSAGE),
                                    "--max-images-per-request", str(MAX_IMAGES), "--metrics-port", "0", log=self.log_path)
        self.pid = self.server.proc.pid
        self.metrics_port = int(self.server.wait_for_log(r"metrics on :(\d+)/metrics").group(1))
        # The client may send more than the server takes: the server's limit is what is tested.
        self.channel = grpc.insecure_channel(self.server.address, options=[
            ("grpc.max_send_message_length", 4 * MAX_MESSAGE), ("grpc.max_receive_message_length", 4 * MAX_MESSAGE)])
        self.classify = pb_grpc.DigitClassifierStub(self.channel)
        self.infer = v2_grpc.GRPCInferenceServiceStub(self.channel)
        self.pixels = digits[0][:4]
        self.good_classify = pb.ClassifyRequest(images=[pb.Image(pixels=p.tobytes(), id=f"g{i}") for i, p in enumerate(self.pixels)])
        x = (self.pixels.astype(np.float32) / 255).reshape(4, 1, 28, 28)
        self.good_infer = v2.ModelInferRequest(model_name="network3", id="good", inputs=[v2.ModelInferRequest.InferInputTensor(
            name="images", datatype="FP32", shape=[4, 1, 28, 28])], raw_input_contents=[x.tobytes()])
        self.expected = [p.digit for p in self.classify.Classify(self.good_classify, timeout=T).predictions]
        self.still_serving()
        self.rss_start = rss_mib(self.pid)

    def still_serving(self) -> None:
        """A well-formed request on each API gets the right answer."""
        got = [p.digit for p in self.classify.Classify(self.good_classify, timeout=T).predictions]
        assert got == self.expected
        r = self.infer.ModelInfer(self.good_infer, timeout=T)
        assert list(np.frombuffer(r.raw_output_contents[1], np.float32).reshape(4, 10).argmax(1)) == self.expected

    def healthy(self) -> None:
        """Alive, no traceback or error logged, no INTERNAL/UNKNOWN counted, memory bounded,
        nothing left queued."""
        assert self.server.proc.poll() is None, self.server.log()[-3000:]
        self.still_serving()
        log = self.server.log()
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
        m = metrics(self.metrics_port)
        bad = {k: v for k, v in m.items() if k.startswith("network3_requests_total") and ("INTERNAL" in k or "UNKNOWN" in k)}
        assert not bad, bad
        assert m["network3_queue_depth[]"] == 0
        assert all(v >= 0 for k, v in m.items() if k.startswith("network3_images_total")), m
        rss, peak = rss_mib(self.pid), rss_mib(self.pid, "VmHWM")
        assert rss < self.rss_start + RSS_GROWTH_MIB, (self.rss_start, rss)
        assert peak < self.rss_start + PEAK_GROWTH_MIB, (self.rss_start, peak)

    def close(self) -> None:
        self.channel.close()
        self.server.kill()


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024


def metrics(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=T).read().decode()
    return {s.name + str(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def target(onnx_model, tmp_path_factory, digits):
    t = Target(onnx_model, tmp_path_factory, digits)
    yield t
    t.close()


@pytest.fixture
def fuzzed(target):
    """Checks the server after the test: still serving, nothing logged or counted as a crash."""
    yield target
    target.healthy()


def status_of(call) -> grpc.StatusCode:
    """Run one call: OK, or the clear status it was refused with (anything else fails the test)."""
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() in CLEAR, f"{e.code()}: {e.details()}"
        assert e.details(), "a refusal must say why"
        return e.code()
    return OK


# ------------------------------------------------------------------------ image seeds --

def _encode(pixels: np.ndarray, fmt: str, mode: str = "L", **kw) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(255 - pixels)  # dark ink on light paper, as a scan
    if mode == "P":
        im = im.convert("P")
    elif mode != "L":
        im = im.convert(mode)
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def seeds(digits) -> list[bytes]:
    """One digit in every format and several modes: what the mutations start from."""
    d = digits[0][0]
    big = np.kron(d, np.ones((4, 4), np.uint8))  # 112x112: real compressed data to damage
    out = [png(d), _encode(big, "PNG"), _encode(big, "PNG", "RGBA"), _encode(big, "PNG", "P"), _encode(big, "PNG", "1"),
           _encode(big, "PNG", "I;16"), _encode(big, "JPEG", quality=80), _encode(big, "JPEG", "RGB", progressive=True),
           _encode(big, "GIF"), _encode(big, "BMP"), _encode(big, "BMP", "RGB"), _encode(big, "TIFF"),
           _encode(big, "TIFF", compression="tiff_lzw"), _encode(big, "TIFF", "RGB", compression="tiff_adobe_deflate"),
           _encode(big, "WEBP", lossless=True), _encode(big, "WEBP", quality=50)]
    frames = [Image.fromarray(255 - d), Image.fromarray(d)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])  # animated
    out.append(buf.getvalue())
    return out


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed image with a few byte-level mutations: flips, overwrites, cuts, insertions,
    truncation, and big numbers written where headers keep their sizes."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate", "u32", "u16"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "truncate":
            del data[pos:]
        elif op == "u32":
            data[pos:pos + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1)))
        elif op == "u16":
            data[pos:pos + 2] = struct.pack("<H", draw(st.sampled_from([0, 1, 0xFFFF]) | st.integers(0, 2**16 - 1)))
    return bytes(data)


# The shape of every answer the servicers send: `error` set, or a full prediction.
def check_prediction(p: pb.Prediction) -> None:
    if p.HasField("error"):
        assert p.error.code in CLEAR_NUMBERS and p.error.message, p
    else:
        assert 0 <= p.digit <= 9 and len(p.probabilities) == 10 and abs(sum(p.probabilities) - 1) < 1e-3


# ------------------------------------------------------------- DigitClassifier: images --

ids = st.text(max_size=40)  # any unicode: newlines, NULs, right-to-left marks...


@st.composite
def image_messages(draw, seeds) -> pb.Image:
    kind = draw(st.sampled_from(["mutated", "mutated", "random", "pixels", "good", "empty", "none"]))
    i = draw(ids)
    if kind == "mutated":
        return pb.Image(encoded=draw(mutated(seeds)), id=i)
    if kind == "random":
        return pb.Image(encoded=draw(st.binary(max_size=2048)), id=i)
    if kind == "pixels":  # mostly the wrong byte count
        n = draw(st.sampled_from([0, 1, 783, 784, 785, 1568, 28 * 28 * 3]) | st.integers(0, 5000))
        return pb.Image(pixels=draw(st.binary(min_size=n, max_size=n)) if n <= 1000 else bytes(n), id=i)
    if kind == "good":
        return pb.Image(encoded=draw(st.sampled_from(seeds)), id=i)
    if kind == "empty":
        return pb.Image(encoded=b"", id=i)
    return pb.Image(id=i)


@st.composite
def classify_requests(draw, seeds) -> pb.ClassifyRequest:
    images = draw(st.lists(image_messages(seeds), max_size=4))
    if draw(st.integers(0, 9)) == 0:  # now and then, past the per-request limit
        images = images + [pb.Image(pixels=bytes(784))] * (MAX_IMAGES + 1 - len(images))
    top_k = draw(st.none() | st.integers(0, 12) | st.integers(0, 2**32 - 1))
    return pb.ClassifyRequest(images=images, top_k=top_k)


def test_random_and_mutated_images(fuzzed, seeds):
    @FUZZ
    @given(request=classify_requests(seeds))
    def run(request):
        answer = {}

        def call():
            answer["r"] = fuzzed.classify.Classify(request, timeout=T)

        code = status_of(call)
        if not request.images or len(request.images) > MAX_IMAGES or (request.HasField("top_k") and request.top_k > 10):
            assert code != OK
        if code == OK:
            r = answer["r"]
            assert len(r.predictions) == len(request.images)
            assert [p.id for p in r.predictions] == [im.id for im in request.images]
            for p in r.predictions:
                check_prediction(p)
        fuzzed.still_serving()

    run()


def test_random_bytes_are_never_an_image(fuzzed):
    @FUZZ
    @given(data=st.binary(min_size=0, max_size=4096))
    def run(data):
        code = status_of(lambda: fuzzed.classify.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=data)]), timeout=T))
        assert code != OK  # INVALID_ARGUMENT; RESOURCE_EXHAUSTED if the bytes happen to be a header claiming a huge size
        fuzzed.still_serving()

    run()


def test_streams_of_hostile_requests_answer_each_in_place(fuzzed, seeds):
    @FUZZ
    @given(requests=st.lists(classify_requests(seeds), min_size=1, max_size=12))
    def run(requests):
        responses = list(fuzzed.classify.ClassifyStream(iter(requests), timeout=T))
        assert len(responses) == len(requests)
        for request, r in zip(requests, responses):
            if r.HasField("error"):
                assert r.error.code in CLEAR_NUMBERS and r.error.message
                assert not r.predictions
            else:
                assert [p.id for p in r.predictions] == [im.id for im in request.images]
                for p in r.predictions:
                    check_prediction(p)
        fuzzed.still_serving()

    run()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, rows: bytes = b"", extra: bytes = b"") -> bytes:
    """A PNG written by hand, so its header may say anything (0x0, 2**31 wide...)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + extra
            + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b""))


def _png_zeros(width: int, height: int) -> bytes:
    """A black PNG compressed row by row: 400 MB of pixels in 400 KB, without holding them."""
    z, row = zlib.compressobj(9), bytes(width + 1)
    idat = b"".join([z.compress(row) for _ in range(height)] + [z.flush()])
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def _webp_canvas(width: int, height: int) -> bytes:
    body = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _gif(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    return head + b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0) + b"\x02\x02\x44\x01\x00\x3b"


def _bmp(width: int, height: int) -> bytes:
    return b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, 0, 0, 0, 0, 0)


def _jpeg_header(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def _pil(size: tuple[int, int], fmt: str, fill: int = 0, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, fill).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _text_bomb(kind: bytes) -> bytes:
    """A 28x28 PNG carrying a text or colour-profile chunk that inflates to 50 MB."""
    head = {b"zTXt": b"k\0\0", b"iTXt": b"k\0\1\0\0\0", b"iCCP": b"k\0\0"}[kind]
    return _png(28, 28, bytes(29 * 28), extra=_chunk(kind, head + zlib.compress(b"a" * 50_000_000, 9)))


# name: (bytes, what the server may answer).  A decompression bomb costs a few KB to send and
# would cost GBs to decode: the size in the header must stop it.
EXHAUSTED, INVALID = {grpc.StatusCode.RESOURCE_EXHAUSTED}, {grpc.StatusCode.INVALID_ARGUMENT}
SPECIAL_IMAGES = {
    "PNG bomb 20000x20000 zeros": (lambda: _png_zeros(20000, 20000), EXHAUSTED),
    "PNG bomb 1001x1000, just over the limit": (lambda: _png_zeros(1001, 1000), EXHAUSTED),
    "PNG header 2**31-1 squared": (lambda: _png(2**31 - 1, 2**31 - 1), EXHAUSTED),
    "PNG header 2**32-1 x 1": (lambda: _png(2**32 - 1, 1), EXHAUSTED | INVALID),
    "PNG 28x28 whose IDAT inflates to 50 MB": (lambda: _png(28, 28, bytes(50_000_000)), {OK}),
    "PNG zTXt bomb": (lambda: _text_bomb(b"zTXt"), INVALID),
    "PNG iTXt bomb": (lambda: _text_bomb(b"iTXt"), INVALID),
    "PNG iCCP bomb": (lambda: _text_bomb(b"iCCP"), INVALID),
    "GIF screen 65535x65535": (lambda: _gif((65535, 65535), (1, 1)), EXHAUSTED),
    "GIF frame 65535x65535 on a 1x1 screen": (lambda: _gif((1, 1), (65535, 65535)), EXHAUSTED),
    "GIF bomb 4000x4000 zeros": (lambda: _pil((4000, 4000), "GIF"), EXHAUSTED),
    "BMP header 100000x100000": (lambda: _bmp(100_000, -100_000), EXHAUSTED),
    "BMP header width -2**31": (lambda: _bmp(-2**31, 1), EXHAUSTED | INVALID),
    "JPEG header 65500x65500": (lambda: _jpeg_header(65500, 65500), EXHAUSTED),
    "TIFF bomb 5000x5000 deflate": (lambda: _pil((5000, 5000), "TIFF", compression="tiff_adobe_deflate"), EXHAUSTED),
    "WebP bomb 4000x4000 lossless": (lambda: _pil((4000, 4000), "WEBP", lossless=True), EXHAUSTED),
    "WebP canvas 16384x16384": (lambda: _webp_canvas(16384, 16384), EXHAUSTED),
    "PNG 0x0": (lambda: _png(0, 0), INVALID),
    "PNG 0x28": (lambda: _png(0, 28), INVALID),
    "GIF 0x0 frame on a 0x0 screen": (lambda: _gif((0, 0), (0, 0)), INVALID | {OK}),
    # 1xN and Nx1: a thin line is a legal image; a blank answer or a clear refusal, never a crash.
    "PNG 1x1": (lambda: _pil((1, 1), "PNG", 255), INVALID | {OK}),
    "PNG 1x28": (lambda: _pil((1, 28), "PNG"), INVALID | {OK}),
    "PNG 28x1": (lambda: _pil((28, 1), "PNG", 255), INVALID | {OK}),
    "PNG 1x1000000 (at the limit)": (lambda: _pil((1, 1_000_000), "PNG", 255), INVALID | {OK}),
    "PNG 1000000x1 (at the limit)": (lambda: _pil((1_000_000, 1), "PNG"), INVALID | {OK}),
    "JPEG 1x1": (lambda: _pil((1, 1), "JPEG"), INVALID | {OK}),
    "GIF 1x5000": (lambda: _pil((1, 5000), "GIF", 255), INVALID | {OK}),
}


@pytest.mark.parametrize("case", list(SPECIAL_IMAGES))
def test_bombs_and_degenerate_sizes(fuzzed, case):
    make, allowed = SPECIAL_IMAGES[case]
    data = make()
    assert len(data) < MAX_MESSAGE - 1024, "the case must reach the decoder, not the message limit"
    code = status_of(lambda: fuzzed.classify.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=data)]), timeout=T))
    assert code in allowed, code
    # In a stream the image gets its error in place and the stream goes on.
    r = list(fuzzed.classify.ClassifyStream(iter([pb.ClassifyRequest(images=[pb.Image(encoded=data), pb.Image(pixels=fuzzed.pixels[0].tobytes())])]), timeout=T))
    assert len(r) == 1 and len(r[0].predictions) == 2
    check_prediction(r[0].predictions[0])
    assert r[0].predictions[1].digit == fuzzed.expected[0]
    fuzzed.still_serving()


def test_many_bombs_in_one_request_are_decoded_one_at_a_time(fuzzed):
    """64 RGBA PNGs of 4 KB that each inflate to 1,000,000 pixels (4 MB; just within the limit):
    a 300 KB request must not hold all 64 decoded at once (with the default limits, 1,024 such
    files at 40 MP in a 64 MB request would need 160 GB)."""
    buf = io.BytesIO()
    Image.new("RGBA", (1000, 1000), (255, 255, 255, 255)).save(buf, format="PNG", optimize=True)
    request = pb.ClassifyRequest(images=[pb.Image(encoded=buf.getvalue())] * MAX_IMAGES)
    assert len(request.SerializeToString()) < 400_000
    before = rss_mib(fuzzed.pid)
    with open(f"/proc/{fuzzed.pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    r = fuzzed.classify.Classify(request, timeout=120)
    assert len(r.predictions) == MAX_IMAGES
    peak = rss_mib(fuzzed.pid, "VmHWM")
    assert peak - before < 128, (before, peak)  # all 64 at once: 256 MB and more


def test_every_truncation_of_a_jpeg(fuzzed, seeds):
    """Each prefix of a JPEG (header only, half a scan, no end marker...) in one stream."""
    jpeg = next(s for s in seeds if s[:2] == b"\xff\xd8")
    cuts = list(range(0, len(jpeg), max(1, len(jpeg) // 400)))
    requests = [pb.ClassifyRequest(images=[pb.Image(encoded=jpeg[:n], id=str(n))]) for n in cuts]
    responses = list(fuzzed.classify.ClassifyStream(iter(requests), timeout=T))
    assert [r.predictions[0].id for r in responses] == [str(n) for n in cuts]
    for r in responses:
        assert r.predictions[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], r
    fuzzed.still_serving()


# ----------------------------------------------------------------- v2: ModelInfer tensors --

DIMS = st.sampled_from([-2**63, -1, 0, 1, 2, 28, MAX_IMAGES, MAX_IMAGES + 1, 2**31, 2**62, 2**63 - 1]) | st.integers(-2**63, 2**63 - 1)
SHAPES = (st.just([1, 1, 28, 28]) | st.lists(DIMS, max_size=6)
          | st.tuples(DIMS, st.just(1), st.just(28), st.just(28)).map(list)
          | st.tuples(st.integers(1, 3), DIMS, DIMS, DIMS).map(list))
DATATYPES = st.sampled_from(["FP32", "FP32", "UINT8", "UINT8", "INT32", "FP16", "FP64", "BYTES", "BOOL", "", "fp32"]) | st.text(max_size=8)
SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, -0.0, 1.0, 1.0000001, -1e-38, 3e38, 5e-324]


@st.composite
def tensor_data(draw, shape: list[int], datatype: str) -> tuple[bytes | None, v2.InferTensorContents | None]:
    """raw bytes or typed contents for a tensor: often the right size, often not."""
    n = shape[0] if shape and 0 < shape[0] <= 4 else 1
    items = n * 784
    how = draw(st.sampled_from(["valid", "valid", "special", "random", "size", "typed", "both", "none"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.random(items, np.float32)
    if how == "special":
        x[rng.integers(0, items, draw(st.integers(1, 5)))] = draw(st.sampled_from(SPECIAL_FLOATS))
    raw = x.tobytes() if datatype != "UINT8" else (np.nan_to_num(x, posinf=1, neginf=0).clip(0, 1) * 255).astype(np.uint8).tobytes()
    if how == "random":
        raw = rng.bytes(len(raw))
    elif how == "size":
        raw = raw[:draw(st.integers(0, len(raw)))] + rng.bytes(draw(st.integers(0, 8)))
    contents = None
    if how in ("typed", "both"):
        field = draw(st.sampled_from(["fp32_contents", "uint_contents", "int_contents", "int64_contents", "bool_contents",
                                      "fp64_contents", "bytes_contents"]))
        k = draw(st.sampled_from([items, items, 0, 1, items - 1, items + 1]))
        values = {"fp32_contents": lambda: x[:k].tolist() + [0.5] * max(0, k - items),
                  "uint_contents": lambda: rng.integers(0, 2**32 if draw(st.booleans()) else 256, k).tolist(),
                  "int_contents": lambda: rng.integers(-2**31, 2**31, k).tolist(),
                  "int64_contents": lambda: rng.integers(-2**63, 2**63 - 1, k).tolist(),
                  "bool_contents": lambda: [True] * k,
                  "fp64_contents": lambda: [0.5] * k,
                  "bytes_contents": lambda: [b"\xff" * 3] * min(k, 10)}[field]()
        contents = v2.InferTensorContents(**{field: values})
    if how == "typed":
        raw = None
    elif how == "none":
        raw = None
    return raw, contents


@st.composite
def infer_requests(draw) -> v2.ModelInferRequest:
    Tensor = v2.ModelInferRequest.InferInputTensor
    Out = v2.ModelInferRequest.InferRequestedOutputTensor
    inputs, raws = [], []
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        shape = draw(SHAPES)
        datatype = draw(DATATYPES)
        raw, contents = draw(tensor_data(shape, datatype))
        name = draw(st.sampled_from(["images", "images", "images", "pixels", ""]) | st.text(max_size=10))
        inputs.append(Tensor(name=name, datatype=datatype, shape=shape, contents=contents))
        if raw is not None:
            raws.append(raw)
    if draw(st.integers(0, 9)) == 0:  # more raw contents than inputs
        raws.append(b"\0" * 4)
    outputs = []
    for _ in range(draw(st.integers(0, 3))):
        params = {}
        if draw(st.booleans()):
            params["classification"] = draw(st.sampled_from([
                v2.InferParameter(int64_param=draw(st.integers(-2**63, 2**63 - 1) | st.integers(0, 11))),
                v2.InferParameter(bool_param=True), v2.InferParameter(string_param=draw(st.text(max_size=5))),
                v2.InferParameter(uint64_param=3), v2.InferParameter(double_param=2.0), v2.InferParameter()]))
        if draw(st.integers(0, 4)) == 0:
            params[draw(st.text(max_size=8))] = v2.InferParameter(int64_param=1)
        outputs.append(Out(name=draw(st.sampled_from(["logits", "probabilities", "softmax", ""]) | st.text(max_size=8)),
                           parameters=params))
    return v2.ModelInferRequest(
        model_name=draw(st.sampled_from(["network3"] * 8 + ["", "NETWORK3", "network3 "]) | st.text(max_size=12)),
        model_version=draw(st.sampled_from(["", "", "1", "2", "-1"]) | st.text(max_size=4)),
        id=draw(ids), inputs=inputs, outputs=outputs, raw_input_contents=raws)


def check_infer_response(request: v2.ModelInferRequest, r: v2.ModelInferResponse) -> None:
    assert r.id == request.id and len(r.outputs) == len(r.raw_output_contents) >= 1
    for o, raw in zip(r.outputs, r.raw_output_contents):
        if o.datatype == "FP32":
            values = np.frombuffer(raw, np.float32).reshape(list(o.shape))
            assert np.isfinite(values).all()
        else:
            assert o.datatype == "BYTES" and raw


def test_v2_random_tensors(fuzzed):
    @FUZZ
    @given(request=infer_requests())
    def run(request):
        answer = {}

        def call():
            answer["r"] = fuzzed.infer.ModelInfer(request, timeout=T)

        if status_of(call) == OK:
            check_infer_response(request, answer["r"])
        fuzzed.still_serving()

    run()


def test_v2_stream_of_random_tensors(fuzzed):
    @FUZZ
    @given(requests=st.lists(infer_requests(), min_size=1, max_size=8))
    def run(requests):
        responses = list(fuzzed.infer.ModelStreamInfer(iter(requests), timeout=T))
        assert len(responses) == len(requests)
        for request, r in zip(requests, responses):
            if r.error_message:
                assert r.infer_response.id == request.id
            else:
                check_infer_response(request, r.infer_response)
        fuzzed.still_serving()

    run()


@pytest.mark.parametrize("shape", [[2**63 - 1, 1, 28, 28], [2**62, 1, 28, 28], [-2**63, 1, 28, 28], [-1, 1, 28, 28],
                                   [0, 1, 28, 28], [1, -1, 28, 28], [1, 1, -28, -28], [1, 1, 2**31, 2**31],
                                   [1, 1, 28, 28, 1], [], [784], [1, 784]])
def test_v2_huge_and_negative_shapes_are_refused_without_allocating(fuzzed, shape):
    Tensor = v2.ModelInferRequest.InferInputTensor
    for dtype, contents in (("FP32", None), ("UINT8", None), ("FP32", v2.InferTensorContents(fp32_contents=[0.5] * 784))):
        request = v2.ModelInferRequest(model_name="network3", inputs=[Tensor(name="images", datatype=dtype, shape=shape, contents=contents)],
                                       raw_input_contents=[] if contents else [bytes(784 * 4)])
        assert status_of(lambda: fuzzed.infer.ModelInfer(request, timeout=T)) in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    fuzzed.still_serving()


# ---------------------------------------------------- bytes that are not the message at all --

SERVICES = [pb.DESCRIPTOR.services_by_name["DigitClassifier"], v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]]
METHODS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}
UNARY = sorted(p for p, m in METHODS.items() if not m.client_streaming)
STREAMS = sorted(p for p, m in METHODS.items() if m.client_streaming)


def _len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand (so it may carry invalid UTF-8)."""
    key, size = (number << 3) | 2, len(payload)
    out = bytearray([key])
    while True:
        byte, size = size & 0x7F, size >> 7
        out.append(byte | (0x80 if size else 0))
        if not size:
            return bytes(out) + payload


BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80", b"\xf4\x90\x80\x80"]  # stray, cut, surrogate, overlong...
# method: how to put invalid UTF-8 into one of its string fields (a raw protobuf message).
UTF8_CASES = {
    "/network3.v1.DigitClassifier/Classify": lambda s: _len_field(1, _len_field(2, bytes(784)) + _len_field(3, s)),  # Image.id
    "/inference.GRPCInferenceService/ModelInfer": lambda s: _len_field(1, s),  # model_name
    "/inference.GRPCInferenceService/ModelMetadata": lambda s: _len_field(1, s),  # name
    "/inference.GRPCInferenceService/ModelReady": lambda s: _len_field(2, s),  # version
}


@pytest.mark.parametrize("method", sorted(UTF8_CASES))
def test_invalid_utf8_in_a_string_field_is_invalid_argument(fuzzed, method):
    call = fuzzed.channel.unary_unary(method)  # no serializers: bytes go out as they are
    for bad in BAD_UTF8:
        with pytest.raises(grpc.RpcError) as e:
            call(UTF8_CASES[method](bad), timeout=T)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "UTF-8" in e.value.details()
    fuzzed.still_serving()


def test_invalid_utf8_inside_streams_ends_them_with_invalid_argument(fuzzed):
    good = fuzzed.good_classify.SerializeToString()
    for method, bad in (("/network3.v1.DigitClassifier/ClassifyStream", UTF8_CASES["/network3.v1.DigitClassifier/Classify"](b"\xff")),
                        ("/inference.GRPCInferenceService/ModelStreamInfer", _len_field(1, b"\xff"))):
        first = good if "Classify" in method else fuzzed.good_infer.SerializeToString()
        call = fuzzed.channel.stream_stream(method)(iter([first, bad, first]), timeout=T)
        answers = []
        with pytest.raises(grpc.RpcError) as e:
            for answer in call:
                answers.append(answer)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in e.value.details()
        assert len(answers) <= 1  # the good first message may have been answered before
    fuzzed.still_serving()


@pytest.mark.parametrize("payload", [b"\x0b" * 200_000, b"\x0a\x80" * 100_000, b"\x0a" + b"\xff" * 11, b"\x0f", b"\x08" + b"\x80" * 20],
                         ids=["groups nested 200,000 deep", "nested lengths", "overlong varint length", "bad wire type", "overlong varint"])
def test_malformed_wire_format(fuzzed, payload):
    for method in ("/network3.v1.DigitClassifier/Classify", "/inference.GRPCInferenceService/ModelInfer"):
        with pytest.raises(grpc.RpcError) as e:
            fuzzed.channel.unary_unary(method)(payload, timeout=T)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    fuzzed.still_serving()


@st.composite
def wire_messages(draw, path: str, target: "Target") -> bytes:
    """Random bytes, or a valid request of this method's type with bytes damaged."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    base = {"/network3.v1.DigitClassifier/Classify": target.good_classify,
            "/network3.v1.DigitClassifier/ClassifyStream": target.good_classify,
            "/inference.GRPCInferenceService/ModelInfer": target.good_infer,
            "/inference.GRPCInferenceService/ModelStreamInfer": target.good_infer}.get(path)
    wire = bytearray(base.SerializeToString() if base is not None else b"\x0a\x08network3\x12\x011")
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(wire) - 1))
        op = draw(st.sampled_from(["set", "cut", "insert"]))
        if op == "set":
            wire[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del wire[pos:pos + draw(st.integers(1, 8))]
        else:
            wire[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        if not wire:
            break
    return bytes(wire)


def test_raw_bytes_to_every_unary_method(fuzzed):
    @FUZZ
    @given(data=st.data())
    def run(data):
        path = data.draw(st.sampled_from(UNARY))
        payload = data.draw(wire_messages(path, fuzzed))
        status_of(lambda: fuzzed.channel.unary_unary(path)(payload, timeout=T))
        fuzzed.still_serving()

    run()


def test_raw_bytes_in_every_stream(fuzzed):
    @FUZZ
    @given(data=st.data())
    def run(data):
        path = data.draw(st.sampled_from(STREAMS))
        payloads = data.draw(st.lists(wire_messages(path, fuzzed), min_size=1, max_size=6))
        status_of(lambda: list(fuzzed.channel.stream_stream(path)(iter(payloads), timeout=T)))
        fuzzed.still_serving()

    run()


# --------------------------------------------------------------------- deep/long streams --

def test_long_streams_are_answered_in_order(fuzzed):
    """3,000 messages on one ClassifyStream, 1,000 on one ModelStreamInfer, a third of them bad."""
    n = 3000
    pixels = fuzzed.pixels[0].tobytes()

    def requests():
        for i in range(n):
            yield pb.ClassifyRequest(images=[pb.Image(pixels=pixels if i % 3 else pixels[:i % 784], id=str(i))])

    responses = fuzzed.classify.ClassifyStream(requests(), timeout=120)
    for i, r in enumerate(responses):
        p = r.predictions[0]
        assert p.id == str(i)
        assert (p.digit == fuzzed.expected[0]) if i % 3 else (p.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert i == n - 1
    bad = v2.ModelInferRequest(model_name="nope", id="bad")
    v2_requests = (fuzzed.good_infer if i % 3 else bad for i in range(1000))
    codes = [bool(r.error_message) for r in fuzzed.infer.ModelStreamInfer(v2_requests, timeout=120)]
    assert codes == [i % 3 == 0 for i in range(1000)]


# ----------------------------------------------------------------- the log stays readable --

ACCESS = re.compile(r"\S+ access id=\S+ method=\S+ code=[A-Z_]+ images=\d+ ms=[\d.]+")


def test_client_ids_cannot_forge_log_lines(fuzzed):
    """Ids come from clients (v2 `id`, `x-request-id`): newlines or spaces in them must not make
    a second line or a fake field in the access log."""
    forged = "x\n2026-01-01T00:00:00.000Z access id=forged method=Fake code=OK images=1 ms=0.1"
    request = v2.ModelInferRequest()
    request.CopyFrom(fuzzed.good_infer)
    request.id = forged
    fuzzed.infer.ModelInfer(request, timeout=T)
    fuzzed.classify.Classify(fuzzed.good_classify, timeout=T, metadata=[("x-request-id", "y code=OK images=999")])
    fuzzed.server.wait_for_log("forged")  # the access log is written every 0.25 s
    fuzzed.server.wait_for_log("images=999")
    lines = fuzzed.server.log().splitlines()
    access = [line for line in lines if " access " in line]
    assert all(ACCESS.fullmatch(line) for line in access), [line for line in access if not ACCESS.fullmatch(line)][:5]
    assert not any(re.match(r"\S+ access id=forged ", line) for line in lines)
