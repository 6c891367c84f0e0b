"""The seed lesson's CIFAR10CNN: three conv blocks (64/128/256) and a 4096 -> 512 -> classes head."""

from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Dropout2d(0.25),
    )


class CIFAR10CNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, image_size: int = 32):
        super().__init__()
        c1, c2, c3 = (max(8, round(c * width)) for c in (64, 128, 256))
        self.features = nn.Sequential(_block(3, c1), _block(c1, c2), _block(c2, c3))
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * side * side, 512),  # 256 * 4 * 4 = 4096 at 32x32
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
