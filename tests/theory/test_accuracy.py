import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

from noiseprop.theory.accuracy import (correct_probability, margin_moments, orthant_probability,
                                       pairwise_error_bounds, sampled_accuracies)


def _random_case(n, c, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    A = torch.randn(n, c, c, generator=g, dtype=torch.float64)
    cov = A @ A.mT / c + 0.05 * torch.eye(c, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return mean, cov, y


@pytest.mark.parametrize("c", [3, 10])
def test_orthant_matches_scipy_genz(c):
    """The vectorised separation-of-variables QMC agrees with scipy's Genz integration."""
    mean, cov, y = _random_case(12, c, seed=c)
    m, s = margin_moments(mean, cov, y)
    ours = orthant_probability(m, s, n_points=2048, seed=0).numpy()
    ref = np.array([multivariate_normal(mean=np.zeros(c - 1), cov=s[i].numpy(), abseps=1e-6, releps=1e-6)
                    .cdf(m[i].numpy()) for i in range(len(y))])
    # scipy's own absolute error ~1e-5; randomised QMC with 2048 points ~1e-4
    assert np.abs(ours - ref).max() < 1e-3
    assert np.abs(ours - ref).mean() < 2e-4


def test_margin_moments_against_explicit_contrast():
    mean, cov, y = _random_case(5, 4, seed=1)
    m, s = margin_moments(mean, cov, y)
    for i in range(5):
        others = [k for k in range(4) if k != int(y[i])]
        A = torch.zeros(3, 4, dtype=torch.float64)
        for r, k in enumerate(others):
            A[r, int(y[i])] = 1
            A[r, k] = -1
        assert torch.allclose(m[i], A @ mean[i])
        assert torch.allclose(s[i], A @ cov[i] @ A.T)


def test_correct_probability_matches_sampling():
    """P(argmax f = y) for Gaussian logits, against direct sampling (4 s.e.)."""
    mean, cov, y = _random_case(6, 5, seed=3, scale=0.8)
    p, lo, hi = correct_probability(mean, cov, y)
    g = torch.Generator().manual_seed(7)
    n = 40000
    for i in range(6):
        L = torch.linalg.cholesky(cov[i])
        f = mean[i] + torch.randn(n, 5, generator=g, dtype=torch.float64) @ L.T
        emp = (f.argmax(1) == y[i]).double().mean().item()
        se = math.sqrt(max(emp * (1 - emp), 1e-4) / n)
        assert abs(p[i].item() - emp) < 4 * se + 2e-4
        assert lo[i] - 1e-12 <= p[i] <= hi[i] + 1e-12


def test_two_classes_is_exact_probit():
    mean = torch.tensor([[2.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    cov = torch.tensor([[[1.0, 0.2], [0.2, 0.5]], [[0.3, 0.0], [0.0, 0.3]]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    p, lo, hi = correct_probability(mean, cov, y)
    want = [norm.cdf(1.5 / math.sqrt(1.0 + 0.5 - 0.4)), norm.cdf(-1.0 / math.sqrt(0.6))]
    assert np.allclose(p.numpy(), want, atol=1e-12)
    assert np.allclose(lo.numpy(), want) and np.allclose(hi.numpy(), want)


def test_bounds_and_degenerate_covariance():
    # zero noise: deterministic, correct iff the clean margin is positive
    mean = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    cov = torch.zeros(2, 3, 3, dtype=torch.float64)
    p, lo, hi = correct_probability(mean, cov, torch.tensor([0, 0]))
    assert p.tolist() == [1.0, 0.0] and lo.tolist() == [1.0, 0.0] and hi.tolist() == [1.0, 0.0]
    # one margin dominating: the pairwise bounds pinch the orthant probability
    mean = torch.tensor([[1.0, -20.0, -20.0]], dtype=torch.float64)
    cov = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    p, lo, hi = correct_probability(mean, cov, torch.tensor([0]))
    assert abs(p.item() - norm.cdf(21 / math.sqrt(2))) < 1e-9
    # bounds bracket the answer for random cases
    mean, cov, y = _random_case(50, 6, seed=9)
    m, s = margin_moments(mean, cov, y)
    pk, lo, hi = pairwise_error_bounds(m, s)
    p = orthant_probability(m, s)
    assert bool((lo <= p + 1e-12).all() and (p <= hi + 1e-12).all())
    assert pk.shape == (50, 5)



def test_tied_margins_without_noise_follow_argmax():
    """Tied logits that the noise does not move (margins 0, variance 0) are decided as
    argmax decides them, the lower class index first (the clean accuracy, Monte-Carlo):
    a three-way tie is won by class 0 alone, at every level, zero included (never NaN:
    the float32 loop once divided 0 by a jitter lost in rounding); a tie with noise is
    an ordinary integral (three classes tied, independent unit noise: 1/3)."""
    from noiseprop.theory.accuracy import OrthantCurve

    mean = torch.tensor([[0.0, 0.0, 0.0]] * 3 + [[2.0, 0.0, 1.0]], dtype=torch.float64)
    cov = torch.zeros(4, 3, 3, dtype=torch.float64)
    cov[3] = torch.eye(3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    for level in (0.0, 0.1, 1.0):
        p, lo, hi = correct_probability(mean, cov * level ** 2, y)
        assert not bool(torch.isnan(p).any())
        assert p[:3].tolist() == [1.0, 0.0, 0.0]
        assert bool((lo <= p + 1e-12).all() and (p <= hi + 1e-12).all())
    m, s = margin_moments(mean, cov, y)
    assert OrthantCurve(m, s).at(0.0)[0][:3].tolist() == [1.0, 0.0, 0.0]
    noisy = correct_probability(mean[3:4] * 0, cov[3:4], y[3:4])[0]  # three-way tie, independent noise: 1/3
    assert abs(noisy.item() - 1 / 3) < 5e-3


def test_orthant_is_deterministic_and_fast_for_many_inputs():
    import time

    mean, cov, y = _random_case(2000, 10, seed=11, scale=1.0)
    m, s = margin_moments(mean, cov, y)
    t0 = time.perf_counter()
    a = orthant_probability(m, s, n_points=512, seed=3)
    dt = time.perf_counter() - t0
    b = orthant_probability(m, s, n_points=512, seed=3)
    assert torch.equal(a, b)
    assert dt < 20  # ~1 s on one core; scipy per input would take minutes


def test_sampled_accuracies_shape_and_value():
    mean = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z = torch.zeros(2, 2, 3, dtype=torch.float64)
    z[0, 1, 1] = 5.0  # draw 1 flips input 0
    acc = sampled_accuracies(mean, z, torch.tensor([0, 1]))
    assert acc.tolist() == [1.0, 0.5, 1.0]


def test_orthant_curve_levels_match_scipy_and_single_calls():
    """One factorisation serves every level: OrthantCurve(m, S).at(η) equals
    orthant_probability(m, η²S) (the same integration) and scipy's Genz integration."""
    from noiseprop.theory.accuracy import OrthantCurve

    mean, cov, y = _random_case(10, 6, seed=21, scale=1.0)
    m, s = margin_moments(mean, cov, y)
    curve = OrthantCurve(m, s, n_points=2048, seed=0)
    for lv in (0.3, 1.0, 2.5):
        p, lo, hi = curve.at(lv)
        single = orthant_probability(m, s * lv**2, n_points=2048, seed=0)
        assert torch.allclose(p, single, atol=1e-6)  # equal up to float32 rounding of the factor
        ref = np.array([multivariate_normal(mean=np.zeros(5), cov=(s[i] * lv**2).numpy(), abseps=1e-6, releps=1e-6)
                        .cdf(m[i].numpy()) for i in range(10)])
        assert np.abs(p.numpy() - ref).max() < 1e-3
        assert bool((lo <= p + 1e-12).all() and (p <= hi + 1e-12).all())
    p0, _, _ = curve.at(0.0)  # no noise: correct iff every margin is positive
    assert p0.tolist() == (m > 0).all(1).double().tolist()


def test_float32_inverse_normal_and_loop_accuracy():
    """The float32 Φ⁻¹ (erfinv in the bulk, ndtri in the tails) against float64 ndtri, and
    the float32 separation-of-variables loop against the float64 one on the same points."""
    from noiseprop.theory.accuracy import _factor, _ndtri, _qmc_points, _sov

    q = torch.cat([torch.logspace(-37, -1e-7, 4000), torch.rand(20000, generator=torch.Generator().manual_seed(0))])
    q = q.float().clamp(1e-37, 1 - 1e-7)
    assert (_ndtri(q).double() - torch.special.ndtri(q.double())).abs().max() < 1e-5
    mean, cov, y = _random_case(40, 10, seed=5, scale=1.0)
    m, s = margin_moments(mean, cov, y)
    _, mo, L, _ = _factor(m, s)
    u = _qmc_points(8, 512, 0)
    a, b = _sov(mo, L, u), _sov(mo.float(), L.float(), u.float())
    assert (a - b).abs().max() < 1e-6



def test_separation_of_variables_on_live_prefixes_equals_the_padded_integral():
    """``_sov(..., live=counts)`` runs step ``i`` on the rows with more than ``i`` live
    margins only; with every other margin at ``+∞`` (factor ``Φ(∞) = 1``) that is the same
    estimate, bit for bit, as the whole padded loop, in float64 and float32. Also through
    ``OrthantCurve.at``, whose rows (live counts 1 to 9) are reordered by live count."""
    from noiseprop.theory.accuracy import OrthantCurve, _factor, _qmc_points, _sov

    mean, cov, y = _random_case(60, 10, seed=11, scale=1.0)
    m, s = margin_moments(mean, cov, y)
    _, mo, L, _ = _factor(m, s)
    live = torch.randint(1, 10, (60,), generator=torch.Generator().manual_seed(3)).sort(descending=True).values
    pad = torch.arange(9)[None, :] >= live[:, None]
    u = _qmc_points(8, 128, 0)
    for dt in (torch.float64, torch.float32):
        mm = mo.to(dt).masked_fill(pad, math.inf)
        a = _sov(mm, L.to(dt), u.to(dt))
        b = _sov(mm, L.to(dt), u.to(dt), live=live)
        assert torch.equal(a, b)
    curve = OrthantCurve(m, s, n_points=128)
    levels = (0.1, 0.2, 0.5)  # live counts 0 to 9, 4 to 9, 8 and 9 (the margins' bounds)
    counts = [int((curve.bounds(lv)[0] > curve.bound_tol / 9).sum(1).unique().numel()) for lv in levels]
    assert counts == [10, 6, 2]
    p_curve = [curve.at(lv)[0] for lv in levels]
    curve.max_elements = 1  # one group per live count: no padding at all
    for lv, p in zip(levels, p_curve):
        assert torch.allclose(p, curve.at(lv)[0], rtol=0, atol=1e-12)

def test_default_qmc_points_resolve_accuracy_to_a_tenth_of_a_point():
    """The default points (``DEFAULT_N_POINTS``) against scipy's Genz integration (absolute
    error 1e-5), 16 inputs with 10 classes and probabilities of staying correct from 0.3
    to 0.95: every input within 2.5e-3 and their mean within 1e-3 (a tenth of the 1-point
    fidelity target; 64 points miss the per-input bound here), and the randomised QMC
    estimate is unbiased: the mean of 8 scrambles lies within 4 of their standard errors
    of the reference."""
    from noiseprop.theory.accuracy import DEFAULT_N_POINTS

    mean, cov, _ = _random_case(16, 10, seed=11, scale=1.5)
    y = mean.argmax(1)
    m, s = margin_moments(mean, cov, y)
    ref = np.array([multivariate_normal(mean=np.zeros(9), cov=s[i].numpy(), abseps=1e-5, releps=1e-5)
                    .cdf(m[i].numpy()) for i in range(len(y))])
    assert 0.25 < ref.min() and ref.max() < 0.99
    est = np.stack([orthant_probability(m, s, n_points=DEFAULT_N_POINTS, seed=k).numpy() for k in range(8)])
    assert np.abs(est[0] - ref).max() < 2.5e-3
    assert abs(est[0].mean() - ref.mean()) < 1e-3
    means = est.mean(axis=1)
    se = means.std(ddof=1) / math.sqrt(len(means))
    assert abs(means.mean() - ref.mean()) < 4 * se + 1e-5  # + scipy's own error


def test_lazy_factor_and_mean_tolerance():
    """``orthant_probability`` factors only the rows it integrates: the same values as the
    eager curve. ``mean_tol`` leaves the narrowest rows to the middle of their bounds: the
    mean moves by at most ``mean_tol`` (checked against the full integration with the same
    points), every row stays within its bounds, and fewer rows are integrated."""
    from noiseprop.theory import accuracy as acc
    from noiseprop.theory.accuracy import OrthantCurve

    mean, cov, y = _random_case(400, 10, seed=5, scale=3.0)  # many rows with nearly met bounds
    m, s = margin_moments(mean, cov, y)
    eager = OrthantCurve(m, s, n_points=256, seed=0)
    for lv in (0.5, 1.0):
        full, lo, hi = eager.at(lv)
        # one level, lazily factored (only the integrated rows): equal up to the factor's rounding
        assert torch.allclose(orthant_probability(m, s * lv**2, n_points=256, seed=0), full, atol=1e-6)
        lazy = OrthantCurve(m, s, n_points=256, seed=0, lazy=True)
        # (on some CPUs the Cholesky factor of a subset of the rows differs in the last bits:
        # 2e-13 in 16 of 400 rows here)
        assert torch.allclose(lazy.at(lv)[0], full, rtol=0, atol=1e-12)
        gap = hi - lo
        integrated = int((gap > 1e-9).sum())
        for tol in (1e-6, 1e-4):
            calls = []
            sov = acc._sov

            def counting(mm, LL, u, **kw):
                calls.append(mm.shape[0])
                return sov(mm, LL, u, **kw)

            acc._sov = counting
            try:
                p, _, _ = eager.at(lv, mean_tol=tol)
            finally:
                acc._sov = sov
            assert abs(float(p.mean() - full.mean())) <= tol + 1e-15
            assert bool((lo - 1e-12 <= p).all() and (p <= hi + 1e-12).all())
            assert 0 < sum(calls) < integrated


def test_correct_probability_with_noiseless_classes():
    """A covariance with zero rows and columns (classes without noise at their mean logit,
    what ``predict_drift(classes=k)`` hands over): the correct probability against
    20,000 draws of the logits (the mean over inputs within 4 s.e.; every input within
    5 s.e. plus the 2e-4 of the test above for the orthant), and an input whose noiseless class stands far
    above the label's mean gets probability 0."""
    from noiseprop.theory.predict import _slot_cov_to_full

    g = torch.Generator().manual_seed(7)
    n, c, s, draws = 120, 6, 3, 20000
    B = torch.randn(n, s, s, generator=g, dtype=torch.float64)
    cs = B @ B.mT
    mean = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=g)
    sel = torch.stack([torch.cat([y[i:i + 1], torch.tensor([k for k in range(c) if k != y[i]][:s - 1])])
                       for i in range(n)])
    out = torch.tensor([k for k in range(c) if k not in sel[0].tolist()][0])
    mean[0, out] = mean[0, y[0]] + 50.0  # a noiseless class the label cannot reach
    p = correct_probability(mean, _slot_cov_to_full(cs, sel, c), y)[0]
    f = mean.unsqueeze(0).repeat(draws, 1, 1)
    z = torch.randn(draws, n, s, generator=g, dtype=torch.float64)
    f.scatter_add_(2, sel.unsqueeze(0).expand(draws, -1, -1), torch.einsum("nab,knb->kna", torch.linalg.cholesky(cs), z))
    hit = (f.argmax(2) == y).double()
    p_mc = hit.mean(0)
    se = (p_mc * (1 - p_mc) / draws).sqrt()
    assert abs(float(p.mean() - p_mc.mean())) < 4 * float(hit.mean(1).std()) / math.sqrt(draws)
    assert bool(((p - p_mc).abs() < 5 * se.clamp_min(math.sqrt(1e-4 / draws)) + 2e-4).all())
    assert float(p[0]) < 1e-12
