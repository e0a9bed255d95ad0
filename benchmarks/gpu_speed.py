"""Time to 99.0, 99.5 and 99.6% of MNIST's test set on a GPU, every variant and seed in one call
(issue 19's GPU part; the GPU machine gives 10 minutes a call and 15 in all).

    python benchmarks/gpu_speed.py run --device cuda --seeds 10 --budget 500 > gpu.jsonl
    python benchmarks/gpu_speed.py check        # on a CPU: the graphed step is the trainer's step

A network3 step launches some sixty kernels from Python and takes about 3.7 ms on an H100 at
any batch size (docs/results.md, bench-train): the GPU waits on the launches.  Variants, each
the preset's own recipe (training.train's net, augmentation, loss, Nesterov SGD with the
one-cycle schedule and the momentum it cycles, moving average):

- eager: training.train's step (`train_step`), one Python call per op;
- compiled: the same with the net under torch.compile (inductor fuses its element-wise ops);
- graphed: the whole step (the batch's gather from the epoch's order, augmentation with the
  device's generator, forward, backward, a foreach SGD reading its learning rate and momentum
  from the schedule's table on the device, the moving average) captured once per preset in a
  CUDA graph and replayed, one launch a step, for every seed;
- tuomaso: tuomaso/train_mnist_fast's final recipe (its 2-conv net, Adam 0.01 with betas 0.7 and
  0.9, one-cycle, batch 256, one epoch of 60,000 digits, no augmentation), its torchvision
  loading replaced by the same 60,000 digits normalised as it normalises them.

The clock runs only while training: every --eval-every epochs the GPU is synchronised, the clock
stopped and the test set scored; a time to X% is the training seconds at the first check at or
above X.  Set-up (CUDA, cuDNN's autotuning, compilation, capture, warm-up steps) is timed apart,
once per variant and preset.  One JSON line per seed, then one summary line per variant and
preset with the medians, printed as they come so a call cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving.contract import SCALE  # noqa: E402
from training.data import load  # noqa: E402
from training.presets import get  # noqa: E402
from training.train import (DeviceLoader, Ema, Run, RunOptions, augmented, forward_backward,  # noqa: E402
                            make_optimizer, new_run, pick_device, split_accuracy, train_step, training_data)

TARGETS = (0.990, 0.995, 0.996)
ROUNDING_STEPS = 4  # check: steps over which the device-side SGD must match the trainer's to rounding


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------ network3's step, two ways ----

class Eager:
    """training.train's own step over the preset's data (its DeviceLoader), reset to a seed's
    fresh run."""

    def __init__(self, preset: str, mnist, device: torch.device, compiled: bool = False, limit: int | None = None):
        self.cfg, self.mnist, self.device, self.compiled = get(preset), mnist, device, compiled
        x, y = training_data(self.cfg, RunOptions(out=Path("."), limit_train=limit), mnist)
        self.loader = DeviceLoader(x, y, self.cfg.batch_size, device, self.cfg.shuffle, None)
        self.spe = len(self.loader)
        self.steps = self.spe * self.cfg.epochs
        self.model = None

    def fresh(self, seed: int) -> Run:
        """A seed's new run, made as training.train.fit makes it (the net's initial weights from
        the seeded global generator); the loader then shuffles with its generator."""
        torch.manual_seed(seed)
        run = new_run(self.cfg, RunOptions(out=Path("."), seed=seed), self.device, self.steps)
        self.loader.gen = run.gen
        return run

    def reset(self, seed: int) -> None:
        self.run = self.fresh(seed)
        if self.compiled:
            # One compiled net for every seed (a new module would compile again): the seed's
            # fresh weights go into it, and the run's optimiser and average point at it.
            if self.model is None:
                self.model, self.compiled_model = self.run.model, torch.compile(self.run.model)
            else:
                self.model.load_state_dict(self.run.model.state_dict())
                self.run.model = self.model
                self.run.opt, self.run.sched = make_optimizer(self.cfg, self.model, self.steps)
                if self.run.ema:
                    self.run.ema = Ema(self.model, self.cfg.ema)
            self.run.model = self.compiled_model

    def net(self) -> torch.nn.Module:
        return self.run.net

    def step(self, k: int) -> None:
        if k % self.spe == 0:
            self.batches = iter(self.loader)
        xb, yb = next(self.batches)
        train_step(self.run, xb, yb, self.augmented(k))

    def augmented(self, k: int) -> bool:
        return augmented(self.cfg, k // self.spe)


class Graphed(Eager):
    """The whole step with nothing read back to Python: the batch index, learning rate, momentum
    and averaging weight are tensors on the device, indexed by a step counter on the device, so
    one captured CUDA graph serves every step of an epoch.  On a CPU it runs the same body
    uncaptured (`check` compares it with Eager).  `exact`: SGD with the schedule's Python floats
    and torch's own formulas (uncaptured only), so the check can ask for equal weights."""

    def __init__(self, preset: str, mnist, device: torch.device, limit: int | None = None, exact: bool = False):
        super().__init__(preset, mnist, device, limit=limit)
        self.exact = exact
        if self.cfg.optimizer not in ("sgd", "nesterov"):
            raise SystemExit(f"graphed: {self.cfg.optimizer} is not a plain SGD")
        self.run = run = self.fresh(0)
        # The persistent tensors the graph reads and writes: every seed copies its start into them.
        self.params = [[p for p in g["params"]] for g in run.opt.param_groups]
        self.decay = [g["weight_decay"] for g in run.opt.param_groups]
        self.nesterov = self.cfg.optimizer == "nesterov"
        self.bufs = [[torch.zeros_like(p) for p in ps] for ps in self.params]
        for p in run.model.parameters():
            p.grad = torch.zeros_like(p)
        self.lrs, self.moms, self.ema_w = self.tables()
        self.i = torch.zeros((), dtype=torch.int64, device=device)  # the step within the epoch
        self.k = torch.zeros((), dtype=torch.int64, device=device)  # the step within the run
        self.order = torch.zeros(self.spe, self.cfg.batch_size, dtype=torch.int64, device=device)
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        if device.type == "cuda":
            # Augmentation draws from the device's default generator: the one a graph replays safely.
            run.aug_gen = torch.cuda.default_generators[device.index or 0]
            self.capture()

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each step's learning rate and momentum as the trainer's scheduler sets them (stepped on
        a throwaway copy of the net), and the average's weight as Ema.update computes it."""
        opt, sched = make_optimizer(self.cfg, copy.deepcopy(self.run.model), self.steps)
        lrs, moms = self.lr_list, self.mom_list = [], []
        for _ in range(self.steps):
            groups = opt.param_groups
            assert all(g["lr"] == groups[0]["lr"] and g["momentum"] == groups[0]["momentum"] for g in groups)
            lrs.append(groups[0]["lr"])
            moms.append(groups[0]["momentum"])
            opt.step()  # no gradients: nothing moves; the scheduler wants a step before its own
            sched.step()
        ema = self.run.ema
        weights = self.ema_list = [ema.weight(k) if ema else 0.0 for k in range(1, self.steps + 1)]
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=self.device)  # noqa: E731
        return as_tensor(lrs), as_tensor(moms), as_tensor(weights)

    @torch.no_grad()
    def _sgd(self) -> None:
        """torch.optim.SGD's step (weight decay, momentum without dampening, Nesterov) with the
        learning rate and momentum read on the device.  Each tensor-scalar product rounds once
        more than torch's fused `add(..., alpha=)`, so weights differ from the trainer's by float
        rounding, which training's chaos then grows (`check` measures both ways)."""
        if self.exact:
            k = int(self.k)
            lr, mom = self.lr_list[k], self.mom_list[k]
            for params, decay, bufs in zip(self.params, self.decay, self.bufs):
                for p, buf in zip(params, bufs):
                    g = p.grad.add(p, alpha=decay) if decay else p.grad
                    buf.mul_(mom).add_(g)
                    p.add_(g.add(buf, alpha=mom) if self.nesterov else buf, alpha=-lr)
            return
        k = self.k.view(1)  # index_select: no read back to the host, so nothing breaks the capture
        lr, mom = self.lrs.index_select(0, k).view(()), self.moms.index_select(0, k).view(())
        for params, decay, bufs in zip(self.params, self.decay, self.bufs):
            grads = [p.grad for p in params]
            if decay:
                grads = torch._foreach_add(grads, params, alpha=decay)
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, grads)
            step = torch._foreach_add(grads, torch._foreach_mul(bufs, mom)) if self.nesterov else bufs
            torch._foreach_sub_(params, torch._foreach_mul(step, lr))

    @torch.no_grad()
    def _average(self) -> None:
        """Ema.update with the step's weight read on the device: torch has no lerp taking a tensor
        weight (a 0-d tensor given for its number is read back to the host), so average += w *
        (weights - average), which rounds differently from lerp."""
        average, weights = self.run.ema._pairs
        if self.exact:
            torch._foreach_lerp_(average, weights, self.ema_list[int(self.k)])
            return
        step = torch._foreach_sub(weights, average)
        torch._foreach_mul_(step, self.ema_w.index_select(0, self.k.view(1)).view(()))
        torch._foreach_add_(average, step)

    def body(self, augment: bool) -> None:
        run = self.run
        torch._foreach_zero_([p.grad for p in run.model.parameters()])
        idx = self.order.index_select(0, self.i.view(1)).view(-1)
        x, y = self.loader.x, self.loader.y
        forward_backward(run, x.index_select(0, idx).float().mul_(SCALE), y.index_select(0, idx), augment, cache=False)
        self._sgd()
        if run.ema:
            self._average()
        self.i.add_(1)
        self.k.add_(1)

    def capture(self) -> None:
        """Warm up on a side stream (cuDNN chooses its kernels, the allocator settles), capture one
        graph per kind of step (augmented, clean), then put back the state the warm-up moved."""
        start = self.snapshot()
        kinds = sorted({self.augmented(k) for k in range(self.steps)})
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for augment in kinds:
                for _ in range(3):
                    self.i.zero_()
                    self.body(augment)
        torch.cuda.current_stream().wait_stream(side)
        pool = None
        for augment in kinds:
            self.i.zero_()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.body(augment)
            pool = g.pool()
            self.graphs[augment] = g
        self.restore(start)

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.state()]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, v in zip(self.state(), saved):
                t.copy_(v)

    def state(self) -> list[torch.Tensor]:
        """What a step reads and writes, in place: the weights, the average, momentum, counters."""
        return _weights(self.run) + [b for bs in self.bufs for b in bs] + [self.i, self.k]

    def reset(self, seed: int) -> None:
        fresh, run = self.fresh(seed), self.run
        zeros = [torch.zeros_like(t) for t in self.state()[len(_weights(run)):]]
        self.restore(_weights(fresh) + zeros)
        run.gen = fresh.gen  # the loader's shuffle (and, on a CPU, the augmentation) as in training.train
        if self.device.type != "cuda":
            run.aug_gen = fresh.aug_gen

    def step(self, k: int) -> None:
        if k % self.spe == 0:
            self.order.copy_(self.loader.order()[:self.spe * self.cfg.batch_size].view(self.spe, -1))
            self.i.zero_()
        augment = self.augmented(k)
        if self.graphs:
            self.graphs[augment].replay()
        else:
            self.body(augment)


def _weights(run: Run) -> list[torch.Tensor]:
    nets = [run.model] + ([run.ema.module] if run.ema else [])
    return [t for net in nets for t in net.state_dict().values()]


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value back to the host (`.item()`, `int(t)`, a 0-d tensor passed
    where torch wants a number): on a GPU each one waits for the device and stops a graph's capture."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------ the reference ----

class TuomasoNet(torch.nn.Module):
    """tuomaso/train_mnist_fast, 8_Final_00s76.ipynb: max pool before ReLU, 5x5 then 3x3."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 24, 5, 1)
        self.conv2 = torch.nn.Conv2d(24, 32, 3, 1)
        self.fc1 = torch.nn.Linear(800, 256)
        self.fc2 = torch.nn.Linear(256, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return F.log_softmax(self.fc2(F.relu(self.fc1(torch.flatten(x, 1)))), dim=1)


class Tuomaso:
    """Its training loop as published (Adam, one-cycle without momentum cycling, batches in a fixed
    order, the last partial batch kept); its data shuffled once per seed, as its save_data did."""

    BATCH, LR, MEAN, STD = 256, 1e-2, 0.1307, 0.3081

    def __init__(self, mnist, device: torch.device, limit: int | None = None):
        x, y = mnist.split("train+val")
        x, y = x[:limit], y[:limit]
        self.device = device
        self.x = ((torch.from_numpy(x).float().div(255) - self.MEAN) / self.STD).unsqueeze(1).to(device)
        self.y = torch.from_numpy(y.astype(np.int64)).to(device)
        self.spe = (len(x) - 1) // self.BATCH + 1
        self.steps = self.spe
        self.test_x = ((torch.from_numpy(mnist.test_x).float().div(255) - self.MEAN) / self.STD).unsqueeze(1).to(device)
        self.test_y = torch.from_numpy(mnist.test_y.astype(np.int64)).to(device)

    def reset(self, seed: int) -> None:
        torch.manual_seed(seed)
        order = torch.randperm(len(self.x)).to(self.device)
        self.xs, self.ys = self.x[order], self.y[order]
        self.model = TuomasoNet().to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.LR, betas=(0.7, 0.9))
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=self.LR, total_steps=self.steps,
                                                         cycle_momentum=False)

    def net(self) -> torch.nn.Module:
        return self.model

    def step(self, k: int) -> None:
        self.model.train()
        b = self.BATCH
        data, target = self.xs[b * k:b * (k + 1)], self.ys[b * k:b * (k + 1)]
        self.opt.zero_grad()
        F.nll_loss(self.model(data), target).backward()
        self.opt.step()
        self.sched.step()

    def accuracy(self) -> float:
        self.model.eval()
        with torch.no_grad():
            return float((self.model(self.test_x).argmax(1) == self.test_y).float().mean())


# ------------------------------------------------------------ timing ----

def time_seed(trainer, seed: int, mnist, eval_every: float) -> dict:
    """Train one seed to the end of its recipe (or until the last target), the clock stopped at
    each check; returns the times to each target and the accuracy curve."""
    trainer.reset(seed)
    every = max(1, round(trainer.spe * eval_every))
    checks, train_s = [], 0.0
    sync(trainer.device)
    t0 = time.perf_counter()
    for k in range(trainer.steps):
        trainer.step(k)
        if (k + 1) % every and k + 1 < trainer.steps:
            continue
        sync(trainer.device)
        train_s += time.perf_counter() - t0
        net = trainer.net()
        if isinstance(trainer, Tuomaso):
            acc = trainer.accuracy()
        else:
            net.eval()
            acc = split_accuracy(net, trainer.device, mnist)
            net.train()
        checks.append((round((k + 1) / trainer.spe, 3), round(train_s, 4), acc))
        if acc >= TARGETS[-1]:
            break
        sync(trainer.device)
        t0 = time.perf_counter()
    first = {f"{t:.3f}": next((s for _, s, a in checks if a >= t), None) for t in TARGETS}
    return {"seed": seed, "time_to": first, "final_accuracy": checks[-1][2], "epochs": checks[-1][0],
            "train_seconds": checks[-1][1], "checks": checks}


def make(variant: str, preset: str, mnist, device: torch.device, limit: int | None):
    if variant == "tuomaso":
        return Tuomaso(mnist, device, limit)
    if variant == "graphed":
        return Graphed(preset, mnist, device, limit)
    if variant in ("eager", "compiled"):
        return Eager(preset, mnist, device, compiled=variant == "compiled", limit=limit)
    raise SystemExit(f"unknown variant {variant!r}: eager, compiled, graphed or tuomaso")


def run(args) -> None:
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True
    mnist = load(verbose=False)
    t_start = time.perf_counter()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"machine": machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                            time.gmtime())}), flush=True)
    for item in args.plan.split(","):
        variant, _, preset = item.partition(":")
        if time.perf_counter() - t_start > args.budget:
            print(json.dumps({"skipped": item, "why": "budget"}), flush=True)
            continue
        t0 = time.perf_counter()
        trainer = make(variant, preset, mnist, device, args.limit)
        trainer.reset(0)
        for k in range(min(args.warmup_steps, trainer.steps)):  # cuDNN's autotuning, compilation
            trainer.step(k)
        sync(device)
        setup = time.perf_counter() - t0
        rows = []
        for seed in range(args.seeds):
            if time.perf_counter() - t_start > args.budget:
                break
            rows.append(time_seed(trainer, seed, mnist, args.eval_every))
            print(json.dumps({"variant": variant, "preset": preset, **rows[-1]}), flush=True)
        summary = {"variant": variant, "preset": preset, "seeds": len(rows), "setup_seconds": round(setup, 2),
                   "median_final_accuracy": statistics.median(r["final_accuracy"] for r in rows) if rows else None}
        for t in TARGETS:
            times = [r["time_to"][f"{t:.3f}"] for r in rows]
            hit = [s for s in times if s is not None]
            summary[f"reached_{t:.3f}"] = f"{len(hit)}/{len(rows)}"
            # a seed that never reached the target counts as infinitely slow: no median if half did not
            median = statistics.median([s if s is not None else math.inf for s in times]) if rows else math.inf
            summary[f"median_seconds_to_{t:.3f}"] = median if median < math.inf else None
        print(json.dumps({"summary": True, **summary}), flush=True)


def check(args) -> None:
    """On a CPU: the graphed step's body, run uncaptured, is training.train's step.  With torch's
    SGD formulas (`exact`) the weights must be equal after every step of a short run (epoch
    boundaries, the clean epoch, the average included); with the device-side SGD the graph runs
    they may differ by rounding, at most `--tolerance` over the first ROUNDING_STEPS steps (later,
    training's chaos grows any difference: 0.16 after 120 steps of `default`)."""
    mnist = load(verbose=False)
    device = torch.device("cpu")
    out = {"preset": args.preset, "limit": args.limit}
    for exact in (True, False):
        eager = Eager(args.preset, mnist, device, limit=args.limit)
        graphed = Graphed(args.preset, mnist, device, limit=args.limit, exact=exact)
        worst = 0.0
        for t in (eager, graphed):
            t.reset(args.seed)
        reads = HostReads()
        for k in range(eager.steps if exact else ROUNDING_STEPS):
            eager.step(k)
            if exact:
                graphed.step(k)
            else:
                with reads:  # what the GPU would capture must never read back to the host
                    graphed.step(k)
            worst = max([worst] + [float((a - b).abs().max()) for a, b in zip(
                eager.net().state_dict().values(), graphed.net().state_dict().values()) if a.is_floating_point()])
        out["steps" if exact else "device_sgd_steps"] = eager.steps if exact else ROUNDING_STEPS
        if not exact:
            out["host_reads"] = reads.count
        out["exact" if exact else "device_sgd"] = worst
    print(json.dumps(out))
    if out["exact"] != 0.0 or out["device_sgd"] > args.tolerance or out["host_reads"]:
        raise SystemExit(f"the graphed step is not the trainer's: {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="time every variant and seed")
    r.add_argument("--device", default="cuda")
    r.add_argument("--plan", default="graphed:fast,eager:fast,tuomaso:-,graphed:default,compiled:fast",
                   help="variant:preset items in order (variants: eager, compiled, graphed, tuomaso)")
    r.add_argument("--seeds", type=int, default=10)
    r.add_argument("--eval-every", type=float, default=0.05, help="epochs between checks")
    r.add_argument("--warmup-steps", type=int, default=20, help="untimed steps of seed 0 before the seeds")
    r.add_argument("--budget", type=float, default=500, help="seconds: no new seed or variant starts after this")
    r.add_argument("--limit", type=int, default=None, help="train on this many digits (a smoke test on a CPU)")
    c = sub.add_parser("check", help="on a CPU: the graphed step equals the trainer's")
    c.add_argument("--preset", default="fast")
    c.add_argument("--limit", type=int, default=2048, help="training digits (the run is the preset's epochs of these)")
    c.add_argument("--seed", type=int, default=3)
    c.add_argument("--tolerance", type=float, default=1e-4, help="for the device-side SGD's rounding")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else check(args)


if __name__ == "__main__":
    main()
