"""Topic `depth` (docs/THEORY.md §3): the depth recursion, the critical law on random
He-initialised ReLU networks for L = 2..32, and the residual variant, each against
Monte-Carlo over random networks, inputs and noise draws.

The laws are statements about ratios of expectations, E‖δh_L‖² = R·E‖h_L‖²; each test
checks mean(‖δh_L‖² − R‖h_L‖²) = 0 within 4 s.e. computed from the replicates (one
replicate = one random network with its input and noise draw).

CI size: width 32; NOISEPROP_FULL=1: width 128 and more networks.
"""
import os

import numpy as np
import pytest
import torch

from noiseprop.theory.symbolic import depth_recursion, depth_relu_critical, depth_residual
from noiseprop.theory.symbolic.checking import agreement, mean_se, ratio_se

FULL = os.environ.get("NOISEPROP_FULL") == "1"


def _z(num, den, R, name=None):
    """z-score of the ratio of means mean(num)/mean(den) against R (delta-method s.e.)."""
    r, se = ratio_se(num, den)
    if name:
        return agreement(name, R, r, se)
    return (r - R) / se


def _randn(g, *shape):
    return torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("chi", [0.6, 1.0, 1.4])
def test_recursion_closed_form_in_all_three_regimes(chi):
    """δ_l = J_l δ_{l−1} + ε_l with J_l iid N(0, χ/n), E‖ε_l‖² = s (ordered, critical, chaotic)."""
    n, L, R, s = 24, 10, 800, 0.5
    g = torch.Generator().manual_seed(int(chi * 10))
    d = torch.zeros(R, n, dtype=torch.float64)
    for _ in range(L):
        J = _randn(g, R, n, n) * np.sqrt(chi / n)
        d = (J @ d[:, :, None])[:, :, 0] + _randn(g, R, n) * np.sqrt(s / n)
    e2 = (d**2).sum(1).numpy()
    m, se = mean_se(e2)
    der = depth_recursion()
    pred = der.numeric("error_constant")(s=s, chi=chi, L=L) if chi != 1.0 else der.numeric("error_critical")(s=s, L=L)
    assert agreement(f"depth.recursion:error_constant[chi={chi}, L={L}]", pred, m, se) < 4
    if chi < 1:
        assert pred < der.numeric("error_ordered_limit")(s=s, chi=chi)
    if chi > 1:  # power: the critical answer s L is rejected in the chaotic phase
        assert abs(m - s * L) / se > 10


def test_recursion_general_layer_dependent_gains():
    n, R = 24, 800
    rng = np.random.default_rng(0)
    chis = rng.uniform(0.5, 1.5, size=8)
    ss = rng.uniform(0.1, 1.0, size=8)
    g = torch.Generator().manual_seed(1)
    d = torch.zeros(R, n, dtype=torch.float64)
    for c, s in zip(chis, ss):
        J = _randn(g, R, n, n) * np.sqrt(c / n)
        d = (J @ d[:, :, None])[:, :, 0] + _randn(g, R, n) * np.sqrt(s / n)
    m, se = mean_se((d**2).sum(1).numpy())
    pred = depth_recursion().numeric("error_general")(s_l=ss, chi_l=chis, L=8)
    assert agreement("depth.recursion:error_general[L=8]", pred, m, se) < 4


def _relu_net(n, L, R, eta, sigma_w2, seed, eta_exact=None):
    """Random ReLU nets h_l = W_l relu(h_{l-1}), W ~ N(0, σ_w²/n), relative noise η·std(W_l)
    (realised population std, the project's RelativeGaussian convention). Returns per
    layer (‖h_l‖², ‖δh_l‖² linearised, ‖h̃_l − h_l‖² of the exact noisy network at eta_exact)."""
    g = torch.Generator().manual_seed(seed)
    h = _randn(g, R, n)
    dh = torch.zeros_like(h)
    ht = h.clone()
    out = {}
    for l in range(1, L + 1):
        first = l == 1
        x = h if first else torch.relu(h)
        dx = dh if first else (h > 0) * dh
        xt = ht if first else torch.relu(ht)
        W = _randn(g, R, n, n) * np.sqrt(sigma_w2 / n)
        Z = _randn(g, R, n, n)
        std = W.reshape(R, -1).std(dim=1, unbiased=False)[:, None, None]
        h = (W @ x[:, :, None])[:, :, 0]
        dh = (W @ dx[:, :, None] + (eta * std * Z) @ x[:, :, None])[:, :, 0]
        if eta_exact is not None:
            ht = ((W + eta_exact * std * Z) @ xt[:, :, None])[:, :, 0]
        out[l] = ((h**2).sum(1).numpy(), (dh**2).sum(1).numpy(), ((ht - h) ** 2).sum(1).numpy())
    return out


@pytest.mark.slow
def test_critical_law_on_he_relu_networks():
    """Relative error η² L for L = 2..32 (first order, exact in expectation at any width),
    and the exact noisy network at a small η (flip corrections ~ η L^1.5 are below the s.e.)."""
    n, R = (128, 800) if FULL else (32, 500)
    eta, eta_exact = 0.05, 0.002
    out = _relu_net(n, 32, R, eta, 2.0, seed=3, eta_exact=eta_exact)
    f = depth_relu_critical().numeric("relative_error")
    for L in range(2, 33):
        h2, d2, t2 = out[L]
        show = L in (2, 4, 8, 16, 32)
        assert abs(_z(d2, h2, f(eta=eta, L=L), f"depth.relu_critical:relative_error[L={L}, n={n}]" if show else None)) < 4, L
        assert abs(_z(t2, h2, f(eta=eta_exact, L=L), f"depth.relu_critical:exact_net[L={L}, eta={eta_exact}]" if show else None)) < 4, L
    # power: a depth-independent relative error (eta^2) is rejected at L = 32
    h2, d2, _ = out[32]
    assert abs(_z(d2, h2, eta**2)) > 4  # heavy tails of ‖h_L‖² at width 32 inflate the s.e.


def test_critical_law_holds_for_any_weight_scale():
    """σ_w² = 1.2 (χ = 0.6 < 1: the signal shrinks) and 3 (χ = 1.5): still η² L."""
    n, R, eta = 24, 600, 0.05
    f = depth_relu_critical().numeric("relative_error")
    for sw2, seed in ((1.2, 4), (3.0, 5)):
        out = _relu_net(n, 8, R, eta, sw2, seed=seed)
        for L in (4, 8):
            h2, d2, _ = out[L]
            assert abs(_z(d2, h2, f(eta=eta, L=L), f"depth.relu_critical:relative_error[sigma_w^2={sw2}, L={L}]")) < 4
        # the signal's norm follows (σ_w²/2)^(L−1)
        gain = depth_relu_critical().numeric("signal_gain")(sigma_w=np.sqrt(sw2), L=8)
        m, se = mean_se(out[8][0] / np.mean(out[1][0]))
        assert abs(m - gain) / se < 4


def _residual_net(n, L, R, eta, beta2, seed):
    """x_l = x_{l-1} + β W2 relu(W1 x_{l-1}), W1 ~ N(0, 2/n), W2 ~ N(0, 1/n); noise std
    η × init std on W1 and W2; linearised perturbation."""
    g = torch.Generator().manual_seed(seed)
    beta = np.sqrt(beta2)
    x = _randn(g, R, n)
    dx = torch.zeros_like(x)
    for _ in range(L):
        W1 = _randn(g, R, n, n) * np.sqrt(2.0 / n)
        W2 = _randn(g, R, n, n) * np.sqrt(1.0 / n)
        N1 = _randn(g, R, n, n) * eta * np.sqrt(2.0 / n)
        N2 = _randn(g, R, n, n) * eta * np.sqrt(1.0 / n)
        u = (W1 @ x[:, :, None])[:, :, 0]
        r = torch.relu(u)
        du = (W1 @ dx[:, :, None] + N1 @ x[:, :, None])[:, :, 0]
        dr = (u > 0) * du
        dF = (W2 @ dr[:, :, None] + N2 @ r[:, :, None])[:, :, 0]
        x = x + beta * (W2 @ r[:, :, None])[:, :, 0]
        dx = dx + beta * dF
    return (x**2).sum(1).numpy(), (dx**2).sum(1).numpy()


@pytest.mark.parametrize("L,scaled", [(4, False), (12, True)])
def test_residual_variant(L, scaled):
    n, R, eta, c = 24, 600, 0.05, 1.0
    d = depth_residual()
    beta2 = c / L if scaled else 1.0
    x2, d2 = _residual_net(n, L, R, eta, beta2, seed=10 + L)
    pred = d.numeric("relative_error")(beta2=beta2, eta=eta, m=2, L=L)
    if scaled:
        assert pred == pytest.approx(d.numeric("relative_error_scaled_branch")(L=L, c=c, eta=eta, m=2))
    else:
        assert pred == pytest.approx(d.numeric("relative_error_unscaled")(L=L, eta=eta, m=2))
    assert abs(_z(d2, x2, pred, f"depth.residual:relative_error[L={L}, beta2={beta2:.3g}]")) < 4
    # power: the plain-network law (eta^2 per noisy layer, 2 L layers) is rejected
    assert abs(_z(d2, x2, eta**2 * 2 * L)) > 6
