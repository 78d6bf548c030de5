"""The linearised network as a Monte-Carlo control variate (monte_carlo(...,
control_variate=True)): unbiased, and much tighter intervals at small noise."""
import math

import numpy as np
import pytest
import torch

from noiseprop.theory import RelativeGaussian
from noiseprop.theory.linearize import LinearControlVariate, control_variate_mean
from predict_nets import held_out, trained


def test_control_variate_estimator_on_known_case():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal(400)
    ys = 2.0 + 3.0 * xs + 0.1 * rng.standard_normal(400)
    r = control_variate_mean(ys, xs, 0.0)
    assert abs(r.estimate - 2.0) < 4 * r.se
    assert r.se < 0.01 and r.variance_reduction > 100
    assert r.beta == pytest.approx(3.0, abs=0.05)
    lo, hi = r.ci
    assert lo < r.estimate < hi
    with pytest.raises(ValueError):
        control_variate_mean([1.0, 2.0], [1.0, 2.0], 0.0)


def test_expected_accuracy_of_linearised_network_matches_its_draws():
    """E[X_acc] from the orthant probabilities equals the mean over draws of the
    linearised network's accuracy (which is exactly Gaussian)."""
    model = trained("cnn")
    x, y = held_out(80)
    noise = RelativeGaussian(0.4)
    cv = LinearControlVariate(model, x, y, noise)
    g = torch.Generator().manual_seed(0)
    names = cv.lin.names
    vals = []
    for _ in range(200):
        zs = [torch.randn(cv.lin.target_params[n].shape, generator=g) for n in names]
        vals.append(cv.values(zs, 0.4))
    vals = np.array(vals)
    acc = vals[:, 0]
    assert abs(acc.mean() - cv.expected_accuracy(0.4)) < 4 * acc.std(ddof=1) / math.sqrt(len(acc))
    assert abs(vals[:, 1].mean()) < 4 * vals[:, 1].std(ddof=1) / math.sqrt(len(acc))  # gᵀδθ has mean 0


def test_monte_carlo_with_control_variate():
    from noiseprop.empirical import monte_carlo

    model = trained("mlp")
    x, y = held_out(150)
    noise = RelativeGaussian(0.05)
    r = monte_carlo(model, x, y, noise, draws=60, seed=1, control_variate=True)
    e = r.extras
    # the loss is dominated by its first-order part: a large variance reduction
    assert e["cv_loss_variance_reduction"] > 5
    assert e["cv_loss_se"] < r.loss_se / 2
    assert e["cv_accuracy_variance_reduction"] > 1.5
    # unbiased: the CV estimates agree with a long plain run within their errors
    ref = monte_carlo(model, x, y, noise, draws=400, seed=2)
    assert abs(e["cv_loss"] - ref.loss) < 4 * math.hypot(e["cv_loss_se"], ref.loss_se)
    assert abs(e["cv_accuracy"] - ref.accuracy) < 4 * math.hypot(e["cv_accuracy_se"], ref.accuracy_se)
    # the plain estimates are untouched
    plain = monte_carlo(model, x, y, noise, draws=60, seed=1)
    assert np.array_equal(plain.accuracies, r.accuracies)
    assert "cv_accuracy" in r.summary()
