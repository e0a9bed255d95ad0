"""Real training runs: accuracy, the files a run writes, resume, evaluation and the CLI's errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from training import train as train_mod
from training.cli import cli
from training.presets import get
from training.checkpoint import load_checkpoint
from training.train import RunOptions, fit


def test_default_on_5000_images_one_epoch(tmp_path, mnist):
    report = fit(get("default", epochs=1), RunOptions(out=tmp_path, device="cpu", limit_train=5000, quiet=True), mnist)
    assert report["test_accuracy"] >= 0.90
    assert {p.name for p in tmp_path.iterdir()} >= {"best.pt", "last.pt", "metrics.jsonl", "report.json",
                                                     "curves.png", "errors.png"}
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("preset", "config", "epochs", "best_epoch", "val_accuracy", "test_accuracy", "per_digit_accuracy",
                "confusion", "train_seconds", "device", "data_sha256"):
        assert key in saved
    assert saved["val_accuracy"] is None  # default trains on train+val: no validation set to report
    assert np.array(saved["confusion"]).sum() == 10_000 and np.array(saved["confusion"]).shape == (10, 10)
    assert all(0 <= a <= 1 for a in saved["per_digit_accuracy"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_accuracy", "val_accuracy", "test_accuracy", "seconds"}
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_bf16_autocast_on_cpu_trains_and_says_so(tmp_path, mnist):
    # --precision bf16 on a CPU: autocast with float32 weights, so the checkpoint stays float32.
    report = fit(get("default", epochs=1), RunOptions(out=tmp_path, device="cpu", limit_train=5000, quiet=True,
                                                      plots=False, precision="bf16"), mnist)
    assert report["precision"] == "bf16" and report["test_accuracy"] >= 0.90
    model, _ = load_checkpoint(tmp_path / "best.pt")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="unknown precision"):
        fit(get("default", epochs=1), RunOptions(out=tmp_path, device="cpu", limit_train=640, precision="fp16"), mnist)


def test_clean_epochs_train_the_last_epochs_without_augmentation(tmp_path, mnist, monkeypatch):
    calls = []
    real = train_mod.augment_batch
    monkeypatch.setattr(train_mod, "augment_batch", lambda x, y, cfg, gen: calls.append(len(x)) or real(x, y, cfg, gen))
    cfg = get("default", epochs=3, batch_size=64, clean_epochs=1)
    fit(cfg, RunOptions(out=tmp_path, device="cpu", limit_train=640, plots=False, quiet=True), mnist)
    assert calls == [64] * 20  # epochs 1 and 2 augment every batch of 10; epoch 3 none


def test_best_checkpoint_follows_validation(tmp_path, mnist):
    cfg = get("nielsen-relu", epochs=2, batch_size=50, lr=0.1)
    report = fit(cfg, RunOptions(out=tmp_path, device="cpu", limit_train=3000, plots=False, quiet=True), mnist)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert report["best_epoch"] == best["epoch"]
    assert report["val_accuracy"] == best["val_accuracy"]
    _, ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["epoch"] == best["epoch"] and ckpt["data_sha256"] == mnist.data_sha256


def test_checkpoint_rebuilds_from_its_config_and_matches_evaluate(checkpoint, mnist):
    from training.evaluate import evaluate, torch_predict
    model, ckpt = load_checkpoint(checkpoint)
    assert ckpt["config"]["preset"] == "default"
    result = evaluate(torch_predict(model), mnist.test_x, mnist.test_y)
    assert result["accuracy"] == pytest.approx(ckpt["test_accuracy"], abs=1e-9)
    assert result["accuracy"] > 0.97  # one epoch of default on 60,000 images


def _straight_and_resumed(tmp_path, mnist, monkeypatch, device: str) -> tuple[dict, dict]:
    """The last.pt of a 3-epoch run, and of the same run interrupted in epoch 2 and resumed."""
    cfg = get("default", epochs=3, batch_size=64)
    opts = dict(device=device, limit_train=1280, plots=False, quiet=True, seed=3)
    fit(cfg, RunOptions(out=tmp_path / "straight", **opts), mnist)

    # Interrupt the second run mid-way through epoch 2 (step 30 of 60), as Ctrl-C or a kill would.
    real_step, calls = torch.optim.lr_scheduler.OneCycleLR.step, []

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.lr_scheduler.OneCycleLR, "step", step)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, RunOptions(out=tmp_path / "resumed", **opts), mnist)
    monkeypatch.setattr(torch.optim.lr_scheduler.OneCycleLR, "step", real_step)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 1
    fit(cfg, RunOptions(out=tmp_path / "resumed", resume=True, **opts), mnist)

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert cfg.ema > 0  # default averages its weights: both the average and the optimiser's weights resume
    return a, b


def test_resume_after_interruption_gives_the_same_weights(tmp_path, mnist, monkeypatch):
    a, b = _straight_and_resumed(tmp_path, mnist, monkeypatch, "cpu")
    for part in ("model", "train_model"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert (tmp_path / "straight" / "metrics.jsonl").read_text().count("\n") == 3
    assert [json.loads(l)["test_accuracy"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()] == \
           [json.loads(l)["test_accuracy"] for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_on_cuda_restores_every_generator(tmp_path, mnist, monkeypatch):
    # On CUDA the augmentation and dropout draw from GPU generators, saved beside the CPU ones.
    # Their states must come back exactly. With cuDNN's deterministic algorithms the weights
    # came back identical on an H100; the tolerance allows for kernels elsewhere (atomics in a
    # backward pass) that add in a different order from one run to the next.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    a, b = _straight_and_resumed(tmp_path, mnist, monkeypatch, "cuda")
    for k in ("generator", "torch", "augment", "cuda"):
        assert torch.equal(a["rng"][k], b["rng"][k]), k
    worst = max((a[p][k].float() - b[p][k].float()).abs().max().item()
                for p in ("model", "train_model") for k in a[p] if a[p][k].is_floating_point())
    print(f"largest weight difference, straight vs resumed on CUDA: {worst:.2e}")
    assert worst < 1e-3, worst


def test_ema_moves_weights_and_batchnorm_statistics_toward_the_net():
    from training.model import Network3
    net = Network3(get("default"))
    ema = train_mod.Ema(net, 0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)  # weights, biases and batch norm's running mean and variance
    ema.update(step=10_000)  # past the warm-up: the full decay
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, before[k] + 0.1, atol=1e-6), k
    ema.update(step=0)  # the first step: decay 1/10, so 90% of the way to the net
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, before[k] + 0.1 + 0.9 * 0.9, atol=1e-5), k
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_resume_refuses_a_different_config(tmp_path, mnist):
    opts = dict(device="cpu", limit_train=640, plots=False, quiet=True)
    fit(get("default", epochs=1, batch_size=64), RunOptions(out=tmp_path, **opts), mnist)
    with pytest.raises(ValueError, match="config differs"):
        fit(get("default", epochs=2, batch_size=64), RunOptions(out=tmp_path, resume=True, **opts), mnist)


def test_target_accuracy_stops_early_and_counts_only_training_time(tmp_path, mnist):
    cfg = get("default", epochs=2)
    report = fit(cfg, RunOptions(out=tmp_path, device="cpu", limit_train=4000, plots=False, quiet=True,
                                 target_accuracy=0.5, eval_every=0.25), mnist)
    reached = report["target_reached"]
    assert reached and reached["test_accuracy"] >= 0.5 and reached["epoch"] <= 1
    assert 0 < reached["train_seconds"]


def test_cli_trains_and_evaluates(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(cli, ["train", "--preset", "default", "--epochs", "1", "--limit-train", "2000",
                              "--device", "cpu", "--out", str(out), "--no-plots", "--lr", "0.05",
                              "--weight-decay", "1e-4"])
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output
    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["lr"], config["weight_decay"]) == (0.05, 1e-4)  # overrides reach the run
    res = runner.invoke(cli, ["evaluate", str(out / "best.pt"), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    assert result["accuracy"] == json.loads((out / "report.json").read_text())["test_accuracy"]
    assert np.array(result["confusion"]).sum() == 10_000


@pytest.mark.parametrize("args, code, message", [
    (["train", "--preset", "nope"], 2, "unknown preset 'nope'"),
    (["train", "--epochs", "0"], 2, "--epochs"),
    (["train", "--device", "tpu"], 2, "--device"),
    (["train", "--precision", "fp16"], 2, "--precision"),
    (["train", "--weight-decay", "-1"], 2, "--weight-decay"),
    (["train", "--weight-decay", "nan"], 2, "weight_decay nan is out of range"),  # past click, caught by Config
    (["evaluate", "/does/not/exist.pt"], 2, "does not exist"),
])
def test_cli_usage_errors(args, code, message):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == code
    assert message in res.output


def test_a_version_1_batchnorm_checkpoint_is_refused_with_the_reason(tmp_path, checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["version"] == 2 and ckpt["config"]["batchnorm"]
    ckpt["version"] = 1  # as written before batch norm moved after the pool
    torch.save(ckpt, tmp_path / "v1.pt")
    with pytest.raises(ValueError, match="version-1 checkpoint with batch norm before the pool"):
        load_checkpoint(tmp_path / "v1.pt")


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(cli, ["evaluate", str(bad)])
    assert res.exit_code == 1
    assert "not a network3 checkpoint" in res.output and "Traceback" not in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_a_gpu(tmp_path):
    res = CliRunner().invoke(cli, ["train", "--device", "cuda", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "no CUDA device" in res.output


def test_cli_lists_presets():
    res = CliRunner().invoke(cli, ["train", "--list"])
    assert res.exit_code == 0
    assert "nielsen-dropout" in res.output and "blog" in res.output


def test_resume_accepts_a_different_eval_every(tmp_path, mnist, monkeypatch):
    """eval_every is how a run is watched, not what it trains: a run option outside the config,
    so a run resumed with another one is accepted (and a checkpoint that still carries it too)."""
    cfg = get("default", epochs=2, batch_size=64)
    opts = dict(device="cpu", limit_train=640, plots=False, quiet=True)
    real_step, calls = torch.optim.lr_scheduler.OneCycleLR.step, []

    def step(self, *a, **k):  # interrupted in epoch 2 (10 steps an epoch), as Ctrl-C would
        calls.append(1)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.lr_scheduler.OneCycleLR, "step", step)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, RunOptions(out=tmp_path, eval_every=1.0, **opts), mnist)
    monkeypatch.setattr(torch.optim.lr_scheduler.OneCycleLR, "step", real_step)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and "eval_every" not in ckpt["config"]
    ckpt["config"]["eval_every"] = 1.0  # as checkpoints written before it moved carry it
    torch.save(ckpt, tmp_path / "last.pt")

    report = fit(cfg, RunOptions(out=tmp_path, resume=True, eval_every=0.5, **opts), mnist)
    assert report["epochs"] == 2 and report["best_epoch"] == 2
    assert [r["epoch"] for r in report["history"] if r.get("partial")] == [1.5]  # evaluated half-way


def test_cli_help_with_h_as_with_help():
    runner = CliRunner()
    long, short = runner.invoke(cli, ["--help"]), runner.invoke(cli, ["-h"])
    assert long.exit_code == short.exit_code == 0 and short.output == long.output
    assert "Usage:" in short.output and "train" in short.output
    sub = runner.invoke(cli, ["train", "-h"])  # the group's context settings reach its commands
    assert sub.exit_code == 0 and "--preset" in sub.output
