"""`--triton-repo`: the layout Triton expects, and config.pbtxt parsed strictly with Triton's own schema.

export.triton_config builds the file as our ModelConfig message (protos.inference, the same
schema) printed by text_format; here it is parsed back twice: with our stubs in this process,
and with tritonclient's in a child interpreter: tritonclient's model_config_pb2 and our committed
protos.inference stubs both register `inference.*` in protobuf's default descriptor pool, and
whichever is imported second in one process fails.  Other test modules import our stubs.
"""
from __future__ import annotations

import json
import subprocess
import sys

from google.protobuf import text_format

from protos.inference import model_config_pb2 as mc
from training.export import MAX_BATCH, TRITON_QUEUE_DELAY_US, write_triton_repo
from training.onnxrt import onnx_session

PARSE = r"""
import json, sys
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

config = text_format.Parse(open(sys.argv[1]).read(), model_config_pb2.ModelConfig())  # unknown fields raise
try:
    text_format.Parse("bogus_field: 1", model_config_pb2.ModelConfig())
    strict = False
except text_format.ParseError:
    strict = True
print(json.dumps({"strict": strict, "has_dynamic_batching": config.HasField("dynamic_batching"),
                  "config": json_format.MessageToDict(config, preserving_proto_field_name=True)}))
"""


def test_triton_repository_layout_and_config(onnx_model, tmp_path):
    folder = write_triton_repo(onnx_model, tmp_path / "repo")
    assert folder == tmp_path / "repo" / "network3"
    assert (folder / "1" / "model.onnx").read_bytes() == onnx_model.read_bytes()
    assert (folder / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt", "labels.txt"]  # no temp files

    run = subprocess.run([sys.executable, "-c", PARSE, str(folder / "config.pbtxt")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    parsed = json.loads(run.stdout)
    assert parsed["strict"] and parsed["has_dynamic_batching"]
    config = parsed["config"]
    assert config["name"] == "network3" and config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == MAX_BATCH > 0

    # With max_batch_size > 0 Triton adds the batch dimension itself: dims are the file's, minus the first.
    sess = onnx_session(onnx_model)
    types = {"tensor(float)": "TYPE_FP32"}
    expect = lambda tensors: [(t.name, types[t.type], [str(d) for d in t.shape[1:]]) for t in tensors]  # noqa: E731
    got = lambda entries: [(e["name"], e["data_type"], e["dims"]) for e in entries]  # noqa: E731
    assert got(config["input"]) == expect(sess.get_inputs()) == [("images", "TYPE_FP32", ["1", "28", "28"])]
    assert got(config["output"]) == expect(sess.get_outputs())
    assert [e["name"] for e in config["output"]] == ["logits", "probabilities"]


def test_config_parses_back_into_model_config(onnx_model, tmp_path):
    folder = write_triton_repo(onnx_model, tmp_path / "repo")
    text = (folder / "config.pbtxt").read_text()
    config = text_format.Parse(text, mc.ModelConfig())  # strict: an unknown field raises
    assert (config.name, config.backend, config.max_batch_size) == ("network3", "onnxruntime", MAX_BATCH)
    assert config.dynamic_batching.max_queue_delay_microseconds == TRITON_QUEUE_DELAY_US
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("images", mc.TYPE_FP32, [1, 28, 28])]
    assert [(t.name, t.data_type, list(t.dims), t.label_filename) for t in config.output] == [
        ("logits", mc.TYPE_FP32, [10], ""), ("probabilities", mc.TYPE_FP32, [10], "labels.txt")]
    assert text_format.MessageToString(config) == text  # printed by text_format, not by hand
