"""Topic ``learning_rate``: learning rate, flatness and robustness (docs/THEORY.md §6).

- :func:`lr_stability`: gradient descent on a quadratic is stable iff every mode has
  ``|1 − lr λ_i| < 1``, i.e. sharpness ``λ_max < 2/lr``.
- :func:`lr_sgd_stationary`: SGD with Gaussian gradient noise of covariance C on a
  quadratic: the stationary covariance solves the discrete Lyapunov equation
  ``Σ = (I − lr H) Σ (I − lr H) + lr² C``; for ``C = H/B`` per mode ``s_i = lr/(B(2 − lr λ_i))``
  and ``E[L − L*] = Σ_i lr λ_i/(2B(2 − lr λ_i))``, which is ``(lr/4B) tr H`` to first order in
  lr (in general ``(lr/4) tr C``, the Ornstein–Uhlenbeck limit).
- :func:`lr_sweet_spot`: a model of the learning-rate sweet spot: the clean loss rises
  like ``a lr^p`` while the noise-induced loss ``½σ² tr H`` falls like ``b lr^{−q}`` (q = 1 at
  the edge of stability, ``tr H = ρ λ_max = 2ρ/lr``); optimum ``lr* = (q b/(p a))^{1/(p+q)}``,
  and the conditions under which no sweet spot exists in ``(lr_min, lr_max)``.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from .base import Derivation
from .functions import assert_zero

__all__ = ["lr_stability", "lr_sgd_stationary", "lr_sweet_spot"]

_SOURCE = r"docs/THEORY.md \S 6; Cohen et al. 2021 (edge of stability); Smith \& Le 2018; Jastrzebski et al. 2017"


@lru_cache(maxsize=None)
def lr_stability() -> Derivation:
    """GD on ``L = ½(θ − θ*)ᵀH(θ − θ*)``: each eigen-mode is multiplied by ``1 − lr λ_i`` per
    step, so GD converges iff ``0 < lr λ_i < 2`` for all i, i.e. ``λ_max < 2/lr``. With
    heavy-ball momentum β ∈ [0, 1) (Jury criterion on ``z² − (1 + β − lr λ)z + β``):
    ``λ_max < 2(1 + β)/lr``. docs/THEORY.md §6.
    """
    lr, lam = sp.symbols("lr lam", positive=True)
    theta0 = sp.Symbol("theta_0", real=True)
    t = sp.Symbol("t", integer=True, nonnegative=True)
    factor = 1 - lr * lam
    stable = sp.solve_univariate_inequality(sp.Abs(factor) < 1, lr, relational=True)
    # the solution set of |1 - lr lambda| < 1 over lr > 0 is lr < 2/lambda
    bound = stable.args[1] if isinstance(stable, sp.StrictLessThan) and stable.args[0] == lr else None
    if bound is None:  # pragma: no cover - sympy output form changed
        raise AssertionError(f"unexpected stability region {stable}")
    checks = [assert_zero(bound - 2 / lam, "|1 - lr lambda| < 1 with lr, lambda > 0  <=>  lr < 2/lambda (solve_univariate_inequality)")]
    loss_t = sp.Rational(1, 2) * lam * (factor**t * theta0) ** 2
    # heavy-ball momentum: d_{t+1} = (1 + beta - lr lam) d_t - beta d_{t-1}; characteristic polynomial
    # z^2 + a1 z + a0 with a1 = -(1 + beta - lr lam), a0 = beta. Jury: |a0| < 1 and |a1| < 1 + a0.
    beta = sp.Symbol("beta", nonnegative=True)
    u, cc = sp.symbols("u c", positive=True)  # u = lr lam, c = 1 + beta
    jury = sp.solve_univariate_inequality(sp.Abs(cc - u) < cc, u, relational=True)
    if not (isinstance(jury, sp.StrictLessThan) and jury.args[0] == u):  # pragma: no cover
        raise AssertionError(f"unexpected Jury region {jury}")
    checks.append(assert_zero(jury.args[1].subs(cc, 1 + beta) - 2 * (1 + beta), "heavy ball (0 <= beta < 1): |1 + beta - lr lambda| < 1 + beta  <=>  lr lambda < 2(1 + beta) (Jury criterion)"))
    zz = sp.Symbol("z")
    charpoly = zz**2 - (1 + beta - lr * lam) * zz + beta
    checks.append(assert_zero(charpoly.subs({zz: -1, lr: 2 * (1 + beta) / lam}), "at lr lambda = 2(1 + beta) the mode has the root z = -1 (period-2 oscillation)"))
    exprs = {
        "mode_factor": factor,
        "max_stable_lr": 2 / lam,
        "max_stable_sharpness": 2 / lr,
        "mode_loss_after_t_steps": loss_t,
        "max_stable_sharpness_momentum": 2 * (1 + beta) / lr,
    }
    return Derivation(
        name="learning_rate.stability",
        topic="learning_rate",
        title="Linear stability of gradient descent",
        statement=(
            r"Gradient descent with learning rate $\mathrm{lr}$ is stable on a quadratic iff its sharpness "
            r"$\lambda_{\max}<2/\mathrm{lr}$; a network trained at learning rate $\mathrm{lr}$ can only settle where "
            r"the curvature is below $2/\mathrm{lr}$ (full-batch training hovers at it: edge of stability)."
        ),
        assumptions=(
            r"$L(\theta)=\frac{1}{2}(\theta-\theta^*)^\top H(\theta-\theta^*)$, $H$ symmetric with eigenvalues "
            r"$\lambda_i>0$; full-batch gradient descent $\theta_{t+1}=\theta_t-\mathrm{lr}\,\nabla L(\theta_t)$, or with "
            r"heavy-ball momentum $\theta_{t+1}=\theta_t-\mathrm{lr}\,\nabla L(\theta_t)+\beta(\theta_t-\theta_{t-1})$.",
        ),
        expressions=exprs,
        symbols={"lr": lr, "lam": lam, "theta_0": theta0, "t": t, "beta": beta},
        latex_names={"lr": r"\mathrm{lr}", "lam": r"\lambda"},
        lhs={
            "mode_factor": r"\frac{\theta_{t+1,i}-\theta^*_i}{\theta_{t,i}-\theta^*_i}",
            "max_stable_lr": r"\mathrm{lr}_{\max}",
            "max_stable_sharpness": r"\lambda_{\max}^{\mathrm{stable}}",
            "mode_loss_after_t_steps": r"L_i(t)",
            "max_stable_sharpness_momentum": r"\lambda_{\max}^{\mathrm{stable}}\big|_{\beta}",
        },
        descriptions={
            "mode_loss_after_t_steps": r"loss carried by one eigen-mode after $t$ steps from deviation $\theta_0$.",
            "max_stable_sharpness_momentum": r"heavy-ball momentum $\beta\in[0,1)$ (PyTorch SGD with \texttt{momentum}$=\beta$, no dampening).",
        },
        where={"lr": "is the learning rate", "lam": "is a Hessian eigenvalue"},
        checks=tuple(checks),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.symbolic.learning_rate.lr_stability", "noiseprop.empirical.studies.learning_rate"),
        tested_by=("tests/theory/test_symbolic_learning_rate.py::test_gd_stability_threshold_and_trajectory", "tests/theory/test_symbolic_learning_rate.py::test_heavy_ball_momentum_threshold"),
    )


@lru_cache(maxsize=None)
def lr_sgd_stationary() -> Derivation:
    """Stationary loss of SGD on a quadratic.

    ``θ_{t+1} − θ* = (I − lr H)(θ_t − θ*) − lr ξ_t``, ``ξ_t ~ (0, C)`` iid: the stationary
    covariance solves ``Σ = (I − lr H)Σ(I − lr H) + lr² C``. Small lr:
    ``HΣ + ΣH = lr C + O(lr²)``, so ``E[L − L*] = ½ tr(HΣ) = (lr/4) tr C + O(lr²)``. With
    ``C = H/B`` (commuting): ``s_i = lr/(B(2 − lr λ_i))`` exactly and
    ``E[L − L*] = Σ_i lr λ_i/(2B(2 − lr λ_i)) ≈ (lr/4B) tr H``. docs/THEORY.md §6.
    """
    lr, lam, B = sp.symbols("lr lam B", positive=True)
    c = sp.Symbol("c", positive=True)
    s = sp.Symbol("s", positive=True)
    sol = sp.solve(sp.Eq(s, (1 - lr * lam) ** 2 * s + lr**2 * c), s)[0]
    mode = sp.simplify(sol.subs(c, lam / B))
    checks = [assert_zero(mode - lr / (B * (2 - lr * lam)), "one mode: s = lr/(B(2 - lr lambda)) solves the scalar Lyapunov equation with c = lambda/B")]
    loss_mode = sp.simplify(lam * mode / 2)
    small = sp.series(loss_mode, lr, 0, 2).removeO()
    checks.append(assert_zero(small - lr * lam / (4 * B), "small lr: lambda s/2 = lr lambda/(4B) + O(lr^2)"))
    # general (non-commuting) C, 2x2: solve the discrete Lyapunov equation, expand in lr
    h11, h12, h22, c11, c12, c22 = sp.symbols("h11 h12 h22 c11 c12 c22", real=True)
    S11, S12, S22 = sp.symbols("S11 S12 S22", real=True)
    H2 = sp.Matrix([[h11, h12], [h12, h22]])
    C2 = sp.Matrix([[c11, c12], [c12, c22]])
    S2 = sp.Matrix([[S11, S12], [S12, S22]])
    A2 = sp.eye(2) - lr * H2
    eqs = A2 * S2 * A2.T + lr**2 * C2 - S2
    solS = sp.solve([eqs[0, 0], eqs[0, 1], eqs[1, 1]], [S11, S12, S22], dict=True)[0]
    excess = (H2 * S2).trace().subs(solS) / 2
    lead = sp.cancel(sp.together(excess / lr)).subs(lr, 0)
    checks.append(assert_zero(lead - C2.trace() / 4, "general C (2x2 Lyapunov solved exactly): E[L - L*] = (lr/4) tr C + O(lr^2)"))

    i = sp.Symbol("i", integer=True, positive=True)
    p = sp.Symbol("p", integer=True, positive=True)
    lam_b = sp.IndexedBase("lambda_l")
    trC = sp.Symbol("trC", nonnegative=True)
    pm = sp.Symbol("p", integer=True, positive=True)
    Hm, Sm, Cm = (sp.MatrixSymbol(nm, pm, pm) for nm in ("H", "Sigma", "C"))
    Am = sp.Identity(pm) - lr * Hm
    exprs = {
        "lyapunov_residual": Am * Sm * Am.T + lr**2 * Cm - Sm,
        "excess_loss_general": sp.Trace(Hm * Sm) / 2,
        "stationary_variance_mode": mode,
        "excess_loss_mode": loss_mode,
        "excess_loss_exact": sp.Sum(lr * lam_b[i] / (2 * B * (2 - lr * lam_b[i])), (i, 1, p)),
        "excess_loss_small_lr": lr / (4 * B) * sp.Sum(lam_b[i], (i, 1, p)),
        "excess_loss_small_lr_general": lr * trC / 4,
    }
    return Derivation(
        name="learning_rate.sgd_stationary",
        topic="learning_rate",
        title="Stationary loss of SGD on a quadratic",
        statement=(
            r"SGD with gradient noise of covariance $C\approx H/B$ does not converge but fluctuates around the "
            r"minimum with excess loss $\frac{\mathrm{lr}}{4B}\operatorname{tr}H$ to first order in the learning "
            r"rate (exactly $\sum_i\frac{\mathrm{lr}\lambda_i}{2B(2-\mathrm{lr}\lambda_i)}$), the discrete form of "
            r"the Ornstein--Uhlenbeck stationary state."
        ),
        assumptions=(
            r"Quadratic loss with Hessian $H$ (eigenvalues $\lambda_i$), stable learning rate "
            r"($\mathrm{lr}\lambda_{\max}<2$).",
            r"Stochastic gradient $H(\theta-\theta^*)+\xi_t$ with $\xi_t$ iid, zero mean, covariance $C$, "
            r"independent of $\theta_t$; $C=H/B$ for the closed forms in $\lambda_i$ (mini-batch of size $B$ near a "
            r"minimum where the per-example gradient covariance is close to $H$).",
            r"$E[L-L^*]$ in the stationary state ($t\to\infty$).",
        ),
        expressions=exprs,
        symbols={"lr": lr, "lam": lam, "B": B, "lambda_l": lam_b, "p": p, "trC": trC, "H": Hm, "Sigma": Sm, "C": Cm},
        latex_names={"lr": r"\mathrm{lr}", "trC": r"\operatorname{tr}C", "lam": r"\lambda"},
        lhs={
            "lyapunov_residual": r"0",
            "excess_loss_general": r"\mathbb{E}[L-L^*]",
            "stationary_variance_mode": r"s_i",
            "excess_loss_mode": r"\frac{1}{2}\lambda_is_i",
            "excess_loss_exact": r"\mathbb{E}[L-L^*]",
            "excess_loss_small_lr": r"\mathbb{E}[L-L^*]\big|_{\mathrm{lr}\to0}",
            "excess_loss_small_lr_general": r"\mathbb{E}[L-L^*]\big|_{\mathrm{lr}\to0,\ C}",
        },
        descriptions={
            "lyapunov_residual": r"the discrete Lyapunov equation for the stationary covariance $\Sigma$ (exact, any $C$).",
            "excess_loss_general": r"with $\Sigma$ the solution of the Lyapunov equation.",
            "excess_loss_exact": r"$C=H/B$; $\lambda_l$: the Hessian eigenvalues ($p$ of them), passed as an array.",
            "excess_loss_small_lr_general": r"any gradient-noise covariance $C$ ($\mathrm{trC}=\operatorname{tr}C$).",
        },
        where={"B": "is the batch size", "lambda_l": "are the Hessian eigenvalues", "C": "is the gradient-noise covariance", "Sigma": "is the stationary covariance of the weights"},
        checks=tuple(checks),
        notes=(
            r"At the edge of stability ($\operatorname{tr}H=\rho\,\lambda_{\max}=2\rho/\mathrm{lr}$) the first-order "
            r"excess loss is $\rho/(2B)$, independent of the learning rate: the clean-loss cost of a large learning "
            r"rate in the sweet-spot model has to come from elsewhere (catapult dynamics, underfitting).",
        ),
        source=_SOURCE,
        implemented_by=("noiseprop.theory.symbolic.learning_rate.lr_sgd_stationary",),
        tested_by=("tests/theory/test_symbolic_learning_rate.py::test_sgd_stationary_loss_with_gradient_noise_h_over_b", "tests/theory/test_symbolic_learning_rate.py::test_sgd_stationary_general_noise_covariance_and_small_lr_limit"),
    )


@lru_cache(maxsize=None)
def lr_sweet_spot() -> Derivation:
    """Sweet spot of the learning rate for accuracy × robustness (a model).

    Total expected loss under weight noise ``J(lr) = L_0 + a lr^p + b lr^{−q}``: clean loss
    rising with lr (a, p > 0), noise-induced loss ``½σ² tr H`` falling with lr. At the edge
    of stability with a fixed spectral shape (``tr H = ρ λ_max = 2ρ/lr``) and isotropic
    noise: ``b = σ² ρ``, q = 1. ``J' = 0`` at ``lr* = (q b/(p a))^{1/(p+q)}``, a minimum;
    ``J(lr*) = L_0 + a lr*^p (1 + p/q)``. A sweet spot inside ``(lr_min, lr_max)`` exists iff
    a, b, p, q > 0 and ``p a lr_min^{p+q} < q b < p a lr_max^{p+q}``. Tolerable noise for a
    loss budget Δ: ``σ = √(Δ lr/ρ)``. docs/THEORY.md §6.
    """
    lr, a, b, p, q = sp.symbols("lr a b p q", positive=True)
    L0 = sp.Symbol("L_0", real=True)
    sigma, rho, Delta = sp.symbols("sigma rho Delta", positive=True)
    lr_min, lr_max = sp.symbols("lr_min lr_max", positive=True)
    lam_max = 2 / lr  # edge of stability
    trH = rho * lam_max
    noise_loss = sigma**2 * trH / 2
    checks = [assert_zero(noise_loss - sigma**2 * rho / lr, "noise loss at the edge of stability: sigma^2 tr H / 2 = sigma^2 rho / lr (b = sigma^2 rho, q = 1)")]
    J = L0 + a * lr**p + b * lr ** (-q)
    crit = sp.solve(sp.diff(J, lr), lr)
    if len(crit) != 1:  # pragma: no cover
        raise AssertionError(f"expected one stationary point, got {crit}")
    lr_opt = crit[0]
    # parametrise by the optimum X: b = p a X^(p+q)/q (b > 0 <=> X > 0) to keep the checks polynomial
    X = sp.Symbol("X", positive=True)
    at_X = {b: p * a * X ** (p + q) / q}
    checks.append(assert_zero(sp.powdenest(lr_opt.subs(at_X), force=True) - X, "sympy solve of dJ/dlr = 0: unique root lr* = (q b/(p a))^(1/(p+q))"))
    dJ_X = sp.diff(J, lr).subs(at_X).subs(lr, X)
    checks.append(assert_zero(sp.powsimp(sp.expand(dJ_X), force=True), "dJ/dlr(lr*) = 0"))
    curv_X = sp.diff(J, lr, 2).subs(at_X).subs(lr, X)
    checks.append(assert_zero(sp.powsimp(sp.expand(curv_X - a * p * (p + q) * X ** (p - 2)), force=True), "J''(lr*) = a p (p + q) lr*^(p-2) > 0: a minimum"))
    J_X = J.subs(at_X).subs(lr, X)
    checks.append(assert_zero(sp.powsimp(sp.expand(J_X - (L0 + a * X**p * (1 + p / q))), force=True), "J(lr*) = L_0 + a lr*^p (1 + p/q)"))
    exists = sp.And(p * a * lr_min ** (p + q) < q * b, q * b < p * a * lr_max ** (p + q))
    # lr_min < lr* < lr_max  <=>  the condition above (x -> x^(p+q) is increasing)
    checks.append(
        assert_zero(sp.powdenest(lr_opt.subs(b, p * a * lr_min ** (p + q) / q), force=True) - lr_min, "at q b = p a lr_min^(p+q), lr* = lr_min (boundary of the existence condition; lr* increases with b)")
    )
    sigma_tol = sp.solve(sp.Eq(noise_loss, Delta), sigma)[0]
    exprs = {
        "objective": J,
        "noise_loss_edge_of_stability": noise_loss,
        "lr_opt": lr_opt,
        "lr_opt_edge_of_stability": lr_opt.subs({q: 1, b: sigma**2 * rho}),
        "objective_at_opt": a * lr_opt**p * (1 + p / q) + L0,
        "curvature_at_opt": a * p * (p + q) * lr_opt ** (p - 2),
        "sweet_spot_exists": exists,
        "tolerable_sigma": sigma_tol,
    }
    return Derivation(
        name="learning_rate.sweet_spot",
        topic="learning_rate",
        title="A model of the learning-rate sweet spot",
        statement=(
            r"If the clean loss rises with the learning rate while the curvature, and with it the noise-induced loss "
            r"$\frac{1}{2}\sigma^2\operatorname{tr}H$, falls like $1/\mathrm{lr}$ (edge of stability), the total "
            r"loss under noise has a unique minimum at $\mathrm{lr}^*=(qb/(pa))^{1/(p+q)}$; there is no interior sweet "
            r"spot when the noise term is too small (the smallest learning rate wins), when the clean loss rises too "
            r"slowly over the trainable range (the largest wins), or when either term does not depend on the learning "
            r"rate."
        ),
        assumptions=(
            r"Edge of stability: the trained network's sharpness is $\lambda_{\max}=2/\mathrm{lr}$ over the range "
            r"$(\mathrm{lr}_{\min},\mathrm{lr}_{\max})$ (full-batch; for SGD approximately).",
            r"Fixed spectral shape: $\operatorname{tr}H=\rho\lambda_{\max}$ with the effective rank $\rho$ "
            r"independent of the learning rate.",
            r"Isotropic weight noise of variance $\sigma^2$, independent of the learning rate (for relative noise: "
            r"weight scales independent of the learning rate); second order: noise loss "
            r"$\frac{1}{2}\sigma^2\operatorname{tr}H$ (\texttt{flatness.quadratic}).",
            r"Clean loss $L_0+a\,\mathrm{lr}^p$ with $a,p>0$ (phenomenological: rising towards the catapult / "
            r"divergence regime). General form: noise loss $b\,\mathrm{lr}^{-q}$, $q=1$ and $b=\sigma^2\rho$ under "
            r"the assumptions above.",
        ),
        expressions=exprs,
        symbols={
            "lr": lr, "a": a, "b": b, "p": p, "q": q, "L_0": L0, "sigma": sigma, "rho": rho, "Delta": Delta,
            "lr_min": lr_min, "lr_max": lr_max,
        },
        latex_names={"lr": r"\mathrm{lr}", "lr_min": r"\mathrm{lr}_{\min}", "lr_max": r"\mathrm{lr}_{\max}"},
        lhs={
            "objective": r"J(\mathrm{lr})",
            "noise_loss_edge_of_stability": r"\mathbb{E}[\Delta L]_{\mathrm{noise}}",
            "lr_opt": r"\mathrm{lr}^*",
            "lr_opt_edge_of_stability": r"\mathrm{lr}^*\big|_{q=1,\ b=\sigma^2\rho}",
            "objective_at_opt": r"J(\mathrm{lr}^*)",
            "curvature_at_opt": r"J''(\mathrm{lr}^*)",
            "sweet_spot_exists": r"\mathbb{1}\{\mathrm{lr}_{\min}<\mathrm{lr}^*<\mathrm{lr}_{\max}\}",
            "tolerable_sigma": r"\sigma_{\mathrm{tol}}(\Delta)",
        },
        descriptions={
            "sweet_spot_exists": r"otherwise $J$ is monotone on the range: below it the smallest, above it the largest learning rate is best.",
            "tolerable_sigma": r"the noise level that costs a loss budget $\Delta$: grows like $\sqrt{\mathrm{lr}}$.",
        },
        where={
            "a": r"and $p$ set the rise of the clean loss",
            "b": r"and $q$ set the fall of the noise-induced loss",
            "rho": r"is the effective rank $\operatorname{tr}H/\lambda_{\max}$",
        },
        checks=tuple(checks),
        notes=(
            r"The seed result (arXiv 2205.07856) reports a sweet spot empirically; the model makes it testable: "
            r"measure $\lambda_{\max}\cdot\mathrm{lr}$, $\rho$ and the clean loss over the learning-rate sweep.",
        ),
        source=_SOURCE + r"; seed result arXiv 2205.07856",
        implemented_by=("noiseprop.theory.symbolic.learning_rate.lr_sweet_spot", "noiseprop.empirical.studies.learning_rate"),
        tested_by=("tests/theory/test_symbolic_learning_rate.py::test_sweet_spot_model_against_simulation", "tests/theory/test_symbolic_learning_rate.py::test_tolerable_noise_grows_like_sqrt_lr"),
    )
