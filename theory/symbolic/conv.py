"""Topic ``conv``: weight noise in a convolution (docs/THEORY.md §2, last item).

One kernel is reused at every position, so the output perturbation of one channel is
correlated across positions: ``Cov(δy_{c,p}, δy_{c,p'}) = σ² ⟨a_p, a_p'⟩`` (``a_p`` the
input patch at position p), channels are uncorrelated. Pooling therefore averages
*correlated* errors: average pooling over P positions has variance
``σ² ‖Σ_p a_p‖² / P²``, not the independent-positions ``σ² Σ_p ‖a_p‖² / P²``.

- :func:`conv_spatial_covariance`: the covariance of the output perturbation.
- :func:`conv_pooling`: the pooled variance, the factor by which the
  independent-positions answer underestimates it (between 0 and P), and its expectation
  for inputs with iid pixels (``1 + (P − 1) μ²/(v + μ²)``: large for post-ReLU inputs).
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from .base import Derivation
from .functions import Diag, SqNorm, Std, assert_zero, gaussian_covariance, matrix_symbols

__all__ = ["conv_spatial_covariance", "conv_pooling"]

_SOURCE = r"docs/THEORY.md \S 2 (convolution: one kernel shared by all positions)"


@lru_cache(maxsize=None)
def conv_spatial_covariance() -> Derivation:
    """Covariance of the output perturbation of a convolution with a noisy kernel.

    ``δy_{c,p} = ⟨N_c, a_p⟩`` with ``N_c`` the noise of channel c's kernel (flattened,
    ``d = C_in k²`` entries) and ``a_p`` the flattened input patch at position p. For
    independent zero-mean entries of variance ``v_{cj}``: ``Cov(δy_{c,·}) = A diag(v_c) Aᵀ``
    (rows of ``A`` are the patches), ``= σ² A Aᵀ`` for iid noise; channels are
    uncorrelated. docs/THEORY.md §2.
    """
    C, d, P = 2, 3, 3  # generic instance
    a = matrix_symbols("a", P, d, real=True)  # patches
    s = matrix_symbols("s", C, d, nonnegative=True)
    Z = matrix_symbols("z", C, d, real=True)
    dy = {(c, p): sum(s[c, j] * Z[c, j] * a[p, j] for j in range(d)) for c in range(C) for p in range(P)}
    keys = list(dy)
    cov = sp.Matrix(len(keys), len(keys), lambda i, k: gaussian_covariance(dy[keys[i]], dy[keys[k]], list(Z)))
    blocks = [a * sp.diag(*[s[c, j] ** 2 for j in range(d)]) * a.T for c in range(C)]
    checks = [
        assert_zero(cov - sp.diag(*blocks), "Cov(dy) = blockdiag_c(A diag(s_c^2) A^T) on a generic instance (2 channels, 3 positions, 3 kernel entries)")
    ]
    sigma = sp.Symbol("sigma", nonnegative=True)
    iid = {s[c, j]: sigma for c in range(C) for j in range(d)}
    checks.append(assert_zero(cov.subs(iid) - sp.diag(*[sigma**2 * a * a.T] * C), "iid noise: sigma^2 A A^T within a channel, 0 across"))

    Ps, ds, Cs = sp.symbols("P d C", integer=True, positive=True)
    A = sp.MatrixSymbol("A", Ps, ds)
    K = sp.MatrixSymbol("K", Cs, ds)
    v = sp.MatrixSymbol("v", ds, 1)
    sig, eta = sp.symbols("sigma eta", nonnegative=True)
    exprs = {
        "cov_within": sig**2 * A * A.T,
        "cov_within_relative": eta**2 * Std(K) ** 2 * A * A.T,
        "cov_within_general": A * Diag(v) * A.T,
        "cov_between": sp.ZeroMatrix(Ps, Ps),
    }
    return Derivation(
        name="conv.spatial_covariance",
        topic="conv",
        title="Spatial covariance of the output perturbation of a convolution",
        statement=(
            r"Because one kernel is reused at every position, the perturbation of one output channel is "
            r"correlated across positions with the Gram matrix of the input patches, "
            r"$\operatorname{Cov}(\delta y_{c,p},\delta y_{c,p'})=\sigma^2\langle a_p,a_{p'}\rangle$; different output "
            r"channels have independent kernels and uncorrelated perturbations. Positions must never be treated as "
            r"independent."
        ),
        assumptions=(
            r"Convolution $y_{c,p}=\langle K_c+N_c,a_p\rangle$ (+ bias) with the input fixed; $a_p\in\mathbb{R}^d$ "
            r"is the flattened input patch at position $p$ (zero padding included), $d=C_{\mathrm{in}}k^2$.",
            r"Kernel noise entries independent, zero mean; variance $v_{cj}$ (general), $\sigma^2$ (additive iid) or "
            r"$\eta^2\operatorname{std}(K)^2$ (layer-relative, std over the whole weight tensor).",
        ),
        expressions=exprs,
        symbols={"A": A, "K": K, "v": v, "sigma": sig, "eta": eta, "P": Ps, "d": ds, "C": Cs},
        lhs={
            "cov_within": r"\operatorname{Cov}(\delta y_{c,\cdot})",
            "cov_within_relative": r"\operatorname{Cov}(\delta y_{c,\cdot})\big|_{\mathrm{rel}}",
            "cov_within_general": r"\operatorname{Cov}(\delta y_{c,\cdot})\big|_{v}",
            "cov_between": r"\operatorname{Cov}(\delta y_{c,\cdot},\delta y_{c',\cdot})",
        },
        descriptions={
            "cov_within": r"the correlation of two positions is the cosine of their patches, whatever $\sigma$.",
            "cov_between": r"for $c\neq c'$.",
        },
        where={
            "A": r"is the $P\times d$ matrix whose rows are the input patches $a_p$ (\texttt{unfold})",
            "K": r"is the layer's weight tensor, flattened to $C\times d$",
            "v": r"holds the noise variances of the $d$ entries of one kernel",
        },
        checks=tuple(checks),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.linearize.tap_covariance",),
        tested_by=("tests/theory/test_symbolic_conv.py::test_spatial_covariance_within_and_between_channels",),
    )


@lru_cache(maxsize=None)
def conv_pooling() -> Derivation:
    """Variance of average-pooled convolution outputs under kernel noise.

    ``z_c = (1/P) Σ_p y_{c,p}``: ``Var(δz_c) = σ² ‖Aᵀ1‖²/P² = σ² ‖mean_p a_p‖²``. The
    independent-positions answer ``σ² ‖A‖_F²/P²`` is wrong by the factor
    ``ρ = ‖Aᵀ1‖²/‖A‖_F² ∈ [0, P]`` (Cauchy–Schwarz:
    ``P Σ‖a_p‖² − ‖Σ a_p‖² = ½ Σ_{p,q} ‖a_p − a_q‖²``). For iid pixels of mean ``μ`` and
    variance ``v`` and a valid convolution: ``E‖Aᵀ1‖² = P d (v + μ²) + P(P − 1) d μ²``,
    ``E‖A‖² = P d (v + μ²)``, ratio ``1 + (P − 1) μ²/(v + μ²)``. docs/THEORY.md §2.
    """
    P, d = 3, 2  # generic instance
    a = matrix_symbols("a", P, d, real=True)
    z = [sp.Symbol(f"z_{j}", real=True) for j in range(d)]
    sigma = sp.Symbol("sigma", nonnegative=True)
    pooled = sum(sigma * z[j] * a[p, j] for p in range(P) for j in range(d)) / P
    var = gaussian_covariance(pooled, pooled, z)
    colsum = sum((sum(a[p, j] for p in range(P))) ** 2 for j in range(d))
    frob = sum(a[p, j] ** 2 for p in range(P) for j in range(d))
    checks = [
        assert_zero(var - sigma**2 * colsum / P**2, "Var(pooled) = sigma^2 |A^T 1|^2 / P^2 on a generic instance (P=3, d=2)"),
        assert_zero(
            P * frob - colsum - sp.Rational(1, 2) * sum((a[p, j] - a[q, j]) ** 2 for p in range(P) for q in range(P) for j in range(d)),
            "P sum|a_p|^2 - |sum a_p|^2 = 1/2 sum_{p,q} |a_p - a_q|^2 >= 0 (so rho <= P)",
        ),
    ]
    # iid pixels, valid convolution: E<a_p, a_q> = d (mu^2 + v delta_pq)
    Ps, ds = sp.symbols("P d", integer=True, positive=True)
    p, q = sp.symbols("p q", integer=True, positive=True)
    mu, v = sp.symbols("mu_x v_x", nonnegative=True)
    # sum over p, q of d mu^2 (all pairs) plus d v for the P diagonal pairs q = p
    e_num = sp.simplify(sp.Sum(sp.Sum(ds * mu**2, (q, 1, Ps)), (p, 1, Ps)).doit() + sp.Sum(ds * v, (p, 1, Ps)).doit())
    e_den = sp.simplify(sp.Sum(ds * (mu**2 + v), (p, 1, Ps)).doit())
    ratio_iid = sp.simplify(e_num / e_den)
    checks.append(assert_zero(ratio_iid - (1 + (Ps - 1) * mu**2 / (v + mu**2)), "iid pixels: E|A^T 1|^2 / E|A|^2 = 1 + (P-1) mu^2/(v+mu^2)"))

    A = sp.MatrixSymbol("A", Ps, ds)
    one = sp.OneMatrix(Ps, 1)
    sig = sp.Symbol("sigma", nonnegative=True)
    exprs = {
        "var_pooled": sig**2 * SqNorm(A.T * one) / Ps**2,
        "var_pooled_independent": sig**2 * SqNorm(A) / Ps**2,
        "underestimation": SqNorm(A.T * one) / SqNorm(A),
        "underestimation_max": Ps,
        "expected_sq_norm_of_sum": e_num,
        "expected_sum_of_sq_norms": e_den,
        "underestimation_iid": 1 + (Ps - 1) * mu**2 / (v + mu**2),
    }
    return Derivation(
        name="conv.pooling",
        topic="conv",
        title="Average pooling of correlated convolution errors",
        statement=(
            r"Average pooling over $P$ positions reduces the noise variance only by the factor "
            r"$\lVert\sum_p a_p\rVert^2/(P\sum_p\lVert a_p\rVert^2)$, not by $1/P$: the errors of one channel are "
            r"correlated through the shared kernel. For non-negative (post-ReLU) inputs the independent-positions "
            r"answer underestimates the pooled variance by a factor close to $P$."
        ),
        assumptions=(
            r"As in \texttt{conv.spatial\_covariance} with iid kernel noise of variance $\sigma^2$; "
            r"$z_c=\frac{1}{P}\sum_{p}y_{c,p}$ over a set of $P$ positions.",
            r"For the iid-pixel expectation: pixels independent with mean $\mu_x$ and variance $v_x$, valid "
            r"convolution (no zero padding), expectation of numerator and denominator taken separately.",
        ),
        expressions=exprs,
        symbols={"A": A, "sigma": sig, "mu_x": mu, "v_x": v, "P": Ps, "d": ds},
        lhs={
            "var_pooled": r"\operatorname{Var}(\delta z_c)",
            "var_pooled_independent": r"\operatorname{Var}(\delta z_c)\big|_{\mathrm{indep.\ positions}}",
            "underestimation": r"\rho",
            "underestimation_max": r"\max\rho",
            "expected_sq_norm_of_sum": r"\mathbb{E}\lVert A^\top\mathbb{1}\rVert^2",
            "expected_sum_of_sq_norms": r"\mathbb{E}\lVert A\rVert_F^2",
            "underestimation_iid": r"\mathbb{E}\lVert A^\top\mathbb{1}\rVert^2/\mathbb{E}\lVert A\rVert_F^2",
        },
        descriptions={
            "var_pooled": r"$=\sigma^2\lVert\bar a\rVert^2$ with $\bar a$ the mean patch.",
            "var_pooled_independent": "the wrong answer that treats positions as independent.",
            "underestimation": r"true/independent ratio; $0\le\rho\le P$, $\rho=P$ when all patches are equal.",
            "underestimation_iid": r"equals $1$ only for zero-mean inputs; tends to $P$ when $\mu_x^2\gg v_x$.",
        },
        where={
            "A": r"is the $P\times d$ matrix of the pooled patches",
            "mu_x": "is the pixel mean",
            "v_x": "is the pixel variance",
        },
        checks=tuple(checks),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.moments",),
        tested_by=("tests/theory/test_symbolic_conv.py::test_pooled_variance_and_the_independent_answer_it_replaces",),
    )
