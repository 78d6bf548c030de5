"""Small, seeded problems for the docstring examples (so each example is one line of
set-up, not six).

>>> net, x, y = tiny_problem()
>>> tuple(x.shape), bool((net(x).argmax(1) == y).all())
((64, 4), True)
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_problem"]


def tiny_problem(n: int = 64, seed: int = 0):
    """A ReLU network 4 → 16 → 3 in eval mode, ``n`` Gaussian inputs and the labels the
    clean network gives them (so its clean accuracy is 1). Seeded with a private
    generator; the global RNG is untouched."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1))
    x = torch.randn(n, 4, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y
