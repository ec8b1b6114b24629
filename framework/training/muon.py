"""Muon for convolution filters (``--optimizer muon``), as the CIFAR-10 speed records use it.

Muon (Jordan et al., 2024) replaces a weight matrix's momentum step by the nearest orthogonal
matrix, found with a few Newton-Schulz iterations: every direction of the filter bank moves by
the same amount, whatever the gradient's scale. Why not ``torch.optim.Muon``: torch's (2.9+)
takes only 2-D matrices and refuses 4-D filters, and no maintained package on the registry
handles them; the code below follows the published algorithm and coefficients.

A 4-D filter bank (out, in, kh, kw) is treated as the matrix (out, in*kh*kw). Before each step
its norm is reset to sqrt(out): the filters of a net with BatchNorm after each convolution are
scale-free, and a fixed norm makes the learning rate the fraction the filters turn per step (this
is the records' variant; a net without normalization would have its filters rescaled). Every
other parameter (biases, the normalization layers', the linear head) takes a plain SGD step with
Nesterov momentum, in the same optimizer, so that schedules and checkpoints see one object.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The quintic's coefficients chosen for the steepest slope at zero (Jordan et al.).
QUINTIC = (3.4445, -4.7750, 2.0315)
FILTER_MOMENTUM = 0.6  # the records' momentum for the filters; --momentum sets the rest's


def orthogonalize(g: Tensor, steps: int = 3, eps: float = 1e-7) -> Tensor:
    """Approximately ``U V^T`` of the matrix ``g = U S V^T`` (its singular values pushed to
    roughly [0.7, 1.2], which trains as well as exactly 1), in bfloat16."""
    a, b, c = QUINTIC
    x = g.bfloat16()
    x = x / (x.norm() + eps)  # singular values <= 1, where the iteration converges
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


def is_filter(p: Tensor) -> bool:
    return p.ndim == 4


class Muon(torch.optim.Optimizer):
    """Muon on the 4-D filters, SGD with Nesterov momentum on the rest. Each group's
    ``weight_decay`` applies to its SGD parameters only (the filters keep a fixed norm)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 filter_momentum: float = FILTER_MOMENTUM, steps: int = 3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      filter_momentum=filter_momentum, steps=steps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                filters = is_filter(p)
                m = group["filter_momentum"] if filters else group["momentum"]
                if not filters and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(m).add_(g)
                g = g.add(buf, alpha=m)  # Nesterov
                if filters:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    g = orthogonalize(g.reshape(len(g), -1), group["steps"]).view_as(p)
                p.add_(g, alpha=-group["lr"])
        return loss
