"""Topic `batchnorm` (docs/THEORY.md §4): folding against torch's BatchNorm in eval mode
(exact), and every noise result against Monte-Carlo of its stated setting with
tolerances from the simulation's standard error."""
import numpy as np
import pytest
import torch
from torch import nn

from noiseprop.theory.noise import RelativeGaussian
from noiseprop.theory.symbolic import (
    batchnorm_folded_noise,
    batchnorm_folding,
    batchnorm_layer_count,
    batchnorm_lognormal_scales,
    batchnorm_scale_estimators,
    batchnorm_statistics_noise,
)
from noiseprop.theory.symbolic.checking import agreement, mean_se, ratio_se, variance_se
from noiseprop.theory.targets import fold_bn


def _call(f, **pool):
    return f(**{a: pool[a] for a in f.args})


def _random_bn(bn, g, spread=0.5):
    with torch.no_grad():
        C = bn.num_features
        bn.weight.copy_(torch.exp(spread * torch.randn(C, generator=g, dtype=torch.float64)))
        bn.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.exp(torch.randn(C, generator=g, dtype=torch.float64)))
    return bn.eval()


def _folded_params(d, W, b, bn, scale=None):
    """W', b' from the closed forms (broadcast over channels)."""
    shape = (-1,) + (1,) * (W.ndim - 1)
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    m, eps = bn.running_mean.numpy(), bn.eps
    if scale is None:
        v = bn.running_var.numpy()
        Wf = d.numeric("w_folded")(gamma=gamma.reshape(shape), v=v.reshape(shape), epsilon=eps, w=W)
        bf = d.numeric("b_folded")(gamma=gamma, beta=beta, m=m, v=v, epsilon=eps, b=b)
    else:
        a = d.numeric("a_scale")(gamma=gamma, epsilon=eps, s=scale)
        Wf = a.reshape(shape) * W
        bf = d.numeric("b_folded_scale")(gamma=gamma, beta=beta, m=m, epsilon=eps, s=scale, b=b)
    return Wf, bf


def test_folding_is_exact_against_torch_eval():
    g = torch.Generator().manual_seed(0)
    d = batchnorm_folding()
    lin = nn.Linear(5, 4).double()
    bn = _random_bn(nn.BatchNorm1d(4).double(), g)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    Wf, bf = _folded_params(d, W, b, bn)
    with torch.no_grad():
        ref = bn(lin(x)).numpy()
    np.testing.assert_allclose(x.numpy() @ Wf.T + bf, ref, rtol=1e-12, atol=1e-12)
    # the lead's fold_bn stores the same weights
    folded = fold_bn(nn.Sequential(lin, bn))
    np.testing.assert_allclose(folded[0].weight.detach().numpy(), Wf, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(folded[0].bias.detach().numpy(), bf, rtol=1e-12, atol=1e-12)
    # convolution + BatchNorm2d
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    bn2 = _random_bn(nn.BatchNorm2d(4).double(), g)
    xc = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    Wc, bc = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    Wcf, bcf = _folded_params(d, Wc, bc, bn2)
    with torch.no_grad():
        ref = bn2(conv(xc))
        out = nn.functional.conv2d(xc, torch.as_tensor(Wcf), torch.as_tensor(bcf), padding=1)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-11, atol=1e-11)
    # scale (L1/TopK) BatchNorm: eval y = gamma (z - m)/(s + eps) + beta
    s = np.exp(torch.randn(4, generator=g, dtype=torch.float64).numpy())
    Wf, bf = _folded_params(d, W, b, bn, scale=s)
    gamma, beta, m = bn.weight.detach().numpy(), bn.bias.detach().numpy(), bn.running_mean.numpy()
    z = x.numpy() @ W.T + b
    np.testing.assert_allclose(x.numpy() @ Wf.T + bf, gamma * (z - m) / (s + bn.eps) + beta, rtol=1e-12, atol=1e-12)


def test_folded_versus_unfolded_noise_per_channel():
    rng = np.random.default_rng(1)
    n, C, draws, eta = 24, 6, 20000, 0.1
    W = rng.normal(size=(C, n)) / np.sqrt(n)
    x = rng.normal(size=n)
    a = np.exp(rng.normal(0.0, 0.6, size=C))
    lin = nn.Linear(n, C, bias=False).double()
    bn = nn.BatchNorm1d(C, affine=False).double().eval()
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(W))
        bn.running_var.copy_(torch.as_tensor(1.0 / a**2 - bn.eps))
    Wf = fold_bn(nn.Sequential(lin, bn))[0].weight.detach()
    np.testing.assert_allclose(Wf.numpy(), a[:, None] * W, rtol=1e-10)
    noise = RelativeGaussian(eta)
    g = torch.Generator().manual_seed(2)
    Wt = torch.as_tensor(W)
    dy_u = a * ((noise.scale(Wt) * torch.randn((draws, C, n), generator=g, dtype=torch.float64)).numpy() @ x)
    dy_f = (noise.scale(Wf) * torch.randn((draws, C, n), generator=g, dtype=torch.float64)).numpy() @ x
    d = batchnorm_folded_noise()
    pool = dict(a_c=a, eta=eta, s_W=W.std(), s_Wf=Wf.numpy().std(), x=x, u_c=W @ x)
    for key, dy in (("noise_var_unfolded", dy_u), ("noise_var_folded", dy_f)):
        v, se = variance_se(dy)
        pred = _call(d.numeric(key), **pool)
        assert agreement(f"batchnorm.folded_noise:{key}", pred, v, se) < 4.5
    # per-channel inflation = ratio of the relative noises (exact algebra)
    np.testing.assert_allclose(
        _call(d.numeric("relative_folded"), **pool) / _call(d.numeric("relative_unfolded"), **pool),
        _call(d.numeric("inflation"), **pool),
    )
    # power: for the smallest-gain channel, folded and unfolded noise differ by many s.e.
    c = int(np.argmin(a))
    v_u, se_u = variance_se(dy_u[:, c] / a[c])
    v_f, se_f = variance_se(dy_f[:, c] / a[c])
    assert (v_f - v_u) / np.hypot(se_u, se_f) > 10
    # zero-mean rows: closed forms in (a, rho) reproduce the realised stds exactly
    W0 = W - W.mean(axis=1, keepdims=True)
    rho = np.sqrt((W0**2).mean(axis=1))
    std_f2 = d.numeric("std_folded_sq_zero_mean_rows")(a=a, rho=rho)
    np.testing.assert_allclose(std_f2, (a[:, None] * W0).std() ** 2, rtol=1e-12)
    kappa = d.numeric("inflation")(s_Wf=np.sqrt(std_f2), a_c=a, s_W=W0.std())
    np.testing.assert_allclose(d.numeric("inflation_zero_mean_rows")(a=a, rho=rho, a_c=a), kappa, rtol=1e-12)
    # energy-weighted inflation = C std(W')^2 / (std(W)^2 sum a^2)
    np.testing.assert_allclose(
        d.numeric("inflation_energy")(a=a, rho=rho), C * std_f2 / (W0.std() ** 2 * np.sum(a**2)), rtol=1e-12
    )


def _equal_rows(rng, C, n):
    W = rng.normal(size=(C, n))
    W -= W.mean(axis=1, keepdims=True)
    return W / np.sqrt((W**2).mean(axis=1, keepdims=True))  # zero mean, mean square 1


def _kappa(a, W):
    """Per-channel inflation from the realised population stds, a: [R, C]."""
    Wf = a[:, :, None] * W[None]
    s_f2 = Wf.reshape(a.shape[0], -1).var(axis=1)
    return s_f2[:, None] / (a**2 * W.var())


def test_lognormal_inflation_finite_channels():
    rng = np.random.default_rng(3)
    C, R, m, tau = 16, 20000, -0.3, 0.4
    W = _equal_rows(rng, C, 10)
    a = np.exp(rng.normal(m, tau, size=(R, C)))
    kappa = _kappa(a, W)
    d = batchnorm_lognormal_scales()
    f = d.numeric("inflation_weighted")
    for nu in (0.0, 0.5):
        w = a ** (2 * nu)
        r, se = ratio_se((w * kappa).sum(axis=1), w.sum(axis=1))
        assert agreement(f"batchnorm.lognormal_scales:inflation_weighted[nu={nu}, C={C}]", f(tau=tau, nu=nu, C=C), r, se) < 4
    np.testing.assert_allclose(d.numeric("inflation_mean")(tau=tau, C=C), f(tau=tau, nu=0, C=C))
    # nu = 1 (signal-energy weights): exactly no inflation in every draw
    np.testing.assert_allclose((a**2 * kappa).sum(axis=1) / (a**2).sum(axis=1), 1.0, rtol=1e-10)
    assert f(tau=tau, nu=1, C=C) == pytest.approx(1.0)
    # power: at C = 16 the finite-C term matters: the C -> oo value is rejected
    r, se = mean_se(kappa.mean(axis=1))
    assert abs(r - d.numeric("inflation_mean_limit")(tau=tau)) / se > 10


def test_lognormal_inflation_many_channels():
    rng = np.random.default_rng(4)
    C, R, tau = 4096, 20, 0.4
    W = _equal_rows(rng, C, 4)
    a = np.exp(rng.normal(0.2, tau, size=(R, C)))
    logk = np.log(_kappa(a, W))
    d = batchnorm_lognormal_scales()
    m, se = mean_se(logk.mean(axis=1))
    assert agreement("batchnorm.lognormal_scales:log_inflation_mean_limit[C=4096]", d.numeric("log_inflation_mean_limit")(tau=tau), m, se) < 4
    med, se = mean_se(np.exp(np.median(logk, axis=1)))
    assert agreement("batchnorm.lognormal_scales:inflation_median_limit[C=4096]", d.numeric("inflation_median_limit")(tau=tau), med, se) < 4


def test_scale_estimators_for_gaussian_activations():
    rng = np.random.default_rng(5)
    d = batchnorm_scale_estimators()
    mu, sigma, R = 1.5, 2.0, 20000
    x = rng.normal(mu, sigma, size=(R, 32))
    mad_b = np.abs(x - x.mean(axis=1, keepdims=True)).mean(axis=1)
    m, se = mean_se(mad_b)
    assert agreement("batchnorm.scale_estimators:mean_abs_dev_batch[n=32]", d.numeric("mean_abs_dev_batch")(sigma=sigma, n=32), m, se) < 4
    l1 = np.sqrt(np.pi / 2) * np.abs(x - mu).mean(axis=1)  # known mean
    m, se = mean_se(l1)
    assert agreement("batchnorm.scale_estimators:l1_scale_mean", d.numeric("l1_scale_mean")(sigma=sigma), m, se) < 4
    v, se = variance_se(l1)
    assert agreement("batchnorm.scale_estimators:l1_scale_var[n=32]", d.numeric("l1_scale_var")(sigma=sigma, n=32), v, se) < 4
    x = rng.normal(mu, sigma, size=(R, 128))
    l2 = np.sqrt(((x - mu) ** 2).mean(axis=1))
    v, se = variance_se(l2)
    assert agreement("batchnorm.scale_estimators:l2_scale_var[n=128]", d.numeric("l2_scale_var")(sigma=sigma, n=128), v, se) < 4  # O(1/n) term ~0.2%, se ~1%
    assert float(d.numeric("efficiency_l1_vs_l2")()) == pytest.approx(np.pi - 2)


@pytest.mark.parametrize("n", [64, 512])
def test_topk_scale(n):
    rng = np.random.default_rng(6 + n)
    d = batchnorm_scale_estimators()
    sigma, k, R = 1.3, 10, 20000 if n == 64 else 4000
    dev = np.abs(rng.normal(0.0, sigma, size=(R, n)))
    top = -np.sort(-dev, axis=1)[:, :k].mean(axis=1)
    m, se = mean_se(top)
    pred = d.numeric("topk_mean")(sigma=sigma, n=n, k=k)
    assert agreement(f"batchnorm.scale_estimators:topk_mean[n={n}, k={k}]", pred, m, se) < 4
    C = d.numeric("topk_constant")(n=n)
    assert C == pytest.approx(0.5 * (1 + np.sqrt(np.pi * np.log(4))) / np.sqrt(2 * np.log(n)))
    bias = d.numeric("topk_scale_bias")(n=n, k=k)
    assert bias == pytest.approx(C * pred / sigma)
    # with the batch mean subtracted (as TopK BN does) the top-k mean shrinks by O(1/n)
    xb = rng.normal(0.0, sigma, size=(R, n))
    devb = np.abs(xb - xb.mean(axis=1, keepdims=True))
    mb, seb = mean_se(-np.sort(-devb, axis=1)[:, :k].mean(axis=1))
    assert mb < pred and abs(mb - pred) / pred < 2.0 / n + 4 * seb / pred


def _bn_eval(gamma, beta, m, stat, z, eps, kind):
    if kind == "l2":
        return gamma * (z - m) / np.sqrt(stat + eps) + beta
    return gamma * (z - m) / (stat + eps) + beta


@pytest.mark.parametrize("kind", ["l2", "scale"])
def test_statistics_noise_per_channel(kind):
    rng = np.random.default_rng(7)
    C, B, draws, eta, eps = 16, 3, 20000, 0.01, 1e-5
    sig_c = np.exp(rng.normal(0, 0.4, size=C))
    params = {
        "gamma": np.exp(rng.normal(0, 0.3, size=C)),
        "beta": rng.normal(size=C),
        "m": rng.normal(size=C),
        "stat": sig_c**2 if kind == "l2" else sig_c,
    }
    z = params["m"] + sig_c * rng.normal(size=(B, C))
    noise = RelativeGaussian(eta)
    g = torch.Generator().manual_seed(8)
    noisy = {}
    for name, p in params.items():
        pt = torch.as_tensor(p)
        noisy[name] = (pt + noise.scale(pt) * torch.randn((draws, 1, C), generator=g, dtype=torch.float64)).numpy()
    y = _bn_eval(noisy["gamma"], noisy["beta"], noisy["m"], noisy["stat"], z[None], eps, kind)
    v, se = variance_se(y)  # [B, C]
    d = batchnorm_statistics_noise()
    sd = {k: eta * p.std() for k, p in params.items()}
    common = dict(gamma=params["gamma"], epsilon=eps, z_c=z - params["m"], sigma_gamma=sd["gamma"],
                  sigma_m=sd["m"], sigma_beta=sd["beta"])
    if kind == "l2":
        pred = d.numeric("output_var_l2")(v=params["stat"], sigma_v=sd["stat"], **common)
    else:
        pred = d.numeric("output_var_scale")(s=params["stat"], sigma_s=sd["stat"], **common)
    assert agreement(f"batchnorm.statistics_noise:output_var_{kind}", pred, v, se) < 4.5
    if kind == "l2":
        # torch's BatchNorm1d in eval mode computes the same clean output
        bn = nn.BatchNorm1d(C, eps=eps).double().eval()
        with torch.no_grad():
            bn.weight.copy_(torch.as_tensor(params["gamma"]))
            bn.bias.copy_(torch.as_tensor(params["beta"]))
            bn.running_mean.copy_(torch.as_tensor(params["m"]))
            bn.running_var.copy_(torch.as_tensor(params["stat"]))
            ref = bn(torch.as_tensor(z)).numpy()
        np.testing.assert_allclose(_bn_eval(params["gamma"], params["beta"], params["m"], params["stat"], z, eps, kind), ref, rtol=1e-12)


def test_statistics_noise_lognormal_average():
    """Channel-weighted mean of the per-channel statistic term over log-normal channel
    stds (C = 4096, bias O(1/C) far below the s.e.)."""
    rng = np.random.default_rng(9)
    C, R, tau = 4096, 40, 0.3
    d = batchnorm_statistics_noise()
    sig = np.exp(rng.normal(0.1, tau, size=(R, C)))
    v, s = sig**2, 3.0 * sig  # s proportional to sigma: the factor cancels
    r_l2 = v.std(axis=1, keepdims=True) ** 2 / (4 * v**2)
    r_sc = s.std(axis=1, keepdims=True) ** 2 / s**2
    for nu in (0.0, 1.0):
        w = sig ** (-2 * nu)  # a_c^{2 nu} with gamma constant
        for key, r in (("statistic_term_l2", r_l2), ("statistic_term_scale", r_sc)):
            m, se = mean_se((w * r).sum(axis=1) / w.sum(axis=1))
            assert agreement(f"batchnorm.statistics_noise:{key}[nu={nu}]", d.numeric(key)(tau=tau, nu=nu), m, se) < 4
    # L2 stores the variance: its statistic term exceeds the scale's for a wide spread
    assert d.numeric("statistic_term_l2")(tau=0.5, nu=0) > 5 * d.numeric("statistic_term_scale")(tau=0.5, nu=0)


@pytest.mark.parametrize("k", [0, 3, 6])
def test_layer_count_folded_random_network(k):
    """Random He ReLU network of L = 6 layers; k of them followed by a folded BN with
    log-normal gains (tau = 0.5); relative noise eta·std(W') on the folded weights;
    first-order (linearised) perturbation. Energy propagation: R = eta² L for every k."""
    rng = np.random.default_rng(20 + k)
    L, n, R, eta, tau = 6, 32, 1500, 0.1, 0.5
    h = rng.normal(size=(R, n))
    dh = np.zeros((R, n))
    bn_layers = set(range(L - k, L))
    for l in range(L):
        x = np.maximum(h, 0.0) if l else h
        dx = (h > 0) * dh if l else dh
        W = rng.normal(scale=np.sqrt(2.0 / n), size=(R, n, n))
        if l in bn_layers:
            W *= np.exp(rng.normal(0.0, tau, size=(R, n, 1)))
        s = eta * W.reshape(R, -1).std(axis=1)[:, None, None]
        N = s * rng.normal(size=(R, n, n))
        h = (W @ x[:, :, None])[:, :, 0]
        dh = (W @ dx[:, :, None] + N @ x[:, :, None])[:, :, 0]
    d = batchnorm_layer_count()
    pred = d.numeric("relative_error")(eta=eta, L=L, k=k, kappa=1.0, G=0.0)
    assert d.numeric("slope_folded")(eta=eta, tau=tau, C=n, nu=1.0) == pytest.approx(0.0, abs=1e-15)
    r, se = ratio_se((dh**2).sum(1), (h**2).sum(1))
    assert agreement(f"batchnorm.layer_count:relative_error[folded, energy, k={k}]", pred, r, se) < 4
    if k == 6:
        kbar0 = batchnorm_lognormal_scales().numeric("inflation_mean")(tau=tau, C=n)
        wrong = d.numeric("relative_error")(eta=eta, L=L, k=k, kappa=kbar0, G=0.0)
        assert abs(r - wrong) / se > 10  # the equal-channel-weights prediction does not hold here
