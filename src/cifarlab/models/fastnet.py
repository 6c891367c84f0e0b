"""A speed-record-class net after airbench (Jordan, arXiv 2404.00498), written for cifarlab.

A 2x2 conv with 24 channels (whitened from the data with `whitening: true`), then three conv groups
(conv, max-pool, BN, GELU, conv, BN, GELU) at widths 64/256/256, a 3x3 max-pool and a linear head
scaled by 1/9. BatchNorm runs with momentum 0.6 and no learnable scale, as in the paper.
"""

from __future__ import annotations

from torch import nn


class _BN(nn.BatchNorm2d):
    def __init__(self, width: int):
        super().__init__(width, eps=1e-12, momentum=0.4)  # torch's momentum = 1 - paper's 0.6
        self.weight.requires_grad_(False)  # scale is redundant before GELU + next conv


class _Group(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding="same", bias=False),
            nn.MaxPool2d(2),
            _BN(cout),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding="same", bias=False),
            _BN(cout),
            nn.GELU(),
        )


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        w1, w2, w3 = (max(8, round(c * width)) for c in (64, 256, 256))
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.body = nn.Sequential(
            nn.GELU(), _Group(24, w1), _Group(w1, w2), _Group(w2, w3), nn.MaxPool2d(3)
        )
        self.head = nn.Linear(w3, num_classes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.whiten:
                nn.init.dirac_(m.weight[: m.in_channels])  # identity start for the first channels
        self.scale = 1 / 9

    def forward(self, x):
        x = self.body(self.whiten(x)).flatten(1)
        return self.head(x) * self.scale
