"""Topic ``hardware``: the closed forms agree with the implementation, and the
compensation scalar's delta method agrees with a simulation of a ratio of means."""
import math

import numpy as np
import torch

from noiseprop.theory.hardware import folded_normal_laplace, rectified_normal_moments
from noiseprop.theory.symbolic import derive, get_derivation


def test_device_moments_match_implementation():
    d = get_derivation("hardware.device_moments")
    assert len(d.checks) == 3 and d.topic == "hardware"
    m1 = d.numeric("rectified_mean")
    m2 = d.numeric("rectified_second")
    lap = d.numeric("drift_factor_mean")
    for a, s in [(0.0, 0.26348), (3.0, 1.2), (-0.5, 0.4)]:
        e1, e2 = rectified_normal_moments(torch.tensor(a, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
        assert abs(float(e1) - m1(a=a, s=s)) < 1e-12 * (1 + abs(float(e1)))
        assert abs(float(e2) - m2(a=a, s=s)) < 1e-12 * (1 + abs(float(e2)))
    for lam, mu, sig in [(0.5, 0.1, 0.045), (16.5, 0.049, 0.008), (3.0, 0.06, 0.02)]:
        assert abs(float(folded_normal_laplace(lam, mu, sig)) - lap(lam=lam, mu=mu, sigma=sig)) < 1e-12


def test_compensation_delta_method_against_simulation():
    """A, B: means of n independent element pairs (|X_i|, |Y_i|) with correlated X, Y;
    E[A/B] and Var[A/B] from the derivation against 4000 simulated layers (4 s.e.)."""
    d = get_derivation("hardware.compensation")
    rng = np.random.default_rng(0)
    n, reps = 64, 4000
    mx, my, sx, sy, rho = 1.0, 0.6, 0.5, 0.4, 0.7
    cov = [[sx**2, rho * sx * sy], [rho * sx * sy, sy**2]]
    xy = np.abs(rng.multivariate_normal([mx, my], cov, size=(reps, n)))
    A, B = xy[..., 0].mean(1), xy[..., 1].mean(1)
    # population moments of A and B from a large independent sample of elements
    big = np.abs(rng.multivariate_normal([mx, my], cov, size=2_000_000))
    a_bar, b_bar = big[:, 0].mean(), big[:, 1].mean()
    va, vb = big[:, 0].var() / n, big[:, 1].var() / n
    cab = np.cov(big[:, 0], big[:, 1])[0, 1] / n
    mean = d.numeric("alpha_mean")(Abar=a_bar, Bbar=b_bar, V_B=vb, C_AB=cab)
    var = d.numeric("alpha_var")(Abar=a_bar, Bbar=b_bar, V_A=va, V_B=vb, C_AB=cab)
    ratio = A / B
    se = ratio.std(ddof=1) / math.sqrt(reps)
    assert abs(ratio.mean() - mean) < 4 * se
    se_v = ratio.var(ddof=1) * math.sqrt(2 / (reps - 1))
    assert abs(ratio.var(ddof=1) - var) < 4 * se_v + 0.05 * var  # first order: O(1/n) relative remainder
    assert len(derive("hardware")) == 2
