"""Residual networks for 32×32 images (He et al. 2016), built from torch.nn alone (no torchvision).

Two families, both of :class:`BasicBlock` (two 3×3 convolutions with BatchNorm, added to a shortcut):

- **CIFAR ResNets** of depth 6n + 2 (ResNet-20, 32, 44, 56, 110; He et al. 2016, Section 4.2): a 3×3
  stem of 16 channels, three stages of n blocks with 16, 32 and 64 channels (the last two halve the
  image), global average pooling and one Linear layer. Where a stage halves the image and doubles the
  channels, the shortcut subsamples and pads the new channels with zeros (the paper's option A), so it
  has no parameters: ResNet-20 has 0.27M parameters, ResNet-56 0.85M (10 classes).
- **ResNet-18/34 for CIFAR**: the ImageNet layouts [2, 2, 2, 2] and [3, 4, 6, 3] with 64, 128, 256 and
  512 channels, but a 3×3 stride-1 stem and no max-pool (a 32×32 image would shrink to 1×1 otherwise);
  projection shortcuts (1×1 convolution and BatchNorm, option B) where the shape changes. ResNet-18
  has 11.2M parameters (10 classes).

:func:`cifar_resnet` builds either by depth; ``width`` scales every stage's channels (the first stage's
channel count is ``width``; later stages double it), so small widths give quick test models of the same
shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HessgapError

__all__ = ["BasicBlock", "ResNet", "cifar_resnet", "RESNET_LAYOUTS"]

#: Blocks per stage of the ImageNet-style layouts kept for CIFAR (3×3 stem, no max-pool).
RESNET_LAYOUTS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
#: First-stage channels by family: He et al.'s CIFAR nets start at 16, the ImageNet layouts at 64.
DEFAULT_WIDTH = {"cifar": 16, "imagenet": 64}


class PadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the extra channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # pad (W left, W right, H top, H bottom, C front, C back): the new channels split over both ends
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU (He et al. 2016, Figure 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """3×3 stem, stages of :class:`BasicBlock` (each after the first halves the image), average pool, Linear.

    Args:
        blocks: blocks per stage, e.g. (3, 3, 3) for ResNet-20 or (2, 2, 2, 2) for ResNet-18.
        widths: channels per stage, e.g. (16, 32, 64) or (64, 128, 256, 512); the stem has ``widths[0]``.
        shortcut: ``"pad"`` (option A, parameter-free) or ``"projection"`` (option B, 1×1 conv + BN) where a
            block changes the shape.
        num_classes, in_channels: the output classes and the image channels.
    """

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], *, shortcut: str = "projection",
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise HessgapError(f"ResNet needs one width per stage: got blocks {tuple(blocks)} and widths {tuple(widths)}")
        if shortcut not in ("pad", "projection"):
            raise HessgapError(f"shortcut must be 'pad' or 'projection', got {shortcut!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, channels = [], widths[0]
        for index, (count, width) in enumerate(zip(blocks, widths)):
            layers = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                layers.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(depth: int = 20, width: int | None = None, *, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """A ResNet for 32×32 images by depth: 6n + 2 (20, 32, 44, 56, 110: He et al.'s CIFAR nets) or 18 / 34
    (the ImageNet layouts with a 3×3 stem); see the module docstring.

    ``width`` is the first stage's channel count (default 16 for 6n + 2, 64 for 18 / 34); each later stage
    doubles it. Any input size works (the pool is adaptive); the stages halve it 2 or 3 times. Every
    6n + 2 is taken as He et al.'s recipe (so depth 50 is a CIFAR net of basic blocks, not the ImageNet
    ResNet-50 of bottleneck blocks).
    """
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise HessgapError(f"depth must be an int (20, 32, 44, 56, 110, or 18, 34), got {depth!r}")
    if depth in RESNET_LAYOUTS:
        blocks, family, shortcut = RESNET_LAYOUTS[depth], "imagenet", "projection"
    elif depth >= 8 and (depth - 2) % 6 == 0:
        blocks, family, shortcut = ((depth - 2) // 6,) * 3, "cifar", "pad"
    else:
        raise HessgapError(
            f"no CIFAR ResNet has depth {depth}: use 6n + 2 (20, 32, 44, 56, 110: He et al.'s CIFAR nets) or "
            f"{' / '.join(map(str, RESNET_LAYOUTS))} (ImageNet layouts with a 3×3 stem)"
        )
    width = DEFAULT_WIDTH[family] if width is None else width
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise HessgapError(f"width is the first stage's channel count and must be a positive int, got {width!r}")
    widths = tuple(width * 2**i for i in range(len(blocks)))
    return ResNet(blocks, widths, shortcut=shortcut, num_classes=num_classes, in_channels=in_channels)
