"""Every preset builds, has the layer sizes the book gives, and maps [N,1,28,28] to logits [N,10]."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from training.model import (ACTIVATIONS, AUGMENTS, CHOICES, INITS, OPTIMIZERS, SCHEDULES, TRAIN_SPLITS, Config,
                            Network3, loss_fn)
from training.presets import PRESETS, get


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_forward_shapes(name):
    cfg = get(name)
    model = Network3(cfg).eval()
    for n in (1, 7):
        out = model(torch.rand(n, 1, 28, 28))
        assert out.shape == (n, 10) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_network3_layer_sizes():
    model = Network3(get("nielsen-relu"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 20, (5, 5)), (20, 40, (5, 5))]
    assert [(l.in_features, l.out_features) for l in linears] == [(640, 100), (100, 10)]
    conv1 = [m for m in Network3(get("nielsen-conv1")).modules() if isinstance(m, nn.Linear)]
    assert conv1[0].in_features == 20 * 12 * 12


def test_nielsen_init_output_layer_starts_at_zero():
    torch.manual_seed(0)
    model = Network3(get("nielsen-sigmoid"))
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last.weight.abs().sum() == 0 and last.bias.abs().sum() == 0
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert abs(conv.weight.std().item() - (1 / 125) ** 0.5) < 0.02  # N(0, 1/n_out), n_out = 20*25/4


def test_dropout_preset_has_two_fc_layers_of_1000_with_dropout():
    model = Network3(get("nielsen-dropout"))
    assert [l.out_features for l in model.modules() if isinstance(l, nn.Linear)] == [1000, 1000, 10]
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 3


def test_config_round_trips_through_a_dict():
    cfg = get("default", epochs=3)
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(KeyError, match="unknown preset"):
        get("nope")
    with pytest.raises(ValueError, match="activation"):
        Config(conv_activation="tanh")


def test_double_softmax_shrinks_the_gradient():
    """The seed post's Softmax + CrossEntropyLoss: a confident wrong answer barely moves the weights."""
    logits = torch.tensor([[8.0, 0.0] + [0.0] * 8], requires_grad=True)
    target = torch.tensor([1])
    (g_plain,) = torch.autograd.grad(loss_fn(get("default", label_smoothing=0.0), logits, target), logits)
    (g_double,) = torch.autograd.grad(loss_fn(get("blog"), logits, target), logits)
    assert g_double.abs().sum() < 0.01 * g_plain.abs().sum()


@pytest.mark.parametrize("field, typo", [
    ("augment", "afine"), ("init", "nielson"), ("conv_activation", "tanh"), ("fc_activation", "Relu"),
    ("train_split", "train+test"), ("optimizer", "adam"), ("schedule", "cosine"),
])
def test_config_refuses_a_typo_in_every_enumerated_field_naming_it_and_the_choices(field, typo):
    """A typo used to train silently with another setting (an unknown augment: no augmentation)."""
    with pytest.raises(ValueError) as e:
        Config(**{field: typo})
    message = str(e.value)
    assert field in message and repr(typo) in message
    assert all(choice in message for choice in CHOICES[field])
    with pytest.raises(ValueError, match=re.escape(repr(typo))):
        Config.from_dict({**get("default").to_dict(), field: typo})  # a checkpoint's config too


def test_config_typo_message_for_augment():
    with pytest.raises(ValueError, match=r"unknown augment 'afine'; choose from none, affine"):
        Config(augment="afine")


@pytest.mark.parametrize("field, bad", [
    ("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("lr", -0.1), ("weight_decay", -1e-4), ("ema", 1.0),
    ("ema", -0.1), ("warmup", 0.0), ("warmup", 1.0), ("label_smoothing", 1.0), ("label_smoothing", -0.1),
    ("clean_epochs", -1), ("dropout", 1.0), ("lr", float("nan")), ("conv_channels", (20, 0)),
    ("fc_sizes", (0,)), ("conv_channels", (20, 40, 80)),
])
def test_config_refuses_values_out_of_range(field, bad):
    with pytest.raises(ValueError, match=field):
        Config(**{field: bad})


def test_every_choice_is_handled_where_it_is_used():
    """The tuples in training.model are the whole list: each value builds and trains a step."""
    from training.train import make_optimizer
    for optimizer in OPTIMIZERS:
        for schedule in SCHEDULES:
            cfg = get("default", optimizer=optimizer, schedule=schedule)
            model = Network3(cfg)
            opt, sched = make_optimizer(cfg, model, steps=10)
            loss_fn(cfg, model(torch.rand(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
            opt.step()
            sched.step()
    for act in ACTIVATIONS:
        for init in INITS:
            assert Network3(Config(conv_activation=act, fc_activation=act, init=init))(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert set(CHOICES) == {"conv_activation", "fc_activation", "init", "train_split", "augment", "optimizer", "schedule"}
    assert set(AUGMENTS) == {"none", "affine"} and set(TRAIN_SPLITS) == {"train", "train+val"}


def test_eval_every_is_a_run_option_not_a_config_field():
    from training.train import RunOptions
    assert "eval_every" not in Config().to_dict()
    assert Config.from_dict({**Config().to_dict(), "eval_every": 0.1}) == Config()  # old checkpoints load
    assert RunOptions(out="x", eval_every=0.25).eval_every == 0.25
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="eval_every"):
            RunOptions(out="x", eval_every=bad)
