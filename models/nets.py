"""Model architectures for DP-SGD training workers, built by name.

Every model is Opacus-compatible: GroupNorm instead of BatchNorm (BatchNorm
mixes the examples of a batch, so per-example gradients -- and DP-SGD's
clipping -- would be undefined), no buffers, no in-place activations, and
``opacus.validators.ModuleValidator.validate(model, strict=True)`` finds no
errors. Each takes images ``(C, H, W)`` and works from 8x8 (sklearn digits)
through 28x28 (MNIST) to 32x32 (CIFAR-10).

Bounded activations (tanh) in the small models follow Papernot et al. 2021,
"Tempered Sigmoid Activations for Deep Learning with Differential Privacy";
the GroupNorm ResNet follows De et al. 2022, "Unlocking High-Accuracy
Differentially Private Image Classification through Scale".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

MODELS: dict[str, str] = {
    "logreg": "multinomial logistic regression: Flatten + Linear",
    "mlp": "MLP: Flatten + Linear(d, 256) + tanh + Linear(256, 128) + tanh + Linear(128, K)",
    "lenet": "LeNet-style CNN: 2 x (Conv5x5 + GroupNorm + tanh + MaxPool), adaptive pool, "
             "Linear(., 128) + tanh + Linear(128, K)",
    "resnet18": "ResNet-18 (BasicBlock [2,2,2,2]) with GroupNorm, CIFAR stem (3x3 conv, no max-pool); "
                "option width (default 64)",
}


class ModelError(ValueError):
    """An unknown model name, option or an input shape the model cannot take; the message is one line."""


def _groups(channels: int, max_groups: int = 32) -> int:
    # GroupNorm needs groups | channels: 32 groups for the usual widths (>= 64), fewer for
    # narrow ones, and at least 2 channels per group: at 1x1 spatial size (8x8 inputs reach
    # it in the last stage) a 1-channel group normalises to a constant.
    return math.gcd(max_groups, max(channels // 2, 1))


def _logreg(c: int, h: int, w: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, k))


def _mlp(c: int, h: int, w: int, k: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, 256), nn.Tanh(),
        nn.Linear(256, 128), nn.Tanh(),
        nn.Linear(128, k),
    )


def _lenet(c: int, h: int, w: int, k: int) -> nn.Module:
    if h < 4 or w < 4:
        raise ModelError(f"model 'lenet' needs inputs of at least 4x4 pixels, got {h}x{w}")
    # Both convolutions are 'same'-padded and each is followed by a 2x2 max-pool, so
    # 8x8 -> 2x2, 28x28 -> 7x7, 32x32 -> 8x8; the adaptive pool caps the head at 4x4.
    ph, pw = min(h // 4, 4), min(w // 4, 4)
    return nn.Sequential(
        nn.Conv2d(c, 16, 5, padding=2), nn.GroupNorm(4, 16), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.GroupNorm(8, 32), nn.Tanh(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d((ph, pw)), nn.Flatten(),
        nn.Linear(32 * ph * pw, 128), nn.Tanh(),
        nn.Linear(128, k),
    )


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) with GroupNorm; projection shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.GroupNorm(_groups(out_ch), out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant: 3x3 stride-1 stem and no max-pool, so 8x8 inputs still end at 1x1."""

    def __init__(self, in_ch: int, num_classes: int, width: int = 64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.GroupNorm(_groups(width), width), nn.ReLU())
        layers, ch = [], width
        for i, out_ch in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1)))
            ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def _resnet18(c: int, h: int, w: int, k: int, *, width: int = 64) -> nn.Module:
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ModelError(f"model 'resnet18' option width must be a positive integer, got {width!r}")
    return ResNet18(c, k, width=width)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "logreg": _logreg, "mlp": _mlp, "lenet": _lenet, "resnet18": _resnet18,
}
_OPTIONS: dict[str, set[str]] = {"logreg": set(), "mlp": set(), "lenet": set(), "resnet18": {"width"}}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, *,
                seed: int | None = None, **options) -> nn.Module:
    """The model ``name`` (a key of ``MODELS``) for inputs ``(C, H, W)`` and ``num_classes`` classes.

    ``seed`` makes the initialisation deterministic without touching the global RNG
    (it is forked for the construction). ``options``: ``width`` for ``resnet18``.
    Raises ``ModelError`` for an unknown name or option, or an impossible shape.
    """
    if name not in _BUILDERS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    unknown = set(options) - _OPTIONS[name]
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[name])) or "none"
        raise ModelError(f"model {name!r} has no option {', '.join(sorted(unknown))} (options: {allowed})")
    try:
        c, h, w = (int(v) for v in input_shape)
        ok = len(tuple(input_shape)) == 3 and min(c, h, w) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ModelError(f"model {name!r} needs input_shape (C, H, W) of positive integers, got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"model {name!r} needs num_classes >= 2, got {num_classes!r}")
    if seed is None:
        return _BUILDERS[name](c, h, w, num_classes, **options)
    # fork_rng restores the global CPU generator afterwards; layer init draws from it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[name](c, h, w, num_classes, **options)


__all__ = ["MODELS", "ModelError", "build_model", "BasicBlock", "ResNet18"]
