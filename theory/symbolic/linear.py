"""Topic ``linear``: one linear layer ``y = (W + N) x`` under weight noise (docs/THEORY.md §2).

Three derivations:

- :func:`linear_fixed_input`: mean and covariance of ``y`` for a fixed input, for
  per-element noise variances ``Σ_ij`` and the additive, layer-relative and
  multiplicative noise models;
- :func:`linear_random_input`: the same for a random input with mean ``μ`` and
  covariance ``Γ``: ``Cov(y) = WΓWᵀ + σ²(‖μ‖² + tr Γ) I`` for additive iid noise;
- :func:`linear_width`: the width dependence of the relative error: ``η²`` (independent
  of the width) for layer-relative noise, ``σ² n / σ_w²`` (RMS ``σ√n/σ_w``) for absolute
  noise, with weights ``W_ij ~ (0, σ_w²/n)``.

Each covariance is computed by expanding Gaussian moments on a generic explicit
instance (symbolic 2×3 weight and noise-scale matrices) and checked entry by entry
against the stated matrix formula.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from .base import Derivation
from .functions import (
    Diag,
    DiagOf,
    SqNorm,
    Std,
    assert_zero,
    gaussian_covariance,
    gaussian_expectation,
    matrix_symbols,
)

__all__ = ["linear_fixed_input", "linear_random_input", "linear_width"]

_SOURCE = r"docs/THEORY.md \S 2 (one linear layer); noise models of \S 1"

#: the left-hand sides of a linear layer's output mean and covariance (both input settings)
_COV_LHS = {
    "mean": r"\mathbb{E}[y]",
    "cov": r"\operatorname{Cov}(y)",
    "cov_additive": r"\operatorname{Cov}(y)\big|_{\mathrm{add}}",
    "cov_relative": r"\operatorname{Cov}(y)\big|_{\mathrm{rel}}",
    "cov_multiplicative": r"\operatorname{Cov}(y)\big|_{\mathrm{mult}}",
}

_M, _N = 2, 3  # size of the generic instance used for the symbolic checks


def _generic_layer():
    W = matrix_symbols("w", _M, _N, real=True)
    s = matrix_symbols("s", _M, _N, nonnegative=True)  # per-element noise std
    Z = matrix_symbols("z", _M, _N, real=True)  # standard normals
    return W, s, Z


def _noise_variants(s):
    """Substitutions of the per-element noise std for the three noise models."""
    sigma, eta, sW = sp.symbols("sigma eta s_W", nonnegative=True)
    additive = {s[i, j]: sigma for i in range(_M) for j in range(_N)}
    relative = {s[i, j]: eta * sW for i in range(_M) for j in range(_N)}
    return sigma, eta, sW, additive, relative


@lru_cache(maxsize=None)
def linear_fixed_input() -> Derivation:
    """Mean and covariance of ``y = (W + N) x`` for a fixed input ``x``.

    ``E[y] = W x``; ``Cov(y) = diag_i(Σ_j σ_ij² x_j²)`` (outputs uncorrelated, because
    distinct rows of ``N`` are independent). Additive iid: ``σ²‖x‖² I``; layer-relative
    (``σ = η std(W)``): ``η² std(W)² ‖x‖² I``; multiplicative (``σ_ij = η|W_ij|``):
    ``η² diag(W^{∘2} x^{∘2})``. docs/THEORY.md §2.
    """
    Wg, s, Z = _generic_layer()
    xg = sp.Matrix(_N, 1, lambda j, _: sp.Symbol(f"x_{j}", real=True))
    z = list(Z)
    y = (Wg + s.multiply_elementwise(Z)) * xg
    mean = sp.Matrix(_M, 1, lambda i, _: gaussian_expectation(y[i], z))
    cov = sp.Matrix(_M, _M, lambda i, k: gaussian_covariance(y[i], y[k], z))
    checks = [assert_zero(mean - Wg * xg, "E[y] = W x on a generic 2x3 instance (moment expansion)")]
    ref = sp.diag(*[sum(s[i, j] ** 2 * xg[j] ** 2 for j in range(_N)) for i in range(_M)])
    checks.append(assert_zero(cov - ref, "Cov(y) = diag(S x^2) on a generic 2x3 instance, S_ij = s_ij^2"))
    sigma, eta, sW, additive, relative = _noise_variants(s)
    x2 = sum(xg[j] ** 2 for j in range(_N))
    checks.append(assert_zero(cov.subs(additive) - sigma**2 * x2 * sp.eye(_M), "additive: sigma^2 |x|^2 I"))
    checks.append(assert_zero(cov.subs(relative) - eta**2 * sW**2 * x2 * sp.eye(_M), "relative: eta^2 std(W)^2 |x|^2 I"))
    mult = {s[i, j]: eta * sp.Abs(Wg[i, j]) for i in range(_M) for j in range(_N)}
    ref_mult = sp.diag(*[eta**2 * sum(Wg[i, j] ** 2 * xg[j] ** 2 for j in range(_N)) for i in range(_M)])
    checks.append(assert_zero(cov.subs(mult) - ref_mult, "multiplicative: eta^2 diag(W^2 x^2)"))

    m, n = sp.symbols("m n", integer=True, positive=True)
    W = sp.MatrixSymbol("W", m, n)
    x = sp.MatrixSymbol("x", n, 1)
    S = sp.MatrixSymbol("S", m, n)
    sig, et = sp.symbols("sigma eta", nonnegative=True)
    exprs = {
        "mean": W * x,
        "cov": Diag(S * sp.HadamardPower(x, 2)),
        "cov_additive": sig**2 * SqNorm(x) * sp.Identity(m),
        "cov_relative": et**2 * Std(W) ** 2 * SqNorm(x) * sp.Identity(m),
        "cov_multiplicative": et**2 * Diag(sp.HadamardPower(W, 2) * sp.HadamardPower(x, 2)),
    }
    return Derivation(
        name="linear.fixed_input",
        topic="linear",
        title="One linear layer with a fixed input",
        statement=(
            r"For $y=(W+N)x$ with independent zero-mean noise $N_{ij}$ of variance $\Sigma_{ij}$, the output is "
            r"unbiased and its covariance is diagonal: each output unit sees the noise of its own row only."
        ),
        assumptions=(
            r"$W\in\mathbb{R}^{m\times n}$ and $x\in\mathbb{R}^{n}$ are fixed.",
            r"The entries $N_{ij}$ are independent, zero mean, with variances $\Sigma_{ij}$ (Gaussian or not: only "
            r"second moments enter).",
            r"Noise models: additive $\Sigma_{ij}=\sigma^2$; layer-relative $\Sigma_{ij}=\eta^2\operatorname{std}(W)^2$ "
            r"(population std over all entries); multiplicative $\Sigma_{ij}=\eta^2 W_{ij}^2$.",
        ),
        expressions=exprs,
        symbols={"W": W, "x": x, "S": S, "sigma": sig, "eta": et, "m": m, "n": n},
        lhs=dict(_COV_LHS),
        descriptions={
            "mean": "the noise does not bias a linear layer.",
            "cov": r"general per-element variances $S=(\Sigma_{ij})$; $x^{\circ 2}$ is the elementwise square.",
            "cov_additive": r"additive iid noise of std $\sigma$.",
            "cov_relative": r"noise of std $\eta\operatorname{std}(W)$ (the seed papers' analog noise).",
            "cov_multiplicative": r"$W\circ(1+\eta Z)$: units with large weights on active inputs are noisier.",
        },
        where={
            "S": r"is the matrix of per-element noise variances $\Sigma_{ij}$",
            "sigma": "is the absolute noise std",
            "eta": "is the relative noise level",
        },
        checks=tuple(checks),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.linearize.tap_covariance", "noiseprop.theory.linearize.jacobian_pass"),
        tested_by=("tests/theory/test_symbolic_linear.py::test_fixed_input_mean_and_covariance", "tests/empirical/test_montecarlo.py::test_linear_layer_logit_moments_exact"),
    )


@lru_cache(maxsize=None)
def linear_random_input() -> Derivation:
    """Mean and covariance of ``y = (W + N) x`` for a random input with mean ``μ`` and
    covariance ``Γ``, independent of ``N``:

    ``E[y] = Wμ``; ``Cov(y) = WΓWᵀ + diag_i(Σ_j σ_ij² (μ_j² + Γ_jj))``; additive iid:
    ``WΓWᵀ + σ²(‖μ‖² + tr Γ) I``. The ``σ² tr Γ`` term is the noise of this layer acting
    on the perturbation of its input (docs/THEORY.md §2, §9).
    """
    Wg, s, Z = _generic_layer()
    mu = sp.Matrix(_N, 1, lambda j, _: sp.Symbol(f"mu_{j}", real=True))
    Lc = sp.Matrix(_N, _N, lambda i, j: sp.Symbol(f"l_{i}{j}", real=True) if j <= i else 0)  # Γ = L Lᵀ
    g = sp.Matrix(_N, 1, lambda j, _: sp.Symbol(f"g_{j}", real=True))
    xg = mu + Lc * g
    Gam = Lc * Lc.T
    normals = list(Z) + list(g)
    y = (Wg + s.multiply_elementwise(Z)) * xg
    mean = sp.Matrix(_M, 1, lambda i, _: gaussian_expectation(y[i], normals))
    cov = sp.Matrix(_M, _M, lambda i, k: gaussian_covariance(y[i], y[k], normals))
    checks = [assert_zero(mean - Wg * mu, "E[y] = W mu on a generic 2x3 instance")]
    ref = Wg * Gam * Wg.T + sp.diag(
        *[sum(s[i, j] ** 2 * (mu[j] ** 2 + Gam[j, j]) for j in range(_N)) for i in range(_M)]
    )
    checks.append(
        assert_zero(cov - ref, "Cov(y) = W Gamma W^T + diag(S (mu^2 + dg Gamma)) on a generic 2x3 instance, Gamma = L L^T")
    )
    sigma, eta, sW, additive, relative = _noise_variants(s)
    m2 = sum(mu[j] ** 2 for j in range(_N)) + Gam.trace()
    checks.append(
        assert_zero(cov.subs(additive) - (Wg * Gam * Wg.T + sigma**2 * m2 * sp.eye(_M)), "additive: W Gamma W^T + sigma^2(|mu|^2 + tr Gamma) I")
    )

    m, n = sp.symbols("m n", integer=True, positive=True)
    W = sp.MatrixSymbol("W", m, n)
    S = sp.MatrixSymbol("S", m, n)
    mu_ = sp.MatrixSymbol("mu", n, 1)
    G = sp.MatrixSymbol("Gamma", n, n)
    sig, et = sp.symbols("sigma eta", nonnegative=True)
    second = sp.HadamardPower(mu_, 2) + DiagOf(G)
    exprs = {
        "mean": W * mu_,
        "cov": W * G * W.T + Diag(S * second),
        "cov_additive": W * G * W.T + sig**2 * (SqNorm(mu_) + sp.Trace(G)) * sp.Identity(m),
        "cov_relative": W * G * W.T + et**2 * Std(W) ** 2 * (SqNorm(mu_) + sp.Trace(G)) * sp.Identity(m),
        "cov_multiplicative": W * G * W.T + et**2 * Diag(sp.HadamardPower(W, 2) * second),
        "noise_variance_additive": sig**2 * (SqNorm(mu_) + sp.Trace(G)),
    }
    return Derivation(
        name="linear.random_input",
        topic="linear",
        title="One linear layer with a random input",
        statement=(
            r"For a random input independent of the weight noise, the output covariance is the propagated input "
            r"covariance plus a diagonal noise term driven by the input's second moments $\mu_j^2+\Gamma_{jj}$; "
            r"the noise acts on the input's fluctuation ($\sigma^2\operatorname{tr}\Gamma$) as well as on its mean."
        ),
        assumptions=(
            r"$x$ has mean $\mu$ and covariance $\Gamma$ and is independent of $N$ (any distribution: only first and "
            r"second moments enter; the symbolic check uses $x=\mu+Lg$, $g\sim\mathcal{N}(0,I)$, $\Gamma=LL^\top$).",
            r"The entries $N_{ij}$ are independent, zero mean, with variances $\Sigma_{ij}$; noise models as in "
            r"\texttt{linear.fixed\_input}.",
        ),
        expressions=exprs,
        symbols={"W": W, "mu": mu_, "Gamma": G, "S": S, "sigma": sig, "eta": et, "m": m, "n": n},
        lhs={
            **_COV_LHS,
            "noise_variance_additive": r"\operatorname{Var}(y_i)-(W\Gamma W^\top)_{ii}",
        },
        descriptions={
            "cov": r"general per-element variances; $\operatorname{dg}(\Gamma)$ is the vector of input variances.",
            "cov_additive": r"additive iid noise: the noise term is isotropic.",
            "noise_variance_additive": r"the part of each output's variance caused by the weight noise.",
        },
        where={
            "mu": "is the input mean",
            "Gamma": "is the input covariance",
            "S": r"is the matrix of per-element noise variances",
        },
        checks=tuple(checks),
        notes=(
            r"Dropping the $\sigma^2\operatorname{tr}\Gamma$ term (treating the input as fixed at its mean) "
            r"underestimates the noise when upstream noise has already perturbed the input (docs/THEORY.md \S 9).",
        ),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.moments",),
        tested_by=("tests/theory/test_symbolic_linear.py::test_random_input_covariance", "tests/theory/test_symbolic_linear.py::test_random_input_noise_part_is_the_trace_term"),
    )


@lru_cache(maxsize=None)
def linear_width() -> Derivation:
    """Width dependence of the relative error of one layer.

    With ``W_ij`` iid of mean 0 and variance ``σ_w²/n`` (mean-field / He scaling) and an
    input with ``E x_j² = q``: ``E y_i² = σ_w² q``. Absolute noise ``σ``: ``Var(δy_i) =
    n σ² q`` so the relative MSE is ``n σ²/σ_w²`` (RMS ``σ√n/σ_w``, growing with width).
    Layer-relative noise ``σ = η std(W)``: ``E std(W)² = (1 − 1/(mn)) σ_w²/n`` so the
    relative MSE is ``η²(1 − 1/(mn)) → η²``, independent of width. docs/THEORY.md §2.
    """
    m, n, N = sp.symbols("m n N", integer=True, positive=True)
    j, k = sp.symbols("j k", integer=True, positive=True)
    sigma_w, q, sigma, eta = sp.symbols("sigma_w q sigma eta", positive=True)
    v = sigma_w**2 / n  # per-weight variance
    # E y_i^2 = sum_j E[W_ij^2] E[x_j^2] (cross terms vanish: W zero mean, independent of x)
    signal = sp.simplify(sp.Sum(v * q, (j, 1, n)).doit())
    # E (N x)_i^2 = sum_j sigma^2 E x_j^2
    noise_abs = sp.simplify(sp.Sum(sigma**2 * q, (j, 1, n)).doit())
    rel_abs = sp.simplify(noise_abs / signal)
    # population variance of N = m n iid entries: E[(1/N) sum w_k^2] - E[wbar^2], E[wbar^2] = (1/N^2) sum_k E w_k^2
    e_std2 = sp.simplify((sp.Sum(v, (k, 1, N)).doit() / N - sp.Sum(v, (k, 1, N)).doit() / N**2).subs(N, m * n))
    noise_rel = sp.simplify(eta**2 * e_std2 * sp.Sum(q, (j, 1, n)).doit())
    rel_rel = sp.simplify(noise_rel / signal)
    checks = [
        assert_zero(rel_abs - n * sigma**2 / sigma_w**2, "relative MSE under absolute noise = n sigma^2/sigma_w^2"),
        assert_zero(rel_rel - eta**2 * (1 - 1 / (m * n)), "relative MSE under relative noise = eta^2 (1 - 1/(mn))"),
        assert_zero(sp.limit(rel_rel, n, sp.oo) - eta**2, "relative noise: limit n -> oo is eta^2"),
    ]
    exprs = {
        "signal": signal,
        "noise_absolute": noise_abs,
        "relative_mse_absolute": rel_abs,
        "relative_rms_absolute": sp.sqrt(rel_abs),
        "mean_std_sq": e_std2,
        "relative_mse_relative": rel_rel,
        "relative_mse_relative_limit": sp.limit(rel_rel, n, sp.oo),
    }
    return Derivation(
        name="linear.width",
        topic="linear",
        title="Width dependence of the relative error",
        statement=(
            r"Noise relative to the layer's weight spread gives a relative output error $\eta^2$ whatever the width; "
            r"absolute noise $\sigma$ gives a relative error that grows linearly with the fan-in $n$ "
            r"(RMS $\sigma\sqrt{n}/\sigma_w$), because trained and initialised weights shrink like $1/\sqrt{n}$."
        ),
        assumptions=(
            r"$W_{ij}$ independent, mean $0$, variance $\sigma_w^2/n$ ($m$ outputs, fan-in $n$).",
            r"$x$ independent of $W$ and $N$ with $\mathbb{E}x_j^2=q$ for every $j$.",
            r"Absolute noise: $N_{ij}$ iid of variance $\sigma^2$. Relative noise: variance "
            r"$\eta^2\operatorname{std}(W)^2$ with the population std of the realised $W$.",
            r"Relative MSE $=\mathbb{E}\lVert Nx\rVert^2/\mathbb{E}\lVert Wx\rVert^2$ (ratio of expectations over "
            r"$W$, $x$ and $N$).",
        ),
        expressions=exprs,
        symbols={"sigma_w": sigma_w, "q": q, "sigma": sigma, "eta": eta, "n": n, "m": m},
        lhs={
            "signal": r"\mathbb{E}[y_i^2]",
            "noise_absolute": r"\mathbb{E}[(Nx)_i^2]\big|_{\mathrm{abs}}",
            "relative_mse_absolute": r"R_{\mathrm{abs}}",
            "relative_rms_absolute": r"\sqrt{R_{\mathrm{abs}}}",
            "mean_std_sq": r"\mathbb{E}\operatorname{std}(W)^2",
            "relative_mse_relative": r"R_{\mathrm{rel}}",
            "relative_mse_relative_limit": r"\lim_{n\to\infty}R_{\mathrm{rel}}",
        },
        descriptions={
            "relative_mse_absolute": "grows linearly with the fan-in.",
            "relative_mse_relative": r"the $1/(mn)$ term comes from the population std subtracting the mean.",
        },
        where={
            "sigma_w": r"sets the weight variance $\sigma_w^2/n$",
            "q": "is the mean square of an input",
            "n": "is the fan-in",
            "m": "is the number of outputs",
        },
        checks=tuple(checks),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.noise.RelativeGaussian",),
        tested_by=("tests/theory/test_symbolic_linear.py::test_width_dependence_of_relative_error", "tests/theory/test_symbolic_linear.py::test_width_limits"),
    )
