"""Train a network3 preset: data resident on the device, batched augmentation, resumable.

No DataLoader: the whole data set is a uint8 tensor on the device and a batch is an index
into it, so the hot loop does no per-sample Python.  Each epoch writes `last.pt` (atomic)
and, when validation improves, `best.pt`; `--resume` continues from `last.pt` exactly (model,
optimiser, schedule, epoch and the generator that shuffles and augments).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from serving.preprocess import SCALE
from . import data as data_mod
from .evaluate import evaluate, summarize, scores, torch_predict
from .model import Config, Network3, count_parameters, loss_fn, param_groups

# 2: batch norm moved after the pool, so a version-1 net with batch norm no longer fits Network3.
CHECKPOINT_VERSION = 2


@dataclasses.dataclass
class RunOptions:
    out: Path
    device: str = "auto"
    seed: int = 0
    limit_train: int | None = None
    resume: bool = False
    data_dir: str | None = None
    plots: bool = True
    quiet: bool = False
    # Stop as soon as test accuracy reaches this (bench-train's "time to accuracy"); None: never.
    target_accuracy: float | None = None
    # "auto": bfloat16 autocast on CUDA, float32 elsewhere; "fp32" or "bf16" to choose.
    precision: str = "auto"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: no MPS device is available")
    return torch.device(name)


# ------------------------------------------------------------ augmentation ----

def random_affine(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Batched random rotation (+-10 deg), scale (0.9-1.1), shear and shift (+-2 px) on the device."""
    n = x.shape[0]
    r = torch.rand(n, 5, generator=gen, device=gen.device).to(x.device) * 2 - 1
    angle = r[:, 0] * math.radians(10)
    scale = 1 + 0.1 * r[:, 1]
    shear = r[:, 2] * 0.15
    tx, ty = r[:, 3] * (2 / 14), r[:, 4] * (2 / 14)  # grid units: 14 px per unit
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


class Ema:
    """Exponential moving average of the weights: the net that is evaluated and delivered.

    The weights after SGD's last step are a noisy sample; their average over the last
    ~1/(1 - decay) steps is a better net, most of all early (here `default` first reaches 98.9%
    after about 0.5 epochs instead of 0.6-0.7).  Batch norm's running statistics are averaged
    too, so they describe the averaged weights (copying them instead cost a tenth of an epoch).
    The decay warms up as (1 + step) / (10 + step) until it reaches `decay`, so a short run is
    not an average dominated by its random start.  One fused lerp a step: about 0.1 ms here.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        floats = [(a, b) for a, b in zip(self.module.state_dict().values(), model.state_dict().values())
                  if a.is_floating_point()]
        self._pairs = ([a for a, _ in floats], [b for _, b in floats])

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(*self._pairs, 1 - decay)


# ------------------------------------------------------------ checkpoints ----

def atomic_save(obj: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data_mod.atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Network3, dict]:
    """Rebuild the net from the config stored beside its weights. weights_only: no code runs."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        cfg = Config.from_dict(ckpt["config"])
        old = ckpt.get("version", 1) < 2 and cfg.batchnorm
        if not old:
            model = Network3(cfg)
            model.load_state_dict(ckpt["model"])
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle errors, zip errors, missing keys: one clear line
        raise ValueError(f"{path}: not a network3 checkpoint ({str(e).splitlines()[0][:200]})") from None
    if old:
        raise ValueError(f"{path}: a version-1 checkpoint with batch norm before the pool, which this network3 "
                         "no longer builds; retrain it (its exported .onnx still serves)")
    return model.to(device).eval(), ckpt


# ------------------------------------------------------------ progress ----

class Progress:
    """A live line on a terminal; plain lines (one per epoch) in a pipe or CI."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def step(self, text: str) -> None:
        if self.tty and not self.quiet:
            print(f"\r{text}\x1b[K", end="", file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        if not self.quiet:
            print(("\r" if self.tty else "") + text + ("\x1b[K" if self.tty else ""), file=sys.stderr, flush=True)


# ------------------------------------------------------------ training ----

def make_optimizer(cfg: Config, model: torch.nn.Module, steps: int):
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr)
    elif cfg.optimizer == "nesterov":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=cfg.warmup)
    elif cfg.schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    return opt, sched


def fit(cfg: Config, opts: RunOptions, mnist: data_mod.Mnist | None = None) -> dict:
    """Train, checkpoint, evaluate, report. Returns the report dict (also written to report.json)."""
    device = pick_device(opts.device)
    torch.manual_seed(opts.seed)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(opts.quiet)
    mnist = mnist or data_mod.load(opts.data_dir, verbose=not opts.quiet)

    x_np, y_np = mnist.split(cfg.train_split)
    if opts.limit_train:
        x_np, y_np = x_np[:opts.limit_train], y_np[:opts.limit_train]
    if cfg.expand:
        x_np, y_np = data_mod.expand(x_np, y_np)
    has_val = cfg.train_split == "train" and len(mnist.val_x) > 0
    # uint8 on the device: a quarter of the memory of floats; scaled per batch with the contract's SCALE.
    x_all = torch.from_numpy(np.ascontiguousarray(x_np)).to(device).unsqueeze(1)
    y_all = torch.from_numpy(y_np.astype(np.int64)).to(device)
    n = len(x_all)
    steps_per_epoch = n // cfg.batch_size  # network3.py drops the last partial batch too
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training images is less than one batch of {cfg.batch_size}")

    # channels_last: oneDNN's (and cuDNN's) fast convolution layout; on this 2-core CPU the
    # training step ran 1.35x faster with it.  Checkpoints hold plain tensors either way.
    fmt = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
    model = Network3(cfg).to(device, memory_format=fmt)
    opt, sched = make_optimizer(cfg, model, steps_per_epoch * cfg.epochs)
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    # Augmentation draws its random numbers where the batch lives: on CUDA a host-side draw is a
    # copy from pageable memory every step, which waits for the GPU and stalls the launch queue.
    # On a CPU (and MPS) it is the same generator, so CPU runs keep their seeds' results.
    aug_gen = torch.Generator(device=device).manual_seed(opts.seed) if device.type == "cuda" else gen
    if opts.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown precision {opts.precision!r}; choose auto, fp32 or bf16")
    use_amp = opts.precision == "bf16" or (opts.precision == "auto" and device.type == "cuda")
    ema = Ema(model, cfg.ema) if cfg.ema else None
    net = ema.module if ema else model  # the net that is evaluated, checkpointed as "model" and exported
    start_epoch, history, best = 0, [], {"val_accuracy": -1.0, "epoch": 0}
    train_seconds = 0.0

    if opts.resume and (out / "last.pt").exists():
        try:
            ckpt = torch.load(out / "last.pt", map_location=device, weights_only=True)
        except Exception as e:  # pickle errors (a file that carries code), zip errors: one clear line
            raise ValueError(f"{out / 'last.pt'}: not a network3 checkpoint ({str(e).splitlines()[0][:200]})") from None
        if Config.from_dict(ckpt["config"]) != cfg:
            raise ValueError(f"{out / 'last.pt'}: its config differs from this run's; resume with the same options")
        model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
        if ema:
            ema.module.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        # map_location moved every tensor to the device; generator states must be CPU byte tensors.
        gen.set_state(ckpt["rng"]["generator"].cpu())
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if aug_gen is not gen and "augment" in ckpt["rng"]:  # absent from CUDA checkpoints before it
            aug_gen.set_state(ckpt["rng"]["augment"].cpu())
        if "cuda" in ckpt["rng"] and device.type == "cuda":  # dropout's masks on a GPU
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), device)
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        train_seconds = ckpt.get("train_seconds", 0.0)
        progress.line(f"resumed {out / 'last.pt'} at epoch {start_epoch}")

    def ckpt_dict(epoch: int) -> dict:
        return {
            "version": CHECKPOINT_VERSION, "preset": cfg.preset, "config": cfg.to_dict(),
            "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            # With an average, the optimiser's own weights too: --resume continues from them.
            **({"train_model": model.state_dict()} if ema else {}),
            "epoch": epoch, "history": history, "best": best, "train_seconds": train_seconds,
            "rng": {"generator": gen.get_state(), "torch": torch.get_rng_state(),
                    **({"augment": aug_gen.get_state(), "cuda": torch.cuda.get_rng_state(device)}
                       if device.type == "cuda" else {})},
            "data_sha256": mnist.data_sha256, "seed": opts.seed,
            "val_accuracy": history[-1]["val_accuracy"] if history else None,
            "test_accuracy": history[-1]["test_accuracy"] if history else None,
        }

    predict = torch_predict(net, device)

    def accuracy(split: str) -> float:
        px, py = mnist.split(split)
        return float((scores(predict, px).argmax(1) == py).mean())

    eval_points = max(1, round(1 / cfg.eval_every)) if cfg.eval_every < 1 else 1
    reached = None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen).to(device) if cfg.shuffle else torch.arange(n, device=device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        augment = cfg.augment == "affine" and epoch < cfg.epochs - cfg.clean_epochs
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb = x_all[idx].float().mul_(SCALE)
            yb = y_all[idx]
            if augment:
                xb = random_affine(xb, aug_gen)
            xb = xb.contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(xb)
                loss = loss_fn(cfg, logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema:
                ema.update(sched.last_epoch)  # the scheduler counts steps, and resumes with them
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
            # Sub-epoch evaluation (bench-train's time-to-accuracy): the clock stops while we evaluate.
            if eval_points > 1 and (step + 1) % (steps_per_epoch // eval_points) == 0 and step + 1 < steps_per_epoch:
                train_seconds += _elapsed(t0, device)
                model.eval()
                acc = accuracy("test")
                model.train()
                history.append({"epoch": epoch + (step + 1) / steps_per_epoch, "test_accuracy": acc,
                                "train_seconds": round(train_seconds, 3), "partial": True})
                if opts.target_accuracy and acc >= opts.target_accuracy:
                    reached = history[-1]
                    break
                t0 = time.perf_counter()
            if progress.tty and step % 50 == 0:
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                progress.step(f"epoch {epoch + 1}/{cfg.epochs} {100 * step // steps_per_epoch:3d}% "
                              f"loss {loss.item():.4f} {rate:,.0f} img/s")
        train_seconds += _elapsed(t0, device)
        if reached:
            break
        model.eval()
        val_acc = accuracy("val") if has_val else None
        test_acc = accuracy("test")
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": float(loss_sum) / seen,
               "train_accuracy": float(correct) / seen, "val_accuracy": val_acc, "test_accuracy": test_acc,
               "seconds": round(time.perf_counter() - t0, 3), "train_seconds": round(train_seconds, 3)}
        history.append(row)
        improved = (val_acc is None) or val_acc > best["val_accuracy"]
        if improved:
            best = {"val_accuracy": val_acc if val_acc is not None else -1.0, "epoch": epoch + 1,
                    "test_accuracy": test_acc}
        state = ckpt_dict(epoch + 1)
        atomic_save(state, out / "last.pt")
        if improved:
            atomic_save(state, out / "best.pt")
        _write_metrics(out, history)
        progress.line(f"epoch {epoch + 1}/{cfg.epochs} loss {row['train_loss']:.4f} "
                      f"train {row['train_accuracy']:.4f} val {_fmt(val_acc)} test {test_acc:.4f} "
                      f"({row['seconds']:.1f}s, {seen / max(row['seconds'], 1e-9):,.0f} img/s)")
        if opts.target_accuracy and test_acc >= opts.target_accuracy:
            reached = row
            break

    report = _report(cfg, opts, mnist, device, use_amp, out, history, best, train_seconds, reached)
    report["history"] = history  # returned to callers (bench-train), not written to report.json
    return report


def _elapsed(t0: float, device: torch.device) -> float:
    """Seconds since t0 once the device has finished the work queued so far.

    A GPU runs behind the Python that queues its work; without the wait, the steps still in
    the queue would be timed as part of the evaluation that follows, not as training.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _write_metrics(out: Path, history: list[dict]) -> None:
    keys = ("epoch", "lr", "train_loss", "train_accuracy", "val_accuracy", "test_accuracy", "seconds")
    lines = "".join(json.dumps({k: r.get(k) for k in keys}) + "\n" for r in history if not r.get("partial"))
    data_mod.atomic_write(out / "metrics.jsonl", lambda f: f.write(lines.encode()))


def _report(cfg, opts, mnist, device, use_amp, out, history, best, train_seconds, reached) -> dict:
    from .presets import BOOK_ACCURACY
    report = {
        "preset": cfg.preset, "config": cfg.to_dict(), "seed": opts.seed,
        "epochs": len([r for r in history if not r.get("partial")]),
        "train_seconds": round(train_seconds, 2), "device": str(device),
        "precision": "bf16" if use_amp else "fp32",
        "torch": torch.__version__, "data_sha256": mnist.data_sha256, "data_source": mnist.source,
        "data_files": mnist.files, "book_accuracy": BOOK_ACCURACY.get(cfg.preset),
        "target_reached": reached,
    }
    if reached is not None or not (out / "best.pt").exists():
        report["best_epoch"] = None
        return report  # bench runs stop early and keep no report files
    model, ckpt = load_checkpoint(out / "best.pt", device)
    result = evaluate(torch_predict(model, device), mnist.test_x, mnist.test_y)
    report.update({
        "best_epoch": ckpt["epoch"], "val_accuracy": ckpt["val_accuracy"], "test_accuracy": result["accuracy"],
        "per_digit_accuracy": result["per_digit_accuracy"], "confusion": result["confusion"],
        "parameters": count_parameters(model),
    })
    data_mod.atomic_write(out / "report.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    if opts.plots:
        from .plots import plot_curves, plot_errors
        plot_curves(history, out / "curves.png", title=cfg.preset)
        pred = scores(torch_predict(model, device), mnist.test_x).argmax(1)
        plot_errors(mnist.test_x, mnist.test_y, pred, out / "errors.png")
    return report
