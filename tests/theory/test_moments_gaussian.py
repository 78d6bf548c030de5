"""The Gaussian closed forms of moment propagation, each against numerical quadrature
(scipy.integrate) or an exact reference: ReLU moments, expected slope and second
Hermite coefficient; Clark's max; Gauss–Hermite moments of smooth activations; the
surrogate's smoothed functions and their derivatives."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from noiseprop.theory.moments.gaussian import (SMOOTH_ACTIVATIONS, clark_max, max_k3, rectified_cross_cumulants,
                                               relu_k4, relu_moments, relu_moments_skew, relu_shape, relu_variance,
                                               smooth_activation, smooth_max, smooth_moments, smooth_relu)

# the activations in NumPy (scalar quadrature is far faster without torch)
NP_ACTIVATIONS = {
    "gelu": lambda z: z * special.ndtr(z),
    "gelu_tanh": lambda z: 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3))),
    "silu": lambda z: z * special.expit(z),
    "tanh": math.tanh,
    "sigmoid": special.expit,
    "softplus": lambda z: float(np.logaddexp(0.0, z)),
}
CASES = [(0.0, 1.0), (1.3, 0.4), (-0.7, 0.5), (2.0, 0.05), (-3.0, 1.0), (0.2, 3.0)]


def _expect(f, mu, s):
    """E f(μ + sZ) by adaptive quadrature over Z."""
    val, _ = integrate.quad(lambda z: f(mu + s * z) * stats.norm.pdf(z), -12, 12, limit=200,
                            points=[(-mu / s)] if abs(mu / s) < 12 else None)
    return val


def _t(v):
    return torch.tensor([v], dtype=torch.float64)


@pytest.mark.parametrize("mu,s", CASES)
def test_relu_moments_against_quadrature(mu, s):
    relu = lambda z: max(z, 0.0)
    mean, var, slope, c2, sd = relu_moments(_t(mu), _t(s * s))
    m1 = _expect(relu, mu, s)
    m2 = _expect(lambda z: relu(z) ** 2, mu, s)
    assert float(mean) == pytest.approx(m1, rel=1e-7, abs=1e-12)
    assert float(var) == pytest.approx(m2 - m1 * m1, rel=1e-6, abs=1e-12)
    # the variance alone, in the input's dtype (the surrogate's variance channel)
    assert float(relu_variance(_t(mu), _t(s * s))) == float(var)
    assert float(relu_variance(_t(mu).float(), _t(s * s).float())) == pytest.approx(float(var), rel=1e-4, abs=1e-7)
    # expected slope = P(z > 0); second Hermite coefficient E[relu(z)(Z² − 1)]/2
    assert float(slope) == pytest.approx(stats.norm.cdf(mu / s), rel=1e-9, abs=1e-15)
    c2_q, _ = integrate.quad(lambda z: relu(mu + s * z) * (z * z - 1) * stats.norm.pdf(z), -12, 12, limit=200)
    assert float(c2) == pytest.approx(c2_q / 2, rel=1e-6, abs=1e-12)
    # the excess of relu_shape is Var − slope²·s²
    _, _, _, e = relu_shape(_t(mu / s))
    assert float(e) * s * s == pytest.approx(m2 - m1 * m1 - stats.norm.cdf(mu / s) ** 2 * s * s, rel=1e-5, abs=1e-12)



@pytest.mark.parametrize("mu,s", CASES)
def test_relu_variance_is_the_interpolated_gate_transmission(mu, s):
    """docs/THEORY.md §3 (gates under the Gaussian interpolation): for ``z = μ + sX``,
    ``Var relu(z) = s² ∫₀¹ P(X > −α, Y_t > −α) dt``, ``(X, Y_t)`` standard bivariate normal
    with correlation ``t`` (``d/dt Cov(f(X), f(Y_t)) = E f'(X) f'(Y_t)``). The integrand runs
    from ``Φ(α)²`` (t = 0: the expected slope squared) to ``Φ(α)`` (t = 1: the gate's second
    moment); the exact variance, which the closed form (``Φ²s²`` + the excess) is, lies
    between. Reference: scipy's bivariate normal CDF, integrated over ``t = sin θ`` by
    32-point Gauss–Legendre (smooth in θ)."""
    a = mu / s
    _, var, slope, _, _ = relu_moments(_t(mu), _t(s * s))
    nodes, weights = np.polynomial.legendre.leggauss(32)
    th = (nodes + 1) * math.pi / 4  # [0, π/2]
    gate = [stats.multivariate_normal(mean=[0.0, 0.0], cov=[[1.0, math.sin(v)], [math.sin(v), 1.0]],
                                      allow_singular=True).cdf([a, a]) for v in th]
    integral = float(np.sum(weights * np.array(gate) * np.cos(th))) * math.pi / 4
    assert float(var) / (s * s) == pytest.approx(integral, rel=2e-4, abs=1e-6)
    # the two ends bracket it: Φ² ≤ Var/s² ≤ Φ
    assert float(slope) ** 2 - 1e-12 <= float(var) / (s * s) <= float(slope) + 1e-12

def test_relu_moments_zero_variance_is_relu():
    mean, var, slope, c2, _ = relu_moments(torch.tensor([1.5, -2.0], dtype=torch.float64), torch.zeros(2))
    assert mean.tolist() == [1.5, 0.0] and var.tolist() == [0.0, 0.0] and slope.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("ma,mb,va,vb,rho", [(0.3, -0.1, 1.0, 0.5, 0.4), (1.0, 1.0, 0.2, 0.2, -0.6),
                                             (-2.0, 0.5, 0.3, 1.5, 0.9), (0.0, 3.0, 0.01, 0.01, 0.0)])
def test_clark_max_against_quadrature(ma, mb, va, vb, rho):
    """Moments of max(a, b) for a bivariate Gaussian, reduced exactly to 1-D quadrature
    over D = a − b ~ N(Δ, θ²): max = b + relu(D), and b = μ_b + β(D − Δ) + (independent
    of D), β = Cov(b, D)/θ² (likewise a with γ = Cov(a, D)/θ²)."""
    cab = rho * math.sqrt(va * vb)
    mean, var, pa, th, c2, ex, g1, _ = clark_max(_t(ma), _t(mb), _t(va), _t(vb), _t(cab))
    dl, t2 = ma - mb, va + vb - 2 * cab
    t = math.sqrt(t2)
    beta, gamma = (cab - vb) / t2, (va - cab) / t2
    relu = lambda z: max(z, 0.0)
    e1 = _expect(relu, dl, t)
    e2 = _expect(lambda z: relu(z) ** 2, dl, t)
    ez = _expect(lambda z: (z - dl) * relu(z), dl, t)  # E[(D − Δ) relu D]
    m1 = mb + e1
    v = vb + (e2 - e1 * e1) + 2 * beta * ez
    assert float(mean) == pytest.approx(m1, rel=1e-7, abs=1e-10)
    assert float(var) == pytest.approx(v, rel=1e-6, abs=1e-10)
    # Cov(max, a) = Φ·Var a + (1 − Φ)·Cov(a, b)  (Price / Stein)
    cov_a = cab + gamma * ez
    assert float(pa * va + (1 - pa) * cab) == pytest.approx(cov_a, rel=1e-6, abs=1e-10)
    assert float(th) == pytest.approx(t, rel=1e-12)
    assert float(ex) == pytest.approx(e2 - e1 * e1 - float(pa) ** 2 * t2, rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("name", sorted(SMOOTH_ACTIVATIONS))
@pytest.mark.parametrize("mu,s", [(0.0, 1.0), (1.3, 0.4), (-0.7, 2.0), (0.5, 0.0)])
def test_smooth_moments_against_quadrature(name, mu, s):
    """Gauss–Hermite moments (GH_NODES points) against adaptive quadrature; tolerance
    from the measured quadrature error (module docstring): 2e-4 relative at s ≤ 2."""
    fn = SMOOTH_ACTIVATIONS[name]
    f = NP_ACTIVATIONS[name]
    assert f(0.7) == pytest.approx(float(fn(torch.tensor(0.7, dtype=torch.float64))), rel=1e-12)
    mean, var, slope, c2, _ = smooth_moments(fn, _t(mu), _t(s * s))
    if s == 0:
        z = torch.tensor([mu], dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(fn(z).sum(), z)
        assert float(mean) == pytest.approx(f(mu), rel=1e-12) and float(var) == 0.0
        assert float(slope) == pytest.approx(float(g), rel=1e-10)
        return
    m1 = _expect(f, mu, s)
    m2 = _expect(lambda z: f(z) ** 2, mu, s)
    assert float(mean) == pytest.approx(m1, rel=2e-4, abs=1e-8)
    assert float(var) == pytest.approx(m2 - m1 * m1, rel=2e-4, abs=1e-8)
    # expected slope E f'(z) (finite differences of f under the integral)
    h = 1e-5
    d1 = _expect(lambda z: (f(z + h) - f(z - h)) / (2 * h), mu, s)
    assert float(slope) == pytest.approx(d1, rel=2e-4, abs=1e-7)
    c2_q, _ = integrate.quad(lambda z: f(mu + s * z) * (z * z - 1) * stats.norm.pdf(z), -12, 12, limit=200)
    assert float(c2) == pytest.approx(c2_q / 2, rel=2e-4, abs=1e-7)


SKEW_CASES = [(0.0, 1.0, 0.5), (1.3, 0.4, -0.3), (-0.7, 0.5, 0.8), (2.0, 0.05, 0.2), (-3.0, 1.0, 0.6),
              (0.2, 3.0, -0.9), (9.0, 1.0, 0.4)]


@pytest.mark.parametrize("mu,s,g1", SKEW_CASES)
def test_relu_moments_skew_against_quadrature(mu, s, g1):
    """relu_moments_skew is exact for the one-term Gram–Charlier density
    ``φ(Z)(1 + γ₁He₃(Z)/6)`` of ``z = μ + sZ``: mean, variance, ``P(z > 0)`` and the third
    cumulant of ``relu(z)`` against adaptive quadrature of that density; with γ₁ = 0 it
    is relu_moments."""
    dens = lambda z: stats.norm.pdf(z) * (1 + g1 * (z ** 3 - 3 * z) / 6)
    pts = [(-mu / s)] if abs(mu / s) < 12 else None
    E = [integrate.quad(lambda z: max(mu + s * z, 0.0) ** k * dens(z), -12, 12, limit=200, points=pts)[0]
         for k in (1, 2, 3)]
    p_pos = integrate.quad(dens, -mu / s, 12, limit=200)[0] if -mu / s < 12 else 0.0
    mean, var, slope, c2, sd, k3 = relu_moments_skew(_t(mu), _t(s * s), _t(g1 * s ** 3))
    assert float(mean) == pytest.approx(E[0], rel=1e-7, abs=1e-12)
    assert float(var) == pytest.approx(E[1] - E[0] ** 2, rel=1e-6, abs=1e-12)
    assert float(slope) == pytest.approx(min(max(p_pos, 0.0), 1.0), rel=1e-7, abs=1e-12)
    assert float(k3) == pytest.approx(E[2] - 3 * E[0] * E[1] + 2 * E[0] ** 3, rel=1e-5, abs=1e-10 * s ** 3)
    g0 = relu_moments_skew(_t(mu), _t(s * s), _t(0.0))
    for a, b in zip(g0[:5], relu_moments(_t(mu), _t(s * s))):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mu,s", [(0.0, 1.0), (1.0, 1.0), (-1.0, 1.0), (-3.0, 1.0), (-10.0, 2.0), (4.0, 1.0),
                                  (-8.0, 1.0), (-12.0, 1.0), (0.5, 0.2)])
def test_relu_k4_against_quadrature(mu, s):
    """The fourth cumulant of ``relu(z)``, ``z ~ N(μ, s²)``, against quadrature of its
    central moments (the mean first, then ``E(r − m)²``, ``E(r − m)⁴`` over ``z > 0`` plus
    the mass at 0): to 1e-6 relative down to α = −12, where ``κ₄ ≈ 2e-36 s⁴`` and the
    closed form's sums cancel by about 10⁹ (the reason for its accurate ``Φ``)."""
    a = -mu / s
    tail = stats.norm.sf(a)  # P(z > 0)
    part = lambda f: integrate.quad(lambda z: f(mu + s * z) * stats.norm.pdf(z), a, np.inf, limit=200,
                                    epsabs=0, epsrel=1e-13)[0]
    m = part(lambda v: v)
    c2 = (1 - tail) * m ** 2 + part(lambda v: (v - m) ** 2)
    c4 = (1 - tail) * m ** 4 + part(lambda v: (v - m) ** 4)
    k4 = float(relu_k4(_t(mu), _t(s * s)))
    assert k4 == pytest.approx(c4 - 3 * c2 * c2, rel=1e-6, abs=1e-12 * s ** 4 * max(tail, 1e-300))
    # a unit that rarely fires (probability p): κ₄/Var² between 1/p and its limit 6/p (given
    # that it fires, r is nearly exponential with mean s/|α|), the heavy tail the diagnostic sees
    if a >= 3:
        assert 1 / tail < k4 / c2 ** 2 < 6 / tail


@pytest.mark.parametrize("ma,sa,mb,sb,rho", [(0.0, 1.0, 0.3, 0.8, 0.6), (1.2, 0.5, -0.4, 1.0, -0.5),
                                             (-1.5, 0.7, 0.2, 0.4, 0.9), (0.4, 2.0, 1.0, 0.3, 0.0)])
def test_rectified_cross_cumulants_against_quadrature(ma, sa, mb, sb, rho):
    """For ``r = relu(a)`` and ``b`` jointly Gaussian: the cross cumulants
    ``κ(r, r, b)``, ``κ(r, b, b)`` and the third cumulant of the residual sum ``r + b``
    against quadrature over ``a`` with ``b | a`` Gaussian (exact conditional moments)."""
    beta = rho * sb / sa
    tau2 = sb * sb * (1 - rho * rho)

    def e(f):  # E f(a, E[b'|a], E[b'²|a]) over a ~ N(ma, sa²)
        return integrate.quad(lambda z: f(ma + sa * z, beta * sa * z, (beta * sa * z) ** 2 + tau2) * stats.norm.pdf(z),
                              -12, 12, limit=200, points=[-ma / sa])[0]

    mr = e(lambda a, b1, b2: max(a, 0.0))
    c_rb = e(lambda a, b1, b2: (max(a, 0.0) - mr) * b1)
    rrb_q = e(lambda a, b1, b2: (max(a, 0.0) - mr) ** 2 * b1)
    rbb_q = e(lambda a, b1, b2: (max(a, 0.0) - mr) * b2)
    rrb, rbb = rectified_cross_cumulants(_t(ma), _t(sa), _t(c_rb), _t(sb * sb))
    assert float(rrb) == pytest.approx(rrb_q, rel=1e-6, abs=1e-12)
    assert float(rbb) == pytest.approx(rbb_q, rel=1e-6, abs=1e-12)
    # the third cumulant of h = r + b from the parts (b Gaussian: κ₃(b) = 0)
    k3_r = float(relu_moments_skew(_t(ma), _t(sa * sa), _t(0.0))[5])
    mh = mr + mb
    k3_q = integrate.quad(lambda z: sum(
        w * (max(ma + sa * z, 0.0) + mb + beta * sa * z + math.sqrt(tau2) * t - mh) ** 3
        for t, w in zip(*np.polynomial.hermite_e.hermegauss(8))) / math.sqrt(2 * math.pi) * stats.norm.pdf(z),
        -12, 12, limit=200, points=[-ma / sa])[0]
    assert k3_r + 3 * float(rrb) + 3 * float(rbb) == pytest.approx(k3_q, rel=1e-6, abs=1e-10)


def test_smoothed_functions_and_their_slopes():
    """The surrogate's functions equal the Gaussian expectations at the mean, and their
    derivatives the expected slopes (Φ(z/s) for the ReLU, Φ(α) for Clark's max)."""
    z = torch.tensor([-1.0, 0.2, 2.5], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.5, 1.0, 0.3], dtype=torch.float64)
    v = smooth_relu(z, s)
    mean, _, slope, _, _ = relu_moments(z.detach(), s * s)
    assert torch.allclose(v, mean)
    (g,) = torch.autograd.grad(v.sum(), z)
    assert torch.allclose(g, slope)
    fn = SMOOTH_ACTIVATIONS["gelu"]
    w = smooth_activation(fn, z, s)
    m2, _, sl2, _, _ = smooth_moments(fn, z.detach(), s * s)
    assert torch.allclose(w, m2)
    (g2,) = torch.autograd.grad(w.sum(), z)
    assert torch.allclose(g2, sl2, rtol=1e-8)
    a = torch.tensor([0.3, -1.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.0, 0.5], dtype=torch.float64, requires_grad=True)
    th = torch.tensor([0.7, 0.2], dtype=torch.float64)
    m = smooth_max(a, b, th)
    # with va = th², vb = 0: Clark's mean at these means
    cm, _, pa, _, _, _, _, _ = clark_max(a.detach(), b.detach(), th * th, torch.zeros(2, dtype=torch.float64),
                                   torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(m, cm)
    ga, gb = torch.autograd.grad(m.sum(), (a, b))
    assert torch.allclose(ga, pa) and torch.allclose(gb, 1 - pa)
    # with the skewness of a − b: the Gram–Charlier mean and P(a > b) of the skewed clark_max
    g1m = torch.tensor([0.6, -0.4], dtype=torch.float64)
    m = smooth_max(a, b, th, g1m)
    cm, _, pa, _, _, _, g1c, _ = clark_max(a.detach(), b.detach(), th * th, torch.zeros(2, dtype=torch.float64),
                                        torch.zeros(2, dtype=torch.float64), k3_a=g1m * th ** 3)
    assert torch.allclose(g1c, g1m) and torch.allclose(m, cm)
    ga, gb = torch.autograd.grad(m.sum(), (a, b))
    assert torch.allclose(ga, pa) and torch.allclose(gb, 1 - pa)
    # with a skewness: the Gram–Charlier mean and P(z > 0) of relu_moments_skew
    g1 = torch.tensor([0.5, -0.3, 0.9], dtype=torch.float64)
    v = smooth_relu(z, s, g1)
    mean, _, slope, _, _, _ = relu_moments_skew(z.detach(), s * s, g1 * s ** 3)
    assert torch.allclose(v, mean)
    (g,) = torch.autograd.grad(v.sum(), z)
    assert torch.allclose(g, slope)


@pytest.mark.parametrize("ma,mb,va,vb,rho", [(0.3, -0.1, 1.0, 0.5, 0.4), (1.0, 1.0, 0.2, 0.2, -0.6),
                                             (-2.0, 0.5, 0.3, 1.5, 0.9), (0.5, 0.0, 1.0, 2.0, 0.35)])
def test_max_k3_against_quadrature(ma, mb, va, vb, rho):
    """The third cumulant of max(a, b) for a bivariate Gaussian, reduced exactly to 1-D
    quadrature over D = a − b: max − E max = X + e, X = β(D − Δ) + relu D + μ_b − E max
    and e independent of D and Gaussian, so κ₃ = E X³ (E X = 0, E e = E e³ = 0)."""
    cab = rho * math.sqrt(va * vb)
    mean, var, pa, th, c2, ex, g1, _ = clark_max(_t(ma), _t(mb), _t(va), _t(vb), _t(cab))
    dl, t2 = ma - mb, va + vb - 2 * cab
    t = math.sqrt(t2)
    beta = (cab - vb) / t2
    m = float(mean)
    k3_q = _expect(lambda z: (beta * (z - dl) + max(z, 0.0) + mb - m) ** 3, dl, t)
    assert float(max_k3(_t(dl), th, _t(cab - vb), _t(vb))) == pytest.approx(k3_q, rel=1e-6, abs=1e-10)
    # the moment pass takes it from clark_max's own intermediates
    assert float(clark_max(_t(ma), _t(mb), _t(va), _t(vb), _t(cab), with_k3=True)[-1]) == pytest.approx(k3_q, rel=1e-6,
                                                                                                         abs=1e-10)


def _window_max_closure(mu, cov, skewed):
    """The moment pass's pairwise maximum over a window (``((e₀ ∨ e₁) ∨ e₂) ∨ e₃``) from
    the elements' means and covariance, with or without the running maximum's skewness."""
    m, v, c, k3 = mu[:, 0], cov[:, 0, 0], cov[:, 0, :].clone(), None
    for j in range(1, mu.shape[1]):
        mean, var, pa, th, _, _, _, k3n = clark_max(m, mu[:, j], v, cov[:, j, j], c[:, j], k3, with_k3=True)
        if skewed:
            assert torch.allclose(k3n, max_k3(m - mu[:, j], th, c[:, j] - cov[:, j, j], cov[:, j, j], k3))
            k3 = k3n
        c = pa[:, None] * c + (1 - pa[:, None]) * cov[:, j, :]
        m, v = mean, var
    return m, v


def test_skewed_window_max_is_closer_to_monte_carlo():
    """Clark's pairwise maximum re-approximates the running maximum of a 2×2 window as
    Gaussian at every step; carrying its third cumulant (:func:`max_k3`) into the next
    step (the skewed :func:`clark_max`) brings the window maximum's variance closer to
    the exact one (Monte-Carlo, 400 000 draws per window, on 40 windows of correlated
    Gaussians like a convolution's outputs): the pooled error shrinks by more than three
    of Monte-Carlo's standard errors, and so does the mean's."""
    g = torch.Generator().manual_seed(4)
    n, draws = 40, 400_000
    A = torch.randn(n, 4, 4, generator=g, dtype=torch.float64)
    cov = A @ A.mT / 4 + 0.6 * torch.ones(4, 4, dtype=torch.float64)  # positively correlated neighbours
    mu = 0.5 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(cov)
    mc_m, mc_v, se_m, se_v = [], [], [], []
    for i in range(n):
        z = torch.randn(draws, 4, generator=g, dtype=torch.float64) @ L[i].T + mu[i]
        mx = z.max(1).values
        c = mx - mx.mean()
        mc_m.append(mx.mean()); mc_v.append(mx.var())
        se_m.append(mx.std() / math.sqrt(draws)); se_v.append(((c ** 4).mean() - mx.var() ** 2).sqrt() / math.sqrt(draws))
    mc_m, mc_v, se_m, se_v = (torch.stack(t) for t in (mc_m, mc_v, se_m, se_v))
    m0, v0 = _window_max_closure(mu, cov, skewed=False)
    m1, v1 = _window_max_closure(mu, cov, skewed=True)
    se_vsum, se_msum = float(se_v.pow(2).sum().sqrt()), float(se_m.pow(2).sum().sqrt())
    err_v0, err_v1 = float((v0 - mc_v).sum()), float((v1 - mc_v).sum())
    err_m0, err_m1 = float((m0 - mc_m).sum()), float((m1 - mc_m).sum())
    assert abs(err_v1) < abs(err_v0) - 3 * se_vsum, (err_v0, err_v1, se_vsum)
    assert abs(err_m1) < abs(err_m0) - 3 * se_msum, (err_m0, err_m1, se_msum)


@pytest.mark.parametrize("mu,s", CASES + [(0.5, 0.0)])
@pytest.mark.parametrize("kind", [("leaky_relu", 0.01), ("leaky_relu", 0.2), ("elu", 1.0), ("elu", 0.5)])
def test_leaky_relu_and_elu_moments_against_quadrature(kind, mu, s):
    """LeakyReLU's moments from the ReLU's (``leaky_relu_moments``) and ELU's in closed
    form (``elu_moments``; Gauss–Hermite is off by up to 1% here, the derivative's kink
    at 0), against adaptive quadrature to 1e-7: mean, variance, expected slope and the
    second Hermite coefficient; at s = 0 the function and its slope at μ. The surrogate's
    smoothed function takes the same mean and the same slope."""
    from noiseprop.theory.moments.gaussian import (activation_function, elu_moments, leaky_relu_moments,
                                                   smooth_elu, smooth_leaky_relu)

    name, a = kind
    if name == "leaky_relu":
        f = lambda z: z if z > 0 else a * z  # noqa: E731
        fp = lambda z: 1.0 if z > 0 else a  # noqa: E731
        mean, var, slope, c2, _ = leaky_relu_moments(_t(mu), _t(s * s), a)
        smooth = smooth_leaky_relu
    else:
        f = lambda z: z if z > 0 else a * math.expm1(z)  # noqa: E731
        fp = lambda z: 1.0 if z > 0 else a * math.exp(z)  # noqa: E731
        mean, var, slope, c2, _ = elu_moments(_t(mu), _t(s * s), a)
        smooth = smooth_elu
    tol = dict(rel=1e-7, abs=1e-10)
    assert float(activation_function(kind)(torch.tensor(-0.7, dtype=torch.float64))) == pytest.approx(f(-0.7))
    if s == 0:
        assert float(mean) == pytest.approx(f(mu), rel=1e-12) and float(var) == 0.0
        assert float(slope) == pytest.approx(fp(mu), rel=1e-10)
        return
    m1 = _expect(f, mu, s)
    assert float(mean) == pytest.approx(m1, **tol)
    assert float(var) == pytest.approx(_expect(lambda z: f(z) ** 2, mu, s) - m1 * m1, **tol)
    assert float(slope) == pytest.approx(_expect(fp, mu, s), **tol)
    c2_q, _ = integrate.quad(lambda z: f(mu + s * z) * (z * z - 1) * stats.norm.pdf(z), -12, 12, limit=200,
                             points=[(-mu / s)] if abs(mu / s) < 12 else None)
    assert float(c2) == pytest.approx(c2_q / 2, **tol)
    # the surrogate: E f(z + sζ) with s fixed, and its derivative E f'
    z = _t(mu).requires_grad_(True)
    val = smooth(z, _t(s), a)
    (g,) = torch.autograd.grad(val.sum(), z)
    assert float(val.detach()) == pytest.approx(m1, **tol)
    assert float(g) == pytest.approx(_expect(fp, mu, s), **tol)


def test_smoothed_means_derivative_in_the_std():
    """The variance channel's derivative of a smoothed mean in its std ``s``: against
    numerical quadrature, ``∂/∂s E f(z + sζ) = E[f(z + sζ)(ζ² − 1)]/s`` (Stein twice), for
    GELU and tanh (Gauss–Hermite) and ELU (closed form); and
    :func:`elementwise_with_slopes` gives the value and both derivatives of its function
    with one input broadcast."""
    from noiseprop.theory.moments.gaussian import elementwise_with_slopes, smooth_elu

    zs, ss = [-0.8, 0.3, 1.5], [0.4, 1.0, 1.7]
    cases = {  # the smoothed mean as the surrogate takes it, and the function pointwise
        "gelu": (lambda z, s: smooth_activation(SMOOTH_ACTIVATIONS["gelu"], z, s), lambda u: u * special.ndtr(u)),
        "tanh": (lambda z, s: smooth_activation(SMOOTH_ACTIVATIONS["tanh"], z, s), math.tanh),
        "elu": (lambda z, s: smooth_elu(z, s, 0.7), lambda u: u if u > 0 else 0.7 * math.expm1(u))}
    for name, (fun, f) in cases.items():
        z = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
        s = torch.tensor(ss, dtype=torch.float64, requires_grad=True)
        (gs,) = torch.autograd.grad(fun(z, s).sum(), s)
        for i in range(3):  # the kink of ELU's derivative at t = −z/s as a breakpoint
            ref = integrate.quad(lambda t: f(zs[i] + ss[i] * t) * (t * t - 1) * stats.norm.pdf(t), -12, 12,
                                 limit=200, points=[-zs[i] / ss[i]])[0] / ss[i]
            assert abs(float(gs[i]) - ref) < 1e-6 * max(1.0, abs(ref)), (name, i, float(gs[i]), ref)

    def fn(a, b):
        return torch.sin(a) * b * b

    a = torch.tensor([[0.1, 0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.3], [2.0]], dtype=torch.float64, requires_grad=True)
    out = elementwise_with_slopes(fn, a, b)
    ref = fn(a, b)
    assert torch.equal(out, ref.detach())
    w = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]], dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), (a, b))
    want = torch.autograd.grad((ref * w).sum(), (a, b))
    assert all(torch.allclose(g, r, rtol=1e-12, atol=1e-14) for g, r in zip(got, want))


def test_elu_closed_forms_stay_finite_at_tiny_noise():
    """``log_ndtr``'s derivative is wrong, then infinite, for arguments below about −1e9:
    an ELU unit whose noise std is 1e-10 of its mean gave the surrogate a NaN slope and,
    attached, a NaN value (:func:`elementwise_with_slopes`). With the argument floored
    the smoothed mean is ELU at the mean, its slopes ELU's derivative, and the variance
    and its derivatives finite, in float32 and float64."""
    from noiseprop.theory.moments.gaussian import activation_variance, smooth_elu

    for dt in (torch.float32, torch.float64):
        z = torch.tensor([0.5, 2.0, -0.3], dtype=dt, requires_grad=True)
        s = torch.full((3,), 1e-10, dtype=dt, requires_grad=True)
        val = smooth_elu(z, s, 0.7)
        gz, gs = torch.autograd.grad(val.sum(), (z, s))
        assert torch.allclose(val, torch.nn.functional.elu(z, 0.7), rtol=1e-6)
        assert torch.allclose(gz, torch.tensor([1.0, 1.0, 0.7 * math.exp(-0.3)], dtype=dt), rtol=1e-5)
        assert bool(torch.isfinite(gs).all())
        mu = torch.tensor([0.5, -0.4], dtype=dt, requires_grad=True)
        var = torch.full((2,), 1e-20, dtype=dt, requires_grad=True)
        v = activation_variance(("elu", 0.7), mu, var)
        grads = torch.autograd.grad(v.sum(), (mu, var))
        assert bool(torch.isfinite(v).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
