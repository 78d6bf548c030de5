"""Topic ``batchnorm``: BatchNorm under weight noise (docs/THEORY.md §4).

- :func:`batchnorm_folding`: inference folding ``W' = diag(a) W``, ``b' = a(b − m) + β``.
- :func:`batchnorm_folded_noise`: the relative noise of each channel when the noise hits
  the folded weights (``σ' = η std(W')``) versus unfolded weights beside a digital BN
  (``σ = η std(W)``): channel c is inflated by ``κ_c = std(W')²/(a_c² std(W)²)``; the
  signal-energy-weighted inflation is ``1 + cov(a², ρ²)/(mean a² mean ρ²)`` (1 for rows
  of equal spread): folding *redistributes* noise from large-scale to small-scale
  channels rather than adding to it.
- :func:`batchnorm_lognormal_scales`: the expected inflation over log-normal BN scales
  (``log a ~ N(m, τ²)``): ``E κ = 1/C + (1 − 1/C) e^{4τ²}``, and for channels weighted by
  ``a^{2ν}`` (ν = 0: every channel counts alike; ν = 1: signal energy) ``1/C + (1 − 1/C)
  e^{4τ²(1 − ν)}``.
- :func:`batchnorm_scale_estimators`: L1 and TopK scales against the L2 std for Gaussian
  activations (``E|x − μ| = σ√(2/π)``; TopK: C(n)·E[mean top-k |x − μ|] as an integral).
- :func:`batchnorm_statistics_noise`: noise on the BN parameters themselves (γ, β, running
  mean, running variance or scale): L2 BN stores a *variance*, whose spread over channels
  is that of σ² — its relative noise is ``¼ std(v)²/v_c²``, versus ``std(s)²/s_c²`` for the
  scale stored by L1/TopK BN.
- :func:`batchnorm_layer_count`: what each mechanism predicts for the number k of BN
  layers: ``R(k) = η² L + k Δ`` with Δ from the mechanisms above.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp
from sympy.stats import E as expectation
from sympy.stats import Normal, moment_generating_function, variance

from .base import Derivation
from .functions import SqNorm, assert_zero

__all__ = [
    "batchnorm_folding",
    "batchnorm_folded_noise",
    "batchnorm_lognormal_scales",
    "batchnorm_scale_estimators",
    "batchnorm_statistics_noise",
    "batchnorm_layer_count",
]

_SOURCE = r"docs/THEORY.md \S 4 (BatchNorm); folding as in PyTorch \texttt{torch.nn.utils.fusion}"


@lru_cache(maxsize=None)
def _normal_mgf():
    """``E[e^{kX}]`` for ``X ~ N(m, τ²)`` (sympy.stats' moment generating function):
    ``(k, m, τ, expr)``."""
    k = sp.Symbol("k", real=True)
    m = sp.Symbol("m", real=True)
    tau = sp.Symbol("tau", positive=True)
    return k, m, tau, moment_generating_function(Normal("X", m, tau))(k)


def _lognormal_moment(k, m, tau):
    """``E[a^k]`` for ``log a ~ N(m, τ²)``: the normal moment generating function at k."""
    ks, ms, taus, mgf = _normal_mgf()
    return sp.powsimp(sp.expand(mgf.xreplace({ks: k, ms: m, taus: tau}), power_exp=False))


@lru_cache(maxsize=None)
def batchnorm_folding() -> Derivation:
    """Inference folding of a BatchNorm into the preceding linear/conv layer.

    Eval-mode L2 BN: ``y = γ (z − m)/√(v + ε) + β`` with ``z = w·x + b``. With
    ``a = γ/√(v + ε)``: ``y = (a w)·x + a(b − m) + β``, i.e. ``W' = diag(a) W``,
    ``b' = a(b − m) + β``. Scale BN (L1/TopK): ``a = γ/(s + ε)``. docs/THEORY.md §4.
    """
    n = 3
    x = sp.Matrix(n, 1, lambda j, _: sp.Symbol(f"x_{j}", real=True))
    w = sp.Matrix(1, n, lambda _, j: sp.Symbol(f"w_{j}", real=True))
    b, beta, m = sp.symbols("b beta m", real=True)
    gamma = sp.Symbol("gamma", real=True)
    v, eps, s = sp.symbols("v epsilon s", positive=True)
    z = (w * x)[0] + b
    a = gamma / sp.sqrt(v + eps)
    a_s = gamma / (s + eps)
    checks = [
        assert_zero(gamma * (z - m) / sp.sqrt(v + eps) + beta - ((a * w * x)[0] + a * (b - m) + beta), "L2 BN(w x + b) = (a w) x + a(b - m) + beta"),
        assert_zero(gamma * (z - m) / (s + eps) + beta - ((a_s * w * x)[0] + a_s * (b - m) + beta), "scale BN(w x + b) = (a w) x + a(b - m) + beta with a = gamma/(s + eps)"),
    ]
    wi = sp.Symbol("w", real=True)
    exprs = {
        "a": a,
        "a_scale": a_s,
        "w_folded": a * wi,
        "b_folded": a * (b - m) + beta,
        "b_folded_scale": a_s * (b - m) + beta,
    }
    return Derivation(
        name="batchnorm.folding",
        topic="batchnorm",
        title="Inference folding of BatchNorm",
        statement=(
            r"In eval mode a BatchNorm is the per-channel affine map $y_c=a_c z_c+c_c$, so it can be folded into the "
            r"layer that feeds it: $W'=\operatorname{diag}(a)W$, $b'=a\odot(b-m)+\beta$. A crossbar that stores the "
            r"folded weights sees the noise on $W'$."
        ),
        assumptions=(
            r"Eval mode: the running mean $m_c$ and variance $v_c$ (or scale $s_c$ for L1/TopK BatchNorm) are fixed.",
            r"The BatchNorm directly follows the linear/conv layer ($z=Wx+b$), per output channel.",
        ),
        expressions=exprs,
        symbols={"gamma": gamma, "beta": beta, "m": m, "v": v, "epsilon": eps, "s": s, "w": wi, "b": b},
        lhs={
            "a": r"a_c",
            "a_scale": r"a_c\big|_{\mathrm{L1/TopK}}",
            "w_folded": r"W'_{cj}",
            "b_folded": r"b'_c",
            "b_folded_scale": r"b'_c\big|_{\mathrm{L1/TopK}}",
        },
        descriptions={"w_folded": r"$W'_{cj}=a_cW_{cj}$: row $c$ scaled by the channel's BN gain."},
        where={
            "gamma": r"($\gamma_c$) and $\beta$ are the affine parameters",
            "m": "is the running mean",
            "v": "is the running variance",
            "s": "is the running scale of L1/TopK BatchNorm",
            "epsilon": "is the BatchNorm epsilon",
        },
        checks=tuple(checks),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.targets.folding_affine", "noiseprop.theory.targets.fold_bn"),
        tested_by=("tests/theory/test_symbolic_batchnorm.py::test_folding_is_exact_against_torch_eval", "tests/theory/test_targets.py::test_fold_bn_exact_and_user_model_untouched"),
    )


@lru_cache(maxsize=None)
def batchnorm_folded_noise() -> Derivation:
    """Relative noise of each channel: noise on folded vs unfolded weights.

    Unfolded (BN digital, ``σ = η std(W)``): channel c's output noise ``a_c N_c x`` has
    variance ``a_c² η² std(W)² ‖x‖²``, relative ``η² std(W)² ‖x‖²/(w_c·x)²`` (independent
    of ``a_c``). Folded (``σ' = η std(W')``): variance ``η² std(W')² ‖x‖²``, relative
    ``η² std(W')² ‖x‖²/(a_c² (w_c·x)²)``. Inflation ``κ_c = std(W')²/(a_c² std(W)²)``.
    Rows with zero mean and mean squares ``ρ_c²``: ``std(W')² = mean_c(a_c² ρ_c²)``,
    ``std(W)² = mean_c ρ_c²``; the signal-energy-weighted inflation is
    ``C Σ a_c²ρ_c² / (Σ a_c² Σ ρ_c²)`` (1 for equal ρ_c). docs/THEORY.md §4.
    """
    # generic instance: C = 3 channels, 2 inputs, rows with zero mean (w_c1 = -w_c0)
    C = 3
    a_ = [sp.Symbol(f"a_{c}", positive=True) for c in range(C)]
    r_ = [sp.Symbol(f"r_{c}", real=True) for c in range(C)]
    rows = [[r_[c], -r_[c]] for c in range(C)]  # zero mean, mean square r_c^2
    entries = [a_[c] * rows[c][j] for c in range(C) for j in range(2)]
    n_el = len(entries)
    std_f2 = sum(e**2 for e in entries) / n_el - (sum(entries) / n_el) ** 2
    std_2 = sum(rows[c][j] ** 2 for c in range(C) for j in range(2)) / n_el
    checks = [
        assert_zero(std_f2 - sum(a_[c] ** 2 * r_[c] ** 2 for c in range(C)) / C, "zero-mean rows: std(W')^2 = mean_c a_c^2 rho_c^2 (generic 3x2 instance)"),
        assert_zero(std_2 - sum(r ** 2 for r in r_) / C, "zero-mean rows: std(W)^2 = mean_c rho_c^2"),
    ]
    eta = sp.Symbol("eta", nonnegative=True)
    a_c, u_c = sp.symbols("a_c u_c", positive=True)
    s_W, s_Wf = sp.symbols("s_W s_Wf", positive=True)
    nC, nn = sp.symbols("C n", integer=True, positive=True)
    x = sp.MatrixSymbol("x", nn, 1)
    av = sp.MatrixSymbol("a", nC, 1)
    rv = sp.MatrixSymbol("rho", nC, 1)
    var_u = a_c**2 * eta**2 * s_W**2 * SqNorm(x)
    var_f = eta**2 * s_Wf**2 * SqNorm(x)
    rel_u = sp.simplify(var_u / (a_c * u_c) ** 2)
    rel_f = sp.simplify(var_f / (a_c * u_c) ** 2)
    infl = sp.simplify(rel_f / rel_u)
    checks.append(assert_zero(sp.diff(rel_u, a_c), "unfolded relative noise does not depend on a_c"))
    # energy weighting: sum_c S_c rel_c / sum_c S_c with S_c = a_c^2 u_c^2 (generic instance)
    u_ = [sp.Symbol(f"u_{c}", positive=True) for c in range(C)]
    num_f = sum((a_[c] * u_[c]) ** 2 * var_f.subs({a_c: a_[c]}) / (a_[c] * u_[c]) ** 2 for c in range(C))
    num_u = sum((a_[c] * u_[c]) ** 2 * var_u.subs({a_c: a_[c]}) / (a_[c] * u_[c]) ** 2 for c in range(C))
    energy = sp.simplify(num_f / num_u)
    checks.append(assert_zero(energy - C * s_Wf**2 / (s_W**2 * sum(a ** 2 for a in a_)), "energy-weighted inflation = C std(W')^2/(std(W)^2 sum_c a_c^2)"))
    ar = sp.HadamardProduct(av, rv)
    exprs = {
        "noise_var_unfolded": var_u,
        "noise_var_folded": var_f,
        "relative_unfolded": rel_u,
        "relative_folded": rel_f,
        "inflation": infl,
        "std_folded_sq_zero_mean_rows": SqNorm(ar) / nC,
        "inflation_zero_mean_rows": SqNorm(ar) / (a_c**2 * SqNorm(rv)),
        "inflation_energy": nC * SqNorm(ar) / (SqNorm(av) * SqNorm(rv)),
    }
    return Derivation(
        name="batchnorm.folded_noise",
        topic="batchnorm",
        title="Relative noise per channel: folded versus unfolded weights",
        statement=(
            r"With the BatchNorm kept digital, the noise of channel $c$ is scaled by $a_c$ together with its signal, "
            r"so its relative noise does not depend on $a_c$. With the noise on the folded weights and $\sigma'=\eta"
            r"\operatorname{std}(W')$ shared by all channels, channels with a small BN gain are inflated by "
            r"$\kappa_c=\operatorname{std}(W')^2/(a_c^2\operatorname{std}(W)^2)$ and large-gain channels deflated; "
            r"weighted by signal energy the two cancel exactly when the rows of $W$ have equal spread."
        ),
        assumptions=(
            r"One linear/conv layer followed by an eval-mode BatchNorm of gain $a_c$; fixed input $x$; "
            r"$u_c=w_c\cdot x$ is channel $c$'s pre-BN signal (bias excluded).",
            r"Relative noise: iid entries of variance $\eta^2\operatorname{std}(W)^2$ on $W$ (unfolded) or "
            r"$\eta^2\operatorname{std}(W')^2$ on $W'=\operatorname{diag}(a)W$ (folded), population std over the "
            r"whole tensor.",
            r"For the closed forms in $a$ and $\rho$: every row of $W$ has zero mean; $\rho_c^2$ is the mean square "
            r"of row $c$.",
        ),
        expressions=exprs,
        symbols={"eta": eta, "a_c": a_c, "u_c": u_c, "s_W": s_W, "s_Wf": s_Wf, "x": x, "a": av, "rho": rv, "C": nC, "n": nn},
        lhs={
            "noise_var_unfolded": r"\operatorname{Var}(\delta y_c)\big|_{\mathrm{unfolded}}",
            "noise_var_folded": r"\operatorname{Var}(\delta y_c)\big|_{\mathrm{folded}}",
            "relative_unfolded": r"r_c\big|_{\mathrm{unfolded}}",
            "relative_folded": r"r_c\big|_{\mathrm{folded}}",
            "inflation": r"\kappa_c",
            "std_folded_sq_zero_mean_rows": r"\operatorname{std}(W')^2",
            "inflation_zero_mean_rows": r"\kappa_c\big|_{\mathrm{zero\text{-}mean\ rows}}",
            "inflation_energy": r"\frac{\sum_c a_c^2u_c^2\,r_c|_{\mathrm{folded}}}{\sum_c a_c^2u_c^2\,r_c|_{\mathrm{unfolded}}}",
        },
        descriptions={
            "relative_unfolded": r"independent of the BN gain $a_c$.",
            "inflation": r"$>1$ for channels whose gain is below the layer's typical gain.",
            "inflation_energy": r"$=1+\operatorname{cov}_c(a^2,\rho^2)/(\overline{a^2}\,\overline{\rho^2})$; exactly $1$ for rows of equal spread.",
        },
        where={
            "s_W": r"$=\operatorname{std}(W)$",
            "s_Wf": r"$=\operatorname{std}(W')$",
            "a": "is the vector of BN gains",
            "rho": "holds the root-mean-square of each row of $W$",
        },
        checks=tuple(checks),
        notes=(
            r"Whether folding harms therefore depends on how the downstream network weights the channels: a "
            r"downstream that is sensitive to each channel's relative error alike sees the inflation "
            r"$\mathbb{E}\kappa$ of \texttt{batchnorm.lognormal\_scales}; random downstream weights see only the "
            r"energy-weighted value (no inflation). Which holds for trained networks is to be measured.",
        ),
        source=_SOURCE,
        implemented_by=("noiseprop.empirical.studies.theory_helpers.folding_factors",),
        tested_by=("tests/theory/test_symbolic_batchnorm.py::test_folded_versus_unfolded_noise_per_channel",),
    )


@lru_cache(maxsize=None)
def batchnorm_lognormal_scales() -> Derivation:
    """Expected folding inflation over log-normal BN gains.

    Zero-mean rows of equal spread: ``κ_c = mean_k(a_k²)/a_c²``. With ``log a_c ~ N(m,
    τ²)`` iid over C channels and channel weights ``a_c^{2ν}``:
    ``E[Σ a_c^{2ν} κ_c]/E[Σ a_c^{2ν}] = 1/C + (1 − 1/C) e^{4τ²(1 − ν)}``
    (ν = 0: plain channel mean ``1/C + (1 − 1/C)e^{4τ²}``; ν = 1: 1). For C → ∞,
    ``log κ_c ~ N(2τ², 4τ²)``: median ``e^{2τ²}``, mean ``e^{4τ²}``. docs/THEORY.md §4.
    """
    m = sp.Symbol("m", real=True)
    tau = sp.Symbol("tau", positive=True)
    nu = sp.Symbol("nu", real=True)
    C = sp.Symbol("C", integer=True, positive=True)
    M = lambda k: _lognormal_moment(k, m, tau)  # noqa: E731
    # E[a_c^{2nu} (1/C) sum_k a_k^2 / a_c^2] = (1/C)(E a^{2nu} + (C-1) E a^2 E a^{2nu-2})
    num = (M(2 * nu) + (C - 1) * M(2) * M(2 * nu - 2)) / C
    weighted = sp.simplify(sp.expand(num / M(2 * nu)))
    target = 1 / C + (1 - 1 / C) * sp.exp(4 * tau**2 * (1 - nu))
    checks = [assert_zero(sp.simplify(sp.expand(weighted - target, power_exp=True)), "E[sum a^(2nu) kappa]/E[sum a^(2nu)] = 1/C + (1 - 1/C) exp(4 tau^2 (1 - nu)) (sympy.stats log-normal moments)")]
    unweighted = sp.simplify(target.subs(nu, 0))
    limit_mean = sp.limit(unweighted, C, sp.oo)
    # C -> oo: log kappa_c = log E a^2 - 2 log a_c, log a_c ~ N(m, tau^2)
    X = Normal("X", m, tau)
    logk = sp.log(M(2)) - 2 * X
    log_mean = sp.simplify(expectation(logk))
    log_var = sp.simplify(variance(logk))
    checks.append(assert_zero(log_mean - 2 * tau**2, "C -> oo: E log kappa = 2 tau^2"))
    checks.append(assert_zero(log_var - 4 * tau**2, "C -> oo: Var log kappa = 4 tau^2"))
    exprs = {
        "mean_a2": M(2),
        "mean_inv_a2": M(-2),
        "inflation_weighted": target,
        "inflation_mean": unweighted,
        "inflation_mean_limit": limit_mean,
        "inflation_median_limit": sp.exp(log_mean),
        "log_inflation_mean_limit": log_mean,
    }
    return Derivation(
        name="batchnorm.lognormal_scales",
        topic="batchnorm",
        title="Expected folding inflation for log-normal BatchNorm gains",
        statement=(
            r"If the BN gains of a layer are log-normal with log-spread $\tau$, folding inflates the relative noise of "
            r"a typical channel by $e^{2\tau^2}$ and of the average channel by $e^{4\tau^2}$; weighting channels by "
            r"$a^{2\nu}$ interpolates to no inflation at all for signal-energy weights ($\nu=1$)."
        ),
        assumptions=(
            r"Every row of $W$ has zero mean and the same mean square, so $\kappa_c=\overline{a^2}/a_c^2$ "
            r"(\texttt{batchnorm.folded\_noise}).",
            r"$\log a_c\sim\mathcal{N}(m,\tau^2)$ independently over the $C$ channels (independent of $W$).",
            r"Weighted inflation: ratio of expectations $\mathbb{E}[\sum_c a_c^{2\nu}\kappa_c]/\mathbb{E}[\sum_c a_c^{2\nu}]$.",
        ),
        expressions=exprs,
        symbols={"m": m, "tau": tau, "nu": nu, "C": C},
        lhs={
            "mean_a2": r"\mathbb{E}a^2",
            "mean_inv_a2": r"\mathbb{E}a^{-2}",
            "inflation_weighted": r"\bar\kappa_\nu",
            "inflation_mean": r"\mathbb{E}\kappa_c",
            "inflation_mean_limit": r"\lim_{C\to\infty}\mathbb{E}\kappa_c",
            "inflation_median_limit": r"\lim_{C\to\infty}\operatorname{median}\kappa_c",
            "log_inflation_mean_limit": r"\lim_{C\to\infty}\mathbb{E}\log\kappa_c",
        },
        descriptions={
            "inflation_weighted": r"$\nu=0$: every channel counts alike; $\nu=1$: channels weighted by signal energy.",
            "inflation_mean_limit": r"$=\mathbb{E}a^2\,\mathbb{E}a^{-2}$; independent of $m$ (scale invariance).",
        },
        where={"m": r"and $\tau$ are the mean and std of $\log a$", "nu": "sets the channel weights $a^{2\\nu}$", "C": "is the number of channels"},
        checks=tuple(checks),
        notes=(
            r"$\kappa$ is invariant to a common factor on all gains, so any BatchNorm variant whose scale is a fixed "
            r"multiple of the std (L1, TopK for Gaussian activations) predicts the same folding inflation as L2.",
        ),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.symbolic.batchnorm.batchnorm_lognormal_scales",),
        tested_by=("tests/theory/test_symbolic_batchnorm.py::test_lognormal_inflation_finite_channels", "tests/theory/test_symbolic_batchnorm.py::test_lognormal_inflation_many_channels"),
    )


@lru_cache(maxsize=None)
def batchnorm_scale_estimators() -> Derivation:
    """L1 and TopK BatchNorm scales against the L2 std for Gaussian activations.

    ``x ~ N(μ, σ²)``: ``E|x − μ| = σ√(2/π)`` so ``√(π/2)·mean|x − μ|`` is unbiased for σ;
    with the batch mean, ``E|x_i − x̄| = σ√(2/π)√((n − 1)/n)``. Known mean, n samples:
    ``Var(√(π/2) mean|x − μ|) = (π/2 − 1) σ²/n`` vs ``σ²/(2n)`` (asymptotic) for the L2
    std: efficiency ratio ``π − 2``. TopK: ``E[mean of the k largest |x − μ|] = (σ n/k)
    ∫_0^∞ t f(t) I_{F(t)}(n − k, k) dt`` (half-normal ``F``, ``f``), scaled by
    ``C(n) = ½(1 + √(π ln 4))/√(2 ln n)`` (Hoffer et al. 2018). docs/THEORY.md §4.
    """
    mu = sp.Symbol("mu", real=True)
    sigma = sp.Symbol("sigma", positive=True)
    n, k = sp.symbols("n k", integer=True, positive=True)
    X = Normal("X", mu, sigma)
    mad = sp.simplify(expectation(sp.Abs(X - mu)))
    var_abs = sp.simplify(variance(sp.Abs(X - mu)))
    checks = [assert_zero(mad - sigma * sp.sqrt(2 / sp.pi), "E|X - mu| = sigma sqrt(2/pi) (sympy.stats)")]
    l1_mean = sp.simplify(sp.sqrt(sp.pi / 2) * mad)
    # x_i - xbar = (1 - 1/n) x_i - (1/n) sum_{j != i} x_j: variance
    j = sp.Symbol("j", integer=True, positive=True)
    var_dev = sp.simplify((1 - 1 / n) ** 2 * sigma**2 + sp.Sum(sigma**2 / n**2, (j, 1, n - 1)).doit())
    checks.append(assert_zero(var_dev - sigma**2 * (n - 1) / n, "Var(x_i - xbar) = sigma^2 (n-1)/n"))
    mad_batch = sp.simplify(sp.sqrt(2 / sp.pi) * sp.sqrt(var_dev))
    l1_var = sp.simplify(sp.pi / 2 * var_abs / n)
    # L2 with known mean: s^2 = mean (x - mu)^2 has variance 2 sigma^4 / n; delta method for sqrt
    l2_var = sp.simplify((1 / (2 * sigma)) ** 2 * 2 * sigma**4 / n)
    eff = sp.simplify(l1_var / l2_var)
    # TopK: E[sum of the k largest of n iid half-normals] = n E[|Z| 1{fewer than k others exceed |Z|}]
    t, F = sp.symbols("t F", nonnegative=True)
    Fh = sp.erf(t / sp.sqrt(2))
    fh = sp.sqrt(2 / sp.pi) * sp.exp(-(t**2) / 2)
    # P(Bin(n-1, 1-F) <= k-1) = I_F(n-k, k): check d/dF for one (n, k) and equality at F = 0
    n0, k0 = 7, 3
    jj = sp.Symbol("jj", integer=True)
    tail = sum(sp.binomial(n0 - 1, i) * (1 - F) ** i * F ** (n0 - 1 - i) for i in range(k0))
    beta_density = F ** (n0 - k0 - 1) * (1 - F) ** (k0 - 1) / sp.expand_func(sp.beta(n0 - k0, k0))
    checks.append(assert_zero(sp.diff(tail, F) - beta_density, "P(Bin(n-1, 1-F) <= k-1) = I_F(n-k, k): derivatives agree (n=7, k=3) and both vanish at F=0"))
    assert tail.subs(F, 0) == 0
    topk_mean = sigma * n / k * sp.Integral(t * fh * sp.betainc_regularized(n - k, k, 0, Fh), (t, 0, sp.oo))
    Cn = sp.Rational(1, 2) * (1 + sp.sqrt(sp.pi * sp.log(4))) / sp.sqrt(2 * sp.log(n))
    exprs = {
        "mean_abs_dev": mad,
        "l1_scale_mean": l1_mean,
        "mean_abs_dev_batch": mad_batch,
        "l1_scale_var": l1_var,
        "l2_scale_var": l2_var,
        "efficiency_l1_vs_l2": eff,
        "topk_constant": Cn,
        "topk_mean": topk_mean,
        "topk_scale_bias": Cn * topk_mean / sigma,
    }
    return Derivation(
        name="batchnorm.scale_estimators",
        topic="batchnorm",
        title="L1 and TopK BatchNorm scales versus the L2 standard deviation",
        statement=(
            r"For Gaussian activations the L1 scale $\sqrt{\pi/2}\,\overline{|x-\mu|}$ is an unbiased estimate of "
            r"$\sigma$ with $\pi-2\approx1.14$ times the variance of the L2 estimate, and the TopK scale is a fixed "
            r"multiple $\beta(n,k)$ of $\sigma$. All three give BN gains proportional to $1/\sigma_c$, hence the same "
            r"folding inflation (which is scale invariant); they differ in what they store and in non-Gaussian "
            r"channels."
        ),
        assumptions=(
            r"Activations of a channel iid $\mathcal{N}(\mu,\sigma^2)$ over the $n$ elements of a batch.",
            r"L1 variance and TopK expectation with the true mean $\mu$ (the batch mean changes them by $O(1/n)$; "
            r"the L1 mean is also given exactly with the batch mean).",
        ),
        expressions=exprs,
        symbols={"sigma": sigma, "mu": mu, "n": n, "k": k},
        lhs={
            "mean_abs_dev": r"\mathbb{E}|x-\mu|",
            "l1_scale_mean": r"\mathbb{E}\,s_{\mathrm{L1}}",
            "mean_abs_dev_batch": r"\mathbb{E}|x_i-\bar x|",
            "l1_scale_var": r"\operatorname{Var}s_{\mathrm{L1}}",
            "l2_scale_var": r"\operatorname{Var}s_{\mathrm{L2}}",
            "efficiency_l1_vs_l2": r"\operatorname{Var}s_{\mathrm{L1}}/\operatorname{Var}s_{\mathrm{L2}}",
            "topk_constant": r"C(n)",
            "topk_mean": r"\mathbb{E}\,\overline{\mathrm{top}_k|x-\mu|}",
            "topk_scale_bias": r"\beta(n,k)=\mathbb{E}\,s_{\mathrm{TopK}}/\sigma",
        },
        descriptions={
            "l2_scale_var": "delta method, to first order in 1/n.",
            "topk_mean": r"$I_F(a,b)$ is the regularised incomplete beta function: the probability that fewer than $k$ of the other $n-1$ exceed $t$.",
            "topk_scale_bias": r"$0.988$ ($n=64$), $1.160$ ($n=512$), $1.248$ ($n=4096$) for $k=10$ (true mean; with the batch mean, Monte-Carlo: $0.981$, $1.159$, $1.248$): $C(n)$ is derived for the maximum ($k=1$).",
        },
        where={"n": "is the number of elements per channel in a batch", "k": "is the number of largest deviations averaged"},
        checks=tuple(checks),
        source=r"docs/THEORY.md \S 4; Wu et al. 2018; Hoffer et al. 2018 (``Norm matters'')",
        implemented_by=("noiseprop.empirical.norms.topk_constant", "noiseprop.empirical.norms.L1BatchNorm2d", "noiseprop.empirical.norms.TopKBatchNorm2d"),
        tested_by=("tests/theory/test_symbolic_batchnorm.py::test_scale_estimators_for_gaussian_activations", "tests/empirical/test_norms.py::test_topk_constant_formula"),
    )


@lru_cache(maxsize=None)
def batchnorm_statistics_noise() -> Derivation:
    """Noise on the BN parameters themselves (γ, β, running mean, running var / scale).

    First order, channel c (``a = γ/√(v + ε)``, output ``y = a(z − m) + β``):
    ``Var(δy) = a²(z − m)² [σ_γ²/γ² + σ_v²/(4(v + ε)²)] + a² σ_m² + σ_β²`` (L2);
    scale BN (``a = γ/(s + ε)``): ``σ_v²/(4(v + ε)²)`` becomes ``σ_s²/(s + ε)²``. Relative
    noise ``σ_p = η std(p)`` over the channels. Log-normal channel std
    (``log σ_c ~ N(m, τ²)``, ``v = σ²``, ``s ∝ σ``, ε → 0, C → ∞), channels weighted by
    ``a^{2ν}`` (γ constant): statistic term ``G_L2 = ¼(e^{8τ²} − e^{4τ²}) e^{8τ²(1 + ν)}``,
    ``G_scale = (e^{2τ²} − e^{τ²}) e^{τ²(2 + 4ν)}``. docs/THEORY.md §4 (seed: L1/TopK BN more
    noise resistant, arXiv 2205.04886).
    """
    gamma, v, s = sp.symbols("gamma v s", positive=True)
    eps = sp.Symbol("epsilon", nonnegative=True)
    zc = sp.Symbol("z_c", real=True)  # centred input z - m
    sg, sv, ss, sm, sb = sp.symbols("sigma_gamma sigma_v sigma_s sigma_m sigma_beta", nonnegative=True)
    m_, beta = sp.symbols("m beta", real=True)
    z = sp.Symbol("z", real=True)
    y_l2 = gamma * (z - m_) / sp.sqrt(v + eps) + beta
    y_sc = gamma * (z - m_) / (s + eps) + beta

    def first_order_var(y, params):
        return sp.expand(sum(sp.diff(y, p) ** 2 * sd**2 for p, sd in params))

    var_l2 = first_order_var(y_l2, [(gamma, sg), (v, sv), (m_, sm), (beta, sb)]).subs(z, zc + m_)
    var_sc = first_order_var(y_sc, [(gamma, sg), (s, ss), (m_, sm), (beta, sb)]).subs(z, zc + m_)
    a_l2 = gamma / sp.sqrt(v + eps)
    a_sc = gamma / (s + eps)
    gain_l2 = first_order_var(a_l2, [(gamma, sg), (v, sv)]) / a_l2**2
    gain_sc = first_order_var(a_sc, [(gamma, sg), (s, ss)]) / a_sc**2
    # the computed forms, checked against (and presented as) their factored forms
    gain_l2_f = sg**2 / gamma**2 + sv**2 / (4 * (v + eps) ** 2)
    gain_sc_f = sg**2 / gamma**2 + ss**2 / (s + eps) ** 2
    var_l2_f = a_l2**2 * zc**2 * gain_l2_f + a_l2**2 * sm**2 + sb**2
    var_sc_f = a_sc**2 * zc**2 * gain_sc_f + a_sc**2 * sm**2 + sb**2
    checks = [
        assert_zero(gain_l2 - gain_l2_f, "L2: relative gain variance = s_g^2/g^2 + s_v^2/(4(v+eps)^2) (first order)"),
        assert_zero(gain_sc - gain_sc_f, "scale BN: relative gain variance = s_g^2/g^2 + s_s^2/(s+eps)^2"),
        assert_zero(var_l2 - var_l2_f, "L2 output variance = a^2 z_c^2 g + a^2 s_m^2 + s_beta^2"),
        assert_zero(var_sc - var_sc_f, "scale BN output variance = a^2 z_c^2 g + a^2 s_m^2 + s_beta^2"),
    ]
    gain_l2, gain_sc, var_l2, var_sc = gain_l2_f, gain_sc_f, var_l2_f, var_sc_f
    # log-normal channel std, weights a^{2 nu} with gamma constant: a^2 = v^{-1} (L2), s^{-2} (scale)
    mm = sp.Symbol("m", real=True)
    tau = sp.Symbol("tau", positive=True)
    nu = sp.Symbol("nu", nonnegative=True)
    M = lambda k: _lognormal_moment(k, mm, tau)  # noqa: E731  E[sigma_c^k]
    std_v2 = M(4) - M(2) ** 2
    G_l2 = sp.Rational(1, 4) * std_v2 * M(-4 - 2 * nu) / M(-2 * nu)
    std_s2 = M(2) - M(1) ** 2  # s proportional to sigma: the factor cancels
    G_sc = std_s2 * M(-2 - 2 * nu) / M(-2 * nu)
    checks.append(assert_zero(sp.expand(G_l2 - sp.Rational(1, 4) * (sp.exp(8 * tau**2) - sp.exp(4 * tau**2)) * sp.exp(8 * tau**2 * (1 + nu)), power_exp=True), "log-normal: G_L2 = 1/4 (e^{8 tau^2} - e^{4 tau^2}) e^{8 tau^2 (1 + nu)}"))
    checks.append(assert_zero(sp.expand(G_sc - (sp.exp(2 * tau**2) - sp.exp(tau**2)) * sp.exp(tau**2 * (2 + 4 * nu)), power_exp=True), "log-normal: G_scale = (e^{2 tau^2} - e^{tau^2}) e^{tau^2 (2 + 4 nu)}"))
    G_l2 = sp.Rational(1, 4) * (sp.exp(8 * tau**2) - sp.exp(4 * tau**2)) * sp.exp(8 * tau**2 * (1 + nu))
    G_sc = (sp.exp(2 * tau**2) - sp.exp(tau**2)) * sp.exp(tau**2 * (2 + 4 * nu))
    ratio_small = sp.limit(sp.series(G_l2, tau, 0, 4).removeO() / sp.series(G_sc, tau, 0, 4).removeO(), tau, 0)
    exprs = {
        "gain_rel_var_l2": gain_l2,
        "gain_rel_var_scale": gain_sc,
        "output_var_l2": var_l2,
        "output_var_scale": var_sc,
        "statistic_term_l2": G_l2,
        "statistic_term_scale": G_sc,
        "ratio_l2_scale_small_spread": ratio_small,
    }
    return Derivation(
        name="batchnorm.statistics_noise",
        topic="batchnorm",
        title="Noise on the BatchNorm parameters and running statistics",
        statement=(
            r"When the BatchNorm's own parameters are stored with noise relative to their spread over channels, "
            r"the running variance of L2 BatchNorm spreads like $\sigma_c^2$, so its relative noise "
            r"$\frac{1}{4}\operatorname{std}(v)^2/v_c^2$ grows much faster with the spread of channel scales than the "
            r"$\operatorname{std}(s)^2/s_c^2$ of the scale stored by L1/TopK BatchNorm; both agree for a small spread."
        ),
        assumptions=(
            r"Eval-mode BatchNorm, output $y_c=\gamma_c(z-m_c)/\sqrt{v_c+\epsilon}+\beta_c$ (L2) or "
            r"$\gamma_c(z-m_c)/(s_c+\epsilon)+\beta_c$ (L1/TopK); $z_c=z-m_c$.",
            r"Independent zero-mean noise on $\gamma,\beta,m$ and $v$ (or $s$) with stds $\sigma_\gamma,\dots$; for "
            r"relative noise $\sigma_p=\eta\operatorname{std}(p)$ over the channels. First order in the noise.",
            r"Log-normal forms: $\gamma$ constant over channels, $\log\sigma_c\sim\mathcal{N}(m,\tau^2)$, "
            r"$v_c=\sigma_c^2$, $s_c\propto\sigma_c$, $\epsilon\to0$, $C\to\infty$; channel $c$ weighted by $a_c^{2\nu}$.",
        ),
        expressions=exprs,
        symbols={
            "gamma": gamma, "v": v, "s": s, "epsilon": eps, "z_c": zc, "sigma_gamma": sg, "sigma_v": sv,
            "sigma_s": ss, "sigma_m": sm, "sigma_beta": sb, "m": mm, "tau": tau, "nu": nu,
        },
        lhs={
            "gain_rel_var_l2": r"\operatorname{Var}(\delta a_c)/a_c^2\big|_{\mathrm{L2}}",
            "gain_rel_var_scale": r"\operatorname{Var}(\delta a_c)/a_c^2\big|_{\mathrm{L1/TopK}}",
            "output_var_l2": r"\operatorname{Var}(\delta y_c)\big|_{\mathrm{L2}}",
            "output_var_scale": r"\operatorname{Var}(\delta y_c)\big|_{\mathrm{L1/TopK}}",
            "statistic_term_l2": r"G_{\mathrm{L2}}",
            "statistic_term_scale": r"G_{\mathrm{L1/TopK}}",
            "ratio_l2_scale_small_spread": r"\lim_{\tau\to0}G_{\mathrm{L2}}/G_{\mathrm{L1/TopK}}",
        },
        descriptions={
            "statistic_term_l2": r"channel-weighted mean of $\operatorname{std}(v)^2/(4v_c^2)$; multiply by $\eta^2$.",
            "statistic_term_scale": r"channel-weighted mean of $\operatorname{std}(s)^2/s_c^2$; multiply by $\eta^2$.",
        },
        where={"tau": r"is the std of $\log\sigma_c$ over channels", "nu": "sets the channel weights $a^{2\\nu}$"},
        checks=tuple(checks),
        source=r"docs/THEORY.md \S 4; seed result arXiv 2205.04886 (L1/TopK BatchNorm more noise resistant)",
        implemented_by=("noiseprop.theory.symbolic.batchnorm.batchnorm_statistics_noise",),
        tested_by=("tests/theory/test_symbolic_batchnorm.py::test_statistics_noise_per_channel", "tests/theory/test_symbolic_batchnorm.py::test_statistics_noise_lognormal_average"),
    )


@lru_cache(maxsize=None)
def batchnorm_layer_count() -> Derivation:
    """What each mechanism predicts for the number k of BN layers.

    First order, per-layer contributions add (independent noise, critical propagation:
    ``depth.relu_critical``): ``R(k) = η²(L + k(κ̄ − 1)) + k η² G``. Digital BN with noise on
    the conv weights: κ̄ = 1, G = 0 — no effect of k. Folded BN: κ̄ from
    ``batchnorm.lognormal_scales`` (``e^{4τ²}`` if channels count alike, 1 for energy
    weighting). Noisy BN statistics: G from ``batchnorm.statistics_noise`` (L2 ≫ L1/TopK
    for a wide spread of channel scales). docs/THEORY.md §4.
    """
    eta = sp.Symbol("eta", nonnegative=True)
    L, k = sp.symbols("L k", integer=True, nonnegative=True)
    kappa, G = sp.symbols("kappa G", nonnegative=True)
    tau = sp.Symbol("tau", positive=True)
    C = sp.Symbol("C", integer=True, positive=True)
    nu = sp.Symbol("nu", nonnegative=True)
    l = sp.Symbol("l", integer=True, positive=True)
    # sum over layers of the per-layer relative variance: eta^2 kappa_l (folded BN layers) or eta^2 (others)
    R = sp.simplify(sp.Sum(eta**2, (l, 1, L - k)).doit() + sp.Sum(eta**2 * kappa + eta**2 * G, (l, 1, k)).doit())
    slope = sp.simplify(sp.diff(R, k))
    kbar = batchnorm_lognormal_scales()["inflation_weighted"]
    lnm = batchnorm_lognormal_scales().symbols
    kbar = kbar.subs({lnm["tau"]: tau, lnm["C"]: C, lnm["nu"]: nu})
    sn = batchnorm_statistics_noise()
    sym = sn.symbols
    G_l2 = sn["statistic_term_l2"].subs({sym["tau"]: tau, sym["nu"]: nu})
    G_sc = sn["statistic_term_scale"].subs({sym["tau"]: tau, sym["nu"]: nu})
    checks = [assert_zero(slope - eta**2 * (kappa - 1 + G), "dR/dk = eta^2 (kappa - 1 + G)")]
    slope_folded = sp.simplify(slope.subs({kappa: kbar, G: 0}))
    checks.append(assert_zero(slope_folded.subs(nu, 1), "folded BN, energy weights (nu = 1): slope 0"))
    exprs = {
        "relative_error": R,
        "slope": slope,
        "slope_digital": slope.subs({kappa: 1, G: 0}),
        "slope_folded": slope_folded,
        "slope_statistics_l2": sp.simplify(slope.subs({kappa: 1, G: G_l2})),
        "slope_statistics_scale": sp.simplify(slope.subs({kappa: 1, G: G_sc})),
    }
    return Derivation(
        name="batchnorm.layer_count",
        topic="batchnorm",
        title="Effect of the number of BatchNorm layers",
        statement=(
            r"With per-layer relative noise contributions adding up along a critical network, each BatchNorm layer "
            r"changes the output's relative error by a fixed slope $\eta^2(\bar\kappa-1+G)$: zero for a digital "
            r"BatchNorm, positive for folding only if the downstream network weighs channels alike (not by energy), "
            r"and positive for noisy BN statistics, much larger for L2 than for L1/TopK BatchNorm when channel scales "
            r"spread widely."
        ),
        assumptions=(
            r"$L$ noisy layers, $k$ of them followed by a BatchNorm; relative noise level $\eta$ on every layer.",
            r"First order; contributions of different layers independent and propagated without gain or loss of "
            r"relative error (critical / homogeneous network, \texttt{depth.relu\_critical}).",
            r"A BatchNorm layer multiplies its layer's contribution by $\bar\kappa$ (folding) and adds $\eta^2 G$ "
            r"(noisy statistics); log-normal spread $\tau$ of the channel scales as in \texttt{batchnorm.lognormal\_scales} "
            r"and \texttt{batchnorm.statistics\_noise}, $\gamma$ constant over channels.",
        ),
        expressions=exprs,
        symbols={"eta": eta, "L": L, "k": k, "kappa": kappa, "G": G, "tau": tau, "C": C, "nu": nu},
        lhs={
            "relative_error": r"R(k)",
            "slope": r"\partial R/\partial k",
            "slope_digital": r"\partial R/\partial k\big|_{\mathrm{digital\ BN}}",
            "slope_folded": r"\partial R/\partial k\big|_{\mathrm{folded}}",
            "slope_statistics_l2": r"\partial R/\partial k\big|_{\mathrm{noisy\ stats,\ L2}}",
            "slope_statistics_scale": r"\partial R/\partial k\big|_{\mathrm{noisy\ stats,\ L1/TopK}}",
        },
        descriptions={
            "slope_folded": r"$\nu=0$: $\eta^2(1-1/C)(e^{4\tau^2}-1)$; $\nu=1$ (random downstream weights): $0$. The same for L1, TopK and L2 BatchNorm with Gaussian activations.",
        },
        where={"kappa": r"($\bar\kappa$) is the folding inflation of a BN layer", "G": "is the relative variance added by noisy BN statistics (over $\\eta^2$)"},
        checks=tuple(checks),
        notes=(
            r"The seed result (accuracy under noise falls with the number of BN layers, arXiv 2205.07372) is "
            r"predicted by folding only under equal channel weighting, and by noisy BN statistics in any case; "
            r"measuring the slope for digital, folded and statistics-noise targets separates the mechanisms.",
        ),
        source=r"docs/THEORY.md \S 4; seed results arXiv 2205.07372, 2205.04886",
        implemented_by=("noiseprop.theory.symbolic.batchnorm.batchnorm_layer_count",),
        tested_by=("tests/theory/test_symbolic_batchnorm.py::test_layer_count_folded_random_network",),
    )
