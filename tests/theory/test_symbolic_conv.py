"""Topic `conv`: spatial covariance of convolution errors and pooling, against
Monte-Carlo noise draws on torch's conv2d (docs/THEORY.md §2)."""
import numpy as np
import torch
import torch.nn.functional as F

from noiseprop.theory.noise import AdditiveGaussian, RelativeGaussian
from noiseprop.theory.symbolic import conv_pooling, conv_spatial_covariance
from noiseprop.theory.symbolic.checking import agreement, covariance_se, mean_se, variance_se

C_IN, C_OUT, H, K = 2, 3, 6, 3


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, C_IN, H, H), generator=g, dtype=torch.float64)  # non-negative, like post-ReLU
    w = torch.randn((C_OUT, C_IN, K, K), generator=g, dtype=torch.float64) * 0.3
    A = F.unfold(x, K, padding=1)[0].T.numpy()  # [P, d]: rows = flattened patches
    return x, w, A


def _perturbations(x, w, noise, draws, seed):
    """δy = conv(x, N) for `draws` kernel-noise draws of the project's noise model:
    [draws, C_out, P]."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn((draws,) + tuple(w.shape), generator=g, dtype=w.dtype)
    N = noise.scale(w) * Z
    dy = F.conv2d(x, N.reshape(-1, C_IN, K, K), padding=1)  # [1, draws*C_out, H, H]
    return dy.reshape(draws, C_OUT, -1).numpy()


def test_unfold_patches_reproduce_the_convolution():
    x, w, A = _setup()
    y = F.conv2d(x, w, padding=1)[0].reshape(C_OUT, -1).numpy()
    np.testing.assert_allclose(y, (A @ w.reshape(C_OUT, -1).numpy().T).T, rtol=1e-12, atol=1e-12)


def test_spatial_covariance_within_and_between_channels():
    x, w, A = _setup()
    d = conv_spatial_covariance()
    dy = _perturbations(x, w, RelativeGaussian(0.2), draws=20000, seed=1)
    pred = d.numeric("cov_within_relative")(A=A, K=w.reshape(C_OUT, -1).numpy(), eta=0.2)
    np.testing.assert_allclose(pred, 0.04 * w.numpy().std() ** 2 * A @ A.T)
    P = A.shape[0]
    pairs = [(0, 0), (14, 14), (14, 15), (14, 20), (14, 21), (0, 35), (7, 28)]  # same, neighbours, far
    keys = [(c, p, q) for c in range(C_OUT) for p, q in pairs]
    cs, ses = zip(*[covariance_se(dy[:, c, p], dy[:, c, q]) for c, p, q in keys])
    assert agreement("conv.spatial_covariance:cov_within_relative", [pred[p, q] for _, p, q in keys], cs, ses) < 4.5
    # strongly correlated neighbours: the independent-positions answer (0) is rejected
    cov, se = covariance_se(dy[:, 0, 14], dy[:, 0, 15])
    assert cov / se > 20 and pred[14, 15] / np.sqrt(pred[14, 14] * pred[15, 15]) > 0.5
    # channels are uncorrelated (the closed form says exactly 0)
    zero = d.numeric("cov_between")(P=P)
    assert zero.shape == (P, P) and not zero.any()
    cs, ses = zip(*[covariance_se(dy[:, c, p], dy[:, c2, q]) for c, c2, p, q in [(0, 1, 14, 14), (0, 2, 14, 15), (1, 2, 3, 30)]])
    assert agreement("conv.spatial_covariance:cov_between", np.zeros(3), cs, ses) < 4


def test_pooled_variance_and_the_independent_answer_it_replaces():
    x, w, A = _setup(seed=3)
    d = conv_pooling()
    sigma = 0.05
    dy = _perturbations(x, w, AdditiveGaussian(sigma), draws=20000, seed=4)
    pooled = dy.mean(axis=2)  # average pooling over all P positions, per channel
    v, se = variance_se(pooled)
    pred = d.numeric("var_pooled")(A=A, sigma=sigma)
    np.testing.assert_allclose(pred, sigma**2 * np.sum(A.mean(axis=0) ** 2))
    assert agreement("conv.pooling:var_pooled", np.full(C_OUT, pred), v, se) < 4
    wrong = d.numeric("var_pooled_independent")(A=A, sigma=sigma)
    rho = d.numeric("underestimation")(A=A)
    np.testing.assert_allclose(pred / wrong, rho)
    assert 1 < rho <= d.numeric("underestimation_max")(P=A.shape[0])
    assert np.min(np.abs(v - wrong) / se) > 20  # the independent-positions answer is far off


def test_underestimation_factor_for_iid_pixels():
    """Images with iid U(0, 1) pixels, valid 3x3 convolution: expectations of ‖Aᵀ1‖² and ‖A‖²."""
    d = conv_pooling()
    R, side = 4000, 6
    g = torch.Generator().manual_seed(5)
    x = torch.rand((R, 1, side, side), generator=g, dtype=torch.float64)
    A = F.unfold(x, K).transpose(1, 2).numpy()  # [R, P, d], no padding
    P, dd = A.shape[1:]
    mu, v = 0.5, 1 / 12
    num = (A.sum(axis=1) ** 2).sum(axis=1)
    den = (A**2).sum(axis=(1, 2))
    kw = dict(mu_x=mu, v_x=v, P=P, d=dd)
    for key, samples in (("expected_sq_norm_of_sum", num), ("expected_sum_of_sq_norms", den)):
        m, se = mean_se(samples)
        f = d.numeric(key)
        assert agreement(f"conv.pooling:{key}", f(**{a: kw[a] for a in f.args}), m, se) < 4
    ratio = d.numeric("underestimation_iid")(mu_x=mu, v_x=v, P=P)
    assert ratio > 0.7 * P  # post-ReLU-like inputs: close to P, far from the independent 1
