"""The seed lesson's CIFAR10CNN: three conv blocks (64/128/256) and a 4096 -> 512 -> classes head."""

from __future__ import annotations

from torch import nn

from cifarlab.errors import UserError


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


_PER_BLOCK = 8  # conv, bn, relu, conv, bn, relu, pool, dropout


def lesson_state_dict(ckpt: dict) -> dict:
    """A `cnn` checkpoint's weights under the lesson's own keys, for its `CIFAR10CNN` written
    flat: `features` one `nn.Sequential` of the three blocks' 24 layers (`features.0` the first
    conv ... `features.23` the last Dropout2d), `classifier` the Linear, ReLU, Dropout, Linear
    after `x.view(x.size(0), -1)`. `torch.save` the result and `load_state_dict(strict=True)`."""
    args = ckpt.get("model_args", {})
    if (args.get("name"), args.get("width", 1.0), args.get("image_size", 32)) != ("cnn", 1, 32):
        raise UserError(
            f"the lesson's CIFAR10CNN is model cnn at width 1 on 32 px images; this checkpoint "
            f"holds {args.get('name')} (width {args.get('width')}); train with --recipe lesson-cnn"
        )
    out = {}
    for key, value in ckpt["model"].items():
        part, *index, leaf = key.removeprefix("_orig_mod.").split(".")
        if part == "features":
            out[f"features.{int(index[0]) * _PER_BLOCK + int(index[1])}.{leaf}"] = value
        else:  # our classifier starts with nn.Flatten, the lesson's flattens in forward
            out[f"classifier.{int(index[0]) - 1}.{leaf}"] = value
    return out
