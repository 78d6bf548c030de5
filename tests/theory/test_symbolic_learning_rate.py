"""Topic `learning_rate` (docs/THEORY.md §6): GD stability (exact iteration), the stationary
loss of SGD with Gaussian gradient noise on a quadratic (Monte-Carlo over chains), and
the sweet-spot model (Monte-Carlo of its stated setting over a learning-rate grid)."""
import numpy as np
import pytest
from scipy.linalg import solve_discrete_lyapunov

from noiseprop.theory.symbolic import lr_sgd_stationary, lr_stability, lr_sweet_spot
from noiseprop.theory.symbolic.checking import agreement, mean_se


def _hessian(eigs, seed):
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
    return Q @ np.diag(eigs) @ Q.T, Q


def test_gd_stability_threshold_and_trajectory():
    eigs = np.array([0.3, 1.0, 2.5, 4.0])
    H, Q = _hessian(eigs, 0)
    theta0 = np.random.default_rng(1).normal(size=4)
    d = lr_stability()
    lr_max = d.numeric("max_stable_lr")(lam=eigs.max())
    assert lr_max == pytest.approx(0.5)
    assert d.numeric("max_stable_sharpness")(lr=0.5) == pytest.approx(eigs.max())
    for factor, stable in ((0.98, True), (1.02, False)):
        lr = factor * lr_max
        th = theta0.copy()
        for t in range(1, 401):
            th = th - lr * H @ th
            if t in (10, 400):
                loss = 0.5 * th @ H @ th
                modes = d.numeric("mode_loss_after_t_steps")(lr=lr, lam=eigs, theta_0=Q.T @ theta0, t=t)
                np.testing.assert_allclose(loss, modes.sum(), rtol=1e-9)
        loss0 = 0.5 * theta0 @ H @ theta0
        assert (loss < 1e-3 * loss0) if stable else (loss > 1e3 * loss0)


def test_heavy_ball_momentum_threshold():
    eigs = np.array([0.5, 2.0])
    H, _ = _hessian(eigs, 7)
    beta = 0.9
    d = lr_stability()
    thr = d.numeric("max_stable_sharpness_momentum")(beta=beta, lr=1.0)  # lr·λ_max threshold = 2(1 + β)
    assert thr == pytest.approx(3.8)
    theta0 = np.array([1.0, -0.5])
    for factor, stable in ((0.97, True), (1.03, False)):
        lr = factor * thr / eigs.max()
        th, prev = theta0.copy(), theta0.copy()
        for _ in range(300):
            th, prev = th - lr * H @ th + beta * (th - prev), th
        ratio = (th @ H @ th) / (theta0 @ H @ theta0)
        assert (ratio < 1e-6) if stable else (ratio > 1e6), factor


def _sgd_chains(H, C, lr, chains, burn, steps, seed):
    """θ ← θ − lr(Hθ + ξ), ξ ~ N(0, C); per-chain time average of L = ½θᵀHθ after burn-in."""
    rng = np.random.default_rng(seed)
    p = H.shape[0]
    Lc = np.linalg.cholesky(C)
    A = np.eye(p) - lr * H
    th = np.zeros((chains, p))
    acc = np.zeros(chains)
    for t in range(burn + steps):
        th = th @ A.T - lr * rng.normal(size=(chains, p)) @ Lc.T
        if t >= burn:
            acc += 0.5 * np.einsum("ri,ij,rj->r", th, H, th)
    return acc / steps


def test_sgd_stationary_loss_with_gradient_noise_h_over_b():
    eigs = np.array([0.2, 0.5, 1.0, 2.0, 4.0])
    H, _ = _hessian(eigs, 2)
    B, lr = 4.0, 0.4  # lr λ_max = 1.6: far from the small-lr regime for the top mode
    per_chain = _sgd_chains(H, H / B, lr, chains=1000, burn=150, steps=300, seed=3)
    m, se = mean_se(per_chain)
    d = lr_sgd_stationary()
    exact = d.numeric("excess_loss_exact")(lr=lr, B=B, lambda_l=eigs, p=len(eigs))
    small = d.numeric("excess_loss_small_lr")(lr=lr, B=B, lambda_l=eigs, p=len(eigs))
    assert agreement(f"learning_rate.sgd_stationary:excess_loss_exact[lr={lr}, B={B}]", exact, m, se) < 4
    assert abs(m - small) / se > 10  # the O(lr) form is detectably wrong at this lr
    np.testing.assert_allclose(small, lr / (4 * B) * eigs.sum())


def test_sgd_stationary_general_noise_covariance_and_small_lr_limit():
    eigs = np.array([0.5, 1.0, 3.0])
    H, _ = _hessian(eigs, 4)
    M = np.random.default_rng(5).normal(size=(3, 3))
    C = M @ M.T + 0.2 * np.eye(3)  # does not commute with H
    lr = 0.3
    A = np.eye(3) - lr * H
    Sigma = solve_discrete_lyapunov(A, lr**2 * C)
    d = lr_sgd_stationary()
    resid = d.numeric("lyapunov_residual")(lr=lr, H=H, Sigma=Sigma, C=C)
    np.testing.assert_allclose(resid, 0.0, atol=1e-12)
    exact = d.numeric("excess_loss_general")(H=H, Sigma=Sigma)
    m, se = mean_se(_sgd_chains(H, C, lr, chains=1000, burn=150, steps=300, seed=6))
    assert agreement("learning_rate.sgd_stationary:excess_loss_general[Lyapunov, C not H/B]", exact, m, se) < 4
    # small-lr limit (lr/4) tr C: relative error O(lr)
    for lr_s in (0.01, 0.001):
        A = np.eye(3) - lr_s * H
        ex = 0.5 * np.trace(H @ solve_discrete_lyapunov(A, lr_s**2 * C))
        approx = d.numeric("excess_loss_small_lr_general")(lr=lr_s, trC=np.trace(C))
        assert abs(approx / ex - 1) < 2 * lr_s * eigs.max()


def _sweet_spot_mc(lrs, a, sigma, rho_shape, L0, R, seed):
    """J(lr) = L0 + a·lr + E[½εᵀH(lr)ε], H(lr) = (2/lr)·U diag(u) Uᵀ (max u = 1), ε ~ N(0, σ²I)."""
    rng = np.random.default_rng(seed)
    u = rho_shape
    out = []
    for lr in lrs:
        eps = sigma * rng.normal(size=(R, len(u)))
        # in the eigenbasis of H (ε is isotropic): ½ Σ_i (2/lr) u_i ε_i²
        noise = 0.5 * (2.0 / lr) * (eps**2 @ u)
        out.append(L0 + a * lr + noise)
    return np.array(out)  # [grid, R]


def test_sweet_spot_model_against_simulation():
    d = lr_sweet_spot()
    u = np.concatenate([[1.0], np.linspace(0.05, 0.9, 19)])
    rho = u.sum()
    lrs = np.geomspace(0.01, 1.0, 13)
    L0, sigma = 0.1, 0.04
    f_J = d.numeric("objective")
    exists = d.numeric("sweet_spot_exists")
    lr_opt = d.numeric("lr_opt_edge_of_stability")
    assert d.numeric("noise_loss_edge_of_stability")(rho=rho, sigma=sigma, lr=0.1) == pytest.approx(sigma**2 * rho / 0.1)
    for a, expect in ((1.0, "interior"), (1e-4, "largest"), (1e4, "smallest")):
        J = _sweet_spot_mc(lrs, a, sigma, u, L0, R=3000, seed=int(np.log10(a)) + 10)
        m, se = mean_se(J.T)
        pred = f_J(lr=lrs, a=a, b=sigma**2 * rho, p=1, q=1, L_0=L0)
        assert agreement(f"learning_rate.sweet_spot:objective[a={a:g}]", pred, m, se) < 4.5
        star = lr_opt(rho=rho, sigma=sigma, a=a, p=1)
        inside = bool(exists(a=a, b=sigma**2 * rho, p=1, q=1, lr_min=lrs[0], lr_max=lrs[-1]))
        i = int(np.argmin(m))
        if expect == "interior":
            assert inside and lrs[0] < star < lrs[-1]
            # the simulated optimum is a grid point next to lr*
            assert lrs[max(i - 1, 0)] <= star <= lrs[min(i + 1, len(lrs) - 1)]
            assert 0 < i < len(lrs) - 1
            J_opt = d.numeric("objective_at_opt")(a=a, b=sigma**2 * rho, p=1, q=1, L_0=L0)
            assert J_opt <= pred.min() + 1e-12
            assert d.numeric("curvature_at_opt")(a=a, b=sigma**2 * rho, p=1, q=1) > 0
        else:
            assert not inside
            assert i == (len(lrs) - 1 if expect == "largest" else 0)
            assert (star > lrs[-1]) if expect == "largest" else (star < lrs[0])


def test_tolerable_noise_grows_like_sqrt_lr():
    d = lr_sweet_spot()
    f = d.numeric("tolerable_sigma")
    s1, s4 = f(Delta=0.01, lr=0.1, rho=5.0), f(Delta=0.01, lr=0.4, rho=5.0)
    assert s4 / s1 == pytest.approx(2.0)
    assert d.numeric("noise_loss_edge_of_stability")(rho=5.0, sigma=s1, lr=0.1) == pytest.approx(0.01)
