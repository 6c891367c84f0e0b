"""Muon for convolution filters beside SGD for everything else, as airbench94_muon trains.

Muon (Jordan et al., 2024) replaces a filter bank's momentum update by its nearest
semi-orthogonal matrix (a few Newton-Schulz iterations), after rescaling the filter bank to a
fixed norm; with BatchNorm after every conv the scale carries no information, so the step is a
pure change of direction. torch.optim.Muon takes 2-D parameters only and has no such rescaling,
hence this optimiser: groups marked `muon=True` take Muon steps, the others torch's SGD formula.
"""

from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic iteration, slope at zero maximised


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of the 2-D `g` = U S V^T (singular values land in ~[0.5, 1.5], which trains as
    well as exactly 1). bf16 on CUDA as airbench does; float32 elsewhere (no fast bf16 on most CPUs)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm() + eps)  # top singular value <= 1
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Param groups with `muon=True`: Nesterov momentum, filters rescaled to norm sqrt(outputs),
    orthogonalised step of size `lr` (no weight decay: the rescaling bounds the weights). Other
    groups: SGD with momentum, Nesterov and coupled weight decay, exactly torch.optim.SGD's rule."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0, muon=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["muon"] and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if momentum:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(g)
                    buf = state["momentum_buffer"]
                    g = g.add(buf, alpha=momentum) if nesterov else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-12))
                    g = orthogonalize(g.reshape(len(g), -1)).view_as(p)
                p.add_(g, alpha=-lr)
        return loss
