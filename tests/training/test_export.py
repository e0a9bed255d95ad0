"""training/export.py and training/quantize.py on a freshly trained net and real MNIST test images."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType
import pytest
import torch
from click.testing import CliRunner

import training
from serving.contract import INPUT_CONTRACT as CONTRACT, UNSURE_KEY, UNSURE_RATE
from serving.preprocess import pixels_to_input
from serving.unsure import calibrate
from training import export as export_mod
from training.cli import cli
from training.checkpoint import load_checkpoint
from training.export import export_onnx, weights_sha256
from training.onnxrt import ExportError, onnx_predict, onnx_session, read_metadata

METADATA_KEYS = {"labels", "input", "preset", "config", "test_accuracy", "data_sha256", "git_commit",
                 "exported_at", "weights_sha256", "opset", "network3_version", "unsure_below"}


@pytest.fixture(scope="module")
def small(mnist):
    """The first 1,000 test images: enough for exports that are meant to fail or to check an option."""
    return dataclasses.replace(mnist, test_x=mnist.test_x[:1000], test_y=mnist.test_y[:1000])


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory, checkpoint):
    """A different net of the same shape: the trained one with its layers perturbed (an ensemble member)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(1)
    ckpt["model"] = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.ndim > 1
                     else v for k, v in ckpt["model"].items()}
    path = tmp_path_factory.mktemp("second") / "best.pt"
    torch.save(ckpt, path)
    return path


def torch_probabilities(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([torch.softmax(model(torch.from_numpy(x[i:i + 2000])), 1)
                          for i in range(0, len(x), 2000)]).numpy()


def accuracy_of(path, data) -> float:
    return float((onnx_predict(path, pixels_to_input(data.test_x))[1].argmax(1) == data.test_y).mean())


def test_file_is_valid_and_describes_itself(onnx_model, checkpoint, mnist):
    onnx.checker.check_model(str(onnx_model), full_check=True)
    meta = read_metadata(onnx_model)
    assert METADATA_KEYS <= set(meta)
    model, ckpt = load_checkpoint(checkpoint)
    assert json.loads(meta["labels"]) == [str(d) for d in range(10)]
    assert json.loads(meta["input"]) == CONTRACT
    assert meta["preset"] == "default"
    assert json.loads(meta["config"]) == json.loads(json.dumps(ckpt["config"]))  # tuples come back as lists
    assert meta["data_sha256"] == mnist.data_sha256
    assert meta["weights_sha256"] == weights_sha256([model])
    assert meta["network3_version"] == training.__version__
    assert re.fullmatch(r"([0-9a-f]{40}(\+dirty)?|unknown)", meta["git_commit"])
    when = dt.datetime.fromisoformat(meta["exported_at"])
    assert when.utcoffset() == dt.timedelta(0) and abs(dt.datetime.now(dt.timezone.utc) - when) < dt.timedelta(days=1)
    proto = onnx.load(str(onnx_model))
    assert meta["opset"] == str(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))
    # The accuracy it carries is the file's own, on all 10,000 test images.
    assert float(meta["test_accuracy"]) == accuracy_of(onnx_model, mnist) > 0.9


def test_graph_signature_and_dynamic_batch(onnx_model, mnist):
    sess = onnx_session(onnx_model)
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type) == ("images", "tensor(float)")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 28, 28]
    assert [(o.name, o.type, o.shape[1:]) for o in sess.get_outputs()] == [
        ("logits", "tensor(float)", [10]), ("probabilities", "tensor(float)", [10])]
    x = pixels_to_input(mnist.test_x[:4096])
    first = None
    for n in (1, 7, 256, 4096):
        logits, probs = sess.run(None, {"images": x[:n]})
        assert logits.shape == probs.shape == (n, 10)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        first = probs[0] if first is None else first
        np.testing.assert_allclose(probs[0], first, atol=1e-6)  # an image's answer does not depend on its batch


def test_parity_with_pytorch_on_every_test_image(onnx_model, checkpoint, mnist):
    """Checked from outside: the written file against the checkpoint rebuilt in PyTorch."""
    model, _ = load_checkpoint(checkpoint)
    x = pixels_to_input(mnist.test_x)
    ref = torch_probabilities(model, x)
    probs = onnx_predict(onnx_model, x)[1]
    assert (probs.argmax(1) == ref.argmax(1)).all()
    assert np.abs(probs - ref).max() <= 1e-5


@pytest.mark.parametrize("fault", ["probability off by 2e-5", "argmax swapped"])
def test_failed_parity_writes_nothing_and_keeps_the_previous_file(tmp_path, monkeypatch, onnx_model, checkpoint,
                                                                  small, fault):
    """Make PyTorch's side disagree (as an exporter bug would): the export is refused, the old file stays."""
    real = export_mod.reference_outputs

    def disagreeing(module, x, batch=1000):
        logits, probs = real(module, x, batch)
        if fault == "argmax swapped":
            top = probs[3].argmax()
            probs[3, [top, (top + 1) % 10]] = probs[3, [(top + 1) % 10, top]]
        else:
            probs[3, 0] += 2e-5
        return logits, probs

    monkeypatch.setattr(export_mod, "reference_outputs", disagreeing)
    out = tmp_path / "model.onnx"
    previous = onnx_model.read_bytes()
    out.write_bytes(previous)
    with pytest.raises(ExportError, match="parity check failed"):
        export_onnx([checkpoint], out, data=small, triton_repo=tmp_path / "triton")
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file, no Triton repo


def test_ensemble_graph_averages_probabilities(tmp_path, checkpoint, second_checkpoint, small):
    out = tmp_path / "ensemble.onnx"
    report = export_onnx([checkpoint, second_checkpoint], out, data=small)
    assert report["members"] == 2 and report["parity"]["argmax_mismatches"] == 0
    proto = onnx.load(str(out))
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == 4  # two members, two conv layers each
    meta = read_metadata(out)
    assert meta["members"] == "2" and len(json.loads(meta["config"])) == 2

    x = pixels_to_input(small.test_x)
    members = [load_checkpoint(c)[0] for c in (checkpoint, second_checkpoint)]
    mean = np.mean([torch_probabilities(m, x) for m in members], axis=0)
    logits, probs = onnx_predict(out, x)
    np.testing.assert_allclose(probs, mean, atol=1e-5)
    assert np.isfinite(logits).all()  # log of the mean, computed without log(0)
    sure = mean > 1e-6
    np.testing.assert_allclose(logits[sure], np.log(mean[sure]), atol=1e-3)
    assert float(meta["test_accuracy"]) == float((probs.argmax(1) == small.test_y).mean())


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, checkpoint, mnist):
    out = tmp_path_factory.mktemp("int8") / "int8.onnx"
    return out, export_onnx([checkpoint], out, quantize="int8", data=mnist)


def test_int8_export_keeps_accuracy_and_shrinks(int8_export, onnx_model, mnist):
    out, report = int8_export
    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    meta = read_metadata(out)
    float32_accuracy = float(read_metadata(onnx_model)["test_accuracy"])
    assert float(meta["test_accuracy"]) == accuracy_of(out, mnist) >= float32_accuracy - 0.001
    quantization = json.loads(meta["quantization"])
    assert quantization["float32_test_accuracy"] == float32_accuracy
    assert quantization["reduce_range"] is True and "7-bit" in quantization["weights"]
    assert out.stat().st_size < 0.5 * onnx_model.stat().st_size
    info = report["int8"]
    assert set(info["images_per_s_batch256"]) == {"float32", "int8"} and info["size_bytes"]["int8"] < info["size_bytes"]["float32"]
    logits, probs = onnx_predict(out, pixels_to_input(mnist.test_x[:7]))
    assert logits.shape == probs.shape == (7, 10)


def test_unsure_threshold_is_calibrated_on_each_files_own_probabilities(onnx_model, int8_export, mnist):
    """float32 and int8 files each carry the threshold that flags UNSURE_RATE of their own
    answers on the test digits; the two differ as their probabilities do."""
    for path in (onnx_model, int8_export[0]):
        probs = onnx_predict(path, pixels_to_input(mnist.test_x))[1]
        top = probs.max(1)
        threshold = float(read_metadata(path)[UNSURE_KEY])
        assert threshold == pytest.approx(calibrate(probs), abs=1e-6)
        assert np.mean(top < threshold) <= UNSURE_RATE < np.mean(top <= threshold)
    assert int8_export[1][UNSURE_KEY] == float(read_metadata(int8_export[0])[UNSURE_KEY])


def test_cli_calibrate_adds_the_threshold_to_an_older_file(tmp_path, onnx_model):
    old = tmp_path / "old.onnx"
    proto = onnx.load(str(onnx_model))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != UNSURE_KEY]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    old.write_bytes(proto.SerializeToString())
    assert UNSURE_KEY not in read_metadata(old)
    r = CliRunner().invoke(cli, ["calibrate", str(old)])
    assert r.exit_code == 0, r.output
    meta = read_metadata(old)
    assert meta[UNSURE_KEY] == read_metadata(onnx_model)[UNSURE_KEY] and "unsure below probability" in r.output
    assert {k: v for k, v in meta.items() if k != UNSURE_KEY} == dict(kept)
    bad = tmp_path / "notes.onnx"
    bad.write_text("not onnx")
    r = CliRunner().invoke(cli, ["calibrate", str(bad)])
    assert r.exit_code == 1 and "Traceback" not in r.output and "not an ONNX file" in r.output


def test_int8_weights_fit_the_reduced_range_so_no_x86_cpu_saturates(int8_export):
    """Why the accuracy above holds on any x86-64 CPU, not only the one running the tests.

    Without AVX-512 VNNI, onnxruntime's uint8 x int8 kernels add two u8*s8 products into a
    saturating int16 (vpmaddubsw).  Weights in onnxruntime's reduced range keep that sum below
    32,767 for every activation value, so the int8 file computes the same on AVX2 and VNNI CPUs.
    """
    qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(onnx.TensorProto.INT8, reduce_range=True))
    assert (qmin, qmax) == (-64, 64)
    assert 2 * 255 * max(-qmin, qmax) <= np.iinfo(np.int16).max
    proto = onnx.load(str(int8_export[0]))
    dequantized = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and i.name in dequantized}
    consumers = {n.op_type for n in proto.graph.node for d in proto.graph.node
                 if d.op_type == "DequantizeLinear" and d.input[0] in weights and d.output[0] in n.input}
    assert {"Conv", "Gemm"} <= consumers  # both conv layers' and the hidden FC layer's weights are int8
    for name, q in weights.items():
        assert qmin <= int(q.min()) and int(q.max()) <= qmax, (name, int(q.min()), int(q.max()))


def test_int8_guard_refuses_a_badly_calibrated_model(tmp_path, checkpoint, small):
    """Calibrated on blank images the input range collapses and accuracy falls: refused, nothing written."""
    blank = dataclasses.replace(small, train_x=np.zeros_like(small.train_x[:1000]))
    with pytest.raises(ExportError, match="int8 refused"):
        export_onnx([checkpoint], tmp_path / "int8.onnx", quantize="int8", data=blank)
    assert list(tmp_path.iterdir()) == []


def test_opset_option_and_bad_arguments(tmp_path, checkpoint, small):
    export_onnx([checkpoint], tmp_path / "op18.onnx", opset=18, data=small)
    assert read_metadata(tmp_path / "op18.onnx")["opset"] == "18"
    for kwargs, message in [(dict(opset=17), "opset 17"), (dict(quantize="int4"), "int4")]:
        with pytest.raises(ExportError, match=message):
            export_onnx([checkpoint], tmp_path / "bad.onnx", data=small, **kwargs)
    with pytest.raises(ExportError, match="no checkpoint"):
        export_onnx([], tmp_path / "bad.onnx", data=small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["op18.onnx"]


def test_cli_export_and_evaluate(tmp_path, checkpoint):
    runner = CliRunner()
    out, repo = tmp_path / "model.onnx", tmp_path / "triton"
    r = runner.invoke(cli, ["export", str(checkpoint), "-o", str(out), "--triton-repo", str(repo)])
    assert r.exit_code == 0, r.output
    assert "0 argmax mismatches" in r.output
    assert (repo / "network3" / "1" / "model.onnx").read_bytes() == out.read_bytes()
    recorded = float(read_metadata(out)["test_accuracy"])

    r = runner.invoke(cli, ["evaluate", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["accuracy"] == recorded

    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    for args, code in [([str(not_a_checkpoint), "-o", str(tmp_path / "x.onnx")], 1),
                       ([str(checkpoint), "-o", str(tmp_path / "x.onnx"), "--opset", "17"], 2),
                       ([str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.onnx")], 2)]:
        r = runner.invoke(cli, ["export", *args])
        assert r.exit_code == code, r.output
        assert "Traceback" not in r.output and r.output.strip().splitlines()[-1].startswith("Error:")
    not_a_checkpoint.with_suffix(".onnx").write_text("not onnx")
    r = runner.invoke(cli, ["evaluate", str(not_a_checkpoint.with_suffix(".onnx"))])
    assert r.exit_code == 1 and "Traceback" not in r.output and "cannot load" in r.output
    assert not (tmp_path / "x.onnx").exists()
