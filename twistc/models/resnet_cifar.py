"""CIFAR ResNets (He et al. 2016, section 4.2) with option-A shortcuts.

These are the networks the compiler compresses.  Module names follow the
reference checkpoint's keys (``conv1``, ``bn1``, ``layer1..3.<i>.conv1/bn1/conv2/bn2``,
``linear``) so it loads with ``strict=True``, and the forward pass has no
data-dependent control flow so that ``torch.fx`` can trace it.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

STAGE_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially, then zero-pad channels on both sides.

    The zero channels are split evenly before and after the real ones, which is
    what the reference checkpoint was trained with.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        extra = out_channels - in_channels
        self.stride = stride
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = (PadShortcut(in_channels, out_channels, stride)
                         if needs_projection else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Stem conv, three stages of basic blocks, global average pool, linear classifier."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.layer1 = _stage(STAGE_WIDTHS[0], STAGE_WIDTHS[0], blocks_per_stage, stride=1)
        self.layer2 = _stage(STAGE_WIDTHS[0], STAGE_WIDTHS[1], blocks_per_stage, stride=2)
        self.layer3 = _stage(STAGE_WIDTHS[1], STAGE_WIDTHS[2], blocks_per_stage, stride=2)
        self.linear = nn.Linear(STAGE_WIDTHS[2], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.mean(x, dim=(2, 3)))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    """He initialisation for convolutions and the classifier (for training from scratch)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def resnet_cifar(depth: int = 32, num_classes: int = 10) -> ResNetCifar:
    """Build a CIFAR ResNet of the given depth (6n + 2: 20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    return ResNetCifar((depth - 2) // 6, num_classes)


def load_resnet32(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ResNetCifar:
    """Load a ResNet-32 ``state_dict`` checkpoint strictly and return it in eval mode."""
    model = resnet_cifar(32)
    state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    logger.debug("loaded ResNet-32 from %s", path)
    return model.eval()
