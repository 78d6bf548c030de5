"""Topic ``hardware``: the closed forms behind the PCM noise model's exact moments and
the first-order treatment of global drift compensation (:mod:`noiseprop.theory.hardware`,
:mod:`noiseprop.theory.drift`).

- :func:`hardware_device_moments`: the moments of a rectified normal
  ``X = max(0, a + s z)`` (programming noise clamped at 0; the read-noise factor
  ``max(0, 1 + s z)``) and the Laplace transform of a folded normal
  ``E exp(−λ|μ + σ z|)`` (the expected drift factor ``((t+t₀)/t₀)^{−ν}`` with
  ``ν = |μ_ν + σ_ν z|``, ``λ = ln((t+t₀)/t₀)``);
- :func:`hardware_compensation`: the delta method for the layer scalar ``α = A/B``
  (``A = mean|W_P|``, ``B = mean|W(t)|``): its expectation to second order, its variance
  to first order, and the first-order logit covariance of the compensated layer
  ``ᾱ² J diag(Var W) Jᵀ + Var α · v vᵀ + ᾱ (u vᵀ + v uᵀ)``.

The integrals are done by sympy on the half-lines where the integrands are smooth; each
closed form is checked against sympy's integral at high precision on several points.
"""
from __future__ import annotations

from functools import lru_cache

import mpmath
import sympy as sp

from .base import Derivation

__all__ = ["hardware_device_moments", "hardware_compensation"]

_SOURCE = ("Nandakumar et al., ICECS 2019 (the PCM fit of aihwkit's PCMLikeNoiseModel); "
           "noiseprop.theory.hardware, noiseprop.theory.drift")


def _Phi(x):
    return (1 + sp.erf(x / sp.sqrt(2))) / 2


def _phi(x):
    return sp.exp(-x**2 / 2) / sp.sqrt(2 * sp.pi)


def _numeric_check(closed, pieces, var, subs_list, what: str) -> str:
    """``closed`` against ``Σ ∫ integrand d var`` over ``pieces = [(integrand, lo, hi)]``
    by mpmath quadrature at 25 digits, at each substitution."""
    with mpmath.workdps(25):
        for subs in subs_list:
            ref = mpmath.mpf(0)
            for integrand, lo, hi in pieces:
                f = sp.lambdify(var, integrand.subs(subs), "mpmath")
                l = mpmath.mpf(str(sp.N(lo.subs(subs), 25))) if lo.is_finite else -mpmath.inf
                h = mpmath.mpf(str(sp.N(hi.subs(subs), 25))) if hi.is_finite else mpmath.inf
                inner = [p for p in (-6, -1, 0, 1, 6) if l < p < h]  # where the mass is
                ref += mpmath.quad(f, [l] + inner + [h])
            got = mpmath.mpf(str(sp.N(closed.subs(subs), 25)))
            if abs(got - ref) > mpmath.mpf("1e-15") * (1 + abs(ref)):
                raise AssertionError(f"{what}: closed form {got} != integral {ref} at {subs}")
    return f"{what} (against mpmath quadrature of the defining integral at {len(subs_list)} points, 25 digits)"


@lru_cache(maxsize=None)
def hardware_device_moments() -> Derivation:
    """``E max(0, a+sz) = aΦ(a/s) + sφ(a/s)``, ``E max(0, a+sz)² = (a²+s²)Φ(a/s) + asφ(a/s)``,
    ``E e^{−λ|μ+σz|} = e^{λ²σ²/2}[e^{−λμ}Φ(μ/σ − λσ) + e^{λμ}Φ(−μ/σ − λσ)]``."""
    a = sp.Symbol("a", real=True)
    s, lam, sig = sp.symbols("s lam sigma", positive=True)
    mu = sp.Symbol("mu", real=True)
    z = sp.Symbol("z", real=True)
    m1 = a * _Phi(a / s) + s * _phi(a / s)
    m2 = (a**2 + s**2) * _Phi(a / s) + a * s * _phi(a / s)
    lap = sp.exp(lam**2 * sig**2 / 2) * (sp.exp(-lam * mu) * _Phi(mu / sig - lam * sig)
                                         + sp.exp(lam * mu) * _Phi(-mu / sig - lam * sig))
    # the defining integrals, on the half-lines where the integrands are smooth
    x = sp.Symbol("x", real=True)
    dens = sp.exp(-(x - mu) ** 2 / (2 * sig**2)) / (sig * sp.sqrt(2 * sp.pi))
    pts = [{a: sp.Rational(3, 10), s: sp.Rational(1, 2)}, {a: -1, s: sp.Rational(26, 100)},
           {a: 25, s: sp.Rational(21, 20)}]
    lpts = [{lam: sp.Rational(33, 2), mu: sp.Rational(1, 10), sig: sp.Rational(45, 1000)},
            {lam: 2, mu: sp.Rational(49, 1000), sig: sp.Rational(8, 1000)},
            {lam: sp.Rational(1, 2), mu: -sp.Rational(1, 5), sig: sp.Rational(3, 10)}]
    half = [((a + s * z) * _phi(z), -a / s, sp.oo)]
    half2 = [((a + s * z) ** 2 * _phi(z), -a / s, sp.oo)]
    folded = [(sp.exp(-lam * x) * dens, sp.Integer(0), sp.oo), (sp.exp(lam * x) * dens, -sp.oo, sp.Integer(0))]
    checks = (
        _numeric_check(m1, half, z, pts, "E max(0, a + s z)"),
        _numeric_check(m2, half2, z, pts, "E max(0, a + s z)^2"),
        _numeric_check(lap, folded, x, lpts, "E exp(-lambda |mu + sigma z|)"),
    )
    return Derivation(
        name="hardware.device_moments", topic="hardware",
        title="Moments of the PCM device stages",
        statement=(r"Programming noise clamped at zero and the read-noise factor are rectified normals; the drift "
                   r"factor $e^{-\lambda\nu}$ with $\nu = |\mu_\nu + \sigma_\nu z|$ has the folded normal's Laplace "
                   r"transform as its mean (and with $2\lambda$, its second moment)."),
        assumptions=(r"$z \sim \mathcal N(0, 1)$", r"$s, \sigma, \lambda > 0$"),
        expressions={"rectified_mean": m1, "rectified_second": m2, "drift_factor_mean": lap},
        symbols={"a": a, "s": s, "lam": lam, "mu": mu, "sigma": sig}, latex_names={"lam": r"\lambda"},
        lhs={"rectified_mean": r"\mathbb E \max(0, a + s z)", "rectified_second": r"\mathbb E \max(0, a + s z)^2",
             "drift_factor_mean": r"\mathbb E\, e^{-\lambda |\mu + \sigma z|}"},
        descriptions={"rectified_mean": "mean of a normal clamped at 0",
                      "rectified_second": "second moment of a normal clamped at 0",
                      "drift_factor_mean": r"mean drift factor, $\lambda = \ln((t + t_0)/t_0)$"},
        source=_SOURCE, checks=checks,
        implemented_by=("noiseprop.theory.hardware.PCMLike.device_moments",
                        "noiseprop.theory.hardware.rectified_normal_moments",
                        "noiseprop.theory.hardware.folded_normal_laplace"),
        tested_by=("tests/theory/test_symbolic_hardware.py::test_device_moments_match_implementation",
                   "tests/theory/test_hardware.py::test_pcm_moments_match_monte_carlo"),
        notes=(r"The read noise depends on the programmed conductance through $Q(g_P)$, so $E[g]$ needs one "
               r"more one-dimensional integral over $g_P$ (Gauss–Legendre, split at the kinks of $Q$).",),
    )


@lru_cache(maxsize=None)
def hardware_compensation() -> Derivation:
    """``α = A/B``: ``E α ≈ (Ā/B̄)(1 + V_B/B̄² − C_AB/(ĀB̄))``,
    ``Var α ≈ (Ā/B̄)²(V_A/Ā² + V_B/B̄² − 2C_AB/(ĀB̄))``; ``δ(αW) ≈ ᾱ δW + W̄ δα``."""
    A, B = sp.symbols("Abar Bbar", positive=True)
    VA, VB = sp.symbols("V_A V_B", nonnegative=True)
    CAB = sp.Symbol("C_AB", real=True)
    eps, da, db = sp.symbols("epsilon delta_A delta_B", real=True)
    alpha = (A + eps * da) / (B + eps * db)
    ser = sp.series(alpha, eps, 0, 3).removeO()
    moments = {da**2: VA, db**2: VB, da * db: CAB}

    def expect(expr):
        expr = sp.expand(expr)
        out = 0
        for term in sp.Add.make_args(expr):
            c, rest = term.as_independent(da, db)
            if rest == 1:
                out += c
            elif rest in moments:
                out += c * moments[rest]
            # first-order terms have zero mean
        return sp.simplify(out)

    mean2 = expect(ser.subs(eps, 1))
    first = sp.series(alpha, eps, 0, 2).removeO().subs(eps, 1) - A / B
    var1 = expect(first**2)
    mean_ref = (A / B) * (1 + VB / B**2 - CAB / (A * B))
    var_ref = (A / B) ** 2 * (VA / A**2 + VB / B**2 - 2 * CAB / (A * B))
    checks = []
    for got, ref, what in ((mean2, mean_ref, "E alpha to second order"), (var1, var_ref, "Var alpha to first order")):
        if sp.simplify(got - ref) != 0:
            raise AssertionError(f"{what}: {got} != {ref}")
        checks.append(f"{what} by series expansion of A/B and Gaussian-free moment bookkeeping")
    # first-order covariance of the compensated weight's image through J
    ab, va = sp.symbols("alphabar Var_alpha", real=True)
    w, dw, dal, v, u, j = sp.symbols("Wbar delta_W delta_alpha v u J", real=True)
    lin = sp.expand((ab + dal) * (w + dw) - ab * w)
    first_order = lin - dal * dw
    checks.append("delta(alpha W) = alphabar deltaW + Wbar deltaalpha + second order" if sp.simplify(
        first_order - (ab * dw + w * dal)) == 0 else "FAILED")
    cov_logit = ab**2 * sp.Symbol("JVJ", real=True) + va * v**2 + 2 * ab * u * v
    return Derivation(
        name="hardware.compensation", topic="hardware",
        title=r"Global drift compensation $\alpha = A/B$ to first order",
        statement=(r"The layer scalar $\alpha = \mathrm{mean}|W_P| / \mathrm{mean}|W(t)|$ has mean "
                   r"$\bar A/\bar B\,(1 + V_B/\bar B^2 - C_{AB}/(\bar A\bar B))$ and variance "
                   r"$(\bar A/\bar B)^2 (V_A/\bar A^2 + V_B/\bar B^2 - 2C_{AB}/(\bar A\bar B))$; the compensated "
                   r"weight moves by $\bar\alpha\,\delta W + \bar W\,\delta\alpha$, so a layer adds "
                   r"$\bar\alpha^2 J\,\mathrm{diag}(\mathrm{Var} W) J^\top + \mathrm{Var}\,\alpha\, v v^\top + "
                   r"\bar\alpha (u v^\top + v u^\top)$ to the logit covariance, $v = J\bar W$, "
                   r"$u = J\,\mathrm{Cov}(\alpha, W)$."),
        assumptions=(r"$A, B$ are means over many independent elements (fluctuations $O(n^{-1/2})$)",
                     r"$\mathrm{Cov}(\alpha, W_{ij}) = \bar\alpha(\mathrm{Cov}(|W_{P,ij}|, W_{ij})/(n\bar A) - "
                     r"\mathrm{Cov}(|W_{ij}|, W_{ij})/(n\bar B))$"),
        expressions={"alpha_mean": mean_ref, "alpha_var": var_ref, "logit_var_share": cov_logit},
        symbols={"Abar": A, "Bbar": B, "V_A": VA, "V_B": VB, "C_AB": CAB, "alphabar": ab, "Var_alpha": va,
                 "v": v, "u": u, "JVJ": sp.Symbol("JVJ", real=True)},
        lhs={"alpha_mean": r"\mathbb E\,\alpha", "alpha_var": r"\mathrm{Var}\,\alpha",
             "logit_var_share": r"\mathrm{Var}(f_a)_{\text{layer}}"},
        descriptions={"alpha_mean": "expected compensation scalar (second order)",
                      "alpha_var": "its variance (first order)",
                      "logit_var_share": r"one class's logit variance from one compensated layer, $JVJ = J\,\mathrm{diag}(\mathrm{Var}\,W) J^\top$"},
        source=_SOURCE, checks=tuple(checks),
        implemented_by=("noiseprop.theory.hardware.PCMLike.compensation_moments",),
        tested_by=("tests/theory/test_symbolic_hardware.py::test_compensation_delta_method_against_simulation",
                   "tests/theory/test_hardware.py::test_pcm_compensation_alpha"),
        latex_names={"Abar": r"\bar A", "Bbar": r"\bar B", "alphabar": r"\bar\alpha", "Var_alpha": r"\mathrm{Var}\,\alpha",
                     "JVJ": r"J V J^\top"},
    )
