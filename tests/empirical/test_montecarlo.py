import copy
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from noiseprop.empirical import monte_carlo, sweep
from noiseprop.theory import AdditiveGaussian, RelativeGaussian, parse_noise
from noiseprop.theory.targets import resolve_targets


def _data(n=120, d=8, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


def _mlp(d=8, h=16, c=4, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, c)).eval()


def test_linear_layer_logit_moments_exact():
    """y = (W + σN) x: E[y] = W x and Var(y_c) = σ²‖x‖² exactly (docs/THEORY.md §2)."""
    x, y = _data()
    lin = nn.Linear(8, 4, bias=False)
    sigma, n = 0.05, 400
    r = monte_carlo(lin, x, y, AdditiveGaussian(sigma), draws=n, seed=1)
    truth = (sigma**2 * (x.double() ** 2).sum(1, keepdim=True)).expand(-1, 4)
    # pooled ratio over N*C cells; per cell (n-1) s²/σ² ~ χ²_{n-1}: s.e. of the mean ratio
    ratio = (r.logit_var / truth).mean().item()
    se = math.sqrt(2 / (n - 1)) / math.sqrt(truth.numel())
    assert abs(ratio - 1) < 5 * se
    # means: within 5 s.e. (per cell sd/sqrt(n)) everywhere
    z = (r.logit_mean - r.clean_logits) / (truth / n).sqrt()
    assert z.abs().max() < 5
    assert r.clean_logits.shape == (120, 4) and r.logit_mean.dtype == torch.float64


def test_same_seed_same_result_and_no_global_rng():
    x, y = _data()
    m = _mlp()
    state = torch.get_rng_state()
    a = monte_carlo(m, x, y, "relative:0.3", draws=10, seed=5)
    b = monte_carlo(m, x, y, "relative:0.3", draws=10, seed=5)
    c = monte_carlo(m, x, y, "relative:0.3", draws=10, seed=6)
    assert torch.equal(state, torch.get_rng_state())
    assert np.array_equal(a.accuracies, b.accuracies) and torch.equal(a.logit_var, b.logit_var)
    assert not np.array_equal(a.losses, c.losses)


def test_batch_size_does_not_change_results():
    x, y = _data()
    m = _mlp()
    a = monte_carlo(m, x, y, "relative:0.3", draws=5, seed=0, batch_size=None)
    b = monte_carlo(m, x, y, "relative:0.3", draws=5, seed=0, batch_size=7)
    assert np.allclose(a.losses, b.losses, atol=1e-6)
    assert torch.allclose(a.logit_mean, b.logit_mean, atol=1e-5)


def test_matches_naive_deepcopy_loop():
    """The engine equals the naive study loop (deep copy per draw, noise.sample on each weight)."""
    x, y = _data()
    m = _mlp()
    noise = RelativeGaussian(0.4)
    r = monte_carlo(m, x, y, noise, draws=6, seed=3)
    g = torch.Generator().manual_seed(3)
    names = resolve_targets(m).names
    accs = []
    for _ in range(6):
        net = copy.deepcopy(m)
        p = dict(net.named_parameters())
        with torch.no_grad():
            for n in names:
                p[n].copy_(noise.sample(p[n], g))
            accs.append((net(x).argmax(1) == y).float().mean().item())
    assert np.allclose(r.accuracies, accs)


def test_sweep_common_random_numbers():
    x, y = _data()
    m = _mlp()
    s = sweep(m, x, y, "relative", [0.0, 0.2, 0.6], draws=8, seed=2)
    assert np.all(s.accuracies[0] == s.clean_accuracy) and np.allclose(s.losses[0], s.clean_loss)
    for i, lv in enumerate([0.2, 0.6]):
        r = monte_carlo(m, x, y, RelativeGaussian(lv), draws=8, seed=2)
        assert np.allclose(r.losses, s.losses[i + 1])  # draw d: the same z at every level
    f = s.to_frame()
    assert list(f.level) == [0.0, 0.2, 0.6] and (f.accuracy_ci_low <= f.accuracy).all()
    assert "common random numbers" in s.summary()


class _Faulty(nn.Module):
    """Raises on its k-th forward call: a fault in the middle of a run."""

    def __init__(self, k):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.calls = [0]
        self.k = k

    def forward(self, x):
        self.calls[0] += 1
        if self.calls[0] == self.k:
            raise RuntimeError("injected fault")
        return self.lin(x)


def test_model_never_mutated_even_on_fault():
    x, y = _data()
    m = _Faulty(k=4).train()
    before = copy.deepcopy(m.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="injected fault"):
            monte_carlo(m, x, y, "relative:0.5", draws=10, seed=0)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert m.training and all(p.requires_grad for p in m.parameters())


def test_train_mode_warns_and_evaluates_in_eval_mode():
    x, y = _data()
    m = _mlp().train()
    with pytest.warns(UserWarning, match="training mode"):
        r = monte_carlo(m, x, y, "relative:0.1", draws=3, seed=0)
    assert m.training
    m.eval()
    r2 = monte_carlo(m, x, y, "relative:0.1", draws=3, seed=0)
    assert np.array_equal(r.accuracies, r2.accuracies)


def test_bad_inputs_are_named():
    x, y = _data()
    m = _mlp()
    with pytest.raises(ValueError, match="same length"):
        monte_carlo(m, x[:10], y, "relative:0.1", draws=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        monte_carlo(m, x, y + 1, "relative:0.1", draws=3)
    with pytest.raises(TypeError, match="integer class labels"):
        monte_carlo(m, x, y.float(), "relative:0.1", draws=3)
    with pytest.raises(ValueError, match="unknown noise"):
        monte_carlo(m, x, y, "gauss:0.1", draws=3)
    with pytest.raises(ValueError, match=">= 0"):
        monte_carlo(m, x, y, RelativeGaussian(0.1).with_level(-1.0) if False else "relative:-0.1", draws=3)
    with pytest.raises(ValueError, match="draws must be an integer >= 2"):
        monte_carlo(m, x, y, "relative:0.1", draws=0)
    with pytest.raises(ValueError, match="no parameters to perturb"):
        monte_carlo(nn.Sequential(nn.Flatten()), x, y, "relative:0.1", draws=3)
    bad = _mlp()
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'0.weight' contains NaN"):
        monte_carlo(bad, x, y, "relative:0.1", draws=3)
    with pytest.raises(ValueError, match="levels is empty"):
        sweep(m, x, y, "relative", [], draws=3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        sweep(m, x, y, "relative", [0.1, float("nan")], draws=3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        sweep(m, x, y, "relative", [-0.1], draws=3)


@pytest.mark.slow
def test_confidence_intervals_cover(full_size):
    """accuracy_ci and loss_ci cover the truth in 93-97% of >= 1000 repeated cheap runs.

    Truth: the same estimators with 100x the draws of one run in total across an
    independent seed range (its s.e. is ~1/100 of a run's half-width).
    """
    x, y = _data(n=60, d=8, c=3, seed=4)
    m = _mlp(c=3, seed=1)
    noise = parse_noise("relative:0.6")
    reps, draws = 1000, 20
    truth = monte_carlo(m, x, y, noise, draws=reps * draws * (4 if full_size else 2), seed=10**6)
    hit_acc = hit_loss = 0
    for rep in range(reps):
        r = monte_carlo(m, x, y, noise, draws=draws, seed=rep, batch_size=None)
        lo, hi = r.accuracy_ci
        hit_acc += lo <= truth.accuracy <= hi
        lo, hi = r.loss_ci
        hit_loss += lo <= truth.loss <= hi
    assert 0.93 <= hit_acc / reps <= 0.97, hit_acc / reps
    assert 0.93 <= hit_loss / reps <= 0.97, hit_loss / reps


def test_cnn_with_digital_batchnorm_matches_naive_loop():
    """BatchNorm kept digital is folded after the noise inside the engine: the results
    equal the naive loop (noise on W, BatchNorm applied after) to float rounding, for
    weights and for weights + biases."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 16, 3))
    with torch.no_grad():
        m[1].running_mean.copy_(torch.randn(6, generator=g))
        m[1].running_var.copy_(torch.rand(6, generator=g) * 4 + 0.1)
        m[1].weight.copy_(torch.randn(6, generator=g))
    m.eval()
    x = torch.randn(50, 2, 8, 8, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    noise = RelativeGaussian(0.3)
    for targets in ("weights", "weights,biases"):
        r = monte_carlo(m, x, y, noise, draws=5, seed=1, targets=targets)
        names = resolve_targets(m, targets).names
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(5):
            net = copy.deepcopy(m)
            p = dict(net.named_parameters())
            with torch.no_grad():
                for n in names:
                    p[n].copy_(noise.sample(p[n], gen))
                losses.append(torch.nn.functional.cross_entropy(net(x).double(), y).item())
        assert np.allclose(r.losses, losses, rtol=1e-5, atol=1e-6), targets
