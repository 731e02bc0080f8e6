"""The two networks of the study, each built around a chosen normalisation.

Every normalisation layer in a network comes from the :class:`~normkit.norms.Norm` it is
given, so a network holds exactly one kind of norm (or none at all with ``"none"``).

* :func:`simple_cnn`: four 3x3 stride-2 convolutions (32, 64, 128, 256 channels), each
  followed by norm + ReLU, then global average pooling and a linear classifier.
* :func:`resnet18`: the ResNet18 of He et al. (2016) (7x7 stem, max-pool, four stages of
  two basic blocks with 64-512 channels), written out so that each norm-ReLU pair can be
  one fused layer (FRN+TLU, EvoNorm). The ReLU after each residual addition is kept.

Input (N, 3, H, W) -> logits (N, n_out).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .norms import Norm, get_norm

__all__ = ["simple_cnn", "resnet18", "build_model", "NETS", "NET_TITLES"]


def simple_cnn(norm: str | Norm = "batchnorm", n_out: int = 10, widths: tuple[int, ...] = (32, 64, 128, 256)) -> nn.Sequential:
    """The study's small CNN: ``len(widths)`` conv-norm-ReLU blocks (stride 2), pool, linear."""
    norm = get_norm(norm)
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in widths:
        layers += [norm.conv(c_in, c_out, 3, stride=2), norm(c_out)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_out)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers and a shortcut: ``relu(norm2(conv2(act(norm1(conv1 x)))) + shortcut(x))``."""

    def __init__(self, norm: Norm, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = norm.conv(c_in, c_out, 3, stride=stride)
        self.norm1 = norm(c_out, act=True)
        self.conv2 = norm.conv(c_out, c_out, 3)
        self.norm2 = norm(c_out, act=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(norm.conv(c_in, c_out, 1, stride=stride), norm(c_out, act=False))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        return self.act(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 with every normalisation layer made by ``norm``."""

    def __init__(self, norm: Norm, n_out: int = 10, widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.stem = nn.Sequential(norm.conv(3, widths[0], 7, stride=2), norm(widths[0]), nn.MaxPool2d(3, 2, 1))
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(norm, c_in, c_out, stride), BasicBlock(norm, c_out, c_out)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def resnet18(norm: str | Norm = "batchnorm", n_out: int = 10) -> ResNet18:
    """ResNet18 (11.2 M parameters with BatchNorm) with every norm made by ``norm``."""
    return ResNet18(get_norm(norm), n_out)


NETS: dict[str, Callable[..., nn.Module]] = {"cnn": simple_cnn, "resnet18": resnet18}
NET_TITLES: dict[str, str] = {"cnn": "CNN", "resnet18": "ResNet18"}


def build_model(net: str, norm: str | Norm, n_out: int = 10) -> nn.Module:
    """Build network ``net`` (one of :data:`NETS`) with ``norm`` everywhere."""
    if net not in NETS:
        raise ValueError(f"unknown network {net!r}; valid networks: {', '.join(NETS)}")
    return NETS[net](norm, n_out=n_out)
