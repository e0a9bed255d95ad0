"""network3-train: data, train, evaluate, export and calibrate.

Only training.data (numpy) is imported at the top.  Each command imports the modules that
bring torch or onnxruntime when it runs: those take seconds to import, and `network3-train -h`,
`--version` and `data` need neither.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .data import DataError, load


class Failure(click.ClickException):
    """A one-line error on stderr and exit code 1: never a traceback for a user's mistake."""

    def format_message(self) -> str:
        return self.message


def _fail(e: Exception) -> Failure:
    return Failure(str(e).splitlines()[0] if str(e) else type(e).__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="network3-train")
def cli() -> None:
    """Train, evaluate and export network3, Nielsen's chapter 6 CNN for MNIST digits."""


@cli.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder with IDX files (or torchvision's MNIST/raw) or Nielsen's mnist.pkl.gz.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def data(data_dir: Path | None, as_json: bool) -> None:
    """Fetch, check and cache MNIST; print where it came from and its hashes."""
    try:
        d = load(data_dir)
    except (DataError, OSError) as e:
        raise _fail(e)
    info = {"source": d.source, "train": len(d.train_x), "val": len(d.val_x), "test": len(d.test_x),
            "data_sha256": d.data_sha256, "files": d.files}
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(f"{d.source}: train {info['train']}, val {info['val']}, test {info['test']}")
        click.echo(f"data_sha256 {d.data_sha256}")
        for name, digest in d.files.items():
            click.echo(f"  {name} sha256 {digest}")


def _preset_names() -> list[str]:
    from .presets import PRESETS
    return list(PRESETS)


@cli.command()
@click.option("--preset", default="default", show_default=True, help="Named config (see --list).")
@click.option("--list", "list_presets", is_flag=True, help="List the presets with their notes and exit.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the preset's number of epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Override the preset's mini-batch size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Override the preset's learning rate.")
@click.option("--weight-decay", type=click.FloatRange(min=0),
              help="Override the preset's L2 weight decay (SGD's weight_decay, on weights, not biases).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="auto picks CUDA, then MPS, then CPU.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bfloat16 autocast on CUDA, float32 elsewhere; bf16 also pays on CPUs with AVX512-BF16/AMX.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for init, shuffling, augmentation.")
@click.option("--limit-train", type=click.IntRange(min=1), help="Train on the first N training images only.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder [default: runs/PRESET].")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt where it stopped.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="As for `data`.")
@click.option("--no-plots", is_flag=True, help="Skip curves.png and errors.png.")
@click.option("--target-accuracy", type=click.FloatRange(0, 1),
              help="Stop once test accuracy reaches this fraction (for time-to-accuracy benchmarks).")
@click.option("--eval-every", type=click.FloatRange(0, 1, min_open=True),
              help="Evaluate every this fraction of an epoch (evaluation time is not counted).")
def train(preset, list_presets, epochs, batch_size, lr, weight_decay, device, precision, seed, limit_train, out, resume, data_dir,
          no_plots, target_accuracy, eval_every) -> None:
    """Train a preset; writes OUT/{best,last}.pt, metrics.jsonl, report.json, curves.png, errors.png."""
    from .presets import PRESETS, get
    if list_presets:
        for name, cfg in PRESETS.items():
            click.echo(f"{name:18} {cfg.notes}")
        return
    if preset not in PRESETS:
        raise click.BadParameter(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}",
                                 param_hint="--preset")
    import torch
    from .train import RunOptions, fit
    try:
        cfg = get(preset, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay)
        opts = RunOptions(out=out or Path("runs") / preset, device=device, seed=seed, limit_train=limit_train,
                          precision=precision, resume=resume, data_dir=data_dir, plots=not no_plots,
                          target_accuracy=target_accuracy, eval_every=eval_every or 1.0)
    except ValueError as e:  # an override the config refuses: a usage error, exit code 2
        raise click.UsageError(str(e))
    try:
        report = fit(cfg, opts)
    except (DataError, OSError, ValueError, RuntimeError, torch.cuda.OutOfMemoryError) as e:
        raise _fail(e)
    except KeyboardInterrupt:
        raise Failure(f"interrupted; continue with --resume (last.pt in {opts.out})")
    if report.get("test_accuracy") is not None:
        click.echo(f"{preset}: test accuracy {report['test_accuracy']:.4f} (epoch {report['best_epoch']}), "
                   f"{report['train_seconds']:.1f}s on {report['device']}; report in {opts.out}/report.json")
    elif report.get("target_reached"):
        r = report["target_reached"]
        click.echo(f"{preset}: reached {r['test_accuracy']:.4f} at epoch {r['epoch']:.2f} "
                   f"after {r['train_seconds']:.2f}s of training on {report['device']}")


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--device", type=click.Choice(["cpu", "cuda", "mps"]), default="cpu", show_default=True,
              help="Device for a checkpoint (ONNX files run on onnxruntime's CPU provider).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="As for `data`.")
def evaluate(model: Path, device: str, as_json: bool, data_dir: Path | None) -> None:
    """Test accuracy, per-digit accuracy and confusion matrix of a checkpoint (.pt) or model (.onnx)."""
    from .evaluate import evaluate as run_eval, format_report, load_predictor
    try:
        d = load(data_dir, verbose=not as_json)
        predict, facts = load_predictor(model, device)
        result = run_eval(predict, d.test_x, d.test_y)
    except (DataError, OSError, ValueError) as e:
        raise _fail(e)
    result.update({"model": str(model), **facts, "eval_data_sha256": d.data_sha256})
    click.echo(json.dumps(result) if as_json else format_report(result))


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .onnx file to write; written only once every check has passed.")
@click.option("--opset", type=click.IntRange(min=18),
              help="ONNX opset (18 or later) [default: the exporter's own].")
@click.option("--quantize", type=click.Choice(["int8"]),
              help="Static int8 quantization calibrated on training images; refused if test accuracy "
                   "drops more than 0.1 percentage point below float32's.")
@click.option("--triton-repo", type=click.Path(file_okay=False, path_type=Path),
              help="Also write a Triton model repository: DIR/network3/config.pbtxt and DIR/network3/1/model.onnx.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="As for `data`.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export(checkpoints, out, opset, quantize, triton_repo, data_dir, as_json) -> None:
    """Export CHECKPOINT(s) to ONNX, checked against PyTorch on the test set (several: one ensemble)."""
    from .export import ExportError, export_onnx
    say = (lambda _m: None) if as_json else (lambda m: click.echo(m, err=True))
    try:
        d = load(data_dir, verbose=not as_json)
        r = export_onnx(list(checkpoints), out, opset=opset, quantize=quantize, triton_repo=triton_repo,
                        data=d, log=say)
    except (DataError, ExportError, OSError, ValueError) as e:  # ExportError: refused, nothing written
        raise _fail(e)
    if as_json:
        click.echo(json.dumps(r))
        return
    p = r["parity"]
    click.echo(f"{out}: {r['size_bytes']:,} bytes, opset {r['opset']}, {r['members']} net(s), "
               f"test accuracy {r['test_accuracy']:.4f}")
    click.echo(f"parity with PyTorch on {p['images']:,} images: {p['argmax_mismatches']} argmax mismatches, "
               f"max |probability difference| {p['max_abs_diff_probabilities']:.2g}")
    if "int8" in r:
        q = r["int8"]
        click.echo(f"int8 vs float32: accuracy {q['test_accuracy']:.4f} vs {q['float32_test_accuracy']:.4f}, "
                   f"size {q['size_bytes']['int8']:,} vs {q['size_bytes']['float32']:,} bytes, "
                   f"batch 256 {q['images_per_s_batch256']['int8']:,} vs {q['images_per_s_batch256']['float32']:,} "
                   f"images/s")
    if "triton_repo" in r:
        click.echo(f"Triton model repository: {r['triton_repo']}")


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="As for `data`.")
def calibrate(model: Path, data_dir: Path | None) -> None:
    """Write MODEL's `unsure` threshold into its metadata (export does; this is for older files)."""
    from .export import ExportError, calibrate_file
    try:
        calibrate_file(model, load(data_dir, verbose=False), log=lambda m: click.echo(f"{model}: {m}"))
    except (DataError, ExportError, OSError, ValueError) as e:
        raise _fail(e)


def main() -> None:
    try:
        cli(prog_name="network3-train")
    except ModuleNotFoundError as e:  # a server host's install: the [train] extra is missing
        click.echo(f"network3-train: {e.name} is not installed; training needs the [train] extra: "
                   "pip install 'network3[train]'", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
