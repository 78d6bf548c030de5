"""Topic ``flatness``: the expected loss increase under weight noise (docs/THEORY.md §5).

- :func:`flatness_quadratic`: ``E[ΔL] = ½ tr(Σ_ε H)``, exact for a quadratic loss and any
  zero-mean noise of covariance ``Σ_ε``; isotropic, multiplicative
  (``½η² tr(D_w H D_w)``) and per-layer relative (``½ Σ_l η² std(W_l)² tr(H_ll)``) forms;
  the variance of ΔL for Gaussian noise, ``gᵀΣg + ½ tr((ΣH)²)``.
- :func:`flatness_second_order`: for a smooth loss the same formula is the second-order
  term of ``E[L(θ + ε)] = exp(½ ∂ᵀΣ∂) L``: odd terms vanish, the next term is
  ``(σ⁴/8) Δ²L`` (isotropic), so the error of the quadratic formula is O(σ⁴).
- :func:`flatness_hutchinson`: Hutchinson's estimator ``vᵀAv`` with Rademacher probes:
  mean ``tr A``, variance ``2(‖A‖_F² − Σ A_ii²)`` (Gaussian probes: ``2‖A‖_F²``); with
  noise-scaled probes ``(σ ⊙ v)ᵀ H (σ ⊙ v)`` it estimates ``tr(Σ_ε H)`` directly.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from .base import Derivation
from .functions import (
    Diag,
    DiagOf,
    QuadForm,
    SqNorm,
    assert_zero,
    gaussian_covariance,
    gaussian_expectation,
    rademacher_expectation,
)

__all__ = ["flatness_quadratic", "flatness_second_order", "flatness_hutchinson"]

_SOURCE = r"docs/THEORY.md \S 5 (loss level and flatness)"


def _sym_matrix(prefix: str, d: int) -> sp.Matrix:
    return sp.Matrix(d, d, lambda i, j: sp.Symbol(f"{prefix}_{min(i, j)}{max(i, j)}", real=True))


@lru_cache(maxsize=None)
def flatness_quadratic() -> Derivation:
    """``E[L(θ + ε)] − L(θ) = ½ tr(ΣH)`` for ``L(θ + ε) = L(θ) + gᵀε + ½ εᵀHε`` and zero-mean
    ε of covariance Σ; Gaussian ε: ``Var(ΔL) = gᵀΣg + ½ tr(ΣHΣH)``. Multiplicative noise
    ``Σ = η² diag(w²)``: ``½η² tr(D_w H D_w)``; per-layer relative noise
    ``Σ = ⊕_l η² std(W_l)² I``: ``½ Σ_l η² std(W_l)² tr(H_ll)``. docs/THEORY.md §5.
    """
    d = 3
    H = _sym_matrix("h", d)
    g = sp.Matrix(d, 1, lambda i, _: sp.Symbol(f"g_{i}", real=True))
    Lc = sp.Matrix(d, d, lambda i, j: sp.Symbol(f"l_{i}{j}", real=True) if j <= i else 0)
    z = sp.Matrix(d, 1, lambda i, _: sp.Symbol(f"z_{i}", real=True))
    eps = Lc * z
    Sig = Lc * Lc.T
    dL = (g.T * eps)[0] + sp.Rational(1, 2) * (eps.T * H * eps)[0]
    zs = list(z)
    mean = gaussian_expectation(dL, zs)
    var = gaussian_covariance(dL, dL, zs)
    checks = [
        assert_zero(mean - (Sig * H).trace() / 2, "E[dL] = tr(Sigma H)/2 on a generic 3-d quadratic (moment expansion)"),
        assert_zero(var - ((g.T * Sig * g)[0] + (Sig * H * Sig * H).trace() / 2), "Gaussian noise: Var(dL) = g^T Sigma g + tr(Sigma H Sigma H)/2"),
    ]
    w = sp.Matrix(d, 1, lambda i, _: sp.Symbol(f"w_{i}", real=True))
    eta = sp.Symbol("eta", nonnegative=True)
    Sig_mult = eta**2 * sp.diag(*[wi**2 for wi in w])
    checks.append(assert_zero((Sig_mult * H).trace() / 2 - eta**2 * (sp.diag(*w) * H * sp.diag(*w)).trace() / 2, "multiplicative: tr(Sigma H) = eta^2 tr(D_w H D_w)"))
    s1, s2 = sp.symbols("s_1 s_2", positive=True)
    Sig_layers = sp.diag(eta**2 * s1**2, eta**2 * s2**2, eta**2 * s2**2)  # layers {0} and {1, 2}
    checks.append(assert_zero((Sig_layers * H).trace() / 2 - eta**2 * (s1**2 * H[0, 0] + s2**2 * (H[1, 1] + H[2, 2])) / 2, "per-layer: tr(Sigma H)/2 = sum_l eta^2 s_l^2 tr(H_ll)/2 (blocks {1}, {2,3})"))

    p = sp.Symbol("p", integer=True, positive=True)
    Hm = sp.MatrixSymbol("H", p, p)
    Sm = sp.MatrixSymbol("Sigma", p, p)
    gm = sp.MatrixSymbol("g", p, 1)
    wm = sp.MatrixSymbol("w", p, 1)
    sigma = sp.Symbol("sigma", nonnegative=True)
    K = sp.Symbol("K", integer=True, positive=True)
    l = sp.Symbol("l", integer=True, positive=True)
    s_b, t_b = sp.IndexedBase("s_l"), sp.IndexedBase("t_l")
    exprs = {
        "mean_increase": sp.Trace(Sm * Hm) / 2,
        "mean_increase_isotropic": sigma**2 * sp.Trace(Hm) / 2,
        "mean_increase_multiplicative": eta**2 * sp.Trace(Diag(wm) * Hm * Diag(wm)) / 2,
        "mean_increase_per_layer": sp.Sum(eta**2 * s_b[l] ** 2 * t_b[l], (l, 1, K)) / 2,
        "variance_gaussian": QuadForm(gm, Sm) + sp.Trace(Sm * Hm * Sm * Hm) / 2,
    }
    return Derivation(
        name="flatness.quadratic",
        topic="flatness",
        title="Expected loss increase under weight noise",
        statement=(
            r"For a quadratic loss the expected increase caused by zero-mean weight noise of covariance "
            r"$\Sigma_\varepsilon$ is exactly $\frac{1}{2}\operatorname{tr}(\Sigma_\varepsilon H)$, whether or not the "
            r"weights sit at a minimum (the gradient term averages out): a flat minimum is a robust one, measured in "
            r"the noise's own metric."
        ),
        assumptions=(
            r"$L(\theta+\varepsilon)=L(\theta)+g^\top\varepsilon+\frac{1}{2}\varepsilon^\top H\varepsilon$ exactly "
            r"(quadratic loss; otherwise see \texttt{flatness.second\_order}).",
            r"$\varepsilon$ zero mean with covariance $\Sigma_\varepsilon$ (any distribution for the mean; Gaussian "
            r"for the variance).",
            r"Multiplicative: $\Sigma_\varepsilon=\eta^2\operatorname{diag}(w^2)$. Per-layer relative: "
            r"$\Sigma_\varepsilon$ block-diagonal with blocks $\eta^2\operatorname{std}(W_l)^2I$.",
        ),
        expressions=exprs,
        symbols={"H": Hm, "Sigma": Sm, "g": gm, "w": wm, "sigma": sigma, "eta": eta, "s_l": s_b, "t_l": t_b, "K": K, "p": p},
        lhs={
            "mean_increase": r"\mathbb{E}[\Delta L]",
            "mean_increase_isotropic": r"\mathbb{E}[\Delta L]\big|_{\Sigma=\sigma^2I}",
            "mean_increase_multiplicative": r"\mathbb{E}[\Delta L]\big|_{\mathrm{mult}}",
            "mean_increase_per_layer": r"\mathbb{E}[\Delta L]\big|_{\mathrm{rel}}",
            "variance_gaussian": r"\operatorname{Var}[\Delta L]",
        },
        descriptions={
            "mean_increase_per_layer": r"$s_l=\operatorname{std}(W_l)$, $t_l=\operatorname{tr}H_{ll}$ (the diagonal block of layer $l$), $K$ layers.",
            "variance_gaussian": "Gaussian noise; the first term vanishes at a minimum.",
        },
        where={"H": "is the Hessian of the loss", "Sigma": "is the noise covariance", "g": "is the gradient", "w": "holds the weights"},
        checks=tuple(checks),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.flatness.hessian_trace", "noiseprop.theory.flatness.loss_increase_gauss_newton"),
        tested_by=("tests/theory/test_symbolic_flatness.py::test_quadratic_mean_and_variance_general_covariance", "tests/theory/test_flatness.py::test_loss_increase_matches_monte_carlo"),
    )


@lru_cache(maxsize=None)
def flatness_second_order() -> Derivation:
    """Beyond quadratic losses: ``E[f(θ + σz)] = Σ_k σ^{2k}/(2^k k!) f^{(2k)}(θ)`` (1-d,
    Gaussian z, analytic f); in d dimensions with isotropic noise
    ``E[ΔL] = ½σ² ΔL + (σ⁴/8) Δ²L + O(σ⁶)`` (Δ the Laplacian, ``ΔL = tr H``). So
    ``½ tr(ΣH)`` is exact for quadratics and second order otherwise. docs/THEORY.md §5.
    """
    th, sigma = sp.Symbol("theta", real=True), sp.Symbol("sigma", nonnegative=True)
    z = sp.Symbol("z", real=True)
    order = 7
    dk = sp.symbols(f"f_0:{order + 1}", real=True)  # f^(k)(theta)
    taylor = sum(dk[k] * (sigma * z) ** k / sp.factorial(k) for k in range(order + 1))
    mean = gaussian_expectation(taylor, [z])
    series = sum(sigma ** (2 * j) / (2**j * sp.factorial(j)) * dk[2 * j] for j in range(order // 2 + 1))
    checks = [assert_zero(mean - series, "1-d: E f(theta + sigma z) = sum_k sigma^(2k)/(2^k k!) f^(2k) up to order 7")]
    # 2-d generic quartic polynomial around a generic point
    x, y = sp.symbols("x y", real=True)
    a, b = sp.symbols("a b", real=True)
    coeffs = {(i, j): sp.Symbol(f"c_{i}{j}", real=True) for i in range(5) for j in range(5) if i + j <= 4}
    poly = sum(c * x**i * y**j for (i, j), c in coeffs.items())
    z1, z2 = sp.symbols("z_1 z_2", real=True)
    shifted = poly.subs({x: a + sigma * z1, y: b + sigma * z2}, simultaneous=True)
    dL = gaussian_expectation(shifted, [z1, z2]) - poly.subs({x: a, y: b})
    lap = sp.diff(poly, x, 2) + sp.diff(poly, y, 2)
    bilap = sp.diff(lap, x, 2) + sp.diff(lap, y, 2)
    checks.append(
        assert_zero(dL - (sigma**2 / 2 * lap + sigma**4 / 8 * bilap).subs({x: a, y: b}), "2-d quartic: E dL = sigma^2/2 Lap L + sigma^4/8 Lap^2 L exactly")
    )
    k = sp.Symbol("k", integer=True, nonnegative=True)
    f2, f4, trH, bl = sp.symbols("f_2 f_4 trH bilap", real=True)
    exprs = {
        "series_coefficient": sigma ** (2 * k) / (2**k * sp.factorial(k)),
        "second_order_1d": sigma**2 * f2 / 2,
        "fourth_order_1d": sigma**4 * f4 / 8,
        "second_order": sigma**2 * trH / 2,
        "fourth_order": sigma**4 * bl / 8,
    }
    return Derivation(
        name="flatness.second_order",
        topic="flatness",
        title="Second order for smooth losses",
        statement=(
            r"For a smooth loss and Gaussian noise, $\mathbb{E}[L(\theta+\varepsilon)]=\exp(\frac{1}{2}\partial^\top"
            r"\Sigma\partial)L(\theta)$: the odd orders vanish, so $\frac{1}{2}\operatorname{tr}(\Sigma H)$ is "
            r"correct to $O(\sigma^4)$, with the next term $\frac{\sigma^4}{8}\Delta^2L$ for isotropic noise."
        ),
        assumptions=(
            r"$L$ analytic near $\theta$ (for the series; a quartic is exact at the order shown); "
            r"$\varepsilon=\sigma z$, $z\sim\mathcal{N}(0,I)$.",
        ),
        expressions=exprs,
        symbols={"sigma": sigma, "k": k, "f_2": f2, "f_4": f4, "trH": trH, "bilap": bl},
        lhs={
            "series_coefficient": r"c_k\ \text{in}\ \mathbb{E}f(\theta+\sigma z)=\sum_k c_kf^{(2k)}(\theta)",
            "second_order_1d": r"\mathbb{E}[\Delta f]^{(2)}",
            "fourth_order_1d": r"\mathbb{E}[\Delta f]^{(4)}",
            "second_order": r"\mathbb{E}[\Delta L]^{(2)}",
            "fourth_order": r"\mathbb{E}[\Delta L]^{(4)}",
        },
        descriptions={"fourth_order": r"isotropic noise; $\Delta^2L=\sum_{ij}\partial_i^2\partial_j^2L$ (bi-Laplacian)."},
        where={"f_2": r"$=f''(\theta)$", "f_4": r"$=f''''(\theta)$", "trH": r"$=\Delta L=\operatorname{tr}H$", "bilap": r"$=\Delta^2L$"},
        checks=tuple(checks),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.symbolic.flatness.flatness_second_order",),
        tested_by=("tests/theory/test_symbolic_flatness.py::test_second_order_for_a_smooth_loss_and_the_fourth_order_term", "tests/theory/test_symbolic_flatness.py::test_second_order_coefficients"),
    )


@lru_cache(maxsize=None)
def flatness_hutchinson() -> Derivation:
    """Hutchinson's trace estimator ``vᵀAv`` (A symmetric): mean ``tr A``; variance
    ``2(‖A‖_F² − Σ_i A_ii²)`` for Rademacher v, ``2‖A‖_F²`` for Gaussian v. With
    noise-scaled probes ``u = σ ⊙ v``: ``E uᵀHu = tr(diag(σ²) H)`` and variance
    ``2(‖D_σ H D_σ‖_F² − Σ σ_i⁴ H_ii²)``. docs/THEORY.md §5.
    """
    d = 4
    A = _sym_matrix("a", d)
    v = sp.symbols(f"v_0:{d}", real=True)
    q = sum(A[i, j] * v[i] * v[j] for i in range(d) for j in range(d))
    mean = rademacher_expectation(q, v)
    second = rademacher_expectation(q**2, v)
    fro2 = sum(A[i, j] ** 2 for i in range(d) for j in range(d))
    diag2 = sum(A[i, i] ** 2 for i in range(d))
    checks = [
        assert_zero(mean - A.trace(), "Rademacher: E v^T A v = tr A (generic symmetric 4x4)"),
        assert_zero(second - mean**2 - 2 * (fro2 - diag2), "Rademacher: Var = 2(|A|_F^2 - sum A_ii^2)"),
        assert_zero(gaussian_covariance(q, q, v) - 2 * fro2, "Gaussian probes: Var = 2 |A|_F^2"),
    ]
    p = sp.Symbol("p", integer=True, positive=True)
    Am = sp.MatrixSymbol("A", p, p)
    Hm = sp.MatrixSymbol("H", p, p)
    s = sp.MatrixSymbol("s", p, 1)
    r = sp.Symbol("r", positive=True)
    Ds = Diag(s)
    var_r = 2 * (SqNorm(Am) - SqNorm(DiagOf(Am)))
    exprs = {
        "mean": sp.Trace(Am),
        "var_rademacher": var_r,
        "var_gaussian": 2 * SqNorm(Am),
        "mean_noise_scaled": sp.Trace(Ds * Hm * Ds),
        "var_noise_scaled": 2 * (SqNorm(Ds * Hm * Ds) - SqNorm(DiagOf(Ds * Hm * Ds))),
        "probes_for_relative_se": var_r / (r**2 * sp.Trace(Am) ** 2),
    }
    return Derivation(
        name="flatness.hutchinson",
        topic="flatness",
        title="Variance of the Hutchinson trace estimator",
        statement=(
            r"A Rademacher probe estimates $\operatorname{tr}A$ without bias with variance "
            r"$2(\lVert A\rVert_F^2-\sum_iA_{ii}^2)$: only the off-diagonal part contributes, which makes Rademacher "
            r"probes better than Gaussian ones. Scaling the probe by the noise std estimates "
            r"$\operatorname{tr}(\Sigma_\varepsilon H)$, the quantity that predicts the loss increase, directly."
        ),
        assumptions=(
            r"$A$ symmetric; $v$ with iid entries, Rademacher ($\pm1$) or standard normal.",
            r"Noise-scaled probes: $u=s\odot v$ with $s_i$ the noise std of parameter $i$ "
            r"($\Sigma_\varepsilon=\operatorname{diag}(s^2)$), i.e. $A=D_sHD_s$.",
        ),
        expressions=exprs,
        symbols={"A": Am, "H": Hm, "s": s, "r": r, "p": p},
        lhs={
            "mean": r"\mathbb{E}[v^\top Av]",
            "var_rademacher": r"\operatorname{Var}[v^\top Av]",
            "var_gaussian": r"\operatorname{Var}[v^\top Av]\big|_{\mathrm{Gauss}}",
            "mean_noise_scaled": r"\mathbb{E}[u^\top Hu]",
            "var_noise_scaled": r"\operatorname{Var}[u^\top Hu]",
            "probes_for_relative_se": r"n_{\mathrm{probes}}(r)",
        },
        descriptions={"probes_for_relative_se": r"probes needed for a relative standard error $r$ of the trace estimate."},
        where={"s": "holds the per-parameter noise stds", "r": "is the target relative standard error"},
        checks=tuple(checks),
        source=r"docs/THEORY.md \S 5; Hutchinson 1990; Avron \& Toledo 2011",
        implemented_by=("noiseprop.theory.flatness.hessian_trace",),
        tested_by=("tests/theory/test_symbolic_flatness.py::test_hutchinson_variance_rademacher_gaussian_and_noise_scaled", "tests/theory/test_flatness.py::test_hutchinson_trace_against_exact_hessian"),
    )
