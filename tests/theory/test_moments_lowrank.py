"""The low-rank-plus-diagonal algebra of moment propagation against exact references:
the patch Gram matrix of a convolution (against unfolding every column), the top
eigenpairs (against a full eigendecomposition), the variance-preserving row rescaling,
and the reproducible generator streams."""
import torch
import torch.nn.functional as F

from noiseprop.theory.moments.lowrank import Dist, generator, patch_gram, renormalise, top_eigh


def test_patch_gram_equals_unfolded_reference():
    g = torch.Generator().manual_seed(0)
    Fm = torch.randn(3, 2, 4, 6, 5, generator=g, dtype=torch.float64)  # [K, B, C, H, W]
    for groups, stride, pad, dil in ((1, 1, 1, 1), (2, 2, 0, 1), (1, 1, 2, 2)):
        k = 3
        Ho = (6 + 2 * pad - dil * (k - 1) - 1) // stride + 1
        Wo = (5 + 2 * pad - dil * (k - 1) - 1) // stride + 1
        G = patch_gram(Fm, groups, k, stride, pad, dil, (Ho, Wo))
        P = F.unfold(Fm.reshape(6, 4, 6, 5), k, dilation=dil, padding=pad, stride=stride)  # [K·B, C·k², L]
        P = P.reshape(3, 2, groups, -1, Ho * Wo)
        ref = torch.einsum("kbgjp,kbgjq->bgpq", P, P)
        assert torch.allclose(G, ref, atol=1e-10)
        # differentiated, the columns are unfolded (a cheaper backward): the same values,
        # and the gradient of the unfolded reference
        w = torch.randn(G.shape, generator=g, dtype=torch.float64)
        Fa, Fb = Fm.clone().requires_grad_(True), Fm.clone().requires_grad_(True)
        Ga = patch_gram(Fa, groups, k, stride, pad, dil, (Ho, Wo))
        assert torch.allclose(Ga, ref, atol=1e-10)
        (Ga * w).sum().backward()
        Pb = F.unfold(Fb.reshape(6, 4, 6, 5), k, dilation=dil, padding=pad, stride=stride).reshape(3, 2, groups, -1,
                                                                                                  Ho * Wo)
        (torch.einsum("kbgjp,kbgjq->bgpq", Pb, Pb) * w).sum().backward()
        assert torch.allclose(Fa.grad, Fb.grad, atol=1e-10)


def test_top_eigh_exact_and_randomised():
    g = torch.Generator().manual_seed(1)
    for L in (20, 120):  # exact below EXACT_EIGH_MAX, randomised above
        A = torch.randn(3, L, 12, generator=g, dtype=torch.float64)
        Gm = A @ torch.diag(torch.logspace(0, -2, 12, dtype=torch.float64)) @ A.mT
        w, U = top_eigh(Gm, 4)
        w0 = torch.linalg.eigvalsh(Gm)[..., -4:].flip(-1)
        assert torch.allclose(w, w0, rtol=1e-3)
        assert torch.allclose(U.mT @ U, torch.eye(4, dtype=torch.float64).expand(3, -1, -1), atol=1e-8)
        assert torch.allclose(Gm @ U, U * w.unsqueeze(-2), atol=1e-3 * float(w0.max()))


def test_top_eigh_orthonormal_in_float32():
    # a float32 Gram with a fast-decaying spectrum (as a convolution's patch Gram), the
    # randomised path asked for as many pairs as there are units (r + OVERSAMPLE >= L):
    # every eigenvector has norm 1 (or 0: a direction below the iteration's resolution,
    # whose true eigenvalue is then negligible), they are orthogonal, and the eigenvalues
    # match float64's (before the fix: norms up to 2.5)
    g = torch.Generator().manual_seed(3)
    L, k = 64, 72
    A = torch.randn(3, L, k, generator=g, dtype=torch.float64) * torch.logspace(0, -4, k, dtype=torch.float64)
    Gd = A @ A.mT
    for r in (4, 40, 54, 64):
        w, U = top_eigh(Gd.float(), r)
        assert w.dtype == U.dtype == torch.float32
        UU = (U.mT @ U).double()
        norms = torch.diagonal(UU, dim1=-2, dim2=-1)
        unit = (norms - 1).abs() < 1e-5
        assert bool((unit | (norms < 1e-12)).all()) and bool(unit[:, :4].all())
        assert float((UU - torch.diag_embed(norms)).abs().max()) < 1e-5
        w0 = torch.linalg.eigvalsh(Gd).flip(-1)[..., :r]
        assert float((w.double() - w0).abs().max()) < 1e-5 * float(w0.max())


def test_renormalise_sets_each_units_variance_and_dist_algebra():
    g = torch.Generator().manual_seed(2)
    Fm = torch.randn(5, 2, 7, generator=g, dtype=torch.float64)
    target = torch.rand(2, 7, generator=g, dtype=torch.float64)
    out = renormalise(Fm, target)
    assert torch.allclose(out.pow(2).sum(0), target)
    # with_lost: the variance a zero row cannot carry, without another pass
    Fz = Fm.clone()
    Fz[:, 1, 3] = 0
    out, lost = renormalise(Fz, target, with_lost=True)
    assert torch.allclose(out.pow(2).sum(0) + lost, target)
    assert float(lost[1, 3]) == float(target[1, 3]) and float(lost.sum()) == float(target[1, 3])
    d = Dist(torch.zeros(2, 7, dtype=torch.float64), Fm, target)
    assert torch.allclose(d.var(), Fm.pow(2).sum(0) + target)
    assert d.padded(8).shape == (8, 2, 7) and torch.equal(d.padded(8)[:5], Fm)
    m = d.map(lambda t: t.reshape(t.shape[0], 7, 1))
    assert m.F.shape == (5, 2, 7, 1) and m.d.shape == (2, 7, 1)


def test_generator_streams_are_reproducible_and_distinct():
    a = torch.randn(4, generator=generator(0, 1, 0))
    assert torch.equal(a, torch.randn(4, generator=generator(0, 1, 0)))
    assert not torch.equal(a, torch.randn(4, generator=generator(0, 2, 0)))
    assert not torch.equal(a, torch.randn(4, generator=generator(0, 1, 1)))
    assert not torch.equal(a, torch.randn(4, generator=generator(1, 1, 0)))


def test_nonlinearity_rule_keeps_each_units_exact_variance():
    """The ReLU rule's output ``μ + Fξ + √d ζ`` (slope·F, the Hermite columns, ``d``)
    has each unit's exact Gaussian moments (``relu_moments``): the rule's known row
    norms (no summation over the columns) add up to the closed form's variance."""
    from torch import nn

    from noiseprop.theory.linearize import LinearizedNetwork
    from noiseprop.theory.moments.gaussian import relu_moments
    from noiseprop.theory.moments.rules import MomentPropagator, _MomentPass
    from noiseprop.theory.noise import RelativeGaussian

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    prop = MomentPropagator(LinearizedNetwork(net), RelativeGaussian(0.3), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = Dist(torch.randn(5, 9, generator=g, dtype=torch.float64), torch.randn(6, 5, 9, generator=g,
             dtype=torch.float64), torch.rand(5, 9, generator=g, dtype=torch.float64))
    ps = _MomentPass(prop)
    ps.cur = "relu"
    y = ps._nonlin(x, "relu")
    mean, var, *_ = relu_moments(x.mu, x.var())
    assert y.K == 6 + prop.h2_rank
    assert torch.allclose(y.mu, mean) and torch.allclose(y.var(), var, rtol=1e-9, atol=1e-12)
