"""predict(method="moments"): cases where moment propagation is exact (checked against
Monte-Carlo to its standard error), agreement with Monte-Carlo on trained nets across
noise levels, its first-order limit, and the supported-layer errors."""
import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from noiseprop.theory import RelativeGaussian, Targets, predict
from noiseprop.theory.linearize import LinearizedNetwork
from noiseprop.theory.moments import MomentPropagator
from predict_nets import held_out, mc_logits, trained


def _quiet(**kw):
    return dict(accuracy_draws=0, loss_probes=0, **kw)


def _check_mean_var(pred, L, k=4.5):
    """Every logit's predicted mean within ``k`` Monte-Carlo standard errors of the
    Monte-Carlo mean, and the pooled variance ratio within ``k`` s.e. (``√(2/(n−1))``
    for a variance from ``n`` draws; cells are pooled, so this is conservative)."""
    n = L.shape[0]
    m, v = L.mean(0), L.var(0)
    z = (pred.logit_mean - m) / (v / n).sqrt()
    assert z.abs().max() < k + 1.5, float(z.abs().max())  # max over cells: allow the extreme of N·C normals
    ratio = float(pred.logit_var.sum() / v.sum())
    assert abs(ratio - 1) < k * math.sqrt(2 / (n - 1)), ratio


def test_exact_for_one_noisy_layer_before_relu():
    """Noise on the first Linear only: its outputs are independent Gaussians, so the ReLU
    moments and hence the logit mean and covariance are exact, at any noise level."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(20, dtype=torch.int64)
    noise = RelativeGaussian(1.0)
    targets = Targets(layers=("0",))
    L = mc_logits(model, x, noise, 4000, seed=2, names=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = predict(model, x, y, noise, targets=targets, method="moments", cov=True, **_quiet())
        q = predict(model, x, y, noise, targets=targets, **_quiet())
    _check_mean_var(p, L)
    # the linear method has no mean shift and the wrong variance here
    shift = (L.mean(0) - p.clean_logits).abs().mean()
    assert float(p.logit_mean_shift.abs().mean()) == pytest.approx(float(shift), rel=0.1)
    assert abs(float(q.logit_var.sum() / L.var(0).sum()) - 1) > 0.1


class _Res(nn.Module):
    """``h = fc1(x)``; ``fc2(relu h) + h``, or with ``head``: ``fc3(relu(relu h + fc2 h))``."""

    def __init__(self, head: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(6, 6)
        self.head = head
        if head:
            self.relu2 = nn.ReLU()
            self.fc3 = nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        if self.head:
            return self.fc3(self.relu2(self.relu(h) + self.fc2(h)))
        return self.fc2(self.relu(h)) + h


def test_exact_residual_correlation():
    """out = W2·relu(h) + h with h = (W1 + N) x: the skip and the branch are correlated
    (Cov(relu h, h) = Φ·Var h); exact in the shared-basis representation."""
    torch.manual_seed(3)
    model = _Res().eval()
    x = torch.randn(15, 4, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(15, dtype=torch.int64)
    noise = RelativeGaussian(0.8)
    targets = Targets(layers=("fc1",))
    L = mc_logits(model, x, noise, 4000, seed=5, names=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = predict(model, x, y, noise, targets=targets, method="moments", **_quiet())
    _check_mean_var(p, L)


def test_skewness_of_a_rectified_residual_sum_matches_monte_carlo():
    """``s = relu(h) + W₂h`` with ``h = (W₁ + N)x`` (noise on fc1 only): ``h`` and the
    branch are exactly jointly Gaussian, so the third cumulant the pass gives the sum
    (the ReLU output's own plus the cross cumulants, ``rectified_cross_cumulants``), as
    the skewness the next ReLU's closure takes, is exact: against the sample third
    cumulant of 20 000 draws, each cell within 5 of its standard errors."""
    torch.manual_seed(3)
    model = _Res(head=True).eval()
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(4))
    noise = RelativeGaussian(0.8)
    targets = Targets(layers=("fc1",))
    lin = LinearizedNetwork(model, targets)
    res = MomentPropagator(lin, noise, dtype=torch.float64).run(x.double())
    rec = res.rec["relu2"]
    pred_k3 = rec["g1"] * rec["s"] ** 3
    # Monte-Carlo of the sum, from the same noise model
    g = torch.Generator().manual_seed(5)
    W, b = model.fc1.weight.detach().double(), model.fc1.bias.detach().double()
    D = 20000
    with torch.no_grad():
        Wn = W + noise.scale(model.fc1.weight).double() * torch.randn((D,) + W.shape, generator=g, dtype=torch.float64)
        h = torch.einsum("dij,nj->dni", Wn, x.double()) + b
        ssum = torch.relu(h) + h @ model.fc2.weight.detach().double().T + model.fc2.bias.detach().double()
    c = ssum - ssum.mean(0)
    k3_mc = (c ** 3).mean(0)
    se = (c ** 3).std(0) / math.sqrt(D)
    assert torch.allclose(rec["s"] ** 2, ssum.var(0), rtol=0.05)  # the variance is exact (4% is > 5 s.e.)
    ok = rec["g1"].abs() < 0.99  # the closure clips the skewness at ±1
    assert bool(ok.any()) and float(pred_k3[ok].abs().max()) > 5 * float(se.max())  # a skewness to detect
    z = ((pred_k3 - k3_mc) / se)[ok]
    assert float(z.abs().max()) < 5, float(z.abs().max())


def _bn_after_relu(seed: int = 3):
    """fc1 → ReLU → BatchNorm1d → fc2, three units of fc1 rarely positive (bias −1.5) and
    their BatchNorm's running variance 1e-3 (gain about 30): a unit that never fired in
    training, then amplified."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 12), relu=nn.ReLU(), bn=nn.BatchNorm1d(12),
                                      fc2=nn.Linear(12, 3))).eval()
    with torch.no_grad():
        model.fc1.bias[:3] = -1.5
        model.bn.running_mean.uniform_(0.0, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.running_var[:3] = 1e-3
    return model


def test_tail_kurtosis_matches_monte_carlo_for_independent_rectified_inputs():
    """The tail diagnostic ``κ₄(y_i) = Σ_j W_ij⁴ κ₄(x_j)`` (``relu_k4`` through the
    BatchNorm's affine map) is exact where the inputs are independent: noise on fc1
    only makes its outputs independent Gaussians given the input, so fc2's outputs are
    sums of independent rectified Gaussians. The pooled excess kurtosis ``Σ κ₄ / Σ Var²``
    of fc2's outputs against 40 000 draws (the sample cumulants in 40 batches: within 4
    of their standard errors); large here, from the three amplified, rarely firing units."""
    model = _bn_after_relu()
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(4))
    noise = RelativeGaussian(0.8)
    lin = LinearizedNetwork(model, Targets(layers=("fc1",)))
    res = MomentPropagator(lin, noise, dtype=torch.float64).run(x.double())
    k4, v2 = res.stats["tail"]["fc2"]
    g = torch.Generator().manual_seed(5)
    W, b = model.fc1.weight.detach().double(), model.fc1.bias.detach().double()
    sd = noise.scale(model.fc1.weight).double()
    ratios = []
    with torch.no_grad():
        for _ in range(40):
            Wn = W + sd * torch.randn((1000,) + W.shape, generator=g, dtype=torch.float64)
            h = torch.relu(torch.einsum("dij,nj->dni", Wn, x.double()) + b)
            out = model.fc2.double()(model.bn.double()(h.reshape(-1, 12))).reshape(1000, 10, 3)
            c = out - out.mean(0)
            m2, m4 = (c ** 2).mean(0), (c ** 4).mean(0)
            ratios.append(float((m4 - 3 * m2 ** 2).sum() / (m2 ** 2).sum()))
    r = np.asarray(ratios)
    se = r.std(ddof=1) / math.sqrt(r.size)
    assert k4 / v2 > 1.0, k4 / v2  # heavy-tailed: the diagnostic's limit
    assert abs(k4 / v2 - r.mean()) < 4 * se, (k4 / v2, r.mean(), se)


def _digits_mlp(bn_after: bool, width: int = 32):
    """Linear-ReLU-BatchNorm (``bn_after``) or Linear-BatchNorm-ReLU, twice, then the
    classifier, trained on digits (20 epochs): after the ReLU some BatchNorm units never
    fire in training (running variance about 0)."""
    from noiseprop.empirical import train

    torch.manual_seed(0)
    layers, d = [], 64
    for i in (1, 2):
        pair = [(f"relu{i}", nn.ReLU()), (f"bn{i}", nn.BatchNorm1d(width))]
        layers += [(f"fc{i}", nn.Linear(d, width))] + (pair if bn_after else pair[::-1])
        d = width
    net = nn.Sequential(OrderedDict([("flatten", nn.Flatten())] + layers + [("fc", nn.Linear(d, 10))]))
    return train(net, "digits", seed=0, cache=False, lr=0.05, epochs=20, batch_size=64, progress=False).model.eval()


@pytest.mark.slow
def test_tail_warning_where_batchnorm_after_relu_amplifies_dead_units():
    """On an MLP with BatchNorm after the ReLU, trained on digits, the moment method's
    Gaussian closure is far too pessimistic at large noise (units that never fired in
    training, amplified by their BatchNorm, fire rarely under noise: heavy tails): more
    than 1 point and 3 s.e. below Monte-Carlo at η = 0.6, and the tail rule flags it
    (``tail_kurtosis`` above ``TAIL_WARN_KURTOSIS``, at fc2). The same MLP with BatchNorm
    before the ReLU: within 1 point or the CI, no layer for the diagnostic (NaN), no warning."""
    from noiseprop.empirical import load_dataset, monte_carlo
    from noiseprop.theory.predict import TAIL_WARN_KURTOSIS

    data = load_dataset("digits")
    x, y = data.x_test, data.y_test
    for bn_after in (True, False):
        net = _digits_mlp(bn_after)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = predict(net, x, y, "relative:0.6", method="moments", **_quiet())
        mc = monte_carlo(net, x, y, "relative:0.6", draws=200, seed=0)
        lo, hi = mc.accuracy_ci
        d = p.accuracy - mc.accuracy
        if bn_after:
            assert d < -0.01 and d < -3 * mc.accuracy_se, (p.accuracy, mc.accuracy, mc.accuracy_se)
            assert p.diagnostics["tail_kurtosis"] > TAIL_WARN_KURTOSIS and p.diagnostics["tail_kurtosis_layer"] == "fc2"
            assert any("excess kurtosis" in w and "'fc2'" in w for w in p.warnings), p.warnings
        else:
            assert abs(d) <= 0.01 or lo <= p.accuracy <= hi, (p.accuracy, mc.accuracy)
            # no affine map after a ReLU: no layer for the diagnostic
            assert math.isnan(p.diagnostics["tail_kurtosis"]) and p.diagnostics["tail_kurtosis_layer"] is None
            assert not p.warnings


def test_skewness_of_a_max_pooled_window_matches_monte_carlo():
    """A (1×2) convolution, a (1×2) max-pool, then a ReLU (noise on the convolution
    only): the pool's two inputs are exactly jointly Gaussian, so the third cumulant the
    pass gives their maximum (``max_k3``), as the skewness the ReLU's closure takes, is
    exact: against the sample third cumulant of 20 000 draws, each unit within 5 of its
    standard errors."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 3, (1, 2)), nn.MaxPool2d((1, 2)), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3, 2)).eval()
    x = torch.randn(12, 1, 1, 3, generator=torch.Generator().manual_seed(7))
    noise = RelativeGaussian(1.0)
    lin = LinearizedNetwork(model, Targets(layers=("0",)))
    res = MomentPropagator(lin, noise, dtype=torch.float64).run(x.double())
    rec = next(r for r in res.rec.values() if r.get("kind") == "relu")
    pred_k3 = rec["g1"] * rec["s"] ** 3
    conv = model[0]
    W, b = conv.weight.detach().double(), conv.bias.detach().double()
    D = 20000
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        Wn = W + noise.scale(conv.weight).double() * torch.randn((D,) + W.shape, generator=g, dtype=torch.float64)
        pre = torch.stack([F.conv2d(x.double(), w, b) for w in Wn])  # [D, N, 3, 1, 2]
        mx = pre.amax(-1, keepdim=True)
    c = mx - mx.mean(0)
    k3_mc, se = (c ** 3).mean(0), (c ** 3).std(0) / math.sqrt(D)
    assert torch.allclose(rec["s"] ** 2, mx.var(0), rtol=0.05)  # Clark's variance is exact
    ok = rec["g1"].abs() < 0.99
    assert bool(ok.any()) and float(pred_k3[ok].abs().max()) > 5 * float(se.max())
    z = ((pred_k3 - k3_mc) / se)[ok]
    assert float(z.abs().max()) < 5, float(z.abs().max())


def test_exact_max_of_two_correlated_units():
    """A (1×2) convolution then a (1×2) max-pool: per channel the max of two correlated
    Gaussians (one kernel shared by both positions), Clark's formulas exactly."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 3, (1, 2)), nn.MaxPool2d((1, 2)), nn.Flatten(), nn.Linear(3, 2)).eval()
    x = torch.randn(12, 1, 1, 3, generator=torch.Generator().manual_seed(7))
    y = torch.zeros(12, dtype=torch.int64)
    noise = RelativeGaussian(1.0)
    targets = Targets(layers=("0",))
    L = mc_logits(model, x, noise, 4000, seed=8, names=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = predict(model, x, y, noise, targets=targets, method="moments", **_quiet())
    _check_mean_var(p, L)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
def test_accuracy_curve_matches_monte_carlo(kind, full_size):
    """Along the curve, the moment prediction is within 1 point of Monte-Carlo accuracy
    (the target) plus 3 Monte-Carlo standard errors; the first order is not."""
    model = trained(kind)
    x, y = held_out(300 if full_size else 120)
    draws = 300 if full_size else 120
    worst_lin = 0.0
    for eta in {"mlp": (0.3, 0.8), "cnn": (0.3, 0.6), "resnet": (0.15, 0.3)}[kind]:
        noise = RelativeGaussian(eta)
        L = mc_logits(model, x, noise, draws, seed=11)
        accs = (L.argmax(2) == y).double().mean(1)
        mc, se = float(accs.mean()), float(accs.std() / math.sqrt(draws))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = predict(model, x, y, noise, method="moments", **_quiet())
            q = predict(model, x, y, noise, **_quiet())
        assert abs(p.accuracy - mc) < 0.01 + 3 * se, (eta, p.accuracy, mc, se)
        worst_lin = max(worst_lin, abs(q.accuracy - mc) - 3 * se)
    assert worst_lin > 0.01  # the test is informative: the first order misses here


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_mean_shift_and_variance_at_eta_01(kind):
    """At η = 0.1 the predicted logit variance (pooled) and the mean shift are within 10%
    of Monte-Carlo, beyond its own error (4 s.e.)."""
    model = trained(kind)
    x, y = held_out(100)
    draws = 600
    L = mc_logits(model, x, RelativeGaussian(0.1), draws, seed=12)
    p = predict(model, x, y, "relative:0.1", method="moments", **_quiet())
    ratio = float(p.logit_var.sum() / L.var(0).sum())
    assert abs(ratio - 1) < 0.10 + 4 * math.sqrt(2 / (draws - 1)) / math.sqrt(10), ratio
    shift_mc = L.mean(0) - p.clean_logits
    # projection of the predicted shift on the observed one, and the observed shift's noise
    noise_mc = float((L.var(0) / draws).sum())
    proj = float((p.logit_mean_shift * shift_mc).sum() / (shift_mc ** 2).sum())
    rel_noise = math.sqrt(noise_mc / float((shift_mc ** 2).sum()))
    assert abs(proj - 1) < 0.10 + 4 * rel_noise, (proj, rel_noise)


def test_small_noise_limit_is_the_linear_method():
    """As η → 0 the surrogate is the network itself: the covariance tends to the first
    order one (the difference is O(η) relative) and the mean shift vanishes."""
    model = trained("resnet")
    x, y = held_out(20)
    errs = []
    for eta in (5e-4, 5e-5):
        p = predict(model, x, y, RelativeGaussian(eta), method="moments", cov=True, **_quiet())
        q = predict(model, x, y, RelativeGaussian(eta), cov=True, **_quiet())
        errs.append(float((p.logit_cov - q.logit_cov).norm() / q.logit_cov.norm()))
        assert float(p.logit_var.sum() / q.logit_var.sum()) == pytest.approx(1, abs=5e-3)
        assert float(p.logit_mean_shift.abs().max()) < 0.1 * float(q.logit_var.sqrt().mean())
    # the difference shrinks with η (to a small floor from the sketched moment pass)
    assert errs[0] < 0.03 and errs[1] < 0.6 * errs[0] and errs[1] < 0.01


@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_first_order_propagation_reproduces_jacobian_covariance(kind):
    """The low-rank-plus-diagonal pass itself, with first-order rules and no truncation,
    carries exactly the first-order covariance through conv, BatchNorm, pooling and
    residual additions."""
    model = trained(kind)
    x, y = held_out(4)
    noise = RelativeGaussian(0.1)
    lin = LinearizedNetwork(model)
    prop = MomentPropagator(lin, noise, rank=100000, spatial_rank=64, first_order=True, dtype=torch.float64)
    with torch.no_grad():
        mean, cov, _ = prop.run(x)
    q = predict(model, x, y, noise, cov=True, **_quiet())
    assert torch.allclose(cov, q.logit_cov, rtol=1e-4, atol=1e-6 * float(q.logit_cov.abs().max()))
    assert torch.allclose(mean, q.clean_logits, atol=1e-4)


def test_unsupported_layers_are_named():
    x, y = held_out(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.Linear(8, 10)).eval()
    with pytest.raises(ValueError, match=r"layer '2' \(LayerNorm\).*method='linear'"):
        predict(model, x, y, "relative:0.1", method="moments", **_quiet())

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            h = self.embed(x.reshape(x.shape[0], 8, 8))
            return self.fc(self.attn(h, h, h)[0].mean(1))

    with pytest.raises(ValueError, match=r"layer 'attn' \(MultiheadAttention\).*method='linear'"):
        predict(Attn().eval(), x, y, "relative:0.1", method="moments", **_quiet())
    # the linear method handles it
    assert predict(model, x, y, "relative:0.1", **_quiet()).logit_var.shape == (5, 10)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            h = self.fc(x.flatten(1))
            if h.sum() > 0:  # data-dependent control flow: not traceable
                return h
            return -h

    with pytest.raises(ValueError, match="torch.fx.*method='linear'"):
        predict(Branchy().eval(), x, y, "relative:0.1", method="moments", **_quiet())
    with pytest.raises(ValueError, match="Linear/Conv2d weights and biases only"):
        predict(trained("cnn"), x, y, "relative:0.1", targets="weights,norm", method="moments", **_quiet())


def test_moments_sweep_and_diagnostics():
    from noiseprop.theory import predict_sweep

    model = trained("mlp")
    x, y = held_out(30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = predict_sweep(model, x, y, "relative", [0.1, 0.5], method="moments", accuracy_draws=8, loss_probes=0)
    a, b = c.predictions
    assert a.method == "moments" and a.diagnostics["preact_source"].startswith("moment")
    assert b.diagnostics["preact_frac"] > a.diagnostics["preact_frac"]
    assert np.all(np.diff(c.accuracy) < 0)
    assert np.isfinite(b.accuracy_std) and b.accuracy_std > 0


def test_mean_only_is_the_moment_pass_mean_without_the_surrogate():
    from noiseprop.theory.moments import propagate_moments

    model = trained("cnn")
    x, _ = held_out(40)
    noise = RelativeGaussian(0.3)
    lin = LinearizedNetwork(model)
    full = propagate_moments(lin, x, noise, chunk_size=16, propagator=MomentPropagator(lin, noise))
    mean = propagate_moments(lin, x, noise, chunk_size=16, propagator=MomentPropagator(lin, noise), mean_only=True)
    assert mean.cov is None and full.cov is not None
    torch.testing.assert_close(mean.mean, full.mean, rtol=0, atol=0)
    assert (mean.preact_frac, mean.compression_loss) == (full.preact_frac, full.compression_loss)
    with pytest.raises(TypeError, match="mean_only must be True or False"):
        propagate_moments(lin, x, noise, mean_only="no")


def test_moment_chunk_size_follows_one_input_and_the_budget():
    """The refinement's chunk (:func:`moment_chunk_size`): inversely proportional to the
    budget, capped, never below the default chunk; and the mean does not depend on the
    chunking (checked where the pass is exact in unit space: the MLP narrower than the
    rank)."""
    from noiseprop.theory.moments import propagate_moments
    from noiseprop.theory.moments.surrogate import DEFAULT_MOMENT_CHUNK, moment_chunk_size

    model = trained("cnn")
    x, _ = held_out(24)
    noise = RelativeGaussian(0.3)
    lin = LinearizedNetwork(model)
    prop = MomentPropagator(lin, noise)
    one = moment_chunk_size(lin, x, prop, budget=2**40, cap=10**9)
    per = 2**40 // one
    assert moment_chunk_size(lin, x, prop, budget=50 * per) == 50
    assert moment_chunk_size(lin, x, prop, budget=per // 3) == DEFAULT_MOMENT_CHUNK == 32
    assert moment_chunk_size(lin, x, prop, budget=2**40) == 128
    wider = MomentPropagator(lin, noise, rank=4 * prop.rank)  # more columns per input: a smaller chunk
    assert moment_chunk_size(lin, x, wider, budget=100 * per) < 100
    mlp = trained("mlp")
    lm = LinearizedNetwork(mlp)
    pm = MomentPropagator(lm, noise, rank=256)
    a = propagate_moments(lm, x.flatten(1), noise, chunk_size=5, propagator=pm, mean_only=True).mean
    b = propagate_moments(lm, x.flatten(1), noise, chunk_size=24, propagator=pm, mean_only=True).mean
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _tapped_pass(model, x, noise, dtype=torch.float64):
    """The moment pass with mean taps after every noisy layer (float64), its mean and the
    per-class signals ∂mean/∂(layer output mean)."""
    from noiseprop.theory.linearize import backprop_signals
    from noiseprop.theory.moments.rules import _MomentPass

    prop = MomentPropagator(LinearizedNetwork(model), noise, dtype=dtype)
    ps = _MomentPass(prop, tap=True)
    with torch.enable_grad():
        mu = ps.result(x).mean
        deltas = backprop_signals(mu, [t.e for _, t in ps.taps])
    return prop, mu.detach(), ps.taps, [d.detach() for d in deltas]


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_differentiated_moment_pass_keeps_its_values(kind):
    """With mean taps and gradients recorded, the moment pass computes the same mean and
    covariance as without (the differentiable branches change derivatives only; the
    differentiated patch Gram matrix, :func:`~noiseprop.theory.moments.lowrank.patch_gram`,
    sums the same products in another order: float32 rounding, measured 1.6e-7 (mean) and
    7.3e-7 (covariance) of the largest entry on the residual net, asserted ≤ 1e-5,
    about a hundred float32 epsilons; bit-identical on the MLP)."""
    from noiseprop.theory.moments.rules import _MomentPass

    x, _ = held_out(24)
    prop = MomentPropagator(LinearizedNetwork(trained(kind)), RelativeGaussian(0.4))
    with torch.no_grad():
        a = _MomentPass(prop).result(x)
    with torch.enable_grad():
        b = _MomentPass(prop, tap=True).result(x.clone().requires_grad_(True))
    if kind == "mlp":
        assert torch.equal(a.mean, b.mean.detach()) and torch.equal(a.cov, b.cov.detach())
    else:
        for u, v in ((a.mean, b.mean.detach()), (a.cov, b.cov.detach())):
            err = float((u - v).abs().max() / u.abs().max())
            assert err <= 1e-5, err


def test_moment_mean_derivatives_match_finite_differences():
    """∂(propagated logit mean)/∂(a noisy layer's output mean), by autograd through the
    moment pass, against central differences of the pass (float64; noise variances
    fixed) for a shift of that layer's output: the MLP through each Linear bias, the
    residual net through the BatchNorm shift after each convolution (a shift c of
    BatchNorm's output is a shift c/a of the convolution's) and the output layer's bias.

    The pass is smooth (central differences at steps h and h/2 agree to 1e-4 of the
    signal; before the batch-independent random features and eigenvector signs they
    jumped by ~1 at some layers). On the MLP (no eigen-solves) the derivative is exact:
    within 4× the step difference plus float64 rounding. On the residual net the
    derivative holds every eigenbasis fixed (``_eigen_factor``; the sketches and
    random features downstream depend on the columns' basis, whose rotation it leaves
    out): measured within 6.3% of the signal's largest entry at the stem and 1% at the
    last block's first convolution, exact (to the step difference) after it (its second
    convolution, its shortcut, the head); asserted within 10% where a spatial eigen-solve
    or a compression follows, exact elsewhere."""
    x, _ = held_out(12)
    noise = RelativeGaussian(0.4)
    gen = torch.Generator().manual_seed(0)
    for kind in ("mlp", "resnet"):
        model = trained(kind)
        prop, mu, taps, deltas = _tapped_pass(model, x, noise)
        errors = []
        for (node, t), dl in zip(taps, deltas):
            v = torch.randn(t.e.shape[1], generator=gen, dtype=torch.float64)
            if prop.weights[t.name][1] is not None:  # the layer's bias
                W, b = prop.weights[t.name]
                store, key, base, shift, scale = prop.weights, t.name, (W, b), (lambda h: (W, b + h * v)), v
            else:  # the BatchNorm right after the convolution
                bn = next(n.target for n in prop.graph.nodes
                          if n.op == "call_module" and n.args and getattr(n.args[0], "name", None) == node)
                a, c = prop.affines[bn]
                store, key, base, shift, scale = prop.affines, bn, (a, c), (lambda h: (a, c + h * v)), v / a.double()
            shape = (1, -1) + (1,) * (t.e.dim() - 2)
            pred = (dl * scale.reshape(shape).unsqueeze(0)).reshape(dl.shape[0], dl.shape[1], -1).sum(-1).T  # [B, C]

            def fd(h):
                store[key] = shift(h)
                up = _tapped_mean(prop, x)
                store[key] = shift(-h)
                dn = _tapped_mean(prop, x)
                store[key] = base
                return (up - dn) / (2 * h)

            g1, g2 = fd(1e-3), fd(5e-4)
            sig = float(pred.abs().max())
            assert sig > 1e-3  # a real signal
            step = float((g1 - g2).abs().max())
            assert step <= 1e-4 * sig, (kind, t.name, step, sig)  # smooth
            errors.append((t.name, float((g2 - pred).abs().max()), 4 * step + 1e-7 * sig, sig))
        if kind == "mlp":
            for name, err, tol, _ in errors:
                assert err <= tol, (name, err, tol)
        else:
            *inner, last, shortcut, head = errors  # the last block's second convolution, its shortcut, the head
            for name, err, tol, sig in inner:
                assert err <= 0.10 * sig, (name, err, sig)
            for name, err, tol, _ in (last, shortcut, head):
                assert err <= tol, (name, err, tol)
            assert len(errors) == 7


def test_mean_map_first_chaos_is_the_first_order_on_a_linear_network():
    """Without a nonlinearity the noisy network's expected output is the clean one (zero-
    mean noise, independent across layers: E[(W₂+N₂)((W₁+N₁)x + b₁) + b₂] = W₂(W₁x + b₁) +
    b₂), so the first chaos through the moment map, the derivative of that expectation, is
    the clean Jacobian, and its covariance is the first-order logit covariance: at the
    propagator's rank and at rank 1, in float64 (the default) and float32. A dtype other
    than those two is refused by name; a non-finite result raises."""
    from noiseprop.theory.moments.surrogate import mean_map_first_chaos

    g = torch.Generator().manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 5), nn.Flatten(), nn.Linear(5, 4)).double().eval()
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (9,), generator=g)
    noise = RelativeGaussian(0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fo = predict(net, x, y, noise, cov=True, accuracy_draws=0, loss_probes=0, diagnostic=False)
    lin = LinearizedNetwork(net)
    ref = fo.logit_cov.double()
    for rank, dtype, tol in ((None, torch.float64, 1e-10), (1, torch.float64, 1e-10), (1, torch.float32, 1e-5)):
        mean, cov = mean_map_first_chaos(lin, x, noise, rank=rank, dtype=dtype)
        assert torch.allclose(mean, net(x).detach(), rtol=0, atol=tol * float(net(x).abs().max()))
        assert torch.allclose(cov, ref, rtol=0, atol=tol * float(ref.abs().max())), (rank, dtype)
    with pytest.raises(ValueError, match="dtype"):
        mean_map_first_chaos(lin, x, noise, dtype=torch.float16)
    # a non-finite derivative (as float32 gave on a deep residual net) raises, naming the dtype
    import noiseprop.theory.moments.surrogate as sur

    orig = sur.weight_terms
    sur.weight_terms = lambda by, params, scale, cov, **kw: (orig(by, params, scale, cov, **kw), cov.fill_(math.nan))
    try:
        with pytest.raises(ValueError, match="not finite for 9 of inputs 0..8 .dtype torch.float32.; run it in float64"):
            mean_map_first_chaos(lin, x, noise, dtype=torch.float32)
    finally:
        sur.weight_terms = orig


def _tapped_mean(prop, x):
    from noiseprop.theory.moments.rules import _MomentPass

    with torch.no_grad():
        return _MomentPass(prop).result(x).mean


@pytest.mark.parametrize("kind", ["resnet", "cnn"])
def test_an_input_gets_the_same_moments_whatever_its_chunk(kind):
    """The moment pass's random features (the Rademacher columns of an input's
    independent part, the subspace iteration's start) are shared across the batch, its
    branches decided by structure, its factors computed per input with eigenvector signs
    fixed by a convention: an input's logit mean and covariance do not depend on the
    other inputs in its chunk (float rounding of batched products aside), a batch of one
    included."""
    from noiseprop.theory.moments import propagate_moments

    x, _ = held_out(40)
    lin = LinearizedNetwork(trained(kind))
    noise = RelativeGaussian(0.4)
    prop = MomentPropagator(lin, noise)
    a = propagate_moments(lin, x, noise, propagator=prop, chunk_size=40)
    b = propagate_moments(lin, x, noise, propagator=prop, chunk_size=7)
    c = propagate_moments(lin, x[13:14], noise, propagator=prop)
    scale = float(a.mean.abs().max())
    assert torch.allclose(a.mean, b.mean, rtol=0, atol=1e-5 * scale)
    assert torch.allclose(a.cov, b.cov, rtol=0, atol=1e-5 * float(a.cov.abs().max()))
    assert torch.allclose(a.mean[13:14], c.mean, rtol=0, atol=1e-5 * scale)


def _moments_of(act):
    """``(mean, var)`` of ``act(z)``, ``z ~ N(mu, var)``, by the closed form or the
    Gauss–Hermite moments the moment pass uses for it."""
    from noiseprop.theory.moments.gaussian import SMOOTH_ACTIVATIONS, elu_moments, leaky_relu_moments, relu_moments

    if isinstance(act, nn.ReLU):
        return lambda mu, var: relu_moments(mu, var)[:2]
    if isinstance(act, nn.LeakyReLU):
        return lambda mu, var: leaky_relu_moments(mu, var, act.negative_slope)[:2]
    if isinstance(act, nn.ELU):
        return lambda mu, var: elu_moments(mu, var, act.alpha)[:2]
    name = {nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Softplus: "softplus"}
    return _smooth(SMOOTH_ACTIVATIONS[name[type(act)]])


def _smooth(fn):
    """``(mean, var)`` of a smooth activation as the surrogate takes them: the mean by
    :data:`GH_NODES`-point Gauss–Hermite, the channel's variance by its own
    ``CHANNEL_GH_NODES`` points."""
    from noiseprop.theory.moments.gaussian import smooth_moments
    from noiseprop.theory.moments.surrogate import CHANNEL_GH_NODES

    return lambda mu, var: (smooth_moments(fn, mu, var)[0], smooth_moments(fn, mu, var, CHANNEL_GH_NODES)[1])


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1), nn.ELU(0.7), nn.GELU(), nn.SiLU(), nn.Tanh(),
                                 nn.Sigmoid(), nn.Softplus()], ids=lambda m: type(m).__name__)
def test_surrogate_variance_channel_is_the_derivative_of_the_diagonal_closure(act):
    """The surrogate's variance channel: with each activation's std set to the diagonal
    Gaussian closure's (as the moment pass gives it when every unit's noise is
    independent), the surrogate's derivatives of the logits with respect to every noisy
    layer's output mean equal autograd of that closure written out (float64): ``h₀ = W₀x
    + b₀ + e₀`` with variance ``σ₀²∘x²`` (+ bias), ``a₁ = E f(h₀)`` and its Gaussian
    variance (the ReLU's, LeakyReLU's and ELU's closed forms, Gauss–Hermite for the smooth
    ones), ``h₂ = W₂a₁ + b₂ + e₂`` with variance ``(W₂∘W₂)Var a₁ + σ₂²∘(a₁² + Var a₁)``
    (+ bias), and so on. Without the channel (the fixed-``s`` surrogate) the derivative
    with respect to ``e₀`` misses the path through ``s₂`` and differs."""
    from noiseprop.theory.moments.rules import activation_kind

    g = torch.Generator().manual_seed(6)
    net = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 5), act, nn.Linear(5, 3)).double().eval()
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    noise = RelativeGaussian(0.5)
    lin = LinearizedNetwork(net)
    prop = MomentPropagator(lin, noise, dtype=torch.float64)
    W = [lin.params[f"{k}.weight"] for k in ("0", "2", "4")]
    b = [lin.params[f"{k}.bias"] for k in ("0", "2", "4")]
    wv = [prop.noise_var[f"{k}.weight"] for k in ("0", "2", "4")]
    bv = [prop.noise_var.get(f"{k}.bias", 0.0) for k in ("0", "2", "4")]  # weights only by default: 0
    moments = _moments_of(act)

    def closure(e0, e2, e4):
        m, v, stds = x, torch.zeros_like(x), []
        for k, e in ((0, e0), (1, e2)):
            h = m @ W[k].T + b[k] + e
            vh = v @ (W[k] * W[k]).T + (m * m + v) @ wv[k].T + bv[k]
            stds.append(vh.sqrt())
            m, v = moments(h, vh)
        return m @ W[2].T + b[2] + e4, stds

    zeros = [torch.zeros(7, n, dtype=torch.float64) for n in (6, 5, 3)]
    _, stds = closure(*zeros)
    acts = [n.name for n in prop.graph.nodes if activation_kind(n, prop.modules) is not None]
    assert len(acts) == 2
    rec = {name: {"s": s.detach()} for name, s in zip(acts, stds)}
    _check_channel_derivatives(prop, rec, x, closure, zeros)


class _Mixed(nn.Module):
    """``torch.cat`` of two activations, a product with a number, a difference with
    ``alpha``, a constant subtracted, a view and a mean over units."""

    def __init__(self):
        super().__init__()
        self.l0, self.l2, self.l3, self.l4 = nn.Linear(4, 6), nn.Linear(12, 6), nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.l0(x)
        a = torch.cat([F.gelu(h), torch.sigmoid(h) * 2.0], dim=1)
        h2 = torch.sub(self.l2(a), h, alpha=0.5) - 0.5
        return self.l4(torch.tanh(self.l3(torch.relu(h2).view(-1, 3, 2).mean(2))))


def test_surrogate_variance_channel_through_cat_arithmetic_and_means():
    """The channel's rules beyond layers and activations, against the diagonal closure
    written out: ``torch.cat`` concatenates the variances, ``2·f`` scales by 4,
    ``torch.sub(a, b, alpha=0.5)`` gives ``v_a + v_b/4``, a constant subtracted keeps them, a mean over ``n`` units gives ``Σ v/n²`` (a tanh after it, so
    that the mean's variance moves a std). Without the channel the first two taps differ
    (each reaches a later activation's std)."""
    from noiseprop.theory.moments.gaussian import SMOOTH_ACTIVATIONS, relu_moments, smooth_moments
    from noiseprop.theory.moments.rules import activation_kind

    torch.manual_seed(2)
    net = _Mixed().double().eval()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lin = LinearizedNetwork(net)
    prop = MomentPropagator(lin, RelativeGaussian(0.5), dtype=torch.float64)
    W = [lin.params[f"{k}.weight"] for k in ("l0", "l2", "l3", "l4")]
    b = [lin.params[f"{k}.bias"] for k in ("l0", "l2", "l3", "l4")]
    wv = [prop.noise_var[f"{k}.weight"] for k in ("l0", "l2", "l3", "l4")]

    def closure(e0, e2, e3, e4):
        h = x @ W[0].T + b[0] + e0
        vh = (x * x) @ wv[0].T
        mg, vg = _smooth(SMOOTH_ACTIVATIONS["gelu"])(h, vh)
        ms, vs = _smooth(SMOOTH_ACTIVATIONS["sigmoid"])(h, vh)
        a, va = torch.cat([mg, 2 * ms], 1), torch.cat([vg, 4 * vs], 1)
        h2 = a @ W[1].T + b[1] + e2 - 0.5 * h - 0.5
        vh2 = va @ (W[1] * W[1]).T + (a * a + va) @ wv[1].T + 0.25 * vh
        m2, v2 = relu_moments(h2, vh2)[:2]
        a2, va2 = m2.view(-1, 3, 2).mean(2), v2.view(-1, 3, 2).sum(2) / 4
        h3 = a2 @ W[2].T + b[2] + e3
        vh3 = va2 @ (W[2] * W[2]).T + (a2 * a2 + va2) @ wv[2].T
        m3 = smooth_moments(SMOOTH_ACTIVATIONS["tanh"], h3, vh3)[0]
        return m3 @ W[3].T + b[3] + e4, [vh.sqrt(), vh.sqrt(), vh2.sqrt(), vh3.sqrt()]

    zeros = [torch.zeros(5, n, dtype=torch.float64) for n in (6, 6, 4, 3)]
    _, stds = closure(*zeros)
    acts = [n.name for n in prop.graph.nodes if activation_kind(n, prop.modules) is not None]
    assert len(acts) == 4
    rec = {name: {"s": s.detach()} for name, s in zip(acts, stds)}
    _check_channel_derivatives(prop, rec, x, closure, zeros, differ=(0, 1))


def test_surrogate_variance_channel_through_max_pooling():
    """The same through a max-pooling window: with Clark's ``θ = sd(a − b)`` of each
    pairwise step set to the diagonal closure's (``√(v_a + v_b)``, the window's units
    independent), the surrogate's derivatives equal autograd of the closure written out,
    the running maximum's variance Clark's (:func:`clark_max` with zero covariance);
    without the channel they differ at the layer before the pooling."""
    from noiseprop.theory.moments.gaussian import clark_max, relu_moments
    from noiseprop.theory.moments.rules import activation_kind, is_maxpool, window_slices

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.pool, self.fc1 = nn.Linear(4, 8), nn.MaxPool2d(2), nn.Linear(2, 3)

        def forward(self, x):
            h = torch.relu(self.fc0(x)).view(-1, 2, 2, 2)
            return self.fc1(torch.flatten(self.pool(h), 1))

    g = torch.Generator().manual_seed(7)
    net = Net().double().eval()
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    noise = RelativeGaussian(0.6)
    lin = LinearizedNetwork(net)
    prop = MomentPropagator(lin, noise, dtype=torch.float64)
    W0, b0, W1, b1 = (lin.params[k] for k in ("fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"))
    wv0, wv1 = prop.noise_var["fc0.weight"], prop.noise_var["fc1.weight"]

    def closure(e0, e1):
        h = x @ W0.T + b0 + e0
        vh = (x * x) @ wv0.T
        a, va = relu_moments(h, vh)[:2]
        a, va = a.view(-1, 2, 2, 2), va.view(-1, 2, 2, 2)
        cur = vcur = None
        thetas = []
        for sl in window_slices(2, 2, 2, 2):
            if cur is None:
                cur, vcur = a[sl], va[sl]
                continue
            thetas.append((vcur + va[sl]).sqrt())
            cur, vcur = clark_max(cur, a[sl], vcur, va[sl], torch.zeros_like(vcur))[:2]
        m = torch.flatten(cur, 1)
        return m @ W1.T + b1 + e1, vh.sqrt(), thetas

    zeros = [torch.zeros(5, 8, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64)]
    _, s0, thetas = closure(*zeros)
    relu = next(n.name for n in prop.graph.nodes if activation_kind(n, prop.modules) == "relu")
    pool = next(n.name for n in prop.graph.nodes if is_maxpool(n, prop.modules))
    rec = {relu: {"s": s0.detach()}, pool: {"theta": [t.detach() for t in thetas]}}
    _check_channel_derivatives(prop, rec, x, closure, zeros)


def _check_channel_derivatives(prop, rec, x, closure, zeros, differ=(0,)):
    """The surrogate's derivatives of the logits with respect to each noisy layer's
    output mean (its taps) against autograd of ``closure`` (``(logits, ...)`` as a
    function of those means' shifts ``zeros``): equal with the variance channel; without
    it equal everywhere but at the taps ``differ`` (the paths through a downstream ``s``)."""
    from noiseprop.theory.moments.surrogate import _Surrogate

    ref = torch.autograd.functional.jacobian(lambda *e: closure(*e)[0], tuple(zeros))  # [B, C, B, n] per tap
    for channel in (True, False):
        sur = _Surrogate(prop, rec, variance_channel=channel)
        with torch.enable_grad():
            out = sur.run(x)
            taps = [t.e for _, t in sur.taps]
            C = out.shape[1]
            got = [torch.stack([torch.autograd.grad(out[:, c].sum(), taps, retain_graph=True)[k] for c in range(C)], 1)
                   for k in range(len(taps))]  # [B, C, n] per tap (inputs do not interact)
        assert len(got) == len(zeros)
        for k in range(len(taps)):
            same = torch.allclose(got[k], torch.einsum("bcbn->bcn", ref[k]), rtol=1e-10, atol=1e-12)
            assert same == (channel or k not in differ), (channel, k)


class _Rules(nn.Module):
    """Products and quotients with numbers, a number minus a tensor, a permutation and a
    slice, a sum over units, adaptive average pooling with overlapping windows (7 → 3,
    functional) and windows of two sizes (5 → 3, module), a mean, ``view_as``, and a
    product with a buffer and a parameter added (both noiseless)."""

    def __init__(self):
        super().__init__()
        self.c, self.pool, self.l = nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(3), nn.Linear(10, 3)
        self.register_buffer("scale", torch.tensor([2.0, 0.5]).view(1, 2, 1, 1))
        self.shift = nn.Parameter(torch.full((1, 2, 1, 1), 0.1))  # not noisy: only weights are

    def forward(self, x):
        h = self.c(x)  # [B, 2, 7, 7]
        b = 1.0 - (3.0 * h) / 2.0
        e = torch.sum(b.permute(0, 2, 3, 1)[:, 1:5], dim=(1, 2))  # [B, 2]
        p = F.adaptive_avg_pool2d(h, 3)
        q = self.pool(h[:, :, 1:6, 1:6]).mean((2, 3))
        r = p.mean((2, 3)).view_as(q)
        t = (h * self.scale + self.shift).mean((2, 3))
        return self.l(torch.cat([e, q, r, 2.0 * e, t], 1))


def test_surrogate_variance_channel_rules_against_written_out_variances():
    """Each of the channel's linear rules against the variance written out for independent
    units: ``c²v`` and ``v/c²``, a constant minus a tensor, selections, ``Σv`` for a sum,
    ``Σv/n²`` per window of an adaptive average (windows that overlap or differ in size)
    and for a mean, ``view_as``, ``c²v`` for a buffer ``c`` and ``v`` with a parameter
    added."""
    from noiseprop.theory.moments.surrogate import _Surrogate

    net = _Rules().double().eval()
    lin = LinearizedNetwork(net)
    prop = MomentPropagator(lin, RelativeGaussian(0.3), dtype=torch.float64)
    x = torch.randn(2, 1, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sur = _Surrogate(prop, {}, variance_channel=True)
    sur.run(x)
    v = {n.name: t for n, t in sur.var.items()}
    vh = v["c"]
    b = 9 / 4 * vh
    assert torch.allclose(v["mul"], 9 * vh) and torch.allclose(v["truediv"], b) and torch.allclose(v["sub"], b)
    assert torch.allclose(v["sum_1"], b.permute(0, 2, 3, 1)[:, 1:5].sum((1, 2)))

    def windows(size, out):
        return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]

    def adaptive(t, out):
        H, W = t.shape[-2:]
        return torch.stack([torch.stack([t[..., r0:r1, c0:c1].sum((-2, -1)) / ((r1 - r0) * (c1 - c0)) ** 2
                                         for c0, c1 in windows(W, out)], -1) for r0, r1 in windows(H, out)], -2)

    p, q = adaptive(vh, 3), adaptive(vh[:, :, 1:6, 1:6], 3)
    assert torch.allclose(v["adaptive_avg_pool2d"], p)
    assert torch.allclose(v["pool"], q)
    assert torch.allclose(v["mean"], q.sum((2, 3)) / 81)
    assert torch.allclose(v["view_as"], p.sum((2, 3)) / 81)
    assert torch.allclose(v["mul_2"], 4 * v["sum_1"])
    scaled = vh * net.scale ** 2
    assert torch.allclose(v["mul_1"], scaled) and torch.allclose(v["add"], scaled)
    assert torch.allclose(v["mean_2"], scaled.sum((2, 3)) / 49 ** 2)
