"""Tiny networks trained for a few seconds on the digits (8×8) for the prediction tests.

Plain torch (no noiseprop.empirical), seeded, one thread: deterministic. Cached per
process so the test modules share them.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=None)
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


class Block(nn.Module):
    """The zoo's residual block structure: relu2(bn2(conv2(relu1(bn1(conv1 x)))) + shortcut(x))."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


def _build(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))
    if kind == "cnn":  # VGG-style with BatchNorm and max pooling
        return nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(12 * 4, 10))
    if kind == "resnet":
        return nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            Block(6, 6, 1), Block(6, 10, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 10))
    raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def trained(kind: str, epochs: int = 6) -> nn.Module:
    xtr, ytr, _, _ = digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _build(kind)
        g = torch.Generator().manual_seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(ytr), generator=g)
            for i in range(0, len(ytr), 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.eval()


def held_out(n: int = 120):
    _, _, xte, yte = digits()
    return xte[:n], yte[:n]


def mc_logits(model: nn.Module, x, noise, draws: int, seed: int = 0, names=None, linearised: bool = False):
    """``[draws, N, C]`` logits of noisy copies (the same draws as Monte-Carlo would make:
    ``w + s(w) z`` per target parameter in order), float64; with ``linearised`` also the
    linearised network's logits ``f + J δθ`` for the same draws."""
    import copy

    from noiseprop.theory.linearize import LinearizedNetwork
    from noiseprop.theory.targets import resolve_targets

    plan = resolve_targets(model, None if names is None else names)
    net = copy.deepcopy(plan.model).eval()
    params = dict(net.named_parameters())
    clean = {n: params[n].detach().clone() for n in plan.names}
    lin = LinearizedNetwork(model, names) if linearised else None
    g = torch.Generator().manual_seed(seed)
    out, outl = [], []
    with torch.no_grad():
        for _ in range(draws):
            delta = {}
            for n in plan.names:
                z = torch.randn(clean[n].shape, generator=g, dtype=clean[n].dtype)
                params[n].copy_(noise.perturb(clean[n], z))
                delta[n] = params[n] - clean[n]
            out.append(net(x).double())
            if lin is not None:
                outl.append(lin.linearized_logits(x, delta)[1].double())
    if linearised:
        return torch.stack(out), torch.stack(outl)
    return torch.stack(out)


def batch_means_se(values: np.ndarray, batches: int = 10) -> float:
    """Standard error of the mean of per-draw ``values`` from batch means."""
    v = np.asarray(values, dtype=np.float64)
    k = len(v) // batches
    m = v[:k * batches].reshape(batches, k).mean(1)
    return float(m.std(ddof=1) / np.sqrt(batches))
