"""Flatness: Hutchinson trace (plain and noise-scaled), Lanczos top eigenvalue, and the
loss increase ½ tr(Σ_ε H) against the exact Hessian and against Monte-Carlo."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from noiseprop.theory import RelativeGaussian, hessian_top_eigenvalue, hessian_trace, predict
from noiseprop.theory.flatness import loss_increase_gauss_newton
from predict_nets import batch_means_se, held_out, mc_logits, trained


def _small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, x, y


def _full_hessian(model, x, y):
    names = ["0.weight", "2.weight"]  # default targets: the Linear weights
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def loss(flat):
        tp, i = {}, 0
        for n, s, k in zip(names, shapes, sizes):
            tp[n] = flat[i:i + k].reshape(s)
            i += k
        return F.cross_entropy(functional_call(model, {**params, **tp}, (x,)), y)

    flat = torch.cat([params[n].reshape(-1) for n in names]).double()
    model.double()
    x64 = x.double()
    params = {k: v.double() for k, v in params.items()}

    def loss64(f):
        tp, i = {}, 0
        for n, s, k in zip(names, shapes, sizes):
            tp[n] = f[i:i + k].reshape(s)
            i += k
        return F.cross_entropy(functional_call(model, {**params, **tp}, (x64,)), y)

    H = torch.autograd.functional.hessian(loss64, flat)
    model.float()
    return H, names


def test_hutchinson_trace_against_exact_hessian():
    model, x, y = _small()
    H, names = _full_hessian(model, x, y)
    tr = float(torch.trace(H))
    r = hessian_trace(model, x, y, probes=200, seed=0)
    assert abs(r.estimate - tr) < 4 * r.se
    # the standard error matches the Rademacher variance 2(‖H‖_F² − Σ H_ii²)
    var1 = 2 * (float((H ** 2).sum()) - float((torch.diagonal(H) ** 2).sum()))
    assert r.se == pytest.approx(math.sqrt(var1 / 200), rel=4 / math.sqrt(2 * 199))
    lo, hi = r.ci()
    assert lo < r.estimate < hi and "Hutchinson" in r.summary() and len(r.to_frame()) == 1


def test_noise_scaled_probes_give_trace_of_sigma_h():
    model, x, y = _small()
    H, names = _full_hessian(model, x, y)
    noise = RelativeGaussian(0.1)
    params = dict(model.named_parameters())
    s2 = torch.cat([noise.variance(params[n].detach()).reshape(-1) for n in names]).double()
    want = float((s2 * torch.diagonal(H)).sum())
    r = hessian_trace(model, x, y, noise=noise, probes=200, seed=1)
    assert abs(r.estimate - want) < 4 * r.se
    assert r.noise == "relative:0.1"


def test_top_eigenvalue_against_exact_hessian():
    model, x, y = _small()
    H, _ = _full_hessian(model, x, y)
    want = float(torch.linalg.eigvalsh(H).max())
    r = hessian_top_eigenvalue(model, x, y, tol=1e-8, maxiter=500, seed=0)
    assert r.converged
    assert r.eigenvalue == pytest.approx(want, rel=1e-5)
    big = trained("cnn")
    xb, yb = held_out(30)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        r2 = hessian_top_eigenvalue(big, xb, yb, tol=1e-12, maxiter=1, ncv=3, seed=0)
    assert not r2.converged and "NOT converged" in r2.summary()


def test_relu_network_hessian_diagonal_equals_gauss_newton():
    """Piecewise-linear in each weight: tr(Σ H) = tr(Σ G) (Hutchinson within 4 s.e. of the
    exact Gauss-Newton form from the Jacobians)."""
    model = trained("cnn")
    x, y = held_out(60)
    noise = RelativeGaussian(0.05)
    r = hessian_trace(model, x, y, noise=noise, probes=60, seed=2)
    p = predict(model, x, y, noise, cov=True, accuracy_draws=0, loss_probes=0)
    gn = loss_increase_gauss_newton(p.clean_logits, p.logit_cov)
    assert abs(0.5 * r.estimate - gn) < 4 * 0.5 * r.se
    assert p.loss_increase_gn == pytest.approx(gn)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_loss_increase_matches_monte_carlo(kind):
    """E[L(θ+ε)] − L(θ) at η = 0.02 against Monte-Carlo with the first-order control
    variate gᵀε (mean 0): within 10% (the target) plus 4 standard errors."""
    from noiseprop.theory.linearize import first_order_loss_change

    model = trained(kind)
    x, y = held_out(150)
    noise = RelativeGaussian(0.02)
    draws = 200
    L, Llin = mc_logits(model, x, noise, draws, seed=4, linearised=True)
    p = predict(model, x, y, noise, accuracy_draws=0, loss_probes=24, seed=3)
    losses = np.array([float(F.cross_entropy(l, y)) for l in L]) - p.clean_loss
    cv = np.array([first_order_loss_change(p.clean_logits, l, y) for l in Llin])  # gᵀδθ: mean exactly 0
    beta = np.cov(losses, cv)[0, 1] / cv.var(ddof=1)
    resid = losses - beta * cv
    est, se = resid.mean(), batch_means_se(resid)
    assert se < 0.5 * batch_means_se(losses)  # the control variate is doing its job
    pred = p.loss_increase
    assert abs(pred - est) < 0.10 * abs(pred) + 4 * math.hypot(se, p.loss_increase_se), (pred, est, se)
    assert p.loss_increase_gn == pytest.approx(est, rel=0.1, abs=4 * se)


def test_validation():
    model, x, y = _small()
    with pytest.raises(ValueError, match="probes"):
        hessian_trace(model, x, y, probes=1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        hessian_trace(model, x, y + 3)
    with pytest.raises(ValueError, match="same length"):
        hessian_top_eigenvalue(model, x, y[:3])


# ----------------------------------------------------------------------------- issue 10
def _relu_small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, x, y


def test_batched_probes_give_the_same_values_as_one_at_a_time():
    model, x, y = _small()
    a = hessian_trace(model, x, y, noise=RelativeGaussian(0.1), probes=20, seed=3, probe_batch=1)
    b = hessian_trace(model, x, y, noise=RelativeGaussian(0.1), probes=20, seed=3, probe_batch=7)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-12)


def test_hutchpp_and_per_layer_shares_against_exact_hessian():
    model, x, y = _small()
    H, names = _full_hessian(model, x, y)
    tr = float(torch.trace(H))
    r = hessian_trace(model, x, y, probes=30, seed=0, method="hutch++")
    assert r.method == "hutch++" and "Hutch++" in r.summary()
    assert abs(r.estimate - tr) < 4 * r.se + 1e-9
    # per-layer shares: each within 4 s.e. of its block's exact trace, and they add up
    p = hessian_trace(model, x, y, probes=200, seed=1, per_layer=True)
    assert sum(p.layer_estimates.values()) == pytest.approx(p.estimate, rel=1e-9)
    n0 = dict(model.named_parameters())["0.weight"].numel()
    d = torch.diagonal(H)
    want = {"0": float(d[:n0].sum()), "2": float(d[n0:].sum())}
    for m, v in p.layer_estimates.items():
        blk = slice(0, n0) if m == "0" else slice(n0, None)
        Hb = H[blk, blk]
        se = math.sqrt(2 * (float((Hb ** 2).sum()) - float((torch.diagonal(Hb) ** 2).sum())) / 200)
        assert abs(v - want[m]) < 4 * se + 1e-9, (m, v, want[m], se)
    assert len(p.to_frame()) == 3
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, x, y, method="exact")
    with pytest.raises(ValueError, match="needs probes >= 6"):
        hessian_trace(model, x, y, probes=4, method="hutch++")


def test_top_k_and_smallest_eigenvalues_against_exact_hessian():
    model, x, y = _relu_small()
    H, _ = _full_hessian(model, x, y)
    w = torch.linalg.eigvalsh(H).numpy()
    assert w[0] < 0 < w[-1]  # indefinite
    r = hessian_top_eigenvalue(model, x, y, tol=1e-10, maxiter=2000, seed=0, k=3, which="both")
    assert r.converged
    np.testing.assert_allclose(r.eigenvalues, w[::-1][:3], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(r.smallest, w[:3], rtol=1e-5, atol=1e-8)
    assert r.eigenvalue == pytest.approx(w[-1], rel=1e-5)
    s = hessian_top_eigenvalue(model, x, y, tol=1e-10, maxiter=2000, seed=0, which="smallest")
    assert s.eigenvalue == pytest.approx(w[0], rel=1e-5) and "smallest" in s.summary()
    assert set(r.to_frame().quantity) == {"lambda_max", "lambda_min"}
    with pytest.raises(ValueError, match="which"):
        hessian_top_eigenvalue(model, x, y, which="middle")
    with pytest.raises(ValueError, match="k must be an integer"):
        hessian_top_eigenvalue(model, x, y, k=0)


def test_auto_probe_batch_groups_by_size_and_keeps_the_values(monkeypatch):
    """probe_batch=None: one vmap group for a small network, smaller groups as the
    parameters (or a chunk's activations) grow; the probe values do not depend on it."""
    import noiseprop.theory.flatness as fl
    from noiseprop.theory.linearize import LinearizedNetwork

    model, x, y = _small()
    a = hessian_trace(model, x, y, noise=RelativeGaussian(0.1), probes=20, seed=3, probe_batch=1)
    b = hessian_trace(model, x, y, noise=RelativeGaussian(0.1), probes=20, seed=3)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-12)
    op = fl.HessianOperator(LinearizedNetwork(model), x, y)
    assert fl.auto_probe_batch(op, 20) == 20
    monkeypatch.setattr(fl, "PROBE_PARAMETER_ELEMENTS", 3 * op.numel)
    assert fl.auto_probe_batch(op, 20) == 3
    acts = fl.activation_elements(op.lin, x)
    monkeypatch.setattr(fl, "PROBE_ACTIVATION_ELEMENTS", 2 * x.shape[0] * acts)
    assert fl.auto_probe_batch(op, 20) == 2
    monkeypatch.setattr(fl, "PROBE_ACTIVATION_ELEMENTS", 1)
    assert fl.auto_probe_batch(op, 20) == 1
