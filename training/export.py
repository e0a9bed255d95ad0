"""Checkpoint(s) -> one self-describing ONNX file, proven equal to the PyTorch net before it is written.

    export_onnx([runs/default/best.pt], models/default.onnx)

The graph: input `images` float32 [N,1,28,28] (the `serving.preprocess` contract), outputs
`logits` and `probabilities` float32 [N,10], N dynamic.  Several checkpoints make one ensemble
graph: probabilities are the mean of the members' softmaxes, logits the log of that mean.

Nothing reaches `out` until every check passed: the graph is exported in memory, run with
onnxruntime on all 10,000 test images against the same computation in PyTorch (same argmax on
every image, probabilities within 1e-5), run at batch sizes 1, 7, 256 and 4096, given its
metadata and checked with `onnx.checker` (full_check); then it goes to a temporary file beside
`out` and `os.replace` puts it in place.  `--quantize int8` swaps the parity rule for an
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
from torch import nn

from serving.contract import INPUT_CONTRACT as CONTRACT
from serving.preprocess import pixels_to_input
from . import __version__
from .data import Mnist, atomic_write

LABELS = [str(d) for d in range(10)]
OUTPUTS = ("logits", "probabilities")
PARITY_ATOL = 1e-5  # onnxruntime vs PyTorch, on every probability of every test image
CHECK_BATCHES = (1, 7, 256, 4096)  # the dynamic batch dimension must run at all of these
MAX_BATCH = max(CHECK_BATCHES)  # the largest batch proven at export: Triton's max_batch_size
# torch's exporter implements opset 18 and later; it converts down for older ones and that
# conversion is not reliable (ReduceLogSumExp fails at 17), so we refuse instead of guessing.
MIN_OPSET = 18
TRITON_NAME = "network3"

Log = Callable[[str], None]


class ExportError(ValueError):
    """An export refused: bad arguments, bad checkpoint, failed parity or accuracy guard."""


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
    from .train import load_checkpoint  # weights_only load, config rebuilt, eval mode
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

def onnx_session(model: str | Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; threads default to torch's setting so tests and benchmarks control both at once."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types: turn them into one clear line
        where = "model" if isinstance(model, bytes) else str(model)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{where}: onnxruntime cannot load it ({first[:200]})") from None


def onnx_predict(model: str | Path | ort.InferenceSession, x: np.ndarray, batch: int = 1000
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) for float32 [N,1,28,28], run in slices of `batch` images."""
    sess = model if isinstance(model, ort.InferenceSession) else onnx_session(model)
    name = sess.get_inputs()[0].name
    outs = [sess.run(list(OUTPUTS), {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def read_metadata(path: str | Path) -> dict[str, str]:
    return dict(onnx_session(path, threads=1).get_modelmeta().custom_metadata_map)


def onnx_predictor(path: str | Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """For `network3-train evaluate model.onnx`: a predict function (images -> probabilities) and facts."""
    sess = onnx_session(path)
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    facts = {"preset": meta.get("preset"), "data_sha256": meta.get("data_sha256"),
             "recorded_test_accuracy": float(meta["test_accuracy"]) if "test_accuracy" in meta else None}
    return (lambda x: onnx_predict(sess, x)[1]), facts


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
    if inp.name != CONTRACT["name"] or inp.type != "tensor(float)" or list(inp.shape[1:]) != CONTRACT["shape"][1:] \
            or not isinstance(inp.shape[0], str):
        raise ExportError(f"graph input {inp.name} {inp.type} {inp.shape} does not match the contract {CONTRACT}")
    if [o.name for o in sess.get_outputs()] != list(OUTPUTS):
        raise ExportError(f"graph outputs {[o.name for o in sess.get_outputs()]}, expected {list(OUTPUTS)}")
    rng = np.random.default_rng(0)
    for n in batches:
        x = rng.random((n, *CONTRACT["shape"][1:]), dtype=np.float32)
        shapes = [o.shape for o in sess.run(list(OUTPUTS), {inp.name: x})]
        if shapes != [(n, 10), (n, 10)]:
            raise ExportError(f"batch of {n}: outputs have shapes {shapes}, expected [{n}, 10]")


# ------------------------------------------------------------ export ----

def to_onnx(module: nn.Module, opset: int | None) -> onnx.ModelProto:
    """torch.onnx's dynamo exporter, batch dimension declared dynamic, traced with a batch of 2."""
    # The exporter warns once per missing torchvision op; we use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        program = torch.onnx.export(
            module.eval(), (torch.zeros(2, *CONTRACT["shape"][1:]),), dynamo=True, opset_version=opset,
            input_names=[CONTRACT["name"]], output_names=list(OUTPUTS), dynamic_shapes={"images": {0: batch}},
            external_data=False, verbose=False)
    except Exception as e:  # the exporter's many error types: one line for the CLI
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.onnx.export failed: {first[:300]}") from e
    return program.model_proto


def set_metadata(model: onnx.ModelProto, meta: dict[str, object]) -> None:
    """metadata_props: strings as they are, everything else as JSON."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        text = value if isinstance(value, str) else json.dumps(value)
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, text


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


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
        from .data import load
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
        "labels": LABELS, "input": CONTRACT, "preset": ",".join(presets),
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

    if quantize:
        from .quantize import quantize_int8
        proto, report["int8"] = quantize_int8(proto, data, float32_accuracy=accuracy, log=log)
        report["test_accuracy"] = report["int8"]["test_accuracy"]
    write_checked(proto, out)
    report["size_bytes"] = out.stat().st_size
    if triton_repo is not None:
        report["triton_repo"] = str(write_triton_repo(out, Path(triton_repo)))
    t_end = time.perf_counter()
    report["timing"] = {"export_s": round(t_export - t0, 3), "check_s": round(t_check - t_export, 3),
                        "total_s": round(t_end - t0, 3)}
    log(f"wrote {out} ({report['size_bytes']:,} bytes, test accuracy {report['test_accuracy']:.4f})")
    return report


# ------------------------------------------------------------ Triton ----

def triton_config(path: Path, max_batch: int = MAX_BATCH) -> str:
    """config.pbtxt for Triton's onnxruntime backend, read from the file's own inputs and outputs."""
    sess = onnx_session(path, threads=1)
    types = {"tensor(float)": "TYPE_FP32"}

    def tensor(t) -> str:
        dims = ", ".join(str(d) for d in t.shape[1:])  # max_batch_size > 0: the batch dim is implicit
        label = ' label_filename: "labels.txt"' if t.name == "probabilities" else ""
        return f'  {{ name: "{t.name}" data_type: {types[t.type]} dims: [ {dims} ]{label} }}'

    return "\n".join([
        f'name: "{TRITON_NAME}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch}",
        "input [", ",\n".join(tensor(t) for t in sess.get_inputs()), "]",
        "output [", ",\n".join(tensor(t) for t in sess.get_outputs()), "]",
        "dynamic_batching { max_queue_delay_microseconds: 1000 }", "",
    ])


def write_triton_repo(model: Path, repo: Path) -> Path:
    """repo/network3/{1/model.onnx,labels.txt,config.pbtxt}, each file atomic, the config (Triton's cue) last."""
    folder = repo / TRITON_NAME
    (folder / "1").mkdir(parents=True, exist_ok=True)
    files = {folder / "1" / "model.onnx": model.read_bytes(),
             folder / "labels.txt": ("\n".join(LABELS) + "\n").encode(),
             folder / "config.pbtxt": triton_config(model).encode()}
    for path, content in files.items():
        atomic_write(path, lambda f, content=content: f.write(content))
    return folder
