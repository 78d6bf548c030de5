"""Topic `flatness` (docs/THEORY.md §5): the expected loss increase against Monte-Carlo
noise draws on quadratic losses (exact) and a smooth non-quadratic loss (second order,
with the fourth-order term measurable), and the Hutchinson variance against probe draws."""
import math

import numpy as np
import pytest
import torch

from noiseprop.theory.noise import Multiplicative, RelativeGaussian
from noiseprop.theory.symbolic import flatness_hutchinson, flatness_quadratic, flatness_second_order
from noiseprop.theory.symbolic.checking import agreement, mean_se, variance_se


def _quadratic(seed, p=8):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(p, p))
    H = A @ A.T / p + 0.1 * np.eye(p)
    g = rng.normal(size=p)
    return H, g


def test_quadratic_mean_and_variance_general_covariance():
    H, g = _quadratic(0)
    p, R = H.shape[0], 40000
    rng = np.random.default_rng(1)
    B = rng.normal(size=(p, p)) * 0.1
    Sigma = B @ B.T
    eps = rng.normal(size=(R, p)) @ np.linalg.cholesky(Sigma).T
    dL = eps @ g + 0.5 * np.einsum("ri,ij,rj->r", eps, H, eps)  # exact for a quadratic loss
    d = flatness_quadratic()
    m, se = mean_se(dL)
    assert agreement("flatness.quadratic:mean_increase", d.numeric("mean_increase")(H=H, Sigma=Sigma), m, se) < 4
    v, vse = variance_se(dL)
    assert agreement("flatness.quadratic:variance_gaussian", d.numeric("variance_gaussian")(g=g, Sigma=Sigma, H=H), v, vse) < 4
    # power: the mean is far from 0 (the gradient term averages out, the curvature term does not)
    assert m / se > 20


def test_quadratic_multiplicative_noise_with_the_project_noise_model():
    H, g = _quadratic(2)
    w = np.random.default_rng(3).normal(size=H.shape[0])
    noise = Multiplicative(0.1)
    wt = torch.as_tensor(w)
    gen = torch.Generator().manual_seed(4)
    R = 40000
    eps = (noise.scale(wt) * torch.randn((R, len(w)), generator=gen, dtype=torch.float64)).numpy()
    # antithetic pairs remove the gradient term exactly: (L(w+e) + L(w-e))/2 - L(w) = ½ eᵀHe
    dL = 0.5 * np.einsum("ri,ij,rj->r", eps, H, eps)
    m, se = mean_se(dL)
    pred = flatness_quadratic().numeric("mean_increase_multiplicative")(eta=0.1, w=w, H=H)
    np.testing.assert_allclose(pred, 0.5 * 0.01 * np.sum(w**2 * np.diag(H)))
    assert agreement("flatness.quadratic:mean_increase_multiplicative", pred, m, se) < 4


def test_per_layer_relative_noise_on_a_two_layer_quadratic():
    """y = A w1 + B w2, L = ½‖y − t‖²/N: exactly quadratic in (w1, w2); RelativeGaussian per layer."""
    rng = np.random.default_rng(5)
    N, p1, p2, eta = 50, 6, 4, 0.2
    A, B, t = rng.normal(size=(N, p1)), rng.normal(size=(N, p2)), rng.normal(size=N)
    w1, w2 = rng.normal(size=p1), 3.0 * rng.normal(size=p2)

    def loss(a, b):
        r = a @ A.T + b @ B.T - t
        return 0.5 * (r**2).sum(-1) / N

    noise = RelativeGaussian(eta)
    gen = torch.Generator().manual_seed(6)
    R = 30000
    e1 = (noise.scale(torch.as_tensor(w1)) * torch.randn((R, p1), generator=gen, dtype=torch.float64)).numpy()
    e2 = (noise.scale(torch.as_tensor(w2)) * torch.randn((R, p2), generator=gen, dtype=torch.float64)).numpy()
    dL = loss(w1 + e1, w2 + e2) - loss(w1, w2)
    m, se = mean_se(dL)
    tr = [np.trace(A.T @ A) / N, np.trace(B.T @ B) / N]  # tr H_ll
    pred = flatness_quadratic().numeric("mean_increase_per_layer")(eta=eta, s_l=np.array([w1.std(), w2.std()]), t_l=np.array(tr), K=2)
    assert agreement("flatness.quadratic:mean_increase_per_layer", pred, m, se) < 4
    # power: a single isotropic sigma = eta·std(all weights) gives a different answer
    wrong = 0.5 * (eta * np.concatenate([w1, w2]).std()) ** 2 * sum(tr)
    assert abs(m - wrong) / se > 6


def _softplus_derivatives(theta, order):
    """f^(k)(theta) of f = log(1 + e^x), k = 0..order (symbolic differentiation, exact)."""
    import sympy as sp

    x = sp.Symbol("x")
    f = sp.log(1 + sp.exp(x))
    return [float(sp.diff(f, x, k).subs(x, theta)) for k in range(order + 1)]


def test_second_order_for_a_smooth_loss_and_the_fourth_order_term():
    """1-d softplus loss, Gaussian noise σ = 0.6, 2·10⁶ antithetic draws: the series
    through σ⁶ agrees; second order alone is rejected (the σ⁴/8·f'''' term is resolved)."""
    theta, sigma, R = 0.3, 0.6, 2_000_000
    rng = np.random.default_rng(7)
    z = rng.normal(size=R)
    f = lambda x: np.logaddexp(0.0, x)  # noqa: E731
    dL = 0.5 * (f(theta + sigma * z) + f(theta - sigma * z)) - f(theta)
    m, se = mean_se(dL)
    d = flatness_second_order()
    fk = _softplus_derivatives(theta, 8)
    coef = d.numeric("series_coefficient")
    series = sum(coef(sigma=sigma, k=k) * fk[2 * k] for k in range(1, 5))
    assert agreement("flatness.second_order:series through sigma^8 (softplus)", series, m, se) < 4
    second = d.numeric("second_order_1d")(sigma=sigma, f_2=fk[2])
    fourth = d.numeric("fourth_order_1d")(sigma=sigma, f_4=fk[4])
    assert abs(m - second) / se > 6  # second order alone is detectably off ...
    assert abs(m - second - fourth) < abs(m - second) / 5  # ... and the fourth-order term explains it


def test_second_order_coefficients():
    d = flatness_second_order()
    c = d.numeric("series_coefficient")
    assert [c(sigma=1.0, k=k) for k in range(4)] == pytest.approx([1.0, 0.5, 0.125, 1 / 48])
    assert d.numeric("fourth_order")(sigma=2.0, bilap=3.0) == pytest.approx(6.0)


def test_hutchinson_variance_rademacher_gaussian_and_noise_scaled():
    rng = np.random.default_rng(8)
    p, R = 6, 100000
    M = rng.normal(size=(p, p))
    A = (M + M.T) / 2 + np.diag(rng.uniform(2, 4, size=p))  # large diagonal: probes differ
    d = flatness_hutchinson()
    V = rng.choice([-1.0, 1.0], size=(R, p))
    q = np.einsum("ri,ij,rj->r", V, A, V)
    m, se = mean_se(q)
    assert agreement("flatness.hutchinson:mean", d.numeric("mean")(A=A), m, se) < 4
    v, vse = variance_se(q)
    assert agreement("flatness.hutchinson:var_rademacher", d.numeric("var_rademacher")(A=A), v, vse) < 4
    assert abs(v - d.numeric("var_gaussian")(A=A)) / vse > 10  # power: the Gaussian-probe formula is wrong here
    G = rng.normal(size=(R, p))
    v, vse = variance_se(np.einsum("ri,ij,rj->r", G, A, G))
    assert agreement("flatness.hutchinson:var_gaussian", d.numeric("var_gaussian")(A=A), v, vse) < 4
    # noise-scaled probes: u = s ⊙ v estimates tr(diag(s²) H)
    H = A
    s = rng.uniform(0.01, 0.1, size=p)
    U = V * s
    qs = np.einsum("ri,ij,rj->r", U, H, U)
    m, se = mean_se(qs)
    assert abs(m - d.numeric("mean_noise_scaled")(s=s, H=H)) / se < 4
    np.testing.assert_allclose(d.numeric("mean_noise_scaled")(s=s, H=H), np.sum(s**2 * np.diag(H)))
    v, vse = variance_se(qs)
    assert agreement("flatness.hutchinson:var_noise_scaled", d.numeric("var_noise_scaled")(s=s, H=H), v, vse) < 4
    n = d.numeric("probes_for_relative_se")(A=A, r=0.01)
    assert n == pytest.approx(d.numeric("var_rademacher")(A=A) / (1e-4 * np.trace(A) ** 2))
    assert math.isfinite(n)
