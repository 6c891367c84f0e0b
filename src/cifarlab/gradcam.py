"""Grad-CAM (Selvaraju et al., arXiv 1610.02391) heat maps with Captum's `LayerGradCam`: where
the model looked when it chose a class, for the report's gallery. The layer, for any model, is
the last `Conv2d` to run with a spatial output (in execution order: a residual shortcut
registered late is not mistaken for the last conv)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cifarlab.errors import UserError
from cifarlab.inference import LoadedModel


@dataclass
class CamLayer:
    name: str  # qualified module name, e.g. "layers.7.conv2"
    module: nn.Conv2d
    side: int  # side of its output map for the model's images


def last_conv_layer(model: nn.Module, example: torch.Tensor) -> CamLayer:
    """The last convolution run on `example` (a normalised batch) with an output map over 1x1."""
    seen: list[CamLayer] = []
    hooks = [
        m.register_forward_hook(
            lambda mod, _i, out, n=n: seen.append(CamLayer(n, mod, out.shape[-1]))
        )
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise UserError(f"Grad-CAM: {type(model).__name__} runs no Conv2d layer to explain")
    return ([layer for layer in seen if layer.side > 1] or seen)[-1]


def gradcam_maps(
    loaded: LoadedModel, images: torch.Tensor, targets: torch.Tensor
) -> tuple[np.ndarray, CamLayer]:
    """Heat maps (N, H, W) in [0, 1] for uint8 NCHW `images` and class indices `targets`,
    upsampled to the images' size, each scaled by its own maximum; and the layer explained."""
    from captum.attr import LayerAttribution, LayerGradCam

    model = loaded.model.eval()
    device = next(model.parameters()).device
    x = loaded.normalize(images.to(device))
    layer = last_conv_layer(model, x[:1])
    with torch.enable_grad():
        attr = LayerGradCam(model, layer.module).attribute(
            x, target=targets.to(device).tolist(), relu_attributions=True
        )
    attr = LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), "bilinear")[:, 0]
    attr = attr.clamp(min=0).float().cpu()
    peak = attr.flatten(1).amax(1).view(-1, 1, 1)
    return (attr / torch.where(peak > 0, peak, 1.0)).numpy(), layer  # all-zero maps stay zero


def have_captum() -> bool:
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True
