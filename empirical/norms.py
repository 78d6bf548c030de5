"""L1 and TopK BatchNorm (docs/THEORY.md §4; Wu et al. 2018; Hoffer et al. 2018 "Norm matters").

Both layers normalise each channel by its batch mean and a *scale* that replaces the
standard deviation of L2 BatchNorm:

    x̂ = (x − μ) / (s + eps),     y = γ ⊙ x̂ + β

* L1:   s = √(π/2) · mean |x − μ|            (for Gaussian x, E s = σ: E|x−μ| = σ√(2/π))
* TopK: s = C(n) · mean(topk_k |x − μ|),     C(n) = ½(1 + √(π ln 4)) / √(2 ln n)

where μ, the mean and the top-k are taken over the ``n`` elements of the channel in the
batch (batch × spatial positions). C(n) is the constant of Hoffer et al. (2018, §5, and
their released code ``models/lp_norm.py``), derived for the maximum (k = 1).

In training the batch statistics are used and running averages of the mean and the
*scale* are kept (``running = (1 − momentum)·running + momentum·batch``, PyTorch's
convention); in eval mode the running values are used, so the layer is the fixed
per-channel affine map ``y = a ⊙ x + c`` with ``a = γ/(running_scale + eps)``,
``c = β − running_mean · a`` (:meth:`folding_affine`, used by
:func:`noiseprop.theory.targets.fold_bn`).

Choice of k: Hoffer et al. use the mean of the 10 largest deviations ("Top10" in their
paper and code, ``GhostTopkBatchNorm2d(k=10)``), so ``k = 10`` is the default here
(clipped to n). Note that with this constant the TopK scale is *not* an unbiased
estimate of σ: for Gaussian data C(n)·mean(top-10) / σ ≈ 0.97 (n = 64), 1.17 (n = 512),
1.25 (n = 4096), 1.30 (n = 32768). The learned γ absorbs such a constant factor, and
eval mode uses the same running scale, so training and inference stay consistent; the
factor matters only when comparing raw scales across layers of different n.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "L1BatchNorm1d",
    "L1BatchNorm2d",
    "TopKBatchNorm1d",
    "TopKBatchNorm2d",
    "topk_constant",
    "NORM_LAYERS",
]

#: Default k of TopK BatchNorm (Hoffer et al. 2018, "Top10").
DEFAULT_TOPK = 10


def topk_constant(n: int) -> float:
    """C(n) = ½(1 + √(π ln 4)) / √(2 ln n) (Hoffer et al. 2018; docs/THEORY.md §4), n ≥ 2.

    Derivation ``batchnorm.scale_estimators``; tested in ``tests/empirical/test_norms.py``."""
    if n < 2:
        raise ValueError(f"TopK BatchNorm needs at least 2 elements per channel in a batch, got n={n}")
    return 0.5 * (1.0 + math.sqrt(math.pi * math.log(4.0))) / math.sqrt(2.0 * math.log(n))


class _ScaleBatchNorm(nn.Module):
    """Shared machinery: batch mean and a batch *scale*; running mean and running scale."""

    _dims: tuple[int, ...] = ()  # accepted input ranks

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        if not float(eps) >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_scale", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_scale.fill_(1.0)
        self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in self._dims:
            raise ValueError(
                f"{type(self).__name__} expects an input of rank {' or '.join(map(str, self._dims))} "
                f"(N, C, ...), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels"
            )

    def _batch_scale(self, dev: torch.Tensor, n: int) -> torch.Tensor:  # pragma: no cover - abstract
        """Scale per channel from ``dev`` = (x − μ) shaped [C, n]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            c = x.shape[1]
            flat = x.transpose(0, 1).reshape(c, -1)  # [C, n]: all elements of a channel
            n = flat.shape[1]
            if n < 2:
                raise ValueError(
                    f"{type(self).__name__}: expected more than 1 value per channel when training, "
                    f"got input shape {tuple(x.shape)}"
                )
            mean = flat.mean(dim=1)
            dev = flat - mean[:, None]
            scale = self._batch_scale(dev, n)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1.0 - m).add_(mean.detach(), alpha=m)
                self.running_scale.mul_(1.0 - m).add_(scale.detach(), alpha=m)
                self.num_batches_tracked.add_(1)
        else:
            mean = self.running_mean
            scale = self.running_scale
        y = (x - mean.reshape(shape)) / (scale.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y

    @torch.no_grad()
    def folding_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(a, c)`` with eval output ``a ⊙ x + c``:
        ``a = γ/(running_scale + eps)``, ``c = β − running_mean · a`` (docs/THEORY.md §4)."""
        a = 1.0 / (self.running_scale.detach() + self.eps)
        if self.affine:
            a = a * self.weight.detach()
        c = -self.running_mean.detach() * a
        if self.affine:
            c = c + self.bias.detach()
        return a.clone(), c.clone()


class _L1Mixin:
    def _batch_scale(self, dev, n):
        # √(π/2)·E|x−μ| = σ for Gaussian x (Hoffer et al. 2018, §5; Wu et al. 2018).
        return math.sqrt(math.pi / 2.0) * dev.abs().mean(dim=1)


class _TopKMixin:
    def _init_k(self, k):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k

    def _batch_scale(self, dev, n):
        k = min(self.k, n)
        top = torch.topk(dev.abs(), k, dim=1, largest=True, sorted=False).values
        return topk_constant(n) * top.mean(dim=1)

    def extra_repr(self):
        return super().extra_repr() + f", k={self.k}"


class L1BatchNorm1d(_L1Mixin, _ScaleBatchNorm):
    """L1 BatchNorm over (N, C) or (N, C, L) inputs: s = √(π/2)·mean|x − μ| (docs/THEORY.md §4)."""

    _dims = (2, 3)


class L1BatchNorm2d(_L1Mixin, _ScaleBatchNorm):
    """L1 BatchNorm over (N, C, H, W) inputs: s = √(π/2)·mean|x − μ| (docs/THEORY.md §4;
    derivation ``batchnorm.scale_estimators``)."""

    _dims = (4,)


class TopKBatchNorm1d(_TopKMixin, _ScaleBatchNorm):
    """TopK BatchNorm over (N, C) or (N, C, L): s = C(n)·mean(topk_k |x − μ|) (docs/THEORY.md §4).

    ``k`` defaults to 10 (Hoffer et al. 2018, "Top10"); clipped to n.
    """

    _dims = (2, 3)

    def __init__(self, num_features: int, k: int = DEFAULT_TOPK, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self._init_k(k)


class TopKBatchNorm2d(_TopKMixin, _ScaleBatchNorm):
    """TopK BatchNorm over (N, C, H, W): s = C(n)·mean(topk_k |x − μ|) (docs/THEORY.md §4;
    derivation ``batchnorm.scale_estimators``).

    ``k`` defaults to 10 (Hoffer et al. 2018, "Top10"); clipped to n.
    """

    _dims = (4,)

    def __init__(self, num_features: int, k: int = DEFAULT_TOPK, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self._init_k(k)


#: norm name -> (1d class, 2d class); "none" has no layer.
NORM_LAYERS = {
    "bn": (nn.BatchNorm1d, nn.BatchNorm2d),
    "l1": (L1BatchNorm1d, L1BatchNorm2d),
    "topk": (TopKBatchNorm1d, TopKBatchNorm2d),
}
