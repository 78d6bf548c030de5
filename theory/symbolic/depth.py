"""Topic ``depth``: how weight-noise errors accumulate with depth (docs/THEORY.md §3).

- :func:`depth_recursion`: the first-order recursion ``e_l = χ_l e_{l−1} + s_l`` for the
  mean squared perturbation per unit, unrolled in closed form (geometric sums), with the
  ordered (χ < 1: bounded by ``s/(1 − χ)``), critical (χ = 1: ``s L``) and chaotic
  (χ > 1: ``∼ s χ^L/(χ − 1)``) regimes.
- :func:`depth_relu_critical`: for ReLU networks (positively homogeneous) the signal and
  the perturbation grow by the same factor per layer, so under layer-relative noise the
  relative error is ``η² L`` for *any* weight scale (He initialisation additionally keeps
  the signal's norm constant, χ = 1): exact in expectation to first order at any width.
- :func:`depth_residual`: residual blocks ``x_l = x_{l−1} + β F(x_{l−1})``:
  ``δ_l = (I + β J_F) δ_{l−1} + ε_l``; relative error ``m η² L β²/(1 + β²)``, which is
  ``m η² c/(1 + c/L) → m η² c`` (independent of depth) for a branch scale ``β² = c/L``.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp
from sympy.stats import P as probability
from sympy.stats import Normal

from .base import Derivation
from .functions import assert_zero

__all__ = ["depth_recursion", "depth_relu_critical", "depth_residual"]

_SOURCE = r"docs/THEORY.md \S 3 (depth); Schoenholz et al. 2017 (perturbation gain $\chi$); Semenova et al. 2022 (arXiv 2103.07413)"


@lru_cache(maxsize=None)
def depth_recursion() -> Derivation:
    """Closed form of ``e_l = χ_l e_{l−1} + s_l``, ``e_0 = 0``:
    ``e_L = Σ_l s_l Π_{k>l} χ_k``; constant χ, s: ``s (1 − χ^L)/(1 − χ)`` (``s L`` at
    χ = 1), limits ``s/(1 − χ)`` (χ < 1) and ``s χ^L/(χ − 1)`` (χ > 1). With the signal at
    a fixed point ``Q*`` and ``s = η² Q*``: relative error ``η² (1 − χ^L)/(1 − χ)``.
    docs/THEORY.md §3.
    """
    # unroll for L = 4 with symbolic gains and injections
    L0 = 4
    ch = sp.symbols(f"chi_1:{L0 + 1}", positive=True)
    ss = sp.symbols(f"s_1:{L0 + 1}", nonnegative=True)
    e = sp.Integer(0)
    for l in range(L0):
        e = ch[l] * e + ss[l]
    closed = sum(ss[l] * sp.Mul(*ch[l + 1:]) for l in range(L0))
    checks = [assert_zero(e - closed, "unrolled recursion (L=4) = sum_l s_l prod_{k>l} chi_k")]

    L = sp.Symbol("L", integer=True, positive=True)
    l, k = sp.symbols("l k", integer=True, positive=True)
    chi_b, s_b = sp.IndexedBase("chi_l"), sp.IndexedBase("s_l")
    general = sp.Sum(s_b[l] * sp.Product(chi_b[k], (k, l + 1, L)), (l, 1, L))
    chi = sp.Symbol("chi", positive=True)
    s = sp.Symbol("s", nonnegative=True)
    eta = sp.Symbol("eta", nonnegative=True)
    summed = sp.piecewise_fold(sp.Sum(s * chi ** (L - l), (l, 1, L)).doit())  # Piecewise: chi = 1 / otherwise
    constant = sp.factor(sp.simplify(summed.args[-1][0] if isinstance(summed, sp.Piecewise) else summed))
    critical = sp.simplify(sp.Sum(s, (l, 1, L)).doit())
    checks.append(assert_zero(sp.limit(constant, chi, 1) - critical, "chi -> 1 limit of the geometric sum = s L"))
    lam = sp.Symbol("lambda", positive=True)
    ordered = sp.simplify(sp.limit(constant.subs(chi, sp.exp(-lam)), L, sp.oo).subs(lam, -sp.log(chi)))
    chaotic = sp.simplify(sp.limit((constant / chi**L).subs(chi, sp.exp(lam)), L, sp.oo).subs(lam, sp.log(chi)) * chi**L)
    checks.append(assert_zero(ordered - s / (1 - chi), "chi < 1: L -> oo limit s/(1 - chi)"))
    ordered = s / (1 - chi)
    checks.append(assert_zero(chaotic - s * chi**L / (chi - 1), "chi > 1: e_L ~ s chi^L/(chi - 1)"))
    exprs = {
        "error_general": general,
        "error_constant": constant,
        "error_critical": critical,
        "error_ordered_limit": ordered,
        "error_chaotic_asymptotic": chaotic,
        "relative_error_fixed_point": sp.simplify(constant.subs(s, eta**2)),
        "relative_error_ordered_bound": eta**2 / (1 - chi),
    }
    return Derivation(
        name="depth.recursion",
        topic="depth",
        title="Accumulation of weight-noise errors with depth",
        statement=(
            r"To first order the mean squared perturbation per unit obeys $e_l=\chi_l e_{l-1}+s_l$: each layer "
            r"multiplies the incoming error by its perturbation gain $\chi_l$ and adds its own noise $s_l$. The "
            r"error saturates at $s/(1-\chi)$ in the ordered phase, grows linearly at criticality and exponentially "
            r"in the chaotic phase."
        ),
        assumptions=(
            r"Per-unit error $e_l=\mathbb{E}\lVert\delta h_l\rVert^2/n_l$; first order in the noise "
            r"($\delta h_l=J_l\delta h_{l-1}+\varepsilon_l$).",
            r"$\mathbb{E}\lVert J_l v\rVert^2/n_l=\chi_l\lVert v\rVert^2/n_{l-1}$ for $v$ independent of $J_l$ "
            r"(mean field: $\chi=\sigma_w^2\mathbb{E}\varphi'(h)^2$), and $\varepsilon_l$ zero mean, independent of the "
            r"past, with $\mathbb{E}\lVert\varepsilon_l\rVert^2/n_l=s_l=\sigma_l^2\lVert x_{l-1}\rVert^2$.",
            r"For the relative form: the signal sits at a fixed point $Q^*$ of its own recursion and "
            r"$s_l=\eta^2Q^*$ (layer-relative noise).",
        ),
        expressions=exprs,
        symbols={"s_l": s_b, "chi_l": chi_b, "L": L, "chi": chi, "s": s, "eta": eta},
        lhs={
            "error_general": r"e_L",
            "error_constant": r"e_L\big|_{\chi_l=\chi,\ s_l=s}",
            "error_critical": r"e_L\big|_{\chi=1}",
            "error_ordered_limit": r"\lim_{L\to\infty}e_L\big|_{\chi<1}",
            "error_chaotic_asymptotic": r"e_L\big|_{\chi>1,\ L\to\infty}",
            "relative_error_fixed_point": r"e_L/Q^*",
            "relative_error_ordered_bound": r"\sup_L e_L/Q^*\big|_{\chi<1}",
        },
        descriptions={
            "error_general": r"indexed symbols take arrays: element $l$ of the formula is entry $l-1$ of the array.",
            "relative_error_ordered_bound": r"the bounded-error regime of Semenova et al. (2022).",
        },
        where={
            "chi_l": r"is the perturbation gain of layer $l$",
            "s_l": r"is the noise injected by layer $l$ (per unit)",
            "L": "is the depth",
        },
        checks=tuple(checks),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.symbolic.depth.depth_recursion",),
        tested_by=("tests/theory/test_symbolic_depth.py::test_recursion_closed_form_in_all_three_regimes", "tests/theory/test_symbolic_depth.py::test_recursion_general_layer_dependent_gains"),
    )


@lru_cache(maxsize=None)
def depth_relu_critical() -> Derivation:
    """Relative error of a ReLU network under layer-relative noise: ``η² L``.

    ``h_l = W_l relu(h_{l−1})``, ``W_ij ~ N(0, σ_w²/n)``: the signal
    ``Q_l = E‖h_l‖²/n`` and the perturbation both get the factor ``χ = σ_w²/2`` per layer
    (``E[1{h > 0}] = ½`` and ``E[1{h > 0} v²] = ½E v²`` for jointly symmetric (h, v)), and
    layer l injects ``s_l = η² Q_l``. So ``e_L = Σ_l η² Q_1 χ^{l−1} χ^{L−l} = η² L Q_L``:
    relative error ``η² L`` (``Σ_l η_l²`` in general) whatever σ_w; absolute noise σ:
    ``L σ² n/σ_w²``. docs/THEORY.md §3.
    """
    sigma_w = sp.Symbol("sigma_w", positive=True)
    Hs = Normal("h", 0, 1)
    p_active = probability(Hs > 0)
    chi = sp.simplify(sigma_w**2 * p_active)  # E[phi'(h)^2] = P(h > 0) for ReLU
    checks = [assert_zero(chi - sigma_w**2 / 2, "ReLU: chi = sigma_w^2 P(h > 0) = sigma_w^2/2 (sympy.stats)")]
    L = sp.Symbol("L", integer=True, positive=True)
    l = sp.Symbol("l", integer=True, positive=True)
    eta, sigma = sp.symbols("eta sigma", nonnegative=True)
    Q1 = sp.Symbol("Q_1", positive=True)
    n = sp.Symbol("n", integer=True, positive=True)
    Ql = Q1 * chi ** (l - 1)
    QL = Q1 * chi ** (L - 1)
    e_L = sp.simplify(sp.Sum(eta**2 * Ql * chi ** (L - l), (l, 1, L)).doit())
    rel = sp.simplify(e_L / QL)
    checks.append(assert_zero(rel - eta**2 * L, "relative error = eta^2 L for any sigma_w"))
    eta_b = sp.IndexedBase("eta_l")
    rel_layers = sp.Sum(eta_b[l] ** 2, (l, 1, L))
    # absolute noise sigma: s_l = sigma^2 ||x_{l-1}||^2 = sigma^2 n q_{l-1} = sigma^2 n Q_l / sigma_w^2
    e_abs = sp.simplify(sp.Sum(sigma**2 * n * Ql / sigma_w**2 * chi ** (L - l), (l, 1, L)).doit())
    rel_abs = sp.simplify(e_abs / QL)
    checks.append(assert_zero(rel_abs - L * sigma**2 * n / sigma_w**2, "absolute noise: relative error = L sigma^2 n / sigma_w^2"))
    exprs = {
        "chi_relu": chi,
        "signal_gain": sp.simplify(QL / Q1),
        "relative_error": rel,
        "relative_error_per_layer": rel_layers,
        "relative_error_absolute": rel_abs,
    }
    return Derivation(
        name="depth.relu_critical",
        topic="depth",
        title="The critical law for ReLU networks",
        statement=(
            r"In a ReLU network with layer-relative weight noise of level $\eta$, the relative mean squared error "
            r"of the pre-activations after $L$ layers is $\eta^2L$: every layer adds $\eta^2$ and the "
            r"perturbation is propagated with the same gain as the signal, so the law holds for any weight scale "
            r"(He initialisation, $\sigma_w^2=2$, also keeps the signal's norm constant)."
        ),
        assumptions=(
            r"$h_l=W_l\operatorname{relu}(h_{l-1})$ ($h_0$ the input), no biases, width $n$, $W_l$ iid "
            r"$\mathcal{N}(0,\sigma_w^2/n)$ independent over layers.",
            r"Noise on layer $l$: iid, zero mean, std $\eta\,\sigma_w/\sqrt{n}$ (layer-relative; the realised "
            r"$\operatorname{std}(W_l)$ differs by a relative $O(1/n^2)$ in expectation).",
            r"First order in the noise (linearised network); relative error "
            r"$=\mathbb{E}\lVert\delta h_L\rVert^2/\mathbb{E}\lVert h_L\rVert^2$ over networks, inputs and noise. Exact "
            r"in expectation at any width: for jointly Gaussian zero-mean $(h,v)$, "
            r"$\mathbb{E}[\mathbb{1}\{h>0\}v^2]=\frac{1}{2}\mathbb{E}v^2$.",
        ),
        expressions=exprs,
        symbols={"sigma_w": sigma_w, "L": L, "eta": eta, "eta_l": eta_b, "sigma": sigma, "n": n},
        lhs={
            "chi_relu": r"\chi",
            "signal_gain": r"Q_L/Q_1",
            "relative_error": r"\frac{\mathbb{E}\lVert\delta h_L\rVert^2}{\mathbb{E}\lVert h_L\rVert^2}",
            "relative_error_per_layer": r"\frac{\mathbb{E}\lVert\delta h_L\rVert^2}{\mathbb{E}\lVert h_L\rVert^2}\Big|_{\eta_l}",
            "relative_error_absolute": r"\frac{\mathbb{E}\lVert\delta h_L\rVert^2}{\mathbb{E}\lVert h_L\rVert^2}\Big|_{\mathrm{abs}}",
        },
        descriptions={
            "relative_error": r"independent of $\sigma_w$: the ordered/chaotic distinction does not arise for ReLU under relative noise.",
            "relative_error_absolute": r"absolute noise $\sigma$: grows with depth and width.",
        },
        where={"sigma_w": r"sets the weight variance $\sigma_w^2/n$", "eta_l": r"is the relative noise level of layer $l$"},
        checks=tuple(checks),
        notes=(
            r"The law is exact for the ratio of expectations. The mean of the per-network ratio "
            r"$\lVert\delta h_L\rVert^2/\lVert h_L\rVert^2$ is larger at finite width, increasingly with $L/n$ "
            r"(Monte-Carlo at width 64: $1.05$, $1.28$, $2.44$ times $\eta^2L$ for $L=2,8,32$), because the norms "
            r"of deep narrow networks fluctuate.",
            r"Beyond first order, activation flips change the exact network's error; that correction is not derived "
            r"here (at $\eta=0.002$ it is below the Monte-Carlo resolution for $L\le32$).",
        ),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.symbolic.depth.depth_relu_critical",),
        tested_by=("tests/theory/test_symbolic_depth.py::test_critical_law_on_he_relu_networks", "tests/theory/test_symbolic_depth.py::test_critical_law_holds_for_any_weight_scale"),
    )


@lru_cache(maxsize=None)
def depth_residual() -> Derivation:
    """Residual networks: ``x_l = x_{l−1} + β F(x_{l−1})``, ``F(x) = W_2 relu(W_1 x)``.

    Linearised: ``δ_l = (I + β J_F) δ_{l−1} + ε_l``. With ``E‖J_F v‖² = ‖v‖²`` and
    ``E⟨v, J_F v⟩ = 0`` (zero-mean branch weights): gain ``1 + β²``; the signal grows by
    the same factor; the branch's m noisy layers inject ``m η² β² E‖x_{l−1}‖²``. Relative
    error ``m η² L β²/(1 + β²)``; for ``β² = c/L``: ``m η² c/(1 + c/L) → m η² c``
    (independent of depth). docs/THEORY.md §3.
    """
    beta2, eta = sp.symbols("beta2 eta", nonnegative=True)
    c = sp.Symbol("c", positive=True)
    m = sp.Symbol("m", integer=True, positive=True)
    L = sp.Symbol("L", integer=True, positive=True)
    l = sp.Symbol("l", integer=True, positive=True)
    Q0 = sp.Symbol("Q_0", positive=True)
    g = 1 + beta2
    # generic one-step check: E||(I + b J) v||^2 = ||v||^2 + 2 b E<v, J v> + b^2 E||J v||^2 with E<v,Jv> = 0
    b = sp.Symbol("b", real=True)
    v2, cross, jv2 = sp.symbols("v2 cross jv2", real=True)
    step = sp.expand((v2 + 2 * b * cross + b**2 * jv2).subs({cross: 0, jv2: v2}))
    checks = [assert_zero(step - (1 + b**2) * v2, "E||(I + beta J_F) v||^2 = (1 + beta^2)||v||^2 when E<v, J_F v> = 0, E||J_F v||^2 = ||v||^2")]
    Ql = Q0 * g ** (l - 1)  # E||x_{l-1}||^2 / n
    e_L = sp.Sum(m * eta**2 * beta2 * Ql * g ** (L - l), (l, 1, L)).doit()
    rel = sp.simplify(e_L / (Q0 * g**L))
    checks.append(assert_zero(rel - m * eta**2 * L * beta2 / (1 + beta2), "relative error = m eta^2 L beta^2/(1 + beta^2)"))
    scaled = sp.simplify(rel.subs(beta2, c / L))
    limit = sp.limit(scaled, L, sp.oo)
    checks.append(assert_zero(limit - m * eta**2 * c, "beta^2 = c/L: limit L -> oo is m eta^2 c"))
    exprs = {
        "perturbation_gain": g,
        "relative_error": rel,
        "relative_error_unscaled": rel.subs(beta2, 1),
        "relative_error_scaled_branch": scaled,
        "relative_error_scaled_limit": limit,
    }
    return Derivation(
        name="depth.residual",
        topic="depth",
        title="Residual networks",
        statement=(
            r"In a residual network the skip connection carries the error forward with gain $1+\beta^2$, exactly as "
            r"it carries the signal, and each block adds $m\eta^2\beta^2$ relative error; with the branch "
            r"down-weighted like $1/\sqrt{L}$ (as BatchNorm does at initialisation, De \& Smith 2020) the relative "
            r"error tends to a depth-independent $m\eta^2c$."
        ),
        assumptions=(
            r"$x_l=x_{l-1}+\beta F(x_{l-1})$, $F(x)=W_2\operatorname{relu}(W_1x)$, width $n$, $W_1$ iid "
            r"$\mathcal{N}(0,2/n)$, $W_2$ iid $\mathcal{N}(0,1/n)$, independent over blocks; so "
            r"$\mathbb{E}\lVert F(x)\rVert^2=\lVert x\rVert^2$, $\mathbb{E}\langle x,F(x)\rangle=0$.",
            r"Layer-relative noise of level $\eta$ on the $m$ weight matrices of each branch ($m=2$ here), std "
            r"$\eta$ times the init std; first order; relative error $=\mathbb{E}\lVert\delta x_L\rVert^2/"
            r"\mathbb{E}\lVert x_L\rVert^2$.",
        ),
        expressions=exprs,
        symbols={"beta2": beta2, "eta": eta, "m": m, "L": L, "c": c},
        lhs={
            "perturbation_gain": r"\chi_{\mathrm{res}}",
            "relative_error": r"R_L",
            "relative_error_unscaled": r"R_L\big|_{\beta=1}",
            "relative_error_scaled_branch": r"R_L\big|_{\beta^2=c/L}",
            "relative_error_scaled_limit": r"\lim_{L\to\infty}R_L\big|_{\beta^2=c/L}",
        },
        descriptions={"relative_error_unscaled": r"an unscaled residual net accumulates $m\eta^2/2$ per block, half the plain-network rate per noisy layer."},
        where={"beta2": r"($\beta^2$) is the squared branch scale", "m": "is the number of noisy layers per branch", "c": r"sets $\beta^2=c/L$"},
        checks=tuple(checks),
        source=r"docs/THEORY.md \S 3 (residual nets); De \& Smith 2020",
        implemented_by=("noiseprop.theory.symbolic.depth.depth_residual",),
        tested_by=("tests/theory/test_symbolic_depth.py::test_residual_variant",),
    )
