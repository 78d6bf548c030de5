"""Layer coverage of moment propagation beyond the zoo: smooth activations (exact
against Monte-Carlo where the pre-activations are independent Gaussians), and
AdaptiveAvgPool2d, Dropout, Identity, 1×1 projection shortcuts, torch.cat and smooth
activations through the low-rank pass (first-order rules reproduce the exact Jacobian
covariance), plus the graph walker that both passes share."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from noiseprop.theory import RelativeGaussian, Targets, predict
from noiseprop.theory.linearize import LinearizedNetwork
from noiseprop.theory.moments import MomentPropagator
from predict_nets import mc_logits


def _quiet(**kw):
    return dict(accuracy_draws=0, loss_probes=0, **kw)


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.1), nn.ELU(),
                                 nn.ELU(0.5)], ids=lambda m: repr(m))
def test_smooth_activation_exact_for_one_noisy_layer(act):
    """Noise on the first Linear only: its outputs are independent Gaussians, so the
    Gauss–Hermite moments and hence the logit mean and covariance are exact. Every logit
    mean within 5.5 Monte-Carlo s.e., the pooled variance within 4.5 s.e."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), act, nn.Linear(12, 3)).eval()
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(16, dtype=torch.int64)
    noise = RelativeGaussian(1.0)
    targets = Targets(layers=("0",))
    draws = 3000
    L = mc_logits(model, x, noise, draws, seed=2, names=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = predict(model, x, y, noise, targets=targets, method="moments", **_quiet())
    m, v = L.mean(0), L.var(0)
    z = (p.logit_mean - m) / (v / draws).sqrt()
    assert z.abs().max() < 5.5, float(z.abs().max())
    ratio = float(p.logit_var.sum() / v.sum())
    assert abs(ratio - 1) < 4.5 * math.sqrt(2 / (draws - 1)), ratio


class _Wide(nn.Module):
    """Stem conv + BN + GELU, a residual stage with a 1×1 projection shortcut, Dropout and
    Identity on the path, torch.cat of a ReLU and a sigmoid branch, adaptive average
    pooling, a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.act0 = nn.GELU()
        self.conv1 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.proj = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.drop = nn.Dropout(0.3)
        self.ident = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(12 * 4, 5)

    def forward(self, x):
        h = self.act0(self.bn0(self.conv0(x)))
        a = self.relu(self.bn1(self.conv1(h))) + self.proj(h)
        a = self.ident(self.drop(a))
        c = torch.cat([torch.relu(a), torch.sigmoid(a)], dim=1)
        return self.fc(torch.flatten(self.pool(c), 1))


def _wide():
    torch.manual_seed(3)
    model = _Wide()
    g = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def _first_order_rules_exact(model, x):
    """With first-order rules and no truncation the low-rank pass carries exactly the
    first-order covariance (the exact Jacobians of the linear method)."""
    y = torch.zeros(x.shape[0], dtype=torch.int64)
    noise = RelativeGaussian(0.1)
    lin = LinearizedNetwork(model)
    prop = MomentPropagator(lin, noise, rank=100000, spatial_rank=64, first_order=True, dtype=torch.float64)
    with torch.no_grad():
        res = prop.run(x)
    q = predict(model, x, y, noise, cov=True, **_quiet())
    assert torch.allclose(res.mean, q.clean_logits.double(), atol=1e-5)
    assert torch.allclose(res.cov, q.logit_cov, rtol=1e-4, atol=1e-6 * float(q.logit_cov.abs().max()))


def _against_monte_carlo(model, x, noise, draws, seed):
    """Logit variance (pooled) and mean shift of ``method="moments"`` within 10% of
    Monte-Carlo beyond its error; returns ``(variance ratio, Monte-Carlo logits)``."""
    y = torch.zeros(x.shape[0], dtype=torch.int64)
    L = mc_logits(model, x, noise, draws, seed=seed)
    p = predict(model, x, y, noise, method="moments", **_quiet())
    ratio = float(p.logit_var.sum() / L.var(0).sum())
    assert abs(ratio - 1) < 0.10 + 4 * math.sqrt(2 / (draws - 1)), ratio
    shift = L.mean(0) - p.clean_logits
    rel_noise = math.sqrt(float((L.var(0) / draws).sum()) / float((shift ** 2).sum()))
    proj = float((p.logit_mean_shift * shift).sum() / (shift ** 2).sum())
    assert abs(proj - 1) < 0.10 + 4 * rel_noise, (proj, rel_noise)
    return ratio, L


def test_first_order_rules_reproduce_jacobian_covariance_on_more_layers():
    """Through GELU, a 1×1 projection shortcut, Dropout/Identity, torch.cat, sigmoid and
    AdaptiveAvgPool2d."""
    _first_order_rules_exact(_wide(), torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)))


def test_moments_on_more_layers_against_monte_carlo():
    """The same network at η = 0.3 on every conv/linear weight, and the user's model
    untouched (Dropout stays an identity: eval mode)."""
    model = _wide()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _against_monte_carlo(model, torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(6)),
                         RelativeGaussian(0.3), 1500, 7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


class _Leaky(nn.Module):
    """A small CNN with LeakyReLU (module and functional, two slopes), ELU (module and
    functional, two alphas) and max pooling after a LeakyReLU."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 4, 3, padding=1)
        self.act0 = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.act1 = nn.ELU()
        self.fc1 = nn.Linear(6 * 16, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.pool(self.act0(self.conv0(x)))
        h = torch.nn.functional.leaky_relu(self.act1(self.conv1(h)), negative_slope=0.3)
        h = torch.nn.functional.elu(self.fc1(torch.flatten(h, 1)), 0.5)
        return self.fc(h)


def test_leaky_relu_and_elu_through_the_low_rank_pass():
    """LeakyReLU and ELU (modules and functions): with first-order rules the pass carries
    exactly the first-order covariance; at η = 0.5 the logit variance and mean shift
    against Monte-Carlo as for the other layers, and the variance closer to Monte-Carlo's
    than the first order's (0.94 against 0.78 here)."""
    torch.manual_seed(8)
    model = _Leaky().eval()
    x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    _first_order_rules_exact(model, x[:3])
    noise, draws = RelativeGaussian(0.5), 3000
    ratio, L = _against_monte_carlo(model, x, noise, draws, 10)
    y = torch.zeros(24, dtype=torch.int64)
    fo = float(predict(model, x, y, noise, **_quiet()).logit_var.sum() / L.var(0).sum())
    assert abs(ratio - 1) + 4 * math.sqrt(2 / (draws - 1)) < abs(fo - 1), (ratio, fo)


def test_one_interpreter_for_both_passes():
    """The moment pass and the surrogate walk the graph with the same interpreter class."""
    from noiseprop.theory.moments.interpreter import GraphInterpreter
    from noiseprop.theory.moments.rules import _MomentPass
    from noiseprop.theory.moments.surrogate import _Surrogate

    assert issubclass(_MomentPass, GraphInterpreter) and issubclass(_Surrogate, GraphInterpreter)
    # the plain walk of the graph is the network
    model = _wide()
    lin = LinearizedNetwork(model)
    prop = MomentPropagator(lin, RelativeGaussian(0.1))
    x = torch.randn(2, 1, 8, 8)
    out = GraphInterpreter(prop.graph, lin.net, lin.params, lin.buffers).run(x)
    assert torch.allclose(out, model(x), atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_functional_pooling_equals_the_module_form(adaptive):
    """``F.avg_pool2d`` / ``F.adaptive_avg_pool2d`` called in a forward give the same
    moment prediction as the ``nn.AvgPool2d`` / ``nn.AdaptiveAvgPool2d`` modules (the
    function form raised AttributeError on torch releases without ``torch.avg_pool2d``)."""
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self, functional):
            super().__init__()
            self.functional = functional
            self.c = nn.Conv2d(1, 6, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1) if adaptive else nn.AvgPool2d(2)
            self.l = nn.Linear(6 if adaptive else 24, 4)

        def forward(self, x):
            h = torch.relu(self.c(x))
            if self.functional:
                h = F.adaptive_avg_pool2d(h, 1) if adaptive else F.avg_pool2d(h, 2)
            else:
                h = self.pool(h)
            return self.l(h.flatten(1))

    torch.manual_seed(0)
    mod, fun = Net(False), Net(True)
    fun.load_state_dict(mod.state_dict())
    x = torch.randn(64, 1, 4, 4)
    with torch.no_grad():
        y = mod(x).argmax(1)
    a = predict(mod, x, y, "relative:0.5", method="moments", cache=False, diagnostic=False)
    b = predict(fun, x, y, "relative:0.5", method="moments", cache=False, diagnostic=False)
    torch.testing.assert_close(b.logit_mean, a.logit_mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(b.logit_var, a.logit_var, rtol=1e-6, atol=1e-9)
    assert b.accuracy == pytest.approx(a.accuracy, abs=1e-9)


def test_bare_layer_model():
    """A model that is one bare layer (``nn.Linear``; its parameters are ``weight`` and
    ``bias``, with no module prefix): the first order runs and matches Monte-Carlo within
    its interval; the moment method names the traced function it does not support."""
    from noiseprop.empirical import monte_carlo

    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    x = torch.randn(400, 5)
    with torch.no_grad():
        y = net(x).argmax(1)
    p = predict(net, x, y, "relative:0.5", cache=False)
    mc = monte_carlo(net, x, y, "relative:0.5", draws=400, seed=0, progress=False)
    se = (mc.accuracy_ci[1] - mc.accuracy_ci[0]) / (2 * 1.96)
    assert abs(p.accuracy - mc.accuracy) <= 3 * se
    with pytest.raises(ValueError, match="does not support function 'linear'.*method='linear'"):
        predict(net, x, y, "relative:0.5", method="moments", cache=False)


class _KeywordNet(nn.Module):
    """The same arithmetic written by position or by keyword (``form``)."""

    def __init__(self, form):
        super().__init__()
        self.a, self.b, self.c, self.form = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 3), form

    def forward(self, x):
        h = torch.relu(self.a(x))
        g = self.b(h)
        f = self.form
        h = {"add": lambda: h + g, "add_kw": lambda: torch.add(input=h, other=g),
             "add_method_kw": lambda: h.add(other=g),
             "sub_alpha": lambda: h - 2 * g, "sub_alpha_kw": lambda: torch.sub(h, g, alpha=2),
             "rsub_alpha": lambda: 1.0 - 3 * g, "rsub_alpha_kw": lambda: torch.sub(1.0, other=g, alpha=3),
             "add_alpha_method": lambda: h.add(g, alpha=-0.5), "add_half": lambda: h - 0.5 * g,
             "cat": lambda: torch.cat([h, g], 1)[:, 5:15], "cat_kw": lambda: torch.cat(tensors=[h, g], dim=1)[:, 5:15],
             "flatten": lambda: torch.flatten(g[:, :, None], 1), "flatten_kw": lambda: torch.flatten(input=g[:, :, None],
                                                                                                   start_dim=1),
             "reshape_shape": lambda: g[:, :, None].reshape(g.shape[0], -1),
             "relu": lambda: h + torch.relu(g), "relu_": lambda: h + torch.relu_(g),
             "floor_div": lambda: torch.div(g, 2.0, rounding_mode="floor")}[f]()
        return self.c(torch.relu(h))


@pytest.mark.parametrize("plain,keyword", [("add", "add_kw"), ("add", "add_method_kw"), ("sub_alpha", "sub_alpha_kw"),
                                           ("rsub_alpha", "rsub_alpha_kw"), ("add_half", "add_alpha_method"),
                                           ("cat", "cat_kw"), ("flatten", "flatten_kw"),
                                           ("flatten", "reshape_shape"), ("relu", "relu_")])
def test_operands_by_keyword_and_alpha(plain, keyword):
    """``torch.add(input=a, other=b)``, ``h.add(other=b)``, ``torch.cat(tensors=...)``,
    ``torch.flatten(input=...)`` and ``alpha`` (torch's ``a + alpha·b``) give the moment
    method what the positional forms give (they raised an IndexError, and ``alpha`` on a
    tensor method was ignored); so do ``x.reshape(x.shape[0], -1)`` and ``torch.relu_``
    (refused before)."""
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(0))
    out = []
    for form in (plain, keyword):
        torch.manual_seed(0)
        net = _KeywordNet(form).eval()
        y = net(x).argmax(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(predict(net, x, y, RelativeGaussian(0.3), method="moments", **_quiet()))
    torch.testing.assert_close(out[1].logit_mean, out[0].logit_mean)
    torch.testing.assert_close(out[1].logit_cov, out[0].logit_cov)


def test_division_with_rounding_mode_is_refused_by_name():
    torch.manual_seed(0)
    net = _KeywordNet("floor_div").eval()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="rounding_mode.*method='linear'"):
        predict(net, x, net(x).argmax(1), RelativeGaussian(0.3), method="moments", **_quiet())


@pytest.mark.parametrize("kernel,dilation", [(3, 1), (2, 1), (4, 1), (2, 3)])
def test_conv_padding_same_equals_explicit_zero_padding(kernel, dilation):
    """``Conv2d(padding='same')`` (an even kernel pads one more at the right and bottom,
    as torch does) gives what an explicit zero padding and ``padding=0`` give, in the
    first order, the moment method and the drift curve (whose per-element Gram unfolds
    the input); the moment method raised a TypeError from inside ``F.unfold`` before."""
    from noiseprop.theory import PCMLike, predict_drift

    tot = dilation * (kernel - 1)
    pad = (tot // 2, tot - tot // 2, tot // 2, tot - tot // 2)
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    nets = []
    for same in (True, False):
        torch.manual_seed(0)
        conv = nn.Conv2d(6, 6, kernel, padding="same" if same else 0, dilation=dilation)
        nets.append(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), *([] if same else [nn.ZeroPad2d(pad)]),
                                  conv, nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4)).eval())
    y = nets[0](x).argmax(1)
    for method in ("linear", "moments"):
        p, q = (predict(n, x, y, RelativeGaussian(0.2), method=method, **_quiet(cov=True)) for n in nets)
        torch.testing.assert_close(p.logit_mean, q.logit_mean)
        torch.testing.assert_close(p.logit_cov, q.logit_cov)
    p, q = (predict_drift(n, x, y, PCMLike(t=1.0), [1.0, 3600.0], accuracy_draws=0) for n in nets)
    np.testing.assert_allclose(p.accuracy, q.accuracy, rtol=1e-6)  # float32 sums in another order


@pytest.mark.parametrize("act,counted", [(nn.ReLU(), True), (nn.LeakyReLU(0.1), True), (nn.ELU(), True),
                                         (nn.GELU(), True), (nn.SiLU(), True), (nn.Softplus(), True),
                                         (nn.Tanh(), False), (nn.Sigmoid(), False)], ids=lambda a: repr(a))
def test_moment_validity_fraction_reads_relu_variants(act, counted):
    """The moment method's validity fraction (pre-activations whose noise sd exceeds their
    magnitude) counts ReLU and its variants, which bend near 0, and not tanh or sigmoid,
    which saturate (it counted ReLU only until stop 38). The activation follows the first
    noisy layer, so each pre-activation's noise sd is ``√(Σ_j σ_ij² x_j²)`` and the
    fraction is known exactly; it is strictly between 0 and 1 here."""
    from noiseprop.theory.moments import propagate_moments

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 3)).eval()
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    lin = LinearizedNetwork(net)
    noise = RelativeGaussian(0.8)
    prop = MomentPropagator(lin, noise)
    res = propagate_moments(lin, x, noise, propagator=prop, mean_only=True)
    with torch.no_grad():
        mu = net[0](x)
    sd = ((x * x) @ prop.noise_var["0.weight"].T).sqrt()
    expected = float((sd > mu.abs()).double().mean())
    assert 0 < expected < 1
    assert res.preact_frac == pytest.approx(expected if counted else 0.0)
