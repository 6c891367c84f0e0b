"""torchvision backbones adapted to small images as in the lesson (3x3 stride-1 conv1, no max-pool)."""

from __future__ import annotations

from torch import nn


def tv_resnet(arch: str, num_classes: int) -> nn.Module:
    from torchvision import models

    net = getattr(models, arch)(weights=None)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net
