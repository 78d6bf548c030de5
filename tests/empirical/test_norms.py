"""L1 / TopK BatchNorm: statistics, running averages, folding, gradients."""
import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch import nn

from noiseprop.empirical.norms import (
    L1BatchNorm1d,
    L1BatchNorm2d,
    TopKBatchNorm1d,
    TopKBatchNorm2d,
    topk_constant,
)
from noiseprop.theory.targets import find_fold_pairs, fold_bn, folding_affine

ALL = [L1BatchNorm1d, L1BatchNorm2d, TopKBatchNorm1d, TopKBatchNorm2d]


def _batch_scale(layer, x):
    """The batch scale of one training forward (momentum 1 copies it to running_scale)."""
    layer.momentum = 1.0
    layer.train()
    layer(x)
    return layer.running_scale.clone()


def _expected_topk_mean_halfnormal(n, k):
    """E[mean of the k largest of n iid |N(0,1)|], from the order-statistic densities
    f_(r)(t) = n!/((r-1)!(n-r)!) F^(r-1) (1-F)^(n-r) f, F(t) = 2Φ(t) - 1 (independent of
    the layer's code)."""
    t = np.linspace(1e-9, 9.0, 100_001)
    F = 2 * stats.norm.cdf(t) - 1
    logf = np.log(2) + stats.norm.logpdf(t)
    logsf = np.log(2) + stats.norm.logsf(t)  # log(1 - F) without cancellation
    total = 0.0
    for r in range(n - k + 1, n + 1):
        logc = special.gammaln(n + 1) - special.gammaln(r) - special.gammaln(n - r + 1)
        dens = np.exp(logc + (r - 1) * np.log(F) + (n - r) * logsf + logf)
        total += np.trapezoid(t * dens, t)
    return total / k


def test_l1_scale_estimates_std_on_gaussian_data():
    # E|x - x̄| = σ √(2/π) √((n-1)/n) for Gaussian x, so E[s_L1] = σ √((n-1)/n);
    # s.e. of s_L1/σ ≈ √((π/2 - 1)/n) (variance of |x| for a half-normal, delta method).
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.5, 1.0, 3.0, 10.0])
    x = torch.randn(256, 4, 8, 8, generator=g, dtype=torch.float64) * sigma.view(1, -1, 1, 1).double() + 7.0
    layer = L1BatchNorm2d(4).double()
    s = _batch_scale(layer, x)
    n = 256 * 64
    se = math.sqrt((math.pi / 2 - 1) / n)
    ratio = s / sigma.double()
    assert torch.all((ratio - math.sqrt((n - 1) / n)).abs() < 5 * se), ratio
    assert torch.allclose(layer.running_mean, torch.full((4,), 7.0, dtype=torch.float64), atol=5 * 10.0 / math.sqrt(n))


def test_topk_scale_matches_its_gaussian_expectation():
    # s_TopK/σ = C(n)·mean(top_k |x-x̄|)/σ; its expectation from order statistics of the
    # half-normal. 400 independent channels; tolerance 5 s.e. of their mean.
    g = torch.Generator().manual_seed(1)
    N, C, H, W = 64, 16, 8, 8
    n = N * H * W
    k = 10
    sigma = torch.linspace(0.2, 5.0, C, dtype=torch.float64)
    ratios = []
    layer = TopKBatchNorm2d(C, k=k).double()
    for _ in range(25):
        x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * sigma.view(1, -1, 1, 1) - 3.0
        ratios.append(_batch_scale(layer, x) / sigma)
    r = torch.cat(ratios).numpy()
    expected = topk_constant(n) * _expected_topk_mean_halfnormal(n, k)
    se = r.std(ddof=1) / math.sqrt(r.size)
    assert abs(r.mean() - expected) < 5 * se, (r.mean(), expected, se)
    # The documented bias of Hoffer et al.'s constant at this n (module docstring): ≈1.25.
    assert 1.2 < expected < 1.3


def test_topk_constant_formula():
    n = 4096
    assert topk_constant(n) == pytest.approx(0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n)))
    with pytest.raises(ValueError, match="at least 2"):
        topk_constant(1)


def test_topk_k_is_clipped_to_the_batch():
    # With k >= n the TopK scale is C(n)·mean|x - x̄| over all n elements.
    x = torch.tensor([[1.0], [2.0], [4.0], [9.0]], dtype=torch.float64)
    layer = TopKBatchNorm1d(1, k=10).double()
    s = _batch_scale(layer, x)
    dev = (x - x.mean()).abs().mean()
    assert torch.allclose(s, topk_constant(4) * dev)
    layer3 = TopKBatchNorm1d(1, k=1).double()
    assert torch.allclose(_batch_scale(layer3, x), topk_constant(4) * (x - x.mean()).abs().max())


@pytest.mark.parametrize("cls", ALL)
def test_running_statistics_follow_pytorch_momentum_convention(cls):
    g = torch.Generator().manual_seed(2)
    shape = (32, 3, 4, 4) if cls.__name__.endswith("2d") else (32, 3)
    x1 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    x2 = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 - 1
    ref = cls(3).double()
    s1, s2 = _batch_scale(ref, x1), _batch_scale(ref, x2)
    dims = (0, 2, 3) if len(shape) == 4 else (0,)
    layer = cls(3, momentum=0.3).double().train()
    layer(x1)
    layer(x2)
    m = 0.3
    exp_mean = (1 - m) * (m * x1.mean(dims)) + m * x2.mean(dims)
    exp_scale = (1 - m) * ((1 - m) * 1.0 + m * s1) + m * s2
    assert torch.allclose(layer.running_mean, exp_mean)
    assert torch.allclose(layer.running_scale, exp_scale)
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("cls", ALL)
def test_train_output_is_normalised_and_eval_is_the_folding_affine(cls):
    g = torch.Generator().manual_seed(3)
    shape = (64, 5, 6, 6) if cls.__name__.endswith("2d") else (64, 5)
    layer = cls(5).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    layer.train()
    y = layer(x)
    dims = (0, 2, 3) if len(shape) == 4 else (0,)
    view = (1, -1) + (1,) * (len(shape) - 2)
    xhat = (y - layer.bias.view(view)) / layer.weight.view(view)
    assert torch.allclose(xhat.mean(dims), torch.zeros(5, dtype=torch.float64), atol=1e-10)
    layer.eval()
    a, c = layer.folding_affine()
    assert torch.allclose(layer(x), a.view(view) * x + c.view(view), rtol=1e-12, atol=1e-12)
    a2, c2 = folding_affine(layer)
    assert torch.equal(a, a2) and torch.equal(c, c2)
    assert torch.allclose(a, layer.weight / (layer.running_scale + layer.eps))


@pytest.mark.parametrize("norm_cls,layer_cls,shape,flat", [
    (L1BatchNorm2d, lambda: nn.Conv2d(3, 6, 3, padding=1), (16, 3, 8, 8), 6 * 64),
    (TopKBatchNorm2d, lambda: nn.Conv2d(3, 6, 3, padding=1), (16, 3, 8, 8), 6 * 64),
    (L1BatchNorm1d, lambda: nn.Linear(7, 6), (16, 7), 6),
    (TopKBatchNorm1d, lambda: nn.Linear(7, 6), (16, 7), 6),
])
def test_fold_bn_gives_the_same_eval_outputs(norm_cls, layer_cls, shape, flat):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(layer_cls(), norm_cls(6), nn.ReLU(), nn.Flatten(), nn.Linear(flat, 4))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):  # non-trivial running statistics and affine parameters
        loss = model(torch.randn(shape, generator=g) * 2 + 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert find_fold_pairs(model) == [("0", "1")]
    folded = fold_bn(model)
    assert isinstance(folded[1], nn.Identity)
    y, yf = model(x), folded(x)
    assert torch.allclose(yf, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


@pytest.mark.parametrize("cls", ALL)
def test_gradients_are_correct(cls):
    g = torch.Generator().manual_seed(5)
    shape = (6, 2, 3, 3) if cls.__name__.endswith("2d") else (12, 2)
    layer = cls(2, **({"k": 3} if "TopK" in cls.__name__ else {})).double().train()
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-6, atol=1e-5)


def test_input_validation():
    with pytest.raises(ValueError, match="rank 4"):
        L1BatchNorm2d(3)(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="channels"):
        TopKBatchNorm1d(3)(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="more than 1 value"):
        L1BatchNorm1d(3).train()(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="k must be"):
        TopKBatchNorm2d(3, k=0)
    with pytest.raises(ValueError, match="momentum"):
        L1BatchNorm2d(3, momentum=2.0)
    # eval mode accepts a single example
    assert L1BatchNorm1d(3).eval()(torch.zeros(1, 3)).shape == (1, 3)
