"""Every preset builds, has the layer sizes the book gives, and maps [N,1,28,28] to logits [N,10]."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from training.model import Config, Network3, loss_fn
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
