"""Train a network3 preset: data resident on the device, batched augmentation, resumable.

The shape of pytorch/examples' mnist/main.py: a loader, `train_epoch`, `split_accuracy`, and
`fit` calling them once an epoch; `resume` restores a run from `last.pt` in one place and
`build_report` writes what the run found.

No DataLoader: the whole data set is a uint8 tensor on the device and a batch is an index
into it (`DeviceLoader`), so the hot loop does no per-sample Python.  Each epoch writes
`last.pt` (atomic) and, when validation improves, `best.pt`; `--resume` continues from
`last.pt` exactly (model, optimiser, schedule, epoch and the generator that shuffles and
augments).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from serving.contract import SCALE
from . import data as data_mod
from .augment import augment_batch
from .checkpoint import CHECKPOINT_VERSION, atomic_save, load_checkpoint, read as read_checkpoint
from .evaluate import evaluate, scores, torch_predict
from .model import Config, Network3, count_parameters, loss_fn, param_groups
from .plots import plot_curves, plot_errors
from .presets import BOOK_ACCURACY

PRECISIONS = ("auto", "fp32", "bf16")


@dataclasses.dataclass
class RunOptions:
    """How a run goes, not what it trains: none of these is in the checkpoint's config, so
    changing one never makes `--resume` refuse a run."""

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
    # Evaluate on the test set every this fraction of an epoch (1.0: once an epoch, at its end).
    eval_every: float = 1.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose auto, fp32 or bf16")
        if not 0 < self.eval_every <= 1:
            raise ValueError(f"eval_every {self.eval_every!r} is out of range; it must be in (0, 1]")


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


# ------------------------------------------------------------ data ----

class DeviceLoader:
    """Mini-batches from uint8 images kept on the device: each batch is an index into them.

    Images stay uint8 (a quarter of the memory of floats) and are scaled per batch with the
    contract's SCALE.  The last partial batch is dropped, as network3.py drops it.  With
    `shuffle`, each pass draws its order from `gen` when it starts.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, device: torch.device,
                 shuffle: bool, gen: torch.Generator):
        self.steps = steps_per_epoch(len(x), batch_size)
        self.x = torch.from_numpy(np.ascontiguousarray(x)).to(device).unsqueeze(1)
        self.y = torch.from_numpy(y.astype(np.int64)).to(device)
        self.batch_size, self.device, self.shuffle, self.gen = batch_size, device, shuffle, gen

    def __len__(self) -> int:
        return self.steps

    def order(self) -> torch.Tensor:
        """A pass's order of the images (a draw from `gen` when shuffling)."""
        n = len(self.x)
        return torch.randperm(n, generator=self.gen).to(self.device) if self.shuffle \
            else torch.arange(n, device=self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, b = self.order(), self.batch_size
        for step in range(len(self)):
            idx = order[step * b:(step + 1) * b]
            yield self.x[idx].float().mul_(SCALE), self.y[idx]


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Full batches in an epoch; ValueError when there is not even one."""
    if images < batch_size:
        raise ValueError(f"{images} training images is less than one batch of {batch_size}")
    return images // batch_size


def training_data(cfg: Config, opts: RunOptions, mnist: data_mod.Mnist) -> tuple[np.ndarray, np.ndarray]:
    """The training split the config names, cut to --limit-train, expanded if the config says so."""
    x, y = mnist.split(cfg.train_split)
    if opts.limit_train:
        x, y = x[:opts.limit_train], y[:opts.limit_train]
    if cfg.expand:
        x, y = data_mod.expand(x, y)
    return x, y


# ------------------------------------------------------------ averaging ----

class Ema:
    """Exponential moving average of the weights: the net that is evaluated and delivered.

    The weights after SGD's last step are a noisy sample; their average over the last
    ~1/(1 - decay) steps is a better net, most of all early in a run.  Batch norm's running
    statistics are averaged too, so they describe the averaged weights rather than the last
    step's.  The decay warms up as (1 + step) / (10 + step) until it reaches `decay`, so a short
    run is not an average dominated by its random start.  One fused lerp over all the tensors
    a step, so the average costs little beside the step itself.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        floats = [(a, b) for a, b in zip(self.module.state_dict().values(), model.state_dict().values())
                  if a.is_floating_point()]
        self._pairs = ([a for a, _ in floats], [b for _, b in floats])

    def weight(self, step: int) -> float:
        """How far the average moves towards the weights after `step` steps."""
        return 1 - min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(*self._pairs, self.weight(step))


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


# ------------------------------------------------------------ the run ----

def make_optimizer(cfg: Config, model: torch.nn.Module, steps: int):
    """The optimiser and schedule the config names (model.OPTIMIZERS and model.SCHEDULES; Config
    has refused any other name)."""
    groups = param_groups(model, cfg.weight_decay)
    optimizers = {
        "sgd": lambda: torch.optim.SGD(groups, lr=cfg.lr),
        "nesterov": lambda: torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True),
        "adamw": lambda: torch.optim.AdamW(groups, lr=cfg.lr),
    }
    opt = optimizers[cfg.optimizer]()
    schedules = {
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps,
                                                                 pct_start=cfg.warmup),
        "constant": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
    }
    return opt, schedules[cfg.schedule]()


@dataclasses.dataclass
class Run:
    """Everything a training run holds and a checkpoint saves: the nets, the optimiser and its
    schedule, the generators, the history and the training clock."""

    cfg: Config
    device: torch.device
    model: Network3  # the net the optimiser steps
    ema: Ema | None  # its moving average, when the config asks for one
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator  # shuffling (and augmentation, except on CUDA)
    aug_gen: torch.Generator  # augmentation
    use_amp: bool
    fmt: torch.memory_format
    epoch: int = 0  # epochs completed
    history: list[dict] = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=lambda: {"val_accuracy": -1.0, "epoch": 0})
    train_seconds: float = 0.0

    @property
    def net(self) -> torch.nn.Module:
        """The net that is evaluated, checkpointed as "model" and exported."""
        return self.ema.module if self.ema else self.model


def new_run(cfg: Config, opts: RunOptions, device: torch.device, steps: int) -> Run:
    """A fresh run: the net initialised from torch's global generator (seeded by `fit`), then
    the optimiser and the generators, in that order, so a seed always gives the same run."""
    # channels_last: the layout oneDNN's and cuDNN's fast convolutions use; checkpoints hold
    # plain tensors either way.
    fmt = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
    model = Network3(cfg).to(device, memory_format=fmt)
    opt, sched = make_optimizer(cfg, model, steps)
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    # Augmentation draws its random numbers where the batch lives: on CUDA a host-side draw is a
    # copy from pageable memory every step, which waits for the GPU and stalls the launch queue.
    # On a CPU (and MPS) it is the same generator, so CPU runs keep their seeds' results.
    aug_gen = torch.Generator(device=device).manual_seed(opts.seed) if device.type == "cuda" else gen
    use_amp = opts.precision == "bf16" or (opts.precision == "auto" and device.type == "cuda")
    return Run(cfg, device, model, Ema(model, cfg.ema) if cfg.ema else None, opt, sched, gen, aug_gen,
               use_amp, fmt)


def checkpoint_state(run: Run, mnist: data_mod.Mnist, seed: int) -> dict:
    """What last.pt and best.pt hold (checkpoint format version 2)."""
    history, device = run.history, run.device
    return {
        "version": CHECKPOINT_VERSION, "preset": run.cfg.preset, "config": run.cfg.to_dict(),
        "model": run.net.state_dict(), "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
        # With an average, the optimiser's own weights too: --resume continues from them.
        **({"train_model": run.model.state_dict()} if run.ema else {}),
        "epoch": run.epoch, "history": history, "best": run.best, "train_seconds": run.train_seconds,
        "rng": {"generator": run.gen.get_state(), "torch": torch.get_rng_state(),
                **({"augment": run.aug_gen.get_state(), "cuda": torch.cuda.get_rng_state(device)}
                   if device.type == "cuda" else {})},
        "data_sha256": mnist.data_sha256, "seed": seed,
        "val_accuracy": history[-1]["val_accuracy"] if history else None,
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
    }


def resume(run: Run, path: Path) -> None:
    """Restore `run` from the checkpoint at `path` (read by checkpoint.read: weights only, one
    clear line if it is not ours); refused if the checkpoint's config differs from the run's."""
    ckpt = read_checkpoint(path, run.device)
    if Config.from_dict(ckpt["config"]) != run.cfg:
        raise ValueError(f"{path}: its config differs from this run's; resume with the same options")
    run.model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
    if run.ema:
        run.ema.module.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    # map_location moved every tensor to the device; generator states must be CPU byte tensors.
    rng = ckpt["rng"]
    run.gen.set_state(rng["generator"].cpu())
    torch.set_rng_state(rng["torch"].cpu())
    if run.aug_gen is not run.gen and "augment" in rng:  # absent from CUDA checkpoints before it
        run.aug_gen.set_state(rng["augment"].cpu())
    if "cuda" in rng and run.device.type == "cuda":  # dropout's masks on a GPU
        torch.cuda.set_rng_state(rng["cuda"].cpu(), run.device)
    run.epoch, run.history, run.best = ckpt["epoch"], ckpt["history"], ckpt["best"]
    run.train_seconds = ckpt.get("train_seconds", 0.0)


# ------------------------------------------------------------ training and evaluation ----

def split_accuracy(net: torch.nn.Module, device: torch.device, mnist: data_mod.Mnist, split: str = "test") -> float:
    """The fraction of `split` that `net` classifies right."""
    x, y = mnist.split(split)
    return float((scores(torch_predict(net, device), x).argmax(1) == y).mean())


def augmented(cfg: Config, epoch: int) -> bool:
    """Whether the config augments its batches in this (0-based) epoch: not in the last clean ones."""
    return cfg.augment == "affine" and epoch < cfg.epochs - cfg.clean_epochs


def forward_backward(run: Run, xb: torch.Tensor, yb: torch.Tensor, augment: bool,
                     cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch, run the net and put the loss's gradients in the parameters' .grad
    (added to what is there).  Returns the loss and the logits.  `cache=False` for a CUDA graph's
    capture, where autocast must not keep the casts of the weights between steps."""
    if augment:
        xb = augment_batch(xb, yb, run.cfg, run.aug_gen)
    xb = xb.contiguous(memory_format=run.fmt)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_amp, cache_enabled=cache):
        logits = run.model(xb)
        loss = loss_fn(run.cfg, logits.float(), yb)
    loss.backward()
    return loss, logits


def train_step(run: Run, xb: torch.Tensor, yb: torch.Tensor, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on one batch: gradients, the optimiser, the schedule, the average."""
    run.opt.zero_grad(set_to_none=True)
    loss, logits = forward_backward(run, xb, yb, augment)
    run.opt.step()
    run.sched.step()
    if run.ema:
        run.ema.update(run.sched.last_epoch)  # the scheduler counts steps, and resumes with them
    return loss, logits


def train_epoch(run: Run, loader: DeviceLoader, epoch: int, progress: Progress,
                check: Callable[[float], bool] | None = None, checks: int = 1) -> dict:
    """One pass over `loader`, a step per batch; adds its training time to run.train_seconds.

    With `checks` > 1, `check(epoch_so_far)` is called that many times minus one inside the
    epoch, with the clock stopped; when it returns True the epoch stops there.  Returns the
    epoch's loss and accuracy sums, the images seen, whether a check stopped it, and how long
    the checks took.
    """
    cfg, model, device = run.cfg, run.model, run.device
    augment = augmented(cfg, epoch)
    steps = len(loader)
    every = steps // checks if checks > 1 else 0
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, stopped, paused = 0, False, 0.0
    for step, (xb, yb) in enumerate(loader):
        loss, logits = train_step(run, xb, yb, augment)
        loss_sum += loss.detach() * len(yb)
        correct += (logits.argmax(1) == yb).sum()
        seen += len(yb)
        # Sub-epoch evaluation (bench-train's time-to-accuracy): the clock stops while we evaluate.
        if every and (step + 1) % every == 0 and step + 1 < steps:
            run.train_seconds += _elapsed(t0, device)
            t_check = time.perf_counter()
            model.eval()
            stopped = bool(check and check(epoch + (step + 1) / steps))
            model.train()
            paused += time.perf_counter() - t_check
            t0 = time.perf_counter()
            if stopped:
                break
        if progress.tty and step % 50 == 0:
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            progress.step(f"epoch {epoch + 1}/{cfg.epochs} {100 * step // steps:3d}% "
                          f"loss {loss.item():.4f} {rate:,.0f} img/s")
    if not stopped:
        run.train_seconds += _elapsed(t0, device)
    return {"loss_sum": float(loss_sum), "correct": int(correct), "seen": seen, "stopped": stopped,
            "paused": paused}


def fit(cfg: Config, opts: RunOptions, mnist: data_mod.Mnist | None = None) -> dict:
    """Train, checkpoint, evaluate, report. Returns the report dict (also written to report.json)."""
    device = pick_device(opts.device)
    torch.manual_seed(opts.seed)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(opts.quiet)
    mnist = mnist or data_mod.load(opts.data_dir, verbose=not opts.quiet)
    has_val = cfg.train_split == "train" and len(mnist.val_x) > 0

    x, y = training_data(cfg, opts, mnist)
    run = new_run(cfg, opts, device, steps_per_epoch(len(x), cfg.batch_size) * cfg.epochs)
    loader = DeviceLoader(x, y, cfg.batch_size, device, cfg.shuffle, run.gen)
    if opts.resume and (out / "last.pt").exists():
        resume(run, out / "last.pt")
        progress.line(f"resumed {out / 'last.pt'} at epoch {run.epoch}")

    def reached_target(epoch: float) -> bool:
        """A sub-epoch evaluation: recorded in the history; True once the target is reached."""
        acc = split_accuracy(run.net, device, mnist)
        run.history.append({"epoch": epoch, "test_accuracy": acc, "train_seconds": round(run.train_seconds, 3),
                            "partial": True})
        return bool(opts.target_accuracy and acc >= opts.target_accuracy)

    checks = max(1, round(1 / opts.eval_every)) if opts.eval_every < 1 else 1
    reached = None
    for epoch in range(run.epoch, cfg.epochs):
        t0 = time.perf_counter()
        stats = train_epoch(run, loader, epoch, progress, reached_target, checks)
        if stats["stopped"]:
            reached = run.history[-1]
            break
        run.model.eval()
        val_acc = split_accuracy(run.net, device, mnist, "val") if has_val else None
        test_acc = split_accuracy(run.net, device, mnist)
        seen = stats["seen"]
        row = {"epoch": epoch + 1, "lr": run.opt.param_groups[0]["lr"], "train_loss": stats["loss_sum"] / seen,
               "train_accuracy": stats["correct"] / seen, "val_accuracy": val_acc, "test_accuracy": test_acc,
               # the epoch's wall time with its end-of-epoch evaluation, without the sub-epoch ones
               "seconds": round(time.perf_counter() - t0 - stats["paused"], 3),
               "train_seconds": round(run.train_seconds, 3)}
        run.history.append(row)
        run.epoch = epoch + 1
        improved = (val_acc is None) or val_acc > run.best["val_accuracy"]
        if improved:
            run.best = {"val_accuracy": val_acc if val_acc is not None else -1.0, "epoch": epoch + 1,
                        "test_accuracy": test_acc}
        state = checkpoint_state(run, mnist, opts.seed)
        if improved:
            atomic_save(state, out / "best.pt")
        _write_metrics(out, run.history)
        # last.pt goes last: once it is there the epoch's files all are, and --resume starts here.
        atomic_save(state, out / "last.pt")
        progress.line(f"epoch {epoch + 1}/{cfg.epochs} loss {row['train_loss']:.4f} "
                      f"train {row['train_accuracy']:.4f} val {_fmt(val_acc)} test {test_acc:.4f} "
                      f"({row['seconds']:.1f}s, {seen / max(row['seconds'], 1e-9):,.0f} img/s)")
        if opts.target_accuracy and test_acc >= opts.target_accuracy:
            reached = row
            break

    report = build_report(run, opts, mnist, out, reached)
    report["history"] = run.history  # returned to callers (bench-train), not written to report.json
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


# ------------------------------------------------------------ the report ----

def build_report(run: Run, opts: RunOptions, mnist: data_mod.Mnist, out: Path, reached: dict | None) -> dict:
    """report.json: the run's facts, and best.pt evaluated on the test set; plots if asked."""
    cfg, device, history = run.cfg, run.device, run.history
    report = {
        "preset": cfg.preset, "config": cfg.to_dict(), "seed": opts.seed,
        "epochs": len([r for r in history if not r.get("partial")]),
        "train_seconds": round(run.train_seconds, 2), "device": str(device),
        "precision": "bf16" if run.use_amp else "fp32",
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
        plot_curves(history, out / "curves.png", title=cfg.preset)
        pred = scores(torch_predict(model, device), mnist.test_x).argmax(1)
        plot_errors(mnist.test_x, mnist.test_y, pred, out / "errors.png")
    return report
