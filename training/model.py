"""network3 in PyTorch: the config that describes a net and the module that builds it.

The layer stack is Nielsen's (chapter 6, `network3.py`):

    [ConvPool(1->20, 5x5, pool 2)] [ConvPool(20->40, 5x5, pool 2)] FC... Softmax(->10)

Nielsen adds the conv bias and applies the activation *after* pooling, and so do we (it
costs a quarter of the activations; for a per-channel bias and a monotonic activation it
equals the usual conv -> activation -> pool).  The model returns logits: softmax belongs to the loss and to
export.  Everything that shapes the net lives in `Config`, which is saved inside every
checkpoint and inside the ONNX metadata, so later steps rebuild the net from the file.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from serving.contract import CLASSES, INPUT_SHAPE

# The choices of every enumerated Config field, written once: Config checks against them, the
# code that acts on a field (the activations below, train.make_optimizer) handles each of them.
ACTIVATIONS = ("none", "sigmoid", "relu")
INITS = ("nielsen", "pytorch")  # network3.py's Gaussians, or PyTorch's default (Kaiming uniform)
TRAIN_SPLITS = ("train", "train+val")
AUGMENTS = ("none", "affine")
OPTIMIZERS = ("sgd", "nesterov", "adamw")
SCHEDULES = ("constant", "onecycle")
AUGMENT_KNOBS = ("elastic", "thickness", "breaks", "lowres", "flags", "blockscan")  # augment.augment_batch acts on them
CHOICES = {
    "conv_activation": ACTIVATIONS, "fc_activation": ACTIVATIONS, "init": INITS, "train_split": TRAIN_SPLITS,
    "augment": AUGMENTS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
}


@dataclass
class Config:
    """Everything needed to rebuild and retrain one network3 net."""

    preset: str = "custom"
    # --- architecture ---
    conv_channels: tuple[int, ...] = (20, 40)  # 0, 1 or 2 conv-pool layers (5x5 kernels, 2x2 max pool)
    conv_activation: str = "relu"
    fc_sizes: tuple[int, ...] = (100,)  # hidden fully connected layers before the 10-way output
    fc_activation: str = "relu"
    dropout: float = 0.0  # Nielsen: on the inputs of every FC layer, the output layer included
    batchnorm: bool = False  # after each pool and hidden FC layer, before the activation (modern recipe only)
    init: str = "nielsen"  # "nielsen" (network3.py's Gaussians) or "pytorch" (Kaiming uniform)
    # --- data ---
    train_split: str = "train"  # "train" (50,000, validation kept apart) or "train+val" (60,000)
    expand: bool = False  # Nielsen's expansion: each image shifted 1 px up/down/left/right (x5 data)
    augment: str = "none"  # "none" or "affine" (random shift/rotate/scale, batched on the device)
    clean_epochs: int = 0  # the last N epochs train on unaugmented images
    # With augment "affine", what real handwriting adds (training/augment.py; all 0: affine only).
    # The last four are the share of each batch they change.
    elastic: float = 0.0  # std in px of an elastic displacement (a coarse random field, Simard 2003)
    thickness: float = 0.0  # a thinner or thicker pen
    breaks: float = 0.0  # a gap cut across the strokes
    lowres: float = 0.0  # a low-resolution scan (8-16 px, 17 grey levels) brought back up
    flags: float = 0.0  # European forms: a flag on a 1, a bar on a 7
    blockscan: float = 0.0  # an 8x8 block-count scan (as UCI's digits were made) brought back up
    shuffle: bool = False  # network3.py walks the data in the same order every epoch
    # --- optimisation ---
    epochs: int = 60
    batch_size: int = 10
    optimizer: str = "sgd"  # "sgd", "nesterov" (momentum 0.9) or "adamw"
    lr: float = 0.1
    weight_decay: float = 0.0  # on weights only, never biases or norm layers
    schedule: str = "constant"  # "constant" or "onecycle"
    warmup: float = 0.25  # onecycle: the fraction of all steps spent rising to `lr`
    label_smoothing: float = 0.0
    ema: float = 0.0  # decay of a moving average of the weights, which is evaluated and delivered (0: off)
    double_softmax: bool = False  # the seed post's nn.Softmax in front of nn.CrossEntropyLoss
    notes: str = ""

    def __post_init__(self) -> None:
        # Tuples survive a JSON round trip as lists; put them back so configs compare equal.
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        self.fc_sizes = tuple(int(s) for s in self.fc_sizes)
        if len(self.conv_channels) > 2:
            raise ValueError(f"conv_channels {self.conv_channels}: network3 has at most two conv-pool layers")
        for name, sizes in (("conv_channels", self.conv_channels), ("fc_sizes", self.fc_sizes)):
            if any(n < 1 for n in sizes):
                raise ValueError(f"{name} {sizes}: every layer needs at least one unit")
        # A typo must not train silently with another setting (an unknown augment was no augmentation).
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")
        ranges = (  # field, the rule it must meet, the rule in words
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("clean_epochs", self.clean_epochs >= 0, ">= 0"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("ema", 0 <= self.ema < 1, "in [0, 1)"),
            ("warmup", 0 < self.warmup < 1, "in (0, 1)"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("elastic", 0 <= self.elastic <= 8, "in [0, 8] px"),
            *((name, 0 <= getattr(self, name) <= 1, "in [0, 1]") for name in AUGMENT_KNOBS if name != "elastic"),
        )
        for name, ok, rule in ranges:
            if not ok:  # NaN fails every comparison, so it lands here too
                raise ValueError(f"{name} {getattr(self, name)!r} is out of range; it must be {rule}")
        knobs = [name for name in AUGMENT_KNOBS if getattr(self, name)]
        if knobs and self.augment == "none":
            raise ValueError(f"{', '.join(knobs)} need augment 'affine'; with augment 'none' nothing is augmented")
        if knobs and not self.shuffle:  # each knob changes a fixed slice of the batch: the same images every epoch
            raise ValueError(f"{', '.join(knobs)} need shuffle: they change a slice of each batch")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Unknown keys are ignored: older checkpoints carry fields since moved out (eval_every)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _activation(name: str) -> nn.Module:
    return {"none": nn.Identity, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}[name]()


class Network3(nn.Module):
    """Input: float32 [N, 1, 28, 28] in [0, 1], white ink on black (serving.contract's INPUT_CONTRACT).
    Output: logits [N, 10]."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        channels, size = INPUT_SHAPE[0], INPUT_SHAPE[1]
        for out in cfg.conv_channels:
            layers += [nn.Conv2d(channels, out, 5), nn.MaxPool2d(2)]
            if cfg.batchnorm:
                # After the pool, where it normalises a quarter of the values (2x2 pooling):
                # batch norm costs in proportion to what it normalises.
                layers.append(nn.BatchNorm2d(out))
            layers.append(_activation(cfg.conv_activation))
            channels, size = out, (size - 4) // 2
        self.features = nn.Sequential(*layers)
        fc: list[nn.Module] = [nn.Flatten()]
        width = channels * size * size  # 640 for the two-layer net
        for hidden in cfg.fc_sizes:
            if cfg.dropout:
                fc.append(nn.Dropout(cfg.dropout))
            fc.append(nn.Linear(width, hidden))
            if cfg.batchnorm:
                fc.append(nn.BatchNorm1d(hidden))
            fc.append(_activation(cfg.fc_activation))
            width = hidden
        if cfg.dropout:
            fc.append(nn.Dropout(cfg.dropout))
        fc.append(nn.Linear(width, CLASSES))
        self.classifier = nn.Sequential(*fc)
        if cfg.init == "nielsen":
            self._nielsen_init()

    def _nielsen_init(self) -> None:
        """network3.py: W ~ N(0, 1/n_out), b ~ N(0, 1); the softmax layer starts at zero."""
        linears = [m for m in self.classifier if isinstance(m, nn.Linear)]
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                n_out = m.out_channels * 25 / 4  # filters * kernel area / pool area
                nn.init.normal_(m.weight, 0.0, math.sqrt(1.0 / n_out))
                nn.init.normal_(m.bias, 0.0, 1.0)
        for m in linears[:-1]:
            nn.init.normal_(m.weight, 0.0, math.sqrt(1.0 / m.out_features))
            nn.init.normal_(m.bias, 0.0, 1.0)
        nn.init.zeros_(linears[-1].weight)
        nn.init.zeros_(linears[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only (network3.py's L2 term covers w, not b)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def loss_fn(cfg: Config, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if cfg.double_softmax:
        # The seed post put nn.Softmax at the end of the net *and* used CrossEntropyLoss, which
        # applies log-softmax again: gradients shrink as the net grows confident.  Kept as published.
        logits = F.softmax(logits, dim=1)
    return F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
