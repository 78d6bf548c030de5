"""Gaussian closed forms used by moment propagation.

Every function takes a Gaussian input ``z = μ + s·Z``, ``Z ~ N(0, 1)``, and returns the
moments of a nonlinearity of it. Each names its derivation and its test
(``tests/theory/test_moments_gaussian.py`` checks every one against
``scipy.integrate.quad`` or an exact reference).

* :func:`relu_moments`: ``E relu z = μΦ(α) + sφ(α)``, ``E relu² z = (μ² + s²)Φ(α) +
  μsφ(α)`` (α = μ/s; integrate ``z·φ`` and ``z²·φ`` over ``z > 0``; docs/THEORY.md §3), the
  expected slope ``E relu'(z) = Φ(α)`` (Stein's lemma: ``Cov(relu z, z) = s²E relu'``,
  so for jointly Gaussian units ``Cov(relu zᵢ, zⱼ) = Φ(αᵢ)Cov(zᵢ, zⱼ)``, Price 1958) and
  the second Hermite coefficient ``c₂ = E[relu(z)(Z² − 1)]/2 = sφ(α)/2``.
* :func:`relu_moments_skew`: the same for a pre-activation with a third cumulant ``κ₃``
  (skewness ``γ₁ = κ₃/s³``), under the one-term Gram–Charlier density
  ``φ(Z)(1 + γ₁He₃(Z)/6)``: integrating ``He₃φ`` against ``1``, ``z``, ``z²``, ``z³`` over
  ``z > 0`` (``∫_c^∞ Heₙφ = Heₙ₋₁(c)φ(c)``, ``z·Heₙ = Heₙ₊₁ + n·Heₙ₋₁``) adds
  ``−γ₁sαφ(α)/6`` to ``E relu``, ``γ₁s²φ(α)/3`` to ``E relu²``, ``κ₃Φ(α)`` to ``E relu³``
  and ``γ₁(α² − 1)φ(α)/6`` to ``P(z > 0)`` (the derivative of the mean in ``μ``, used as
  the slope); it also returns the output's third cumulant.
* :func:`rectified_cross_cumulants`: for ``r = relu(a)`` and ``b`` jointly Gaussian with
  ``a``, the third-order cross cumulants of ``r`` and ``b`` (Stein's lemma):
  ``κ(r, r, b) = 2·Cov(a, b)·E r·(1 − Φ(α))`` and ``κ(r, b, b) = Cov(a, b)²φ(α)/s_a``,
  with ``Cov(a, b) = Cov(r, b)/Φ(α)``. A residual connection adds a rectified skip to a
  branch: its sum is skewed, ``κ₃(r + b) = κ₃(r) + κ₃(b) + 3κ(r, r, b) + 3κ(r, b, b)``.
* :func:`clark_max`: Clark (1961), the maximum of two jointly Gaussian variables,
  ``max(a, b) = b + relu(a − b)``, ``a − b ~ N(Δ, θ²)``; with a skewed input (the
  running maximum of a pooling window) the Gram–Charlier ``relu(a − b)``.
* :func:`max_k3`: the third cumulant of that maximum, ``κ₃(relu(a − b)) + 3κ(r, r, b) +
  3κ(r, b, b)`` (the cross cumulants of :func:`rectified_cross_cumulants` with
  ``Cov(relu(a − b), b) = Φ·Cov(a − b, b)``), exact for jointly Gaussian ``a, b``.
* :func:`leaky_relu_moments`: ``(1 − a)·relu(z) + a·z`` from the ReLU's moments and
  ``Cov(relu z, z) = σ²Φ(μ/σ)``; :func:`elu_moments`: ELU in closed form through the
  truncated moments ``E[e^{kz}; z ≤ 0] = e^{kμ + k²σ²/2}Φ(−μ/σ − kσ)`` (Gauss–Hermite is
  off by up to 1% there: the derivative jumps at 0).
* :func:`smooth_moments`: any smooth activation (GELU, SiLU, tanh, sigmoid, softplus)
  by ``GH_NODES``-point Gauss–Hermite quadrature: ``E f``, ``E f²``, the expected slope
  ``E f'(z) = E[f(z)Z]/s`` (Stein) and ``c₂``.
* :func:`smooth_relu`, :func:`smooth_leaky_relu`, :func:`smooth_elu`, :func:`smooth_max`,
  :func:`smooth_activation`: the same
  expectations as functions of the mean with the std fixed (the surrogate network);
  their derivatives are the expected slopes.

All moment formulas run in float64: ``E relu² − (E relu)²`` cancels badly in float32
when ``s ≪ |μ|``; the variance is written as ``s²(Φ + g)`` with ``g`` free of that
cancellation.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["npdf", "ncdf", "relu_shape", "relu_moments", "relu_moments_skew", "relu_k3", "relu_k4", "skewness",
           "rectified_cross_cumulants", "max_k3",
           "SKEW_MAX", "clark_max", "smooth_moments", "smooth_relu",
           "smooth_max", "smooth_activation", "SMOOTH_ACTIVATIONS", "GH_NODES", "TINY", "safe_sqrt",
           "leaky_relu_moments", "smooth_leaky_relu", "elu_moments", "smooth_elu", "activation_function",
           "activation_variance", "relu_variance", "elementwise_with_slopes"]

INV_SQRT2PI = 1.0 / math.sqrt(2 * math.pi)
#: a std below this is treated as zero (the nonlinearity is then applied to the mean)
TINY = 1e-30
#: Gauss–Hermite points for smooth activations: exact for polynomials of degree
#: 2·GH_NODES − 1. Measured against adaptive quadrature: GELU (entire) to ~1e-12; tanh,
#: the hardest (poles at ±iπ/2), variance to 1e-8 relative at s = 1, 8e-5 at s = 2,
#: 1.5e-3 at s = 3 (a pre-activation noise std three times tanh's own scale).
GH_NODES = 64


class _SafeSqrt(torch.autograd.Function):
    """``√x`` whose derivative is 0 where ``x ≤ 0`` (instead of ``inf``, which turns into
    NaN when it meets a zero gradient): a zero variance stays zero to first order under
    a perturbation of the means, so its square root has no first-order change there."""

    @staticmethod
    def forward(ctx, x):
        r = x.sqrt()
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        pos = r > 0
        return torch.where(pos, g / (2 * torch.where(pos, r, torch.ones_like(r))), torch.zeros_like(g))


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``x.sqrt()``; differentiable at 0 with derivative 0 (:class:`_SafeSqrt`); the
    plain square root when no gradient is being recorded."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SafeSqrt.apply(x)
    return x.sqrt()


def npdf(a: torch.Tensor) -> torch.Tensor:
    """Standard normal density φ."""
    return torch.exp(-0.5 * a * a) * INV_SQRT2PI


def ncdf(a: torch.Tensor) -> torch.Tensor:
    """Standard normal distribution function Φ."""
    return torch.special.ndtr(a)


def relu_shape(alpha: torch.Tensor):
    """For ``z ~ N(μ, s²)``, ``α = μ/s``: ``(Φ, φ, g, e)`` with ``Var(relu z) = s²(Φ + g)``
    and the part the expected-slope linearisation ``Φ·z`` misses,
    ``Var(relu z) − Φ²s² = s²e``; ``g = α²Φ(1−Φ) + αφ(1−2Φ) − φ²``, ``e = Φ(1−Φ) + g``,
    written with ``1 − Φ = Φ(−α)`` to avoid cancellation.

    Derivation: ``E relu² − (E relu)² = s²[(α² + 1)Φ + αφ − (αΦ + φ)²]``, expanded.
    Test: ``test_relu_moments_against_quadrature``."""
    cdf = ncdf(alpha)
    q = ncdf(-alpha)
    pdf = npdf(alpha)
    g = alpha * alpha * cdf * q + alpha * pdf * (q - cdf) - pdf * pdf
    return cdf, pdf, g, cdf * q + g


def _relu_core(mu: torch.Tensor, var: torch.Tensor, dtype: torch.dtype = torch.float64):
    """Shared by the ReLU closures: ``μ``, variance (in ``dtype``, float64 by default),
    ``s``, ``s > TINY``, ``s`` with ones where tiny, ``α`` and :func:`relu_shape`'s
    ``Φ, φ, g``."""
    mu = mu.to(dtype)
    var = var.to(dtype).clamp_min(0)
    s = safe_sqrt(var)
    pos = s > TINY
    sa = torch.where(pos, s, torch.ones_like(s))
    alpha = torch.where(pos, mu / sa, torch.zeros_like(s))
    cdf, pdf, g, _ = relu_shape(alpha)
    pdf = torch.where(pos, pdf, torch.zeros_like(s))
    return mu, var, s, pos, sa, alpha, cdf, pdf, g


def _relu_gauss(mu, var, s, pos, cdf, pdf, g):
    """The Gaussian closure from :func:`_relu_core`: ``(mean, var, slope)``."""
    slope = torch.where(pos, cdf, (mu > 0).double())
    mean = mu * slope + s * pdf
    v = torch.where(pos, (var * (cdf + g)).clamp_min(0), torch.zeros_like(s))
    return mean, v, slope


def relu_variance(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``Var relu(z)``, ``z ~ N(mu, var)``, in ``mu``'s dtype: :func:`relu_moments`'
    variance without its other outputs (the surrogate's variance channel needs only this,
    and only its derivative: no float64 round trip). Test:
    ``test_relu_moments_against_quadrature``."""
    mu, var, s, pos, sa, alpha, cdf, pdf, g = _relu_core(mu, var, mu.dtype)
    return torch.where(pos, (var * (cdf + g)).clamp_min(0), torch.zeros_like(s))


def relu_moments(mu: torch.Tensor, var: torch.Tensor):
    """``(mean, var, slope, c2, s)`` of ``relu(z)``, ``z ~ N(mu, var)`` (float64), with
    ``slope = E relu'(z) = Φ(μ/s)`` and ``c2 = sφ(μ/s)/2`` (module docstring). Where
    ``s`` is below :data:`TINY` the ReLU acts on the mean (slope 1 or 0).

    Test: ``test_relu_moments_against_quadrature``."""
    mu, var, s, pos, sa, alpha, cdf, pdf, g = _relu_core(mu, var)
    mean, v, slope = _relu_gauss(mu, var, s, pos, cdf, pdf, g)
    return mean, v, slope, s * pdf / 2, s


#: the largest |skewness| the Gram–Charlier ReLU closure takes (larger values are clipped):
#: the one-term density ``φ(1 + γ₁He₃/6)`` is negative somewhere for any ``γ₁ ≠ 0``, but
#: only beyond ``|Z| ≈ 2.4`` at ``|γ₁| = 1``, where its weight is small
SKEW_MAX = 1.0
#: beyond this ``|μ/s|`` a ReLU is the identity (or zero) for the third cumulant
_K3_ALPHA_MAX = 8.0


def skewness(k3: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
    """``γ₁ = κ₃/s³`` as the closure takes it: zero where ``s`` is below :data:`TINY` (or
    ``k3`` is ``None``), clipped to ``±SKEW_MAX``."""
    pos = s > TINY
    if k3 is None:
        return torch.zeros_like(s)
    sa = torch.where(pos, s, torch.ones_like(s))
    return torch.where(pos, k3.to(s.dtype) / (sa * sa * sa), torch.zeros_like(s)).clamp(-SKEW_MAX, SKEW_MAX)


def _skew_terms(s, al, pdf, g1):
    """What the Gram–Charlier term adds to ``E relu`` and to the slope ``P(z > 0)``:
    ``(−γ₁sαφ(α)/6, γ₁(α² − 1)φ(α)/6)``."""
    return -g1 * s * al * pdf / 6, g1 * (al * al - 1) * pdf / 6


def _relu_skew(mu, var, s, pos, al, cdf, pdf, g, g1):
    """The one-term Gram–Charlier closure from :func:`_relu_core`: ``(mean, var, slope)``
    (:func:`_relu_gauss` plus the skewness terms; slope ``P(z > 0)``, clipped to [0, 1])."""
    mean, v, slope = _relu_gauss(mu, var, s, pos, cdf, pdf, g)
    dm, dslope = _skew_terms(s, al, pdf, g1)
    var_out = (v + g1 * var * pdf / 3 - 2 * mean * dm - dm * dm).clamp_min(0)
    return mean + dm, var_out, torch.where(pos, (slope + dslope).clamp(0, 1), slope)


def _relu_k3(pos, sa, al, cdf, pdf, g1):
    """The third cumulant of ``relu(z)`` under the Gram–Charlier density, in units of
    ``s`` (no cancellation for ``|α| ≤ _K3_ALPHA_MAX``; the identity / zero beyond)."""
    # E relu, E relu², E relu³ in units of s (E relu³ = Φ(α³ + 3α) + φ(α² + 2) + γ₁Φ)
    a2, t, gp = al * al, al * cdf, g1 * pdf
    m1 = t + pdf - gp * al / 6
    e2 = (a2 + 1) * cdf + al * pdf + gp / 3
    e3 = t * (a2 + 3) + pdf * (a2 + 2) + g1 * cdf
    s3 = sa * sa * sa
    k3 = s3 * (e3 - m1 * (3 * e2 - 2 * m1 * m1))
    k3 = torch.where(al > _K3_ALPHA_MAX, g1 * s3, k3)
    return torch.where(pos & (al >= -_K3_ALPHA_MAX), k3, torch.zeros_like(sa))


def relu_k3(mu: torch.Tensor, var: torch.Tensor, k3: torch.Tensor | None = None) -> torch.Tensor:
    """The third cumulant of ``relu(z)`` (the last output of :func:`relu_moments_skew`;
    ``k3 = None``: ``z`` Gaussian), float64."""
    mu, var, s, pos, sa, alpha, cdf, pdf, g = _relu_core(mu, var)
    return _relu_k3(pos, sa, alpha, cdf, pdf, skewness(k3, s))


def _accurate_cdf(a: torch.Tensor) -> torch.Tensor:
    """``Φ(a)`` to full relative precision in the lower tail: ``φ(a)·√(π/2)·erfcx(−a/√2)``
    below 0 (``erfcx(x) = e^{x²} erfc(x)``), ``1 − Φ(−a)`` above."""
    lower = npdf(a) * math.sqrt(math.pi / 2) * torch.special.erfcx(a.abs() / math.sqrt(2))  # Φ(−|a|)
    return torch.where(a < 0, lower, 1 - lower)


def relu_k4(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """The fourth cumulant ``κ₄ = E(r − E r)⁴ − 3 Var(r)²`` of ``r = relu(z)``, ``z ~ N(μ,
    var)``, float64 (the moment method's tail diagnostic, :func:`~.rules.fourth_cumulant`).

    With ``α = μ/s``, ``m = E r``, ``δ = μ − m`` and the partial moments ``M_j = E[Z^j
    1{Z > −α}]`` of a standard normal ``Z`` (``M₀ = Φ(α)``, ``M₁ = φ(α)``, ``M_j = (j−1)
    M_{j−2} + (−α)^{j−1} φ(α)``, by parts), each central moment is the part below 0 (``r =
    0``, probability ``Φ(−α)``) plus the part above: ``E(r − m)^k = Φ(−α)(−m)^k + Σ_j
    C(k, j) δ^{k−j} s^j M_j``. A unit that rarely fires (``α ≪ 0``, probability ``p =
    Φ(α)``) has ``κ₄/Var(r)²`` between ``1/p`` and ``6/p`` (its limit: given that it fires,
    ``r`` is nearly exponential with mean ``s/|α|``): rare, large values. Zero where ``s`` is 0. Test:
    ``tests/theory/test_moments_gaussian.py::test_relu_k4_against_quadrature``."""
    mu, var, s, pos, sa, al, _, pdf, g = _relu_core(mu, var)
    # Φ(±α) from the scaled complementary error function: ``ndtr`` loses its relative
    # accuracy far in the tail (2% at α = −8), where the sums below cancel most
    cdf, below = _accurate_cdf(al), _accurate_cdf(-al)
    m0, m1 = cdf, pdf
    m2 = m0 - al * pdf
    m3 = 2 * m1 + al * al * pdf
    m4 = 3 * m2 - al * al * al * pdf
    mean = mu * cdf + sa * pdf
    dl = mu - mean
    c2 = below * mean ** 2 + dl * dl * m0 + 2 * dl * sa * m1 + sa * sa * m2
    c4 = (below * mean ** 4 + dl ** 4 * m0 + 4 * dl ** 3 * sa * m1 + 6 * dl * dl * sa * sa * m2
          + 4 * dl * sa ** 3 * m3 + sa ** 4 * m4)
    return torch.where(pos, c4 - 3 * c2 * c2, torch.zeros_like(sa))


def relu_moments_skew(mu: torch.Tensor, var: torch.Tensor, k3: torch.Tensor, with_k3: bool = True):
    """``(mean, var, slope, c2, s, k3_out)`` of ``relu(z)`` for ``z`` with mean ``mu``,
    variance ``var`` and third cumulant ``k3``, under the one-term Gram–Charlier density
    (module docstring; skewness clipped to ``±SKEW_MAX``), float64. ``slope = P(z > 0)``
    (the derivative of the mean in ``μ``), ``c2`` the Gaussian second Hermite coefficient,
    ``k3_out`` the output's third cumulant (``None`` unless ``with_k3``). With ``k3 = 0``
    the first five equal :func:`relu_moments`.

    Test: ``test_relu_moments_skew_against_quadrature``."""
    mu, var, s, pos, sa, al, cdf, pdf, g = _relu_core(mu, var)
    g1 = skewness(k3, s)
    mean, var_out, slope = _relu_skew(mu, var, s, pos, al, cdf, pdf, g, g1)
    k3_out = _relu_k3(pos, sa, al, cdf, pdf, g1) if with_k3 else None
    return mean, var_out, slope, s * pdf / 2, s, k3_out


def rectified_cross_cumulants(mu_a: torch.Tensor, s_a: torch.Tensor, c_rb: torch.Tensor, var_b: torch.Tensor):
    """``(κ(r, r, b), κ(r, b, b))`` for ``r = relu(a)``, ``a ~ N(mu_a, s_a²)``, and ``b``
    jointly Gaussian with ``a``, given ``Cov(r, b) = c_rb`` (module docstring), float64.
    ``Cov(a, b) = c_rb/Φ(α)`` is clipped to ``±s_a·sd(b)``; zero where ``s_a`` is tiny.

    Derivation: Stein's lemma ``E[g(a)b'] = Cov(a, b)E g'(a)`` with ``g = (r − E r)²``
    gives ``κ(r, r, b) = 2Cov(a, b)E[(r − E r)1{a>0}] = 2Cov(a, b)E r(1 − Φ)``; writing
    ``b' = βa' + e`` (``e`` independent of ``a``) and applying it twice,
    ``κ(r, b, b) = β²E[r a'²] − β²s_a²E r = Cov(a, b)²φ(α)/s_a``.
    Test: ``test_rectified_cross_cumulants_against_quadrature``."""
    mu_a, s_a, c_rb = mu_a.double(), s_a.double(), c_rb.double()
    pos = s_a > TINY
    ss = torch.where(pos, s_a, torch.ones_like(s_a))
    al = torch.where(pos, mu_a / ss, torch.zeros_like(s_a))
    cdf, pdf = ncdf(al), npdf(al)
    ok = cdf > 0
    cov_ab = torch.where(ok, c_rb / torch.where(ok, cdf, torch.ones_like(cdf)), torch.zeros_like(c_rb))
    return _cross_cumulants(pos, ss, al, cdf, pdf, cov_ab, var_b)


def _cross_cumulants(pos, ss, al, cdf, pdf, cov_ab, var_b):
    """:func:`rectified_cross_cumulants` from ``Cov(a, b)`` (clipped to ``±s_a·sd(b)``)."""
    lim = ss * safe_sqrt(var_b.double().clamp_min(0))
    cov_ab = torch.maximum(torch.minimum(cov_ab.double(), lim), -lim)
    rrb = torch.where(pos, 2 * cov_ab * ss * (al * cdf + pdf) * ncdf(-al), torch.zeros_like(ss))
    rbb = torch.where(pos, cov_ab * cov_ab * pdf / ss, torch.zeros_like(ss))
    return rrb, rbb


def clark_max(mu_a, mu_b, va, vb, cab, k3_a=None, k3_b=None, with_k3: bool = False):
    """Clark (1961): moments of ``max(a, b)`` for jointly Gaussian ``a, b`` (means
    ``mu_a, mu_b``, variances ``va, vb``, covariance ``cab``), float64.

    ``max(a, b) = b + relu(a − b)``, ``a − b ~ N(Δ, θ²)``, ``θ² = va + vb − 2cab``,
    ``α = Δ/θ``: ``E = μ_b + ΔΦ(α) + θφ(α)``; ``Var = v_b + θ²(Φ + g(α)) + 2Φ(c_ab − v_b)``
    (``Cov(b, relu(a − b)) = Φ·Cov(b, a − b)`` by Stein's lemma). Returns
    ``(mean, var, pa, theta, c2, excess, g1, k3)``: ``pa = Φ(α)`` (so ``Cov(max, ·) =
    Φ Cov(a, ·) + (1 − Φ) Cov(b, ·)``), ``c2 = θφ(α)/2`` the second Hermite coefficient
    of ``relu(a − b)``, ``excess`` the variance the linear part ``pa·a + (1 − pa)·b``
    misses (``θ²e(α)``), ``g1`` the skewness of ``a − b`` the closure took (``None``:
    Gaussian), ``k3`` the output's third cumulant (:func:`max_k3`) if ``with_k3``, else
    ``None``.

    Beyond the Gaussian (the running maximum of a pooling window is skewed): with third
    cumulants ``k3_a``/``k3_b``, ``a − b`` takes ``κ₃(a) − κ₃(b)`` and ``relu(a − b)`` the
    one-term Gram–Charlier closure of :func:`relu_moments_skew` (its mean, variance and
    slope ``pa = P(a > b)``), the covariance term ``2·pa·(c_ab − v_b)``.

    Tests: ``test_clark_max_against_quadrature``, ``test_skewed_window_max_is_closer_to_monte_carlo``."""
    va, vb, cab = va.double(), vb.double(), cab.double()
    th2 = (va + vb - 2 * cab).clamp_min(0)
    th = safe_sqrt(th2)
    pos = th > TINY
    ts = torch.where(pos, th, torch.ones_like(th))
    delta = mu_a.double() - mu_b.double()
    alpha = torch.where(pos, delta / ts, torch.zeros_like(th))
    cdf, pdf, g, exc = relu_shape(alpha)
    pdf = torch.where(pos, pdf, torch.zeros_like(th))
    tie = (delta >= 0).double()
    if k3_a is None and k3_b is None:
        g1 = None
        pa = torch.where(pos, cdf, tie)
        mean = mu_b.double() + delta * pa + th * pdf
        v = (vb + th2 * torch.where(pos, cdf + g, torch.zeros_like(th)) + 2 * pa * (cab - vb)).clamp_min(0)
        excess = torch.where(pos, th2 * exc, torch.zeros_like(th)).clamp_min(0)
    else:
        g1 = skewness((0 if k3_a is None else k3_a.double()) - (0 if k3_b is None else k3_b.double()), th)
        rm, rv, pa = _relu_skew(delta, th2, th, pos, alpha, cdf, pdf, g, g1)
        pa = torch.where(pos, pa, tie)
        mean = mu_b.double() + rm
        v = (vb + rv + 2 * pa * (cab - vb)).clamp_min(0)
        lin = pa * pa * va + (1 - pa) ** 2 * vb + 2 * pa * (1 - pa) * cab
        excess = (v - lin).clamp_min(0)
    k3 = _max_k3(pos, ts, alpha, cdf, pdf, cab - vb, vb, g1, k3_b) if with_k3 else None
    return mean, v, pa, th, th * pdf / 2, excess, g1, k3


def _max_k3(pos, ts, al, cdf, pdf, c_db, vb, g1, k3_b):
    """:func:`max_k3` from :func:`clark_max`'s intermediates (``c_db = Cov(a − b, b)``)."""
    k3_r = _relu_k3(pos, ts, al, cdf, pdf, torch.zeros_like(ts) if g1 is None else g1)
    rrb, rbb = _cross_cumulants(pos, ts, al, cdf, pdf, c_db, vb)  # Cov(d, b) itself: no division by Φ
    out = torch.where(pos, k3_r + 3 * rrb + 3 * rbb, torch.zeros_like(ts))
    return out if k3_b is None else out + k3_b.double()


def max_k3(delta, th, c_db, vb, k3_a=None, k3_b=None):
    """The third cumulant of ``max(a, b) = b + relu(d)``, ``d = a − b`` (mean ``delta``,
    std ``th``), with ``Cov(d, b) = c_db`` and ``Var b = vb``, float64:
    ``κ₃(relu d) + κ₃(b) + 3κ(r, r, b) + 3κ(r, b, b)`` (the cross cumulants of
    :func:`rectified_cross_cumulants`, ``Cov(r, b) = P(d > 0)·c_db``). Exact for jointly
    Gaussian ``a, b``; where ``a`` or ``b`` carries a third cumulant (a running maximum
    over a pooling window), ``d`` takes ``κ₃(a) − κ₃(b)`` and the cross cumulants stay
    the Gaussian ones.

    Test: ``test_max_k3_against_quadrature``."""
    th = th.double()
    k3_d = None if k3_a is None and k3_b is None else (
        (0 if k3_a is None else k3_a.double()) - (0 if k3_b is None else k3_b.double()))
    _, _, s, pos, sa, al, cdf, pdf, _ = _relu_core(delta, th * th)
    return _max_k3(pos, sa, al, cdf, pdf, c_db, vb.double(), None if k3_d is None else skewness(k3_d, s), k3_b)


# ----------------------------------------------------------------------------
# Smooth activations by Gauss–Hermite quadrature
# ----------------------------------------------------------------------------
def _gelu_tanh(z):
    return F.gelu(z, approximate="tanh")


#: name -> elementwise function; the moment pass and the surrogate recognise these
SMOOTH_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
}


def leaky_relu_moments(mu: torch.Tensor, var: torch.Tensor, slope: float):
    """``(mean, var, slope, c2, s)`` of ``leaky_relu(z) = (1 − a)·relu(z) + a·z``,
    ``z ~ N(mu, var)``, ``a`` the negative slope, exactly from the ReLU's
    (:func:`relu_moments`): ``E f = (1 − a) E relu + a μ``, ``Var f = (1 − a)² Var relu +
    a² σ² + 2a(1 − a) Cov(relu z, z)`` with ``Cov(relu z, z) = σ² Φ(μ/σ)`` (Stein),
    ``E f' = (1 − a) Φ(μ/σ) + a``, and the second Hermite coefficient ``(1 − a) c₂``
    (the linear part has none). Test: ``test_leaky_relu_and_elu_moments_against_quadrature``."""
    a = float(slope)
    mean, v, sl, c2, sd = relu_moments(mu, var)
    var = var.double()
    out_v = (1 - a) ** 2 * v + a * a * var + 2 * a * (1 - a) * var * sl
    return (1 - a) * mean + a * mu.double(), out_v.clamp_min(0), (1 - a) * sl + a, (1 - a) * c2, sd


#: ``log Φ(b)`` is taken at ``max(b, −this)``: ``e^c Φ(b)`` is 0 there in float64 anyway,
#: and the derivative of ``log_ndtr`` is wrong, then infinite, below about −1e9 (an ELU
#: unit with ``μ/s`` that large: a NaN slope, which the attached slopes would turn into a
#: NaN value, :func:`elementwise_with_slopes`).
LOG_NDTR_FLOOR = 1e4


def _exp_tail(c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``e^c Φ(b)`` without overflow (``exp(c + log Φ(b))``)."""
    return torch.exp(c + torch.special.log_ndtr(b.clamp_min(-LOG_NDTR_FLOOR)))


def elu_moments(mu: torch.Tensor, var: torch.Tensor, alpha: float):
    """``(mean, var, slope, c2, s)`` of ``elu(z) = z`` (``z > 0``), ``α(eᶻ − 1)``
    (``z ≤ 0``), ``z ~ N(μ, σ²)``, in closed form (float64; ``a = μ/σ``):
    ``E[z; z > 0] = μΦ(a) + σφ(a)``, ``E[z²; z > 0] = (μ² + σ²)Φ(a) + μσφ(a)``,
    ``E[e^{kz}; z ≤ 0] = e^{kμ + k²σ²/2} Φ(−a − kσ)``; the expected slope
    ``Φ(a) + α e^{μ+σ²/2} Φ(−a − σ)`` and the second Hermite coefficient ``σ² E f''/2``
    with ``E f'' = (1 − α)φ(a)/σ + α e^{μ+σ²/2} Φ(−a − σ)`` (the jump of ``f'`` at 0 when
    ``α ≠ 1``). Where ``σ`` is below :data:`TINY`: the function and its slope at ``μ``.
    Test: ``test_leaky_relu_and_elu_moments_against_quadrature``."""
    al = float(alpha)
    mu, var, s, pos, sa, a, cdf, pdf, _ = _relu_core(mu, var)
    e1 = _exp_tail(mu + var / 2, -a - sa)  # E[e^z; z ≤ 0]
    e2 = _exp_tail(2 * mu + 2 * var, -a - 2 * sa)  # E[e^{2z}; z ≤ 0]
    q = ncdf(-a)  # P(z ≤ 0)
    m_pos = mu * cdf + sa * pdf
    mean = m_pos + al * (e1 - q)
    second = (mu * mu + var) * cdf + mu * sa * pdf + al * al * (e2 - 2 * e1 + q)
    v = (second - mean * mean).clamp_min(0)
    slope = cdf + al * e1
    c2 = var / 2 * ((1 - al) * pdf / sa + al * e1)
    # σ = 0: the function at μ, its slope there
    f0 = torch.where(mu > 0, mu, al * torch.expm1(mu.clamp(max=0)))
    d0 = torch.where(mu > 0, torch.ones_like(mu), al * torch.exp(mu.clamp(max=0)))
    zero = torch.zeros_like(mu)
    return (torch.where(pos, mean, f0), torch.where(pos, v, zero), torch.where(pos, slope, d0),
            torch.where(pos, c2, zero), s)


def smooth_elu(z: torch.Tensor, s: torch.Tensor, alpha: float) -> torch.Tensor:
    """``E[elu(z + sζ)]`` (:func:`elu_moments`' mean); its derivative in ``z`` is the
    expected slope, in ``s`` the surrogate's variance channel's; both attached by
    :func:`elementwise_with_slopes`."""
    al = float(alpha)

    def mean(zz, s_):
        pos = s_ > TINY
        ss = torch.where(pos, s_, torch.ones_like(s_))
        a = zz / ss
        val = zz * ncdf(a) + ss * npdf(a) + al * (_exp_tail(zz + ss * ss / 2, -a - ss) - ncdf(-a))
        return torch.where(pos, val, F.elu(zz, al))
    return elementwise_with_slopes(mean, z, s.to(z.dtype))


def activation_function(kind):
    """The elementwise function of an activation kind of the moment pass: ``"relu"``, a
    name of :data:`SMOOTH_ACTIVATIONS`, ``("leaky_relu", negative_slope)`` or ``("elu",
    alpha)``."""
    if kind == "relu":
        return torch.relu
    if isinstance(kind, tuple):
        name, a = kind
        return (lambda z: F.leaky_relu(z, a)) if name == "leaky_relu" else (lambda z: F.elu(z, a))
    return SMOOTH_ACTIVATIONS[kind]


def activation_variance(kind, mu: torch.Tensor, var: torch.Tensor, n: int = GH_NODES) -> torch.Tensor:
    """``Var f(z)``, ``z ~ N(mu, var)``, for an activation kind of the moment pass
    (:func:`activation_function`), in ``mu``'s dtype, with its derivatives in ``mu`` and
    ``var``: :func:`relu_variance`, :func:`leaky_relu_moments`' and :func:`elu_moments`'
    closed forms, :func:`smooth_moments`' ``n``-point Gauss–Hermite variance (the surrogate's variance
    channel, :mod:`.surrogate`), its derivatives attached by
    :func:`elementwise_with_slopes` (by the chain rule through the quadrature nodes in
    float64, once per class, the moment method was 4–5× slower on a GELU network)."""
    if kind == "relu":
        fn = relu_variance
    elif isinstance(kind, tuple):
        name, a = kind
        moments = leaky_relu_moments if name == "leaky_relu" else elu_moments

        def fn(m, v):
            return moments(m, v, a)[1].to(m.dtype)
    else:
        act = SMOOTH_ACTIVATIONS[kind]

        def fn(m, v):
            return smooth_moments(act, m, v, n)[1].to(m.dtype)
    return elementwise_with_slopes(fn, mu, var)


_GH_CACHE: dict = {}


def _gh(n: int = GH_NODES):
    """Probabilists' Gauss–Hermite nodes and weights normalised to a probability
    (``Σ w_k g(t_k) ≈ E g(Z)``), float64."""
    if n not in _GH_CACHE:
        t, w = np.polynomial.hermite_e.hermegauss(n)
        _GH_CACHE[n] = (torch.from_numpy(t), torch.from_numpy(w / w.sum()))
    return _GH_CACHE[n]


def smooth_moments(fn, mu: torch.Tensor, var: torch.Tensor, n: int = GH_NODES):
    """``(mean, var, slope, c2, s)`` of ``fn(z)``, ``z ~ N(mu, var)``, by ``n``-point
    Gauss–Hermite quadrature over ``Z`` (float64): ``E f``, ``Var f = E f² − (E f)²``,
    ``slope = E[f(z)Z]/s = E f'(z)`` (Stein's lemma; ``f'(μ)`` where ``s = 0``) and the
    second Hermite coefficient ``c2 = E[f(z)(Z² − 1)]/2``.

    Test: ``test_smooth_moments_against_quadrature``."""
    t, w = _gh(n)
    t = t.to(mu.device)
    w = w.to(mu.device)
    mu = mu.double()
    var = var.double().clamp_min(0)
    s = safe_sqrt(var)
    z = mu.unsqueeze(-1) + s.unsqueeze(-1) * t  # [..., n]
    fz = fn(z)
    mean = (fz * w).sum(-1)
    m2 = (fz * fz * w).sum(-1)
    v = (m2 - mean * mean).clamp_min(0)
    pos = s > TINY
    ss = torch.where(pos, s, torch.ones_like(s))
    slope_q = (fz * (w * t)).sum(-1) / ss
    # at s = 0 the slope is f'(μ) (autograd through fn)
    if bool((~pos).any()):
        with torch.enable_grad():
            m0 = mu.detach().clone().requires_grad_(True)
            (d0,) = torch.autograd.grad(fn(m0).sum(), m0)
        slope = torch.where(pos, slope_q, d0)
    else:
        slope = slope_q
    c2 = (fz * (w * (t * t - 1))).sum(-1) / 2
    return mean, torch.where(pos, v, torch.zeros_like(v)), slope, torch.where(pos, c2, torch.zeros_like(c2)), s


# ----------------------------------------------------------------------------
# The surrogate's smoothed nonlinearities (std fixed, differentiable in the mean)
# ----------------------------------------------------------------------------
def _with_slopes(value: torch.Tensor, *pairs) -> torch.Tensor:
    """``value`` (computed without a graph) with the derivative ``slope`` with respect to
    each ``x`` of ``pairs = (x, slope), ...``: ``value + Σ slope·(x − x.detach())``. The
    added terms are exactly zero, so the value is unchanged; the backward pass is one
    product per input instead of the chain rule through ``Φ`` and ``φ`` (the surrogate's
    backward runs once per class, so this halves it on max-pooling networks)."""
    out = value
    for x, slope in pairs:
        if x.requires_grad:
            out = out + slope * (x - x.detach())
    return out


def elementwise_with_slopes(fn, *xs: torch.Tensor) -> torch.Tensor:
    """``fn(*xs)`` for an elementwise ``fn`` (each output element depends on the same
    element of every input; the inputs broadcast to one shape), with its partial
    derivatives computed here by one backward pass and attached to the value
    (:func:`_with_slopes`): a backward pass through the result is then one product per
    input instead of the chain rule through ``fn``'s own operations (Gauss–Hermite nodes,
    closed forms), which the surrogate's backward would repeat once per class."""
    if not any(x.requires_grad for x in xs):
        return fn(*xs)
    xs_b = torch.broadcast_tensors(*xs)
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in xs_b]
        out = fn(*leaves)
        live = [i for i, x in enumerate(xs_b) if x.requires_grad]
        grads = torch.autograd.grad(out.sum(), [leaves[i] for i in live], allow_unused=True)
    pairs = [(xs_b[i], torch.zeros_like(out) if g is None else g) for i, g in zip(live, grads)]
    return _with_slopes(out.detach(), *pairs)


def smooth_relu(z: torch.Tensor, s: torch.Tensor, g1: torch.Tensor | None = None) -> torch.Tensor:
    """``E[relu(z + sζ)] = zΦ(z/s) + sφ(z/s)``; its derivative in ``z`` is ``Φ(z/s)``, the
    expected slope, in ``s`` (the surrogate's variance channel) ``φ(z/s)`` (attached
    directly, see :func:`_with_slopes`). With a skewness ``g1`` (fixed) the Gram–Charlier
    mean of :func:`relu_moments_skew`, ``− g1·zφ(z/s)/6``, and its slope in ``z`` (the
    derivative in ``s`` stays the Gaussian one). Test:
    ``test_smoothed_functions_and_their_slopes``."""
    with torch.no_grad():
        pos = s > TINY
        ss = torch.where(pos, s, torch.ones_like(s))
        a = z / ss
        cdf = ncdf(a)
        pdf = npdf(a)
        val = z * cdf + ss * pdf
        slope = cdf
        if g1 is not None:
            dm, dslope = _skew_terms(ss, a, pdf, g1.to(z.dtype))
            val = val + dm
            slope = (slope + dslope).clamp(0, 1)
        val = torch.where(pos, val, torch.relu(z))
        slope = torch.where(pos, slope, (z > 0).to(z.dtype))
        ds = torch.where(pos, pdf, torch.zeros_like(pdf))
    return _with_slopes(val, (z, slope), (s, ds))


def smooth_max(a: torch.Tensor, b: torch.Tensor, th: torch.Tensor, g1: torch.Tensor | None = None) -> torch.Tensor:
    """Clark's ``E[max(A, B)] = aΦ(α) + bΦ(−α) + θφ(α)``, ``θ = sd(A − B)``, ``α = (a −
    b)/θ``; its derivatives are ``Φ(α)`` and ``Φ(−α)`` (with ``θ = 0`` those of ``max``,
    ties split evenly) and, in ``θ`` (the surrogate's variance channel), ``φ(α)``; attached
    directly, see :func:`_with_slopes`. With the skewness ``g1`` of ``A − B`` (fixed), the
    Gram–Charlier mean of :func:`clark_max` (the derivative in ``θ`` stays the Gaussian one)."""
    with torch.no_grad():
        pos = th > TINY
        ts = torch.where(pos, th, torch.ones_like(th))
        al = (a - b) / ts
        pdf = npdf(al)
        pa = ncdf(al)
        val = a * pa + b * (1 - pa) + ts * pdf
        if g1 is not None:
            dm, dslope = _skew_terms(ts, al, pdf, g1.to(a.dtype))
            val = val + dm
            pa = (pa + dslope).clamp(0, 1)
        pb = 1 - pa
        val = torch.where(pos, val, torch.maximum(a, b))
        hard = (a > b).to(a.dtype) + 0.5 * (a == b).to(a.dtype)
        pa, pb = torch.where(pos, pa, hard), torch.where(pos, pb, 1.0 - hard)
        dth = torch.where(pos, pdf, torch.zeros_like(pdf))
    return _with_slopes(val, (a, pa), (b, pb), (th, dth))


def smooth_leaky_relu(z: torch.Tensor, s: torch.Tensor, slope: float, g1: torch.Tensor | None = None) -> torch.Tensor:
    """``E[leaky_relu(z + sζ)] = (1 − a)·E[relu(z + sζ)] + a·z`` (:func:`smooth_relu`); its
    derivative in ``z`` is ``(1 − a)Φ(z/s) + a``, in ``s`` ``(1 − a)φ(z/s)``."""
    a = float(slope)
    return (1 - a) * smooth_relu(z, s, g1) + a * z


def smooth_activation(fn, z: torch.Tensor, s: torch.Tensor, n: int = GH_NODES) -> torch.Tensor:
    """``E[fn(z + sζ)]`` by Gauss–Hermite quadrature; its derivative in ``z`` is the
    expected slope ``E fn'``, in ``s`` (the surrogate's variance channel) ``s E fn''``;
    both attached by :func:`elementwise_with_slopes`."""
    t, w = _gh(n)
    t = t.to(device=z.device, dtype=z.dtype)
    w = w.to(device=z.device, dtype=z.dtype)

    def mean(zz, ss):
        return (fn(zz.unsqueeze(-1) + ss.unsqueeze(-1) * t) * w).sum(-1)
    return elementwise_with_slopes(mean, z, s.to(z.dtype))
