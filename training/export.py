"""Checkpoint(s) -> one self-describing ONNX file, proven equal to the PyTorch net before it is written.

    export_onnx([runs/default/best.pt], models/default.onnx)

The graph: input `images` float32 [N,1,28,28] (`serving.contract`'s INPUT_CONTRACT), outputs
`logits` and `probabilities` float32 [N,10], N dynamic.  Several checkpoints make one ensemble
graph: probabilities are the mean of the members' softmaxes, logits the log of that mean.

Nothing reaches `out` until every check passed: the graph is exported in memory, run with
onnxruntime on all 10,000 test images against the same computation in PyTorch (same argmax on
every image, probabilities within 1e-5), run at batch sizes 1, 7, 256 and 4096, given its
metadata and checked with `onnx.checker` (full_check); then it goes to a temporary file beside
`out` and `os.replace` puts it in place.  The metadata includes the model's `unsure_below`
threshold, calibrated on the file's own probabilities for the same test images
(serving/unsure.py); `calibrate_file` adds it to a file exported before.  `--quantize int8` swaps the parity rule for an
accuracy guard (see `training/quantize.py`).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf import text_format
from torch import nn

from protos.inference import model_config_pb2 as mc
from serving.contract import (CLASSES, INPUT_CONTRACT, INPUT_NAME, INPUT_SHAPE, LABELS, MODEL_NAME, OUTPUT_NAMES,
                              UNSURE_KEY, UNSURE_RATE)
from serving.preprocess import pixels_to_input
from serving.unsure import calibrate
from . import __version__
from .checkpoint import load_checkpoint
from .data import Mnist, atomic_write, load
from .onnxrt import ExportError, onnx_predict, onnx_session, opset_of, set_metadata
from .quantize import quantize_int8

PARITY_ATOL = 1e-5  # onnxruntime vs PyTorch, on every probability of every test image
CHECK_BATCHES = (1, 7, 256, 4096)  # the dynamic batch dimension must run at all of these
MAX_BATCH = max(CHECK_BATCHES)  # the largest batch proven at export: Triton's max_batch_size
# torch's exporter implements opset 18 and later; it converts down for older ones and that
# conversion is not reliable (ReduceLogSumExp fails at 17), so we refuse instead of guessing.
MIN_OPSET = 18
# Triton's dynamic batcher waits this long for more requests before it runs a batch.
TRITON_QUEUE_DELAY_US = 1000

Log = Callable[[str], None]


# ------------------------------------------------------------ the exported computation ----

class Exported(nn.Module):
    """images -> (logits, probabilities): what the ONNX graph computes, and PyTorch's reference for it."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.members) == 1:
            logits = self.members[0](images)
            return logits, torch.softmax(logits, dim=1)
        # log(mean(p_i)) computed as logsumexp(log p_i) - log k: a confident member's tiny
        # probabilities would underflow to 0 in float32 and make log(mean) -inf.
        logp = torch.stack([torch.log_softmax(m(images), dim=1) for m in self.members])
        logits = torch.logsumexp(logp, dim=0) - math.log(len(self.members))
        return logits, torch.exp(logits)


def load_members(checkpoints: list[Path]) -> tuple[list[nn.Module], list[dict]]:
    models, ckpts = [], []
    for path in checkpoints:
        if not Path(path).is_file():
            raise ExportError(f"{path}: no such checkpoint")
        try:
            model, ckpt = load_checkpoint(path, "cpu")
        except ValueError as e:  # not a checkpoint, or not one of ours: already one clear line
            raise ExportError(str(e)) from None
        models.append(model.eval())
        ckpts.append(ckpt)
    return models, ckpts


def weights_sha256(models: list[nn.Module]) -> str:
    """sha256 over every member's state_dict (name, dtype, shape, bytes), in order."""
    h = hashlib.sha256()
    for i, model in enumerate(models):
        for name, t in model.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def git_commit() -> str:
    """HEAD of the repository this code runs from, '+dirty' if tracked files changed; 'unknown' without git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# ------------------------------------------------------------ onnxruntime side ----

def reference_outputs(module: nn.Module, x: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's (logits, probabilities) for the parity check."""
    with torch.inference_mode():
        outs = [module(torch.from_numpy(x[i:i + batch])) for i in range(0, len(x), batch)]
    return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()


def parity(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> dict:
    """The export rule's figures: argmax disagreements and largest absolute differences."""
    return {
        "images": int(len(ref[1])),
        "argmax_mismatches": int((ref[1].argmax(1) != got[1].argmax(1)).sum()),
        "max_abs_diff_probabilities": float(np.abs(ref[1] - got[1]).max()),
        "max_abs_diff_logits": float(np.abs(ref[0] - got[0]).max()),
        "atol": PARITY_ATOL,
    }


def check_signature(sess: ort.InferenceSession, batches=CHECK_BATCHES) -> None:
    """Names, types and shapes match the contract, and every batch size in `batches` runs."""
    (inp,) = sess.get_inputs()
    if inp.name != INPUT_NAME or inp.type != "tensor(float)" or tuple(inp.shape[1:]) != INPUT_SHAPE \
            or not isinstance(inp.shape[0], str):
        raise ExportError(f"graph input {inp.name} {inp.type} {inp.shape} does not match the contract "
                          f"{INPUT_CONTRACT}")
    if [o.name for o in sess.get_outputs()] != list(OUTPUT_NAMES):
        raise ExportError(f"graph outputs {[o.name for o in sess.get_outputs()]}, expected {list(OUTPUT_NAMES)}")
    rng = np.random.default_rng(0)
    for n in batches:
        x = rng.random((n, *INPUT_SHAPE), dtype=np.float32)
        shapes = [o.shape for o in sess.run(list(OUTPUT_NAMES), {inp.name: x})]
        if shapes != [(n, CLASSES)] * len(OUTPUT_NAMES):
            raise ExportError(f"batch of {n}: outputs have shapes {shapes}, expected [{n}, {CLASSES}]")


# ------------------------------------------------------------ export ----

def to_onnx(module: nn.Module, opset: int | None) -> onnx.ModelProto:
    """torch.onnx's dynamo exporter, batch dimension declared dynamic, traced with a batch of 2."""
    # The exporter warns once per missing torchvision op; we use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        program = torch.onnx.export(
            module.eval(), (torch.zeros(2, *INPUT_SHAPE),), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_shapes={INPUT_NAME: {0: batch}},
            external_data=False, verbose=False)
    except Exception as e:  # the exporter's many error types: one line for the CLI
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.onnx.export failed: {first[:300]}") from e
    return program.model_proto


def write_checked(model: onnx.ModelProto, out: Path) -> None:
    """The full onnx check, then temp file + os.replace (data.atomic_write): `out` is never partial."""
    onnx.checker.check_model(model, full_check=True)
    atomic_write(out, lambda f: f.write(model.SerializeToString()))


def export_onnx(checkpoints: list[Path], out: Path, *, opset: int | None = None, quantize: str | None = None,
                triton_repo: Path | None = None, data: Mnist | None = None, log: Log = lambda _m: None) -> dict:
    """Export, check, describe, write. Returns a report; raises ExportError (nothing written) on failure."""
    t0 = time.perf_counter()
    checkpoints, out = [Path(c) for c in checkpoints], Path(out)
    if not checkpoints:
        raise ExportError("no checkpoint given")
    if quantize not in (None, "int8"):
        raise ExportError(f"unknown quantization {quantize!r}; the only one is int8")
    if opset is not None and not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset} is not supported; choose {MIN_OPSET} to {onnx.defs.onnx_opset_version()}")
    models, ckpts = load_members(checkpoints)
    module = Exported(models).eval()
    if data is None:
        data = load(verbose=False)
    for path, ckpt in zip(checkpoints, ckpts):
        if ckpt.get("data_sha256") and ckpt["data_sha256"] != data.data_sha256:
            log(f"warning: {path} was trained on data {ckpt['data_sha256'][:16]}, "
                f"checking on {data.data_sha256[:16]}")

    log(f"exporting {len(models)} net(s) with torch.onnx (dynamo)")
    proto = to_onnx(module, opset)
    t_export = time.perf_counter()

    # Parity on the in-memory graph: the file written below differs from it only in metadata.
    log(f"checking parity with PyTorch on {len(data.test_x):,} test images")
    x = pixels_to_input(data.test_x)
    sess = onnx_session(proto.SerializeToString())
    check_signature(sess)
    got = onnx_predict(sess, x)
    figures = parity(reference_outputs(module, x), got)
    if figures["argmax_mismatches"] or not figures["max_abs_diff_probabilities"] <= PARITY_ATOL:
        raise ExportError(f"parity check failed, nothing written: {figures['argmax_mismatches']} argmax mismatches, "
                          f"max |dp| {figures['max_abs_diff_probabilities']:.3g} (limit {PARITY_ATOL:g})")
    accuracy = float((got[1].argmax(1) == data.test_y).mean())
    log(f"parity ok: max |dp| {figures['max_abs_diff_probabilities']:.2g}, test accuracy {accuracy:.4f}")
    t_check = time.perf_counter()

    presets = sorted({c.get("preset") or c["config"].get("preset", "custom") for c in ckpts})
    configs = [c["config"] for c in ckpts]
    meta = {
        "labels": list(LABELS), "input": INPUT_CONTRACT, "preset": ",".join(presets),
        # one config dict for a single net; a list, one per member, for an ensemble
        "config": configs[0] if len(configs) == 1 else configs,
        "test_accuracy": json.dumps(accuracy), "data_sha256": data.data_sha256, "git_commit": git_commit(),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_sha256": weights_sha256(models), "opset": str(opset_of(proto)),
        "network3_version": __version__, "members": str(len(models)),
    }
    set_metadata(proto, meta)
    proto.doc_string = f"network3 MNIST digit classifier ({meta['preset']}, {len(models)} net(s))"
    report = {"path": str(out), "members": len(models), "opset": opset_of(proto), "test_accuracy": accuracy,
              "parity": figures, "batch_sizes": list(CHECK_BATCHES)}

    probs = got[1]
    if quantize:
        proto, report["int8"] = quantize_int8(proto, data, float32_accuracy=accuracy, log=log)
        report["test_accuracy"] = report["int8"]["test_accuracy"]
        probs = onnx_predict(onnx_session(proto.SerializeToString()), x)[1]  # int8's own confidences
    report[UNSURE_KEY] = unsure_threshold(proto, probs, log)
    write_checked(proto, out)
    report["size_bytes"] = out.stat().st_size
    if triton_repo is not None:
        report["triton_repo"] = str(write_triton_repo(out, Path(triton_repo)))
    t_end = time.perf_counter()
    report["timing"] = {"export_s": round(t_export - t0, 3), "check_s": round(t_check - t_export, 3),
                        "total_s": round(t_end - t0, 3)}
    log(f"wrote {out} ({report['size_bytes']:,} bytes, test accuracy {report['test_accuracy']:.4f})")
    return report


# ------------------------------------------------------------ unsure ----

def unsure_threshold(proto: onnx.ModelProto, probs: np.ndarray, log: Log) -> float:
    """Calibrate the `unsure` threshold on these probabilities (the graph's own, on MNIST's
    test digits, which no preset trains on) and write it into the metadata."""
    threshold = calibrate(probs)
    set_metadata(proto, {UNSURE_KEY: threshold})
    log(f"unsure below probability {threshold:.4f}: flags {UNSURE_RATE:.0%} of the test digits or fewer")
    return threshold


def calibrate_file(path: Path, data: Mnist | None = None, log: Log = lambda _m: None) -> float:
    """Add (or recompute) the `unsure` threshold of an exported file in place, the rest of it
    untouched: for files exported before the threshold existed."""
    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError, OSError...: one line for the CLI
        raise ExportError(f"{path}: not an ONNX file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})")
    data = data if data is not None else load(verbose=False)
    probs = onnx_predict(onnx_session(path), pixels_to_input(data.test_x))[1]
    threshold = unsure_threshold(proto, probs, log)
    write_checked(proto, path)
    return threshold


# ------------------------------------------------------------ Triton ----

def triton_config(path: Path, max_batch: int = MAX_BATCH) -> str:
    """config.pbtxt for Triton's onnxruntime backend, read from the file's own inputs and outputs.

    Built as Triton's ModelConfig message and printed by protobuf's text_format, so the text is
    valid by construction: a field Triton does not know cannot be written.
    """
    sess = onnx_session(path, threads=1)
    types = {"tensor(float)": mc.TYPE_FP32}
    config = mc.ModelConfig(name=MODEL_NAME, backend="onnxruntime", max_batch_size=max_batch)
    config.dynamic_batching.max_queue_delay_microseconds = TRITON_QUEUE_DELAY_US
    # max_batch_size > 0: Triton adds the batch dimension itself, so dims leave it out.
    for t in sess.get_inputs():
        config.input.add(name=t.name, data_type=types[t.type], dims=t.shape[1:])
    for t in sess.get_outputs():
        out = config.output.add(name=t.name, data_type=types[t.type], dims=t.shape[1:])
        if t.name == OUTPUT_NAMES[1]:  # probabilities: Triton's classification extension reads the labels
            out.label_filename = "labels.txt"
    return text_format.MessageToString(config)


def write_triton_repo(model: Path, repo: Path) -> Path:
    """repo/network3/{1/model.onnx,labels.txt,config.pbtxt}, each file atomic, the config (Triton's cue) last."""
    folder = repo / MODEL_NAME
    (folder / "1").mkdir(parents=True, exist_ok=True)
    files = {folder / "1" / "model.onnx": model.read_bytes(),
             folder / "labels.txt": ("\n".join(LABELS) + "\n").encode(),
             folder / "config.pbtxt": triton_config(model).encode()}
    for path, content in files.items():
        atomic_write(path, lambda f, content=content: f.write(content))
    return folder
