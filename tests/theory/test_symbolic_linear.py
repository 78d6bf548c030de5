"""Topic `linear`: closed forms of docs/THEORY.md §2 against Monte-Carlo of the stated setting.

Tolerances: |estimate − prediction| < Z·se with se computed from the samples
(noiseprop.theory.symbolic.checking); Z = 4 for a handful of comparisons, 4.5 when a
test makes a few dozen. Each test also shows the simulation can tell the right formula
from a plausible wrong one (power), so the check can fail.
"""
import numpy as np
import pytest
import torch

from noiseprop.theory.noise import AdditiveGaussian, Multiplicative, RelativeGaussian
from noiseprop.theory.symbolic import linear_fixed_input, linear_random_input, linear_width
from noiseprop.theory.symbolic.checking import agreement, covariance_se, mean_se, ratio_se, variance_se

NOISES = {
    "additive": (AdditiveGaussian(0.3), "cov_additive", {"sigma": 0.3}),
    "relative": (RelativeGaussian(0.2), "cov_relative", {"eta": 0.2}),
    "multiplicative": (Multiplicative(0.25), "cov_multiplicative", {"eta": 0.25}),
}


def _call(f, **pool):
    """Call a NumericFunction with the arguments it takes from a pool of values."""
    return f(**{a: pool[a] for a in f.args})


def _noisy_weights(W, noise, draws, seed):
    """`draws` noisy copies W + s(W)·Z of the project's noise model (WeightNoise.perturb
    semantics: the same per-element scale s(W), fresh standard normals per draw)."""
    g = torch.Generator().manual_seed(seed)
    Wt = torch.as_tensor(W)
    Z = torch.randn((draws,) + tuple(Wt.shape), generator=g, dtype=Wt.dtype)
    return (Wt + noise.scale(Wt) * Z).numpy()


def _noisy_outputs(W, x, noise, draws, seed):
    """y = (W + N) x for `draws` noise draws (shared x)."""
    return _noisy_weights(W, noise, draws, seed) @ np.asarray(x)


@pytest.mark.parametrize("model", list(NOISES))
def test_fixed_input_mean_and_covariance(model):
    noise, key, level = NOISES[model]
    rng = np.random.default_rng(1)
    W = rng.normal(size=(4, 6))
    x = rng.normal(size=6)
    d = linear_fixed_input()
    y = _noisy_outputs(W, x, noise, draws=20000, seed=2)
    m, se = mean_se(y)
    assert agreement(f"linear.fixed_input:mean[{model}]", d.numeric("mean")(W, x).ravel(), m, se) < 4.5
    cov_pred = _call(d.numeric(key), W=W, x=x, m=4, **level)
    # the general form with S = the noise model's own per-element variances agrees exactly
    S = noise.variance(torch.as_tensor(W)).numpy()
    np.testing.assert_allclose(d.numeric("cov")(S=S, x=x), cov_pred, rtol=1e-12, atol=1e-14)
    v, vse = variance_se(y)
    assert agreement(f"linear.fixed_input:{key} (variances)", np.diag(cov_pred), v, vse) < 4.5
    cs, ses = zip(*[covariance_se(y[:, i], y[:, k]) for i in range(4) for k in range(i + 1, 4)])
    assert agreement(f"linear.fixed_input:{key} (covariances = 0)", np.zeros(6), cs, ses) < 4.5
    if model == "multiplicative":
        # power: an isotropic answer with the same total variance is rejected
        iso = np.full(4, np.trace(cov_pred) / 4)
        assert np.max(np.abs(v - iso) / vse) > 10


@pytest.mark.parametrize("model", ["additive", "multiplicative"])
def test_random_input_covariance(model):
    noise, key, level = NOISES[model]
    rng = np.random.default_rng(3)
    m, n, draws = 3, 6, 40000
    W = rng.normal(size=(m, n))
    mu = rng.normal(size=n)
    A = rng.normal(size=(n, n)) * 0.6
    Gamma = A @ A.T
    x = mu + rng.normal(size=(draws, n)) @ np.linalg.cholesky(Gamma).T
    Wn = _noisy_weights(W, noise, draws, seed=4)
    y = np.einsum("dij,dj->di", Wn, x)
    d = linear_random_input()
    mean, se = mean_se(y)
    assert agreement(f"linear.random_input:mean[{model}]", d.numeric("mean")(W, mu).ravel(), mean, se) < 4
    pred = d.numeric(key)(W=W, mu=mu, Gamma=Gamma, **level)
    pairs = [(i, k) for i in range(m) for k in range(i, m)]
    cs, ses = zip(*[covariance_se(y[:, i], y[:, k]) for i, k in pairs])
    assert agreement(f"linear.random_input:{key}", [pred[i, k] for i, k in pairs], cs, ses) < 4.5
    # power: the fixed-input answer at x = mu (dropping the noise acting on Gamma) is rejected
    if model == "additive":
        wrong = W @ Gamma @ W.T + level["sigma"] ** 2 * (mu @ mu) * np.eye(m)
        v, vse = variance_se(y)
        assert np.min(np.abs(v - np.diag(wrong)) / vse) > 6


def test_random_input_noise_part_is_the_trace_term():
    d = linear_random_input()
    rng = np.random.default_rng(0)
    W, mu, G = rng.normal(size=(2, 3)), rng.normal(size=3), np.diag([1.0, 2.0, 3.0])
    full = d.numeric("cov_additive")(W=W, mu=mu, Gamma=G, sigma=0.5)
    part = d.numeric("noise_variance_additive")(mu=mu, Gamma=G, sigma=0.5)
    np.testing.assert_allclose(np.diag(full - W @ G @ W.T), part)
    np.testing.assert_allclose(part, 0.25 * (mu @ mu + 6.0))


@pytest.mark.parametrize("n", [16, 64, 256])
def test_width_dependence_of_relative_error(n):
    """Joint draws of (W, x, N): E‖Nx‖² − R·E‖Wx‖² = 0 for the predicted R."""
    d = linear_width()
    m, R, sigma_w, b = 8, 3000, 1.4, 1.5
    q = b**2 / 3  # x_j ~ U(0, b): E x² = b²/3
    rng = np.random.default_rng(10 + n)
    W = rng.normal(scale=sigma_w / np.sqrt(n), size=(R, m, n))
    x = rng.uniform(0, b, size=(R, n))
    Z = rng.normal(size=(R, m, n))
    y2 = np.einsum("rij,rj->ri", W, x) ** 2
    zx2 = np.einsum("rij,rj->ri", Z, x) ** 2
    sig, eta = 0.02, 0.1
    np.testing.assert_allclose(d.numeric("signal")(sigma_w=sigma_w, q=q), sigma_w**2 * q)
    # absolute noise
    r_abs = d.numeric("relative_mse_absolute")(sigma=sig, sigma_w=sigma_w, n=n)
    r, se = ratio_se(sig**2 * zx2.sum(1), y2.sum(1))
    assert agreement(f"linear.width:relative_mse_absolute[n={n}]", r_abs, r, se) < 4
    # relative noise: sigma = eta * std(W) of the realised W (population std)
    r_rel = d.numeric("relative_mse_relative")(eta=eta, n=n, m=m)
    s2 = W.reshape(R, -1).var(axis=1)
    r, se = ratio_se(eta**2 * s2 * zx2.sum(1), y2.sum(1))
    assert agreement(f"linear.width:relative_mse_relative[n={n}]", r_rel, r, se) < 4
    if n == 256:
        # power: a width-independent absolute-noise law (sigma²/sigma_w²) is rejected
        r, se = ratio_se(sig**2 * zx2.sum(1), y2.sum(1))
        assert abs(r - sig**2 / sigma_w**2) / se > 10


def test_width_limits():
    d = linear_width()
    f = d.numeric("relative_rms_absolute")
    np.testing.assert_allclose(f(sigma=0.01, sigma_w=1.0, n=np.array([100, 400])), [0.1, 0.2])
    assert float(d.numeric("relative_mse_relative_limit")(eta=0.3)) == pytest.approx(0.09)
