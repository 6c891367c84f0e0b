"""Muon for convolution filters beside SGD for everything else, as airbench94_muon trains.

Muon (Jordan et al., 2024) replaces a filter bank's momentum update by its nearest
semi-orthogonal matrix (a few Newton-Schulz iterations); with BatchNorm after every conv the
filters' scale carries no information, so they are rescaled to a fixed norm and the step is a
pure change of direction. torch.optim.Muon takes 2-D parameters only and does not rescale.
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
    def step(self) -> None:  # no closure: the AMP scaler and the loop call it without one
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (_muon_step if group["muon"] else _sgd_step)(params, group, self.state)


def _momentum(params, grads, group, state) -> list[torch.Tensor]:
    """The step direction after updating the momentum buffers with `grads` (Nesterov: gradient +
    momentum x buffer); a new buffer starts at zero, holding its first gradient as torch's SGD."""
    momentum = group["momentum"]
    if not momentum:
        return grads
    for p in params:
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p)
    bufs = [state[p]["momentum_buffer"] for p in params]
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    return torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs


def _sgd_step(params, group, state) -> None:
    """torch.optim.SGD's rule (coupled weight decay, momentum, Nesterov) with foreach ops: one
    launch per operation on a GPU, not one per tensor."""
    grads = [p.grad for p in params]
    if group["weight_decay"]:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    torch._foreach_add_(params, _momentum(params, grads, group, state), alpha=-group["lr"])


def _muon_step(params, group, state) -> None:
    for p, g in zip(params, _momentum(params, [p.grad for p in params], group, state), strict=True):
        p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-12))
        p.add_(orthogonalize(g.reshape(len(g), -1)).view_as(p), alpha=-group["lr"])
