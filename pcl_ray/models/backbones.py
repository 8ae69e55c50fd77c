"""Backbones: a small CNN for CPU runs on small images, torchvision ResNets with a small-image stem."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18, resnet50


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """Four 3x3 conv blocks (widths w, 2w, 4w, 8w; the last three stride 2) and global average pooling.

    Sized for 28x28 / 32x32 inputs on CPU: at w=32 a forward pass costs about 12 MMAC per 28x28 image.
    """

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w, 1),
            _conv_bn(w, 2 * w, 2),
            _conv_bn(2 * w, 4 * w, 2),
            _conv_bn(4 * w, 8 * w, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_dim = 8 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _resnet(factory, in_channels: int, small_stem: bool) -> tuple[nn.Module, int]:
    net = factory(weights=None)
    if small_stem:  # CIFAR-style: 3x3 stride-1 conv, no max-pool
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, out_dim


def build_backbone(name: str, in_channels: int, width: int = 32, small_stem: bool = True) -> tuple[nn.Module, int]:
    """Return ``(module, feature_dim)``; the module maps images to pooled features."""
    if name == "convnet":
        net = ConvNet(in_channels, width)
        return net, net.out_dim
    if name == "resnet18":
        return _resnet(resnet18, in_channels, small_stem)
    if name == "resnet50":
        return _resnet(resnet50, in_channels, small_stem)
    raise ValueError(f"model.backbone: expected one of convnet, resnet18, resnet50, got {name!r}")
