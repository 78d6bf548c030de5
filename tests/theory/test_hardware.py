"""Hardware noise models (theory/hardware.py): exact per-element moments against
Monte-Carlo (tolerances from the standard errors), the one-dimensional pieces against
scipy quadrature, common random numbers, and bad input."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from noiseprop.theory import AdditiveGaussian, Multiplicative, PCMLike, Quantized, RelativeGaussian, StuckAt, parse_noise
from noiseprop.theory import hardware as hw
from noiseprop.theory.hardware import (G_MAX, folded_normal_laplace, rectified_expectation,
                                       rectified_normal_moments)


def _w(seed=0, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    w[0, 0] = 0.0  # both devices idle
    w[1, 1] = -w.abs().max()  # the layer's extreme weight on the negative device
    return w


def _samples(noise, w, draws, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([noise.sample(w, g) for _ in range(draws)])


def _z_scores(s, mean, var):
    """Per element: (sample mean − mean)/se and (sample variance − var)/se, with the
    variance's s.e. from the sample fourth central moment."""
    d = s.shape[0]
    zm = (s.mean(0) - mean) / (s.var(0) / d).sqrt().clamp_min(1e-300)
    c = s - s.mean(0)
    v = s.var(0)
    se_v = (((c**4).mean(0) - v**2) / d).clamp_min(0).sqrt()
    zv = torch.where(se_v > 0, (v - var) / se_v.clamp_min(1e-300), (v - var).abs() * 0)
    return zm, zv


def test_gaussian_models_have_zero_mean():
    w = _w()
    for nz in (AdditiveGaussian(0.1), RelativeGaussian(0.2), Multiplicative(0.1)):
        assert nz.zero_mean and torch.equal(nz.mean(w), w)
    assert not PCMLike().zero_mean


@pytest.mark.parametrize("t,scale,per", [(0.0, 1.0, "layer"), (3600.0, 2.0, "layer"), (3.15e8, 1.0, "channel"),
                                         (3.15e8, 3.0, "layer")])
def test_pcm_moments_match_monte_carlo(t, scale, per):
    """Every element's sample mean and variance of W(t) within 4 s.e. of the exact
    formula (and at least 97% within 3 s.e.)."""
    w = _w(1)
    nz = PCMLike(t=t, compensation=False, prog_noise_scale=scale, drift_scale=scale, read_noise_scale=scale, per=per)
    s = _samples(nz, w, 4000)
    mo = nz.raw_moments(w)
    zm, zv = _z_scores(s, mo["mean"], mo["var"])
    z = torch.cat([zm.reshape(-1), zv.reshape(-1)]).abs()
    assert float(z.max()) < 4.0, float(z.max())
    assert float((z < 3).double().mean()) >= 0.97
    # the per-element table and the per-element quadrature agree
    ex = nz.raw_moments(w, exact=True)
    for k in ("mean", "var", "prog_mean", "prog_var", "cov"):
        assert torch.allclose(mo[k], ex[k], rtol=1e-4, atol=1e-10), k


def test_pcm_programmed_and_cross_moments():
    """W_P = (g_P⁺ − g_P⁻)M/g_max and Cov(W_P, W(t)) against Monte-Carlo."""
    w = _w(2)
    nz = PCMLike(t=86400.0, compensation=False, prog_noise_scale=2.0)
    g = torch.Generator().manual_seed(3)
    wp, wt = [], []
    for _ in range(4000):
        gp, gg, m = nz.conductances(w, nz.draw(w, g))
        wp.append((gp[0] - gp[1]) * m / G_MAX)
        wt.append((gg[0] - gg[1]) * m / G_MAX)
    wp, wt = torch.stack(wp), torch.stack(wt)
    mo = nz.raw_moments(w)
    zm, zv = _z_scores(wp, mo["prog_mean"], mo["prog_var"])
    assert float(torch.cat([zm.reshape(-1), zv.reshape(-1)]).abs().max()) < 4.0
    prod = (wp - wp.mean(0)) * (wt - wt.mean(0))
    cov = prod.sum(0) / (wp.shape[0] - 1)
    se = prod.std(0) / math.sqrt(wp.shape[0])
    assert float(((cov - mo["cov"]) / se).abs().max()) < 4.0


def test_pcm_compensation_alpha():
    """E α and Var α (delta method, Gaussian |W|): E α within 4 s.e. + 1% (the stated
    approximation), Var α within 4 s.e. of the sample variance + 10%."""
    g0 = torch.Generator().manual_seed(5)
    w = torch.randn(32, 16, generator=g0, dtype=torch.float64) * 0.3
    nz = PCMLike(t=3.15e7, prog_noise_scale=2.0)
    g = torch.Generator().manual_seed(6)
    al, ws = [], []
    for _ in range(1500):
        gp, gg, m = nz.conductances(w, nz.draw(w, g))
        wt, wp = (gg[0] - gg[1]) * m / G_MAX, (gp[0] - gp[1]) * m / G_MAX
        al.append(float(wp.abs().mean() / wt.abs().mean()))
    al = np.array(al)
    comp = nz.compensation_moments(w, draws=0)
    se = al.std(ddof=1) / math.sqrt(al.size)
    assert abs(al.mean() - comp.alpha_mean) < 4 * se + 0.01 * comp.alpha_mean
    se_v = al.var(ddof=1) * math.sqrt(2 / (al.size - 1))
    assert abs(al.var(ddof=1) - comp.alpha_var) < 4 * se_v + 0.1 * comp.alpha_var
    # the compensated sample is alpha * W(t)
    z = nz.draw(w, torch.Generator().manual_seed(1))
    gp, gg, m = nz.conductances(w, z)
    wt, wp = (gg[0] - gg[1]) * m / G_MAX, (gp[0] - gp[1]) * m / G_MAX
    assert torch.allclose(nz.apply(w, z), wt * wp.abs().mean() / wt.abs().mean())


@pytest.mark.parametrize("shape", [(16, 1, 3, 3), (64, 32, 3, 3)])
def test_pcm_compensation_alpha_sampled(shape):
    """Twice aihwkit's noise, ten years (where the delta method's Gaussian |W| is 2–7%
    low): the sampled E α within 4 s.e. of 400 independent draws (plus the sampled
    estimate's own s.e.), Var α within 4 s.e. of the sample variance plus the estimate's."""
    g0 = torch.Generator().manual_seed(7)
    w = torch.randn(*shape, generator=g0, dtype=torch.float64) * 0.1
    nz = PCMLike(t=3.15e8, prog_noise_scale=2.0, drift_scale=2.0, read_noise_scale=2.0)
    g = torch.Generator().manual_seed(8)
    al = []
    for _ in range(400):
        gp, gg, m = nz.conductances(w, nz.draw(w, g))
        al.append(float(((gp[0] - gp[1]) * m).abs().mean() / ((gg[0] - gg[1]) * m).abs().mean()))
    al = np.array(al)
    comp = nz.compensation_moments(w)
    k = min(16 * hw.ALPHA_DRAWS, max(hw.ALPHA_DRAWS, hw.ALPHA_SAMPLE_ELEMENTS // w.numel()))
    se = al.std(ddof=1) * math.sqrt(1 / al.size + 1 / k)
    assert abs(al.mean() - comp.alpha_mean) < 4 * se, (al.mean(), comp.alpha_mean, se)
    se_v = al.var(ddof=1) * (math.sqrt(2 / (al.size - 1)) + math.sqrt(2 / (k - 1)))
    assert abs(al.var(ddof=1) - comp.alpha_var) < 4 * se_v, (al.var(ddof=1), comp.alpha_var)
    delta = nz.compensation_moments(w, draws=0)  # the delta method misses here: the reason for sampling
    assert abs(al.mean() - delta.alpha_mean) > 4 * se


def test_conductances_of_several_draws_at_once():
    """Draws stacked along leading axes give, draw by draw, the conductances of one call
    each (the compensation scalar's sampled moments evaluate a layer's draws together);
    a wrong trailing shape is refused."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64) * 0.2
    nz = PCMLike(t=86400.0, prog_noise_scale=1.5)
    zs = torch.stack([nz.draw(w, g) for _ in range(4)])
    gp, gr, m = nz.conductances(w, zs)
    for i in range(4):
        gp1, gr1, m1 = nz.conductances(w, zs[i])
        assert torch.equal(gp[i], gp1) and torch.equal(gr[i], gr1) and torch.equal(m, m1)
    with pytest.raises(ValueError, match="PCM draws must have shape"):
        nz.conductances(w, zs[..., :2])


def test_device_table_integrals_on_shared_nodes():
    """The three read-noise integrals of :meth:`PCMLike.device_moments`, taken on one set
    of quadrature nodes, equal each taken alone (``rectified_expectation`` of one integrand)."""
    nz = PCMLike(t=3.15e7, read_noise_scale=2.0)
    g = torch.linspace(0.0, G_MAX, 257, dtype=torch.float64)
    d = nz.device_moments(g)
    c, s_p = nz.read_factor, nz._sigma_prog(g)

    def one(power, which):
        return rectified_expectation(
            lambda x: x ** power * hw.rectified_normal_moments(torch.ones_like(x), c * hw._q_read(x))[which], g, s_p,
            hw._Q_KINKS)

    mu, sd = nz._drift_params(g)
    lam = nz.drift_scale * nz.log_drift_time
    d1, d2 = folded_normal_laplace(lam, mu, sd), folded_normal_laplace(2 * lam, mu, sd)
    assert torch.allclose(d["mean"], d1 * one(1, 0), rtol=1e-13, atol=0)
    assert torch.allclose(d["sq"], d2 * one(2, 1), rtol=1e-13, atol=0)
    assert torch.allclose(d["cross"], d1 * one(2, 0), rtol=1e-13, atol=0)


def test_device_tables_over_times_equal_one_time_at_a_time():
    """The device tables of one PCM model at several times, computed together on one set
    of quadrature nodes (what a drift curve does), equal each time's own table; models
    that differ in more than ``t`` are refused."""
    times = [1.0, 3600.0, 3.15e8]
    hw._TABLES.clear()
    together = PCMLike.device_tables_over_times([PCMLike(t=t, read_noise_scale=2.0) for t in times], points=257)
    for t, (grid, d) in zip(times, together):
        hw._TABLES.clear()  # each time's table computed on its own, not taken from the cache
        g1, d1 = PCMLike(t=t, read_noise_scale=2.0).device_table(points=257)
        assert torch.equal(grid, g1)
        for k in d1:
            assert torch.allclose(d[k], d1[k], rtol=1e-13, atol=0), k
    with pytest.raises(ValueError, match="one PCMLike model at several times"):
        PCMLike.device_tables_over_times([PCMLike(t=1.0), PCMLike(t=2.0, drift_scale=2.0)], points=17)
    PCMLike(t=1.0).device_table(points=17)  # refused whatever the cache holds
    with pytest.raises(ValueError, match="one PCMLike model at several times"):
        PCMLike.device_tables_over_times([PCMLike(t=1.0), PCMLike(t=2.0, drift_scale=2.0)], points=17)


def test_device_tables_cached_across_models():
    """A device table depends on the scales, ``t`` and the nodes only: another instance
    with the same ones (compensation and ``per`` may differ) gets the cached table, one
    with another scale or time its own; the cache keeps the most recently used
    :data:`~noiseprop.theory.hardware.TABLE_CACHE_SIZE` tables, and a table computed again
    after being dropped is the same numbers."""
    hw._TABLES.clear()
    g0, d0 = PCMLike(t=60.0, prog_noise_scale=1.5).device_table(points=33)
    g1, d1 = PCMLike(t=60.0, prog_noise_scale=1.5, compensation=False, per="channel").device_table(points=33)
    assert g1 is g0 and all(d1[k] is d0[k] for k in d0)
    _, d2 = PCMLike(t=60.0, prog_noise_scale=2.0).device_table(points=33)
    _, d3 = PCMLike(t=61.0, prog_noise_scale=1.5).device_table(points=33)
    assert d2["sq"] is not d0["sq"] and d3["sq"] is not d0["sq"]
    for k in range(hw.TABLE_CACHE_SIZE):  # push the first table out
        PCMLike(t=1000.0 + k).device_table(points=9)
    assert len(hw._TABLES) == hw.TABLE_CACHE_SIZE
    _, d4 = PCMLike(t=60.0, prog_noise_scale=1.5).device_table(points=33)
    assert d4["sq"] is not d0["sq"] and all(torch.equal(d4[k], d0[k]) for k in d0)


@pytest.mark.parametrize("per", ["layer", "channel"])
def test_raw_moments_over_times_equal_both_devices_interpolated(per):
    """A curve's raw moments (one table position per weight, the idle device's moments
    from the table's first node) equal, to the bit, interpolating both devices of every
    weight in each time's table; zero weights and a zero channel included."""
    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(3))
    w[0, 0] = 0.0
    w[1] = 0.0
    models = [PCMLike(t=t, per=per, prog_noise_scale=2.0) for t in (1.0, 86400.0, 3.15e8)]
    for q, raw in zip(models, PCMLike.raw_moments_over_times(w, models, points=257)):
        g_t, m = hw._device_targets(w.double(), per)
        d = q.table_moments(g_t, points=257)
        k = (m / G_MAX).double()
        var_dev = d["sq"] - d["mean"] ** 2
        pvar_dev = d["prog_sq"] - d["prog_mean"] ** 2
        cov_dev = d["cross"] - d["prog_mean"] * d["mean"]
        both = dict(mean=(d["mean"][0] - d["mean"][1]) * k, var=(var_dev[0] + var_dev[1]) * k * k,
                    prog_mean=(d["prog_mean"][0] - d["prog_mean"][1]) * k,
                    prog_var=(pvar_dev[0] + pvar_dev[1]) * k * k, cov=(cov_dev[0] + cov_dev[1]) * k * k)
        for key, v in both.items():
            assert torch.equal(raw[key], v), key
    with pytest.raises(ValueError, match="empty weight"):
        PCMLike.raw_moments_over_times(torch.zeros(0, 3), models)
    for bad in ([], [models[0], PCMLike(t=2.0, per="channel" if per == "layer" else "layer")], [models[0], 3.0]):
        with pytest.raises(ValueError, match="PCMLike models that differ only in t"):
            PCMLike.raw_moments_over_times(w, bad)


def test_folded_normal_laplace_against_quadrature():
    for s, mu, sd in [(0.5, 0.05, 0.01), (20.0, 0.1, 0.045), (60.0, 0.049, 0.008), (3.0, -0.2, 0.3)]:
        ref = integrate.quad(lambda x: math.exp(-s * abs(x)) * stats.norm.pdf(x, mu, sd), mu - 12 * sd, mu + 12 * sd,
                             points=[0.0] if abs(mu) < 12 * sd else None, limit=200)[0]
        assert float(folded_normal_laplace(s, mu, sd)) == pytest.approx(ref, rel=1e-8, abs=1e-300)


def test_rectified_normal_moments_and_quadrature():
    a = torch.tensor([-1.0, 0.0, 0.3, 5.0], dtype=torch.float64)
    s = torch.tensor([0.5, 0.26, 1.0, 1.2], dtype=torch.float64)
    m1, m2 = rectified_normal_moments(a, s)
    for i in range(4):
        f = lambda z, k: max(0.0, float(a[i]) + float(s[i]) * z) ** k * stats.norm.pdf(z)  # noqa: E731
        assert float(m1[i]) == pytest.approx(integrate.quad(f, -12, 12, args=(1,), points=[float(-a[i] / s[i])])[0], rel=1e-9)
        assert float(m2[i]) == pytest.approx(integrate.quad(f, -12, 12, args=(2,), points=[float(-a[i] / s[i])])[0], rel=1e-9)
    # a kinked integrand, split at its kink
    h = lambda g: g * torch.clamp(0.0088 / (g.clamp_min(0) / 25) ** 0.65, max=0.2)  # noqa: E731
    q = rectified_expectation(h, a, s, kinks=(25 * (0.0088 / 0.2) ** (1 / 0.65),))
    for i in range(4):
        def f(z):
            g = float(a[i]) + float(s[i]) * z
            return float(h(torch.tensor(g))) * stats.norm.pdf(z) if g > 0 else 0.0
        kink = (25 * (0.0088 / 0.2) ** (1 / 0.65) - float(a[i])) / float(s[i])
        ref = integrate.quad(f, -12, 12, points=[float(-a[i] / s[i]), kink], limit=200)[0]
        assert float(q[i]) == pytest.approx(ref, rel=1e-7, abs=1e-12)


def test_quantized_exact():
    w = _w(3)
    for b in (1, 2, 4):
        q = Quantized(b).mean(w)
        m = w.abs().max()
        levels = torch.unique(q)
        assert levels.numel() <= 2**b
        grid = -m + 2 * m / (2**b - 1) * torch.arange(2**b, dtype=w.dtype)
        assert torch.all(torch.isclose(levels[:, None], grid[None, :]).any(1))
        assert float((q - w).abs().max()) <= float(m / (2**b - 1)) + 1e-12  # half a step
        assert torch.equal(Quantized(b).sample(w), q) and float(Quantized(b).variance(w).abs().max()) == 0
    qc = Quantized(2, per="channel").mean(w)
    assert torch.allclose(qc.abs().amax(1), w.abs().amax(1))


@pytest.mark.parametrize("p0,p1", [(0.1, 0.0), (0.05, 0.02)])
def test_stuck_at_moments(p0, p1):
    w = _w(4)
    nz = StuckAt(p_zero=p0, p_max=p1)
    s = _samples(nz, w, 4000)
    zm, zv = _z_scores(s, nz.mean(w), nz.variance(w))
    assert float(torch.cat([zm.reshape(-1), zv.reshape(-1)]).abs().max()) < 4.0


def test_common_random_numbers_and_rng():
    w = _w()
    nz = PCMLike(t=1.0)
    state = torch.get_rng_state()
    z = nz.draw(w, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(nz.sample(w, torch.Generator().manual_seed(0)), nz.apply(w, z))
    # the programmed conductances do not depend on t; the read ones do, through the same z
    a, b = nz.conductances(w, z), nz.with_level(3.15e7).conductances(w, z)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert nz.with_level(86400).t == 86400
    assert isinstance(parse_noise("pcm:3600"), PCMLike) and not parse_noise("pcm-nocomp:1").compensation
    assert parse_noise("quantized:4").bits == 4 and parse_noise("stuck:0.01").p_zero == 0.01


@pytest.mark.parametrize("make,name", [
    (lambda: PCMLike(t=-1), "t"), (lambda: PCMLike(t=float("nan")), "t"), (lambda: PCMLike(t=float("inf")), "t"),
    (lambda: PCMLike(prog_noise_scale=-0.1), "prog_noise_scale"), (lambda: PCMLike(drift_scale=-1), "drift_scale"),
    (lambda: PCMLike(read_noise_scale=float("nan")), "read_noise_scale"), (lambda: PCMLike(per="row"), "per"),
    (lambda: PCMLike(compensation="yes"), "compensation"),
    (lambda: Quantized(0), "bits"), (lambda: Quantized(2.5), "bits"), (lambda: Quantized(True), "bits"),
    (lambda: Quantized(4, per="tile"), "per"), (lambda: StuckAt(p_zero=1.5), "p_zero"),
    (lambda: StuckAt(p_zero=-0.1), "p_zero"), (lambda: StuckAt(p_max=2), "p_max"),
    (lambda: StuckAt(p_zero=0.6, p_max=0.6), r"p_zero \+ p_max"), (lambda: parse_noise("quantized:2.5"), "bits"),
    (lambda: PCMLike(t=10.0).compensation_moments(torch.ones(4, 4), draws=-1), r"draws must be an integer >= 0"),
])
def test_bad_input(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_alpha_over_times_equals_each_time_drawn_alone():
    """A curve over times makes each layer's compensation draws once
    (``alpha_over_times``): the statistics equal those of ``compensation_moments`` drawn
    at each time alone (the same seeded numbers), and so do the effective moments that
    take them (``sampled=``)."""
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.1
    nz = PCMLike(prog_noise_scale=1.5, drift_scale=1.5, read_noise_scale=1.5)
    times = [1.0, 3600.0, 3.15e7]
    stats = nz.alpha_over_times(w, times)
    assert len(stats) == 3
    for t, st in zip(times, stats):
        one = nz.with_level(t)
        alone = one.compensation_moments(w)
        shared = one.compensation_moments(w, sampled=st)
        assert shared.alpha_mean == pytest.approx(alone.alpha_mean, rel=1e-12)
        assert shared.alpha_var == pytest.approx(alone.alpha_var, rel=1e-10)
        assert torch.allclose(shared.cov_w, alone.cov_w, rtol=1e-12, atol=0)
        assert torch.allclose(one.effective_moments(w, sampled=st)["var"], one.effective_moments(w)["var"], rtol=1e-12)
    assert stats[0][2] != stats[2][2]  # the statistics do move with time
    assert nz.alpha_over_times(w, []) == []


def test_cubic_between_kinks():
    """The table's fill between quadrature nodes: exact at the nodes, exact for a cubic
    within each kink-free piece, and never across a kink (a continuous function whose
    pieces are different cubics, its slope jumping at every kink node, is reproduced to
    rounding; a stencil across a kink would miss it by the slope's jump)."""
    kinks = torch.tensor(hw._table_kinks(), dtype=torch.float64)
    xc = hw._table_grid((4097 - 1) // hw.TABLE_UPSAMPLE + 1)  # the default table's quadrature nodes
    xf = hw._table_grid(4097)
    assert all(bool((xc == k).any()) for k in kinks)
    pieces = torch.tensor([0] + [int(torch.nonzero(xc == k)) for k in kinks] + [xc.numel() - 1])
    assert int(pieces.diff().min()) >= 3  # every piece has four nodes or more: cubic throughout

    def piecewise(x):  # continuous, a cubic on each piece, its slope jumping at every kink
        return x**3 - 2 * x**2 + 0.5 + sum((j + 1.5) * (x - k).clamp_min(0) for j, k in enumerate(kinks.tolist()))

    out = hw._cubic_between_kinks(xc, piecewise(xc), xf)
    assert torch.allclose(out, piecewise(xf), rtol=1e-10, atol=1e-10)
    assert torch.allclose(hw._cubic_between_kinks(xc, piecewise(xc), xc), piecewise(xc), rtol=0, atol=1e-12)
    coarse = hw._table_grid(129)  # here the piece between 0.190 and 0.205 µS has two nodes: linear there
    lin = 3 * coarse - 1 + sum((j + 1.5) * (coarse - k).clamp_min(0) for j, k in enumerate(kinks.tolist()))
    want = 3 * xf - 1 + sum((j + 1.5) * (xf - k).clamp_min(0) for j, k in enumerate(kinks.tolist()))
    assert torch.allclose(hw._cubic_between_kinks(coarse, lin, xf), want, rtol=1e-10, atol=1e-10)


def test_device_table_from_coarse_quadrature():
    """The default table (quadrature on every 8th node, cubic between kinks to the rest)
    is within 1e-6 (relative) of quadrature at every node, at three scales and times
    from 1 s to ten years: well below the table's own interpolation error (1e-5)."""
    times = [1.0, 86400.0, 3.15e8]
    for sc in (0.5, 1.0, 2.0):
        models = [PCMLike(t=t, prog_noise_scale=sc, drift_scale=sc, read_noise_scale=sc) for t in times]
        hw._TABLES.clear()
        tabs = PCMLike.device_tables_over_times(models)
        grid = tabs[0][0]
        assert grid.numel() > 4097
        for (g, d), e in zip(tabs, models[0]._device_moments_over_times(grid, times)):
            for k in e:
                m = e[k].abs() > 0
                assert float(((d[k] - e[k]).abs()[m] / e[k].abs()[m]).max()) < 1e-6, (sc, k)


def test_alpha_draws_fall_back_to_float64_where_float32_flushes_the_drift():
    """The compensation draws run in float32, except where a device's drift factor
    would fall below float32's range (drift_scale=1000 after 10⁸ s: every read
    conductance flushed to 0 and α read as 1): there they are float64, the same numbers
    as asking for float64. At aihwkit's scales the float32 statistics agree with float64
    draws of the same model within their sampling error (4 s.e. of E α over 64 draws)."""
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.2
    extreme = PCMLike(t=1e8, drift_scale=1e3)
    assert extreme._alpha_sampled(w, 4) == extreme._alpha_sampled(w, 4, (), torch.float64)
    assert extreme._alpha_sampled(w, 4)[0][2] > 1e10
    nz = PCMLike(t=3.15e7)
    (_, _, m32, v32), = nz._alpha_sampled(w, 4)
    (_, _, m64, v64), = nz._alpha_sampled(w, 4, (), torch.float64)
    k = min(16 * hw.ALPHA_DRAWS, max(hw.ALPHA_DRAWS, hw.ALPHA_SAMPLE_ELEMENTS // w.numel()))
    assert abs(m32 - m64) < 4 * math.sqrt((v32 + v64) / k)
