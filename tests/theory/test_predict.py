"""predict(method="linear") and predict_sweep: exactness of the first-order covariance,
agreement with Monte-Carlo (tolerances from the Monte-Carlo standard error), input
checks and the no-mutation / determinism guarantees."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from noiseprop.theory import Multiplicative, RelativeGaussian, predict, predict_sweep
from noiseprop.theory.examples import tiny_problem
from noiseprop.theory.linearize import LinearizedNetwork, jacobian_pass
from noiseprop.theory.noise import parse_noise
from predict_nets import batch_means_se, held_out, mc_logits, trained


def _reference_cov(model, x, noise, targets=None):
    """Independent reference: per-input Jacobians by vmap(jacrev) on every target."""
    lin = LinearizedNetwork(model, targets)
    var = {n: noise.variance(p) for n, p in lin.target_params.items()}

    def f(tp, xi):
        return functional_call(lin.net, ({**lin.params, **tp}, lin.buffers), (xi[None],))[0]

    J = vmap(jacrev(f), in_dims=(None, 0))(lin.target_params, x)
    n = x.shape[0]
    cov = 0
    for k in lin.names:
        j = J[k].reshape(n, J[k].shape[1], -1).double()
        cov = cov + torch.einsum("bcp,p,bdp->bcd", j, var[k].reshape(-1).double(), j)
    return cov


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("noise", [RelativeGaussian(0.05), RelativeGaussian(0.05, per="channel"), Multiplicative(0.05)])
def test_linear_covariance_is_exact_first_order(kind, noise):
    """The batched activation-gradient engine equals vmap(jacrev) per input."""
    model = trained(kind)
    x, y = held_out(24)
    p = predict(model, x, y, noise, cov=True, accuracy_draws=0, loss_probes=0, chunk_size=10)
    ref = _reference_cov(model, x, noise)
    assert torch.allclose(p.logit_cov, ref, rtol=1e-4, atol=1e-7 * float(ref.abs().max()))
    assert torch.allclose(p.logit_var, torch.diagonal(ref, dim1=1, dim2=2), rtol=1e-4)


def test_linear_covariance_with_biases_norm_and_folded_targets():
    model = trained("resnet")
    x, y = held_out(12)
    noise = RelativeGaussian(0.05)
    for targets in ("weights,biases", "weights,norm", "weights,fold_bn"):
        p = predict(model, x, y, noise, targets=targets, cov=True, accuracy_draws=0, loss_probes=0)
        ref = _reference_cov(model, x, noise, targets)
        assert torch.allclose(p.logit_cov, ref, rtol=1e-4, atol=1e-7 * float(ref.abs().max())), targets


def test_chunking_does_not_change_results():
    model = trained("cnn")
    x, y = held_out(30)
    a = predict(model, x, y, "relative:0.05", cov=True, chunk_size=1, accuracy_draws=8, loss_probes=0)
    b = predict(model, x, y, "relative:0.05", cov=True, chunk_size=7, accuracy_draws=8, loss_probes=0)
    # float32 Jacobians: equal up to float32 rounding
    assert torch.allclose(a.logit_cov, b.logit_cov, rtol=1e-4, atol=1e-6 * float(a.logit_cov.abs().max()))
    assert a.accuracy_std == pytest.approx(b.accuracy_std, rel=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
def test_linear_variance_matches_monte_carlo(kind):
    """Pooled logit variance at η = 0.02: predicted / Monte-Carlo within 4 standard errors
    of the Monte-Carlo pooled variance (batch means over draws)."""
    model = trained(kind)
    x, y = held_out(60)
    noise = RelativeGaussian(0.02)
    draws = 300
    L = mc_logits(model, x, noise, draws, seed=1)
    dev = ((L - L.mean(0)) ** 2).sum(dim=(1, 2)).numpy()  # per-draw squared deviation, all cells
    pooled = dev.sum() / (draws - 1)
    se_rel = batch_means_se(dev) * draws / (draws - 1) / pooled
    p = predict(model, x, y, noise, accuracy_draws=0, loss_probes=0)
    ratio = float(p.logit_var.sum()) / pooled
    assert abs(ratio - 1) < 4 * se_rel + 1e-3, (ratio, se_rel)
    # the per-cell median relative error is about the Monte-Carlo noise sqrt(2/(n-1))
    cell = (p.logit_var / L.var(0)).numpy().ravel()
    assert abs(np.median(cell) - 1) < 4 * math.sqrt(2 / (draws - 1))


class _TinyViT(nn.Module):
    """Patch embedding, two Transformer encoder layers, mean pooling, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 16, 2, 2)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.enc(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


@pytest.mark.parametrize("layers", [None, ("enc.layers.0.self_attn.out_proj",)], ids=["all", "out_proj"])
def test_attention_layers_match_monte_carlo(layers):
    """nn.MultiheadAttention reads ``out_proj.weight`` without calling ``out_proj``: the
    hooks saw no call, and its noise was silently left out (predicted variance 0 with
    noise on it alone); and the fused attention kernels have no forward-mode derivative,
    so the loss increase (forward-over-reverse), ``hessian_trace`` and the drift curve
    raised NotImplementedError from inside torch. Pooled logit variance at η = 0.02
    within 4 Monte-Carlo standard errors (as for the CNNs above); the other entry points
    run."""
    from noiseprop.theory import PCMLike, Targets, hessian_trace, predict_drift

    torch.manual_seed(0)
    model = _TinyViT().eval()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    targets = None if layers is None else Targets(layers=layers)
    noise, draws = RelativeGaussian(0.02), 300
    L = mc_logits(model, x, noise, draws, seed=1, names=targets)
    dev = ((L - L.mean(0)) ** 2).sum(dim=(1, 2)).numpy()
    pooled = dev.sum() / (draws - 1)
    se_rel = batch_means_se(dev) * draws / (draws - 1) / pooled
    p = predict(model, x, y, noise, targets=targets, accuracy_draws=0)
    ratio = float(p.logit_var.sum()) / pooled
    assert abs(ratio - 1) < 4 * se_rel + 1e-3, (ratio, se_rel)
    assert math.isfinite(p.loss_increase) and p.loss_increase_method == "hutchinson"  # softmax attention: smooth
    if layers is None:
        assert math.isfinite(hessian_trace(model, x, y, probes=4).estimate)
        assert np.isfinite(predict_drift(model, x, y, PCMLike(), [1.0, 86400.0], accuracy_draws=0).accuracy).all()


def test_accuracy_and_spread_match_monte_carlo_at_small_noise():
    from noiseprop.empirical import monte_carlo

    model = trained("mlp")
    x, y = held_out(200)
    noise = RelativeGaussian(0.3)
    mc = monte_carlo(model, x, y, noise, draws=200, seed=3)
    p = predict(model, x, y, noise, accuracy_draws=64, loss_probes=0, seed=1)
    assert abs(p.accuracy - mc.accuracy) < 4 * mc.accuracy_se + 0.01
    assert p.accuracy_lower <= p.accuracy <= p.accuracy_upper
    # chip-to-chip sd: both estimated from draws; relative s.e. of an sd ≈ 1/sqrt(2(n-1))
    sd_mc = float(mc.accuracies.std(ddof=1))
    se = math.hypot(sd_mc / math.sqrt(2 * 199), p.accuracy_std / math.sqrt(2 * 63))
    assert abs(p.accuracy_std - sd_mc) < 4 * se + 0.2 * sd_mc  # + the first-order bias at η = 0.3


def test_draws_of_linearised_network_equal_jvp():
    """The shared draws J(u⊙ξ) from the Jacobian pass equal forward-mode jvp with the same ξ."""
    from noiseprop.theory.linearize import _directions

    model = trained("resnet")
    x, _ = held_out(10)
    lin = LinearizedNetwork(model)
    unit = lin.unit_scales(RelativeGaussian(1.0))
    jp = jacobian_pass(lin, x, unit, draws=3, seed=5)
    dirs = _directions(lin, 3, 5)
    for k in range(3):
        delta = {n: (dirs[n][:, k].reshape(p.shape) * unit[n]) for n, p in lin.target_params.items()}
        f0, fl = lin.linearized_logits(x, delta)
        assert torch.allclose(fl - f0, jp.draws_unit[:, :, k], rtol=1e-3, atol=1e-4)


def test_sweep_equals_single_predictions():
    model = trained("cnn")
    x, y = held_out(40)
    levels = [0.01, 0.1, 0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = predict_sweep(model, x, y, "relative", levels, accuracy_draws=16, loss_probes=4, seed=2)
        singles = [predict(model, x, y, RelativeGaussian(lv), accuracy_draws=16, loss_probes=4, seed=2) for lv in levels]
    for p, q in zip(curve.predictions, singles):
        assert torch.allclose(p.logit_var, q.logit_var, rtol=1e-6)
        assert p.accuracy == pytest.approx(q.accuracy, abs=1e-9)
        assert p.loss_increase == pytest.approx(q.loss_increase, rel=1e-6)
        assert p.accuracy_std == pytest.approx(q.accuracy_std, rel=1e-6)
    assert np.allclose(curve.accuracy, [q.accuracy for q in singles])
    df = curve.to_frame()
    assert list(df.level) == levels and "accuracy" in df
    assert "level" in curve.summary()


def test_model_not_mutated_and_train_mode_warns():
    model = trained("cnn")
    m = copy.deepcopy(model).train()
    before = copy.deepcopy(m.state_dict())
    x, y = held_out(20)
    with pytest.warns(UserWarning, match="training mode"):
        p = predict(m, x, y, "relative:0.05", accuracy_draws=4, loss_probes=2)
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    # evaluated in eval mode: the clean logits are the eval-mode logits
    assert torch.allclose(p.clean_logits, model(x).double(), atol=1e-5)
    # only a submodule in training mode (the root in eval): named in the notice, by predict
    # and Monte-Carlo, and evaluated in eval mode too
    from noiseprop.empirical import monte_carlo

    bn = next(n for n, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d))
    s = copy.deepcopy(model)
    s.get_submodule(bn).train()
    with pytest.warns(UserWarning, match=f"submodules in training mode \\({bn}\\)"):
        q = predict(s, x, y, "relative:0.05", cache=False)
    with pytest.warns(UserWarning, match="submodules in training mode"):
        monte_carlo(s, x, y, "relative:0.05", draws=2, seed=0)
    assert s.get_submodule(bn).training and not s.training
    assert torch.allclose(q.clean_logits, model(x).double(), atol=1e-5)
    # a model wholly in eval mode, BatchNorm folded (the plan's copy has new modules): no notice
    from noiseprop.theory import Targets

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        predict(model, x, y, "relative:0.05", targets=Targets(fold_bn=True), cache=False)


class _WithUnusedLayer(nn.Module):
    """A network with a layer its forward never calls (an auxiliary head, say)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))
        self.aux = nn.Linear(12, 7)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("method", ["linear", "moments"])
def test_a_layer_the_forward_never_calls(method):
    """Its noise reaches nothing: the prediction is the one without it (the validity
    diagnostic raised an AttributeError from deep inside torch before), and its share
    in the sensitivity breakdown is 0."""
    from noiseprop.theory import sensitivity

    torch.manual_seed(0)
    net = _WithUnusedLayer().eval()
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))
    y = net(x).argmax(1)
    kw = dict(accuracy_draws=0, loss_probes=0, method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = predict(net, x, y, RelativeGaussian(0.3), **kw)
        q = predict(net.body, x, y, RelativeGaussian(0.3), **kw)
    torch.testing.assert_close(p.logit_cov, q.logit_cov)
    assert p.accuracy == pytest.approx(q.accuracy, abs=1e-12)
    if method == "linear":
        assert p.diagnostics["preact_frac"] == q.diagnostics["preact_frac"]
        s = sensitivity(net, x, y, RelativeGaussian(0.3)).to_frame().set_index("layer")
        assert s.loc["aux", "share_logit_var"] == 0 and s.loc["aux", "share_loss"] == 0
        # the drift curve's shared pass scales each layer by the others' drift: not by the unused one's
        from noiseprop.theory import PCMLike, keep_digital, predict_drift

        d = [predict_drift(m, x, y, PCMLike(compensation=False), [1.0, 3.15e7], accuracy_draws=0) for m in (net, net.body)]
        np.testing.assert_allclose(d[0].accuracy, d[1].accuracy, rtol=1e-9)
        # keep_digital chooses among the layers that reach the logits
        assert keep_digital(net, x, y, RelativeGaussian(0.3), k=1).layers[0] in ("body.0", "body.2")
        with pytest.raises(ValueError, match="2 of the 3 noisy layers reach the logits"):
            keep_digital(net, x, y, RelativeGaussian(0.3), k=2)


def test_diagnostic_with_in_place_relus():
    """``nn.ReLU(inplace=True)`` (torchvision's default) overwrote the pre-activations
    the validity diagnostic reads with the ReLU's output (its fraction was 0.10 instead of
    0.21 on this net): the same fraction as with ``inplace=False`` now, and the exact
    loss increase (the net is piecewise linear with ``torch.relu_`` as well)."""
    def net(inplace, functional=False):
        torch.manual_seed(0)
        body = [nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=inplace),
                nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(6 * 36, 4)]
        if functional:
            body[4] = _Relu_()
        m = nn.Sequential(*body)
        m[1].running_mean.normal_(0, 0.2)
        return m.eval()

    x = torch.randn(24, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    y = net(False)(x).argmax(1)
    out = [predict(net(*a), x, y, RelativeGaussian(0.3), accuracy_draws=0, loss_probes=0)
           for a in ((False,), (True,), (True, True))]
    for p in out[1:]:
        assert p.diagnostics["preact_frac"] == out[0].diagnostics["preact_frac"]
        assert p.accuracy == out[0].accuracy
        assert p.loss_increase == pytest.approx(out[0].loss_increase_gn, rel=1e-9)


class _Relu_(nn.Module):
    def forward(self, x):
        return torch.relu_(x)


def test_deterministic_and_no_global_rng():
    model = trained("mlp")
    x, y = held_out(30)
    state = torch.get_rng_state()
    a = predict(model, x, y, "relative:0.1", accuracy_draws=8, loss_probes=4, seed=4)
    b = predict(model, x, y, "relative:0.1", accuracy_draws=8, loss_probes=4, seed=4)
    c = predict(model, x, y, "relative:0.1", accuracy_draws=8, loss_probes=4, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    assert a.accuracy_std == b.accuracy_std and a.loss_increase == b.loss_increase
    assert a.loss_increase != c.loss_increase


def test_results_object():
    model = trained("mlp")
    x, y = held_out(15)
    p = predict(model, x, y, "relative:0.05", accuracy_draws=4, loss_probes=2)
    df = p.per_input_frame()
    assert len(df) == 15 * 10 and set(df.columns) >= {"input", "label", "cls", "logit_var", "correct_prob"}
    assert len(p.to_frame()) == 1 and p.to_frame().accuracy[0] == p.accuracy
    assert "accuracy" in p.summary() and p.logit_cov is None
    assert p.logit_mean_shift.abs().max() == 0  # the first order has no mean shift
    s = p.scalars()
    assert s["n_inputs"] == 15 and 0 <= s["accuracy"] <= 1
    with pytest.raises(dataclasses_frozen()):
        p.accuracy = 0.5


def dataclasses_frozen():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_input_validation():
    model = trained("mlp")
    x, y = held_out(10)
    with pytest.raises(ValueError, match="same length"):
        predict(model, x, y[:5], "relative:0.1")
    with pytest.raises(TypeError, match="integer class labels"):
        predict(model, x, y.float(), "relative:0.1")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        predict(model, x, y + 10, "relative:0.1")
    with pytest.raises(ValueError, match="method must be one of"):
        predict(model, x, y, "relative:0.1", method="exact")
    with pytest.raises(ValueError, match="unknown noise"):
        predict(model, x, y, "loud:0.1")
    with pytest.raises(ValueError, match="accuracy_draws"):
        predict(model, x, y, "relative:0.1", accuracy_draws=1)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1.weight"):
        predict(bad, x, y, "relative:0.1")
    with pytest.raises(ValueError, match="no parameters to perturb"):
        predict(nn.Sequential(nn.Flatten(), nn.ReLU()), x, y, "relative:0.1")
    with pytest.raises(ValueError, match="levels"):
        predict_sweep(model, x, y, "relative", [])


def test_warns_outside_first_order_range():
    model = trained("mlp")
    x, y = held_out(40)
    with pytest.warns(RuntimeWarning, match="first order outside its range"):
        p = predict(model, x, y, "relative:1.0", accuracy_draws=0, loss_probes=0)
    assert p.diagnostics["preact_frac"] > 0.15 and p.warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = predict(model, x, y, "relative:0.02", accuracy_draws=0, loss_probes=0)
    assert q.diagnostics["preact_frac"] < 0.15 and not q.warnings


def test_moment_risks_from_the_graph():
    """The structures the moment method's warning keys on, read from the traced graph: a
    residual sum (two different tensors that both carry weight noise, ``+`` or ``+=``) and
    max pooling; an activation plus a parameter or a constant, ``h + h`` and input
    preprocessing before the first noisy layer are not residual sums."""
    from noiseprop.theory._graph import trace
    from noiseprop.theory.moments.rules import moment_risks
    from noiseprop.theory.targets import resolve_targets

    def risks(m):
        return moment_risks(trace(m), dict(m.named_modules()), resolve_targets(m).names)

    assert [risks(trained(k)) for k in ("mlp", "cnn", "resnet")] == [(), ("max_pool",), ("residual",)]

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.shift = nn.Parameter(torch.zeros(10))

        def forward(self, x):
            return torch.relu(self.fc(x.flatten(1))) + self.shift - 1.0

    class Doubled(Shifted):
        def forward(self, x):
            h = torch.relu(self.fc(x.flatten(1)))
            return h + h

    class Centred(Shifted):  # preprocessing: a sum of input-dependent tensors before any noise
        def forward(self, x):
            x = x.flatten(1)
            return self.fc(x - x.mean(1, keepdim=True))

    class InPlace(Shifted):
        def forward(self, x):
            h = self.fc(x.flatten(1))
            out = torch.relu(h)
            out += h
            return out

    assert [risks(m()) for m in (Shifted, Doubled, Centred)] == [(), (), ()]
    assert risks(InPlace()) == ("residual",)


def test_moments_range_warning_thresholds():
    from noiseprop.theory.predict import MOMENTS_WARN_FRACTION, moments_range_warning

    res, mp = MOMENTS_WARN_FRACTION["residual"], MOMENTS_WARN_FRACTION["max_pool"]
    assert moments_range_warning(0.95, ()) is None and moments_range_warning(None, ("residual",)) is None
    assert moments_range_warning(res, ("residual",)) is None
    assert "residual connections" in moments_range_warning(res + 0.01, ("residual",))
    assert moments_range_warning(mp, ("max_pool",)) is None
    assert "max pooling" in moments_range_warning(mp + 0.01, ("max_pool",))
    assert "residual connections" in moments_range_warning(res + 0.01, ("max_pool", "residual"))


def test_moments_warns_outside_its_measured_range():
    """``method="moments"`` warns (at the caller's line, and once per curve naming the
    levels) on a residual network where its own fraction of ReLU pre-activations with noise
    sd above their magnitude passes the calibrated limit; not at small noise, and never on
    an MLP, where it stays right far beyond that fraction."""
    from noiseprop.theory.predict import MOMENTS_WARN_FRACTION

    x, y = held_out(80)
    res = trained("resnet")
    with pytest.warns(RuntimeWarning, match="moment method outside its measured range") as rec:
        p = predict(res, x, y, "relative:0.6", method="moments", accuracy_draws=0, loss_probes=0)
    assert [w.filename for w in rec if w.category is RuntimeWarning] == [__file__]
    assert p.diagnostics["preact_frac"] > MOMENTS_WARN_FRACTION["residual"] and p.warnings
    with pytest.warns(RuntimeWarning, match=r"moment method outside its measured range at levels 0\.6"):
        curve = predict_sweep(res, x, y, "relative", [0.05, 0.6], method="moments", accuracy_draws=0, loss_probes=0)
    assert [bool(q.warnings) for q in curve.predictions] == [False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        q = predict(trained("mlp"), x, y, "relative:1.0", method="moments", accuracy_draws=0, loss_probes=0)
    assert q.diagnostics["preact_frac"] > MOMENTS_WARN_FRACTION["residual"] and not q.warnings


def test_moments_warning_against_monte_carlo_on_resnet20():
    """The zoo's ResNet-20 trained on digits (120 test inputs, Monte-Carlo 100 draws): at
    η = 0.15 the moment method is within 1 point or Monte-Carlo's 95% CI and does not
    warn; at η = 0.4 it warns, and it overestimates the accuracy by more than a point and
    beyond the CI (the residual-network limit the warning is calibrated on)."""
    from noiseprop.empirical import load_dataset, monte_carlo, train

    data = load_dataset("digits")
    model = train({"name": "resnet20", "norm": "bn"}, data, seed=0).model
    x, y = data.x_test[:120], data.y_test[:120]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ok = predict(model, x, y, "relative:0.15", method="moments", accuracy_draws=0, loss_probes=0)
    mc = monte_carlo(model, x, y, "relative:0.15", draws=100, seed=0, progress=False)
    lo, hi = mc.accuracy_ci
    assert abs(ok.accuracy - mc.accuracy) <= 0.01 or lo <= ok.accuracy <= hi, (ok.accuracy, mc.accuracy_ci)
    with pytest.warns(RuntimeWarning, match="moment method outside its measured range"):
        far = predict(model, x, y, "relative:0.4", method="moments", accuracy_draws=0, loss_probes=0)
    mc = monte_carlo(model, x, y, "relative:0.4", draws=100, seed=0, progress=False)
    assert far.accuracy - mc.accuracy > 0.01 and far.accuracy > mc.accuracy_ci[1], (far.accuracy, mc.accuracy_ci)


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_jacobian_pass_per_layer_and_extra_scales(kind):
    """Per-layer shares add up to the total and each equals the exact reference with noise
    on that layer alone; an extra scale map gives the same covariance as its own pass."""
    model = trained(kind)
    x, _ = held_out(12)
    lin = LinearizedNetwork(model)
    unit = lin.unit_scales(RelativeGaussian(1.0))
    other = lin.unit_scales(Multiplicative(1.0))
    jp = jacobian_pass(lin, x, unit, per_layer=True, extra_units=[other, unit], chunk_size=5)
    total = sum(jp.layer_cov_unit.values())
    assert torch.allclose(total, jp.cov_unit, rtol=1e-9, atol=1e-12)
    layers = sorted({n.rpartition(".")[0] for n in lin.names})
    assert sorted(jp.layer_cov_unit) == layers
    for layer in layers[:2] + layers[-1:]:
        ref = _reference_cov(model, x, RelativeGaussian(1.0), targets={"layers": [layer]})
        assert torch.allclose(jp.layer_cov_unit[layer], ref, rtol=1e-3, atol=1e-6)
    ref_other = jacobian_pass(lin, x, other).cov_unit
    assert torch.allclose(jp.extra_cov[0], ref_other, rtol=1e-4, atol=1e-8)
    assert torch.allclose(jp.extra_cov[1], jp.cov_unit, rtol=1e-4, atol=1e-8)


# ----------------------------------------------------------------------------- issue 10
from noiseprop.theory.linearize import piecewise_linear  # noqa: E402
from noiseprop.theory.predict import Predictor, clear_cache  # noqa: E402


class _Shared(nn.Module):
    """One Linear layer called twice: the logits are quadratic in its weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.a(x.flatten(1)))
        return self.out(torch.relu(self.a(h)))


def test_piecewise_linear_detection():
    for kind in ("mlp", "cnn", "resnet"):
        ok, why = piecewise_linear(LinearizedNetwork(trained(kind)))
        assert ok, why
    for act in (nn.Tanh(), nn.GELU(), nn.SiLU()):
        m = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), act, nn.Linear(8, 10)).eval()
        ok, why = piecewise_linear(LinearizedNetwork(m))
        assert not ok and type(act).__name__ in why
    ok, why = piecewise_linear(LinearizedNetwork(_Shared().eval()))
    assert not ok and "called 2 times" in why


def _exact_half_trace_sigma_h(model, x, y, noise):
    """½ tr(Σ_ε H) from the exact Hessian diagonal (float64, torch.func.hessian per layer block)."""
    from torch.func import hessian

    m = copy.deepcopy(model).double()
    lin = LinearizedNetwork(m)
    tot = 0.0
    for n in lin.names:
        p0 = lin.target_params[n]

        def loss(w):
            out = functional_call(lin.net, ({**lin.params, n: w}, lin.buffers), (x.double(),))
            return torch.nn.functional.cross_entropy(out, y)

        H = hessian(loss)(p0).reshape(p0.numel(), p0.numel())
        tot += float((noise.variance(p0).reshape(-1) * torch.diagonal(H)).sum())
    return 0.5 * tot


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_default_loss_increase_is_exact_for_piecewise_linear_networks(kind):
    """For ReLU/max-pool/BN networks the default loss increase is the Gauss-Newton form,
    which equals ½ tr(Σ_ε H) of the exact Hessian (to rounding), with no probes."""
    model = trained(kind)
    x, y = held_out(12)
    noise = RelativeGaussian(0.05)
    p = predict(model, x, y, noise, cache=False)
    assert p.loss_increase_method.startswith("gauss_newton (exact") and p.loss_probes == 0
    assert p.loss_increase_se == 0.0 and p.loss_increase == p.loss_increase_gn
    want = _exact_half_trace_sigma_h(model, x, y, noise)
    assert p.loss_increase == pytest.approx(want, rel=1e-4)
    # per-layer shares add up; asking for probes uses Hutchinson and agrees within 4 s.e.
    q = predict(model, x, y, noise, per_layer=True, cache=False)
    assert sum(q.loss_increase_by_layer.values()) == pytest.approx(q.loss_increase_gn, rel=1e-9)
    # in network order (was a set's, which changes with the process's string hashing)
    noisy = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert list(q.loss_increase_by_layer) == noisy
    h = predict(model, x, y, noise, loss_probes=48, seed=1, cache=False)
    assert h.loss_increase_method == "hutchinson" and h.loss_probes == 48
    assert abs(h.loss_increase - want) < 4 * h.loss_increase_se


def test_smooth_network_uses_the_hessian_estimator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).eval()
    x, y = held_out(20)
    noise = RelativeGaussian(0.1)
    p = predict(model, x, y, noise, cache=False)
    assert p.loss_increase_method == "hutchinson" and p.loss_probes == 16
    want = _exact_half_trace_sigma_h(model, x, y, noise)
    assert abs(p.loss_increase - want) < 4 * p.loss_increase_se
    g = predict(model, x, y, noise, loss_increase="gauss_newton", cache=False)
    assert g.loss_increase_method.startswith("gauss_newton (approximation") and math.isnan(g.loss_increase_se)


def test_cache_and_predictor_reuse_one_pass():
    model = trained("mlp")
    x, y = held_out(30)
    before = copy.deepcopy(model.state_dict())
    clear_cache()
    a = predict(model, x, y, RelativeGaussian(0.1))
    b = predict(model, x, y, RelativeGaussian(0.3))
    assert a.diagnostics["derivative_pass"] == "computed" and b.diagnostics["derivative_pass"] == "cached"
    ref = predict(model, x, y, RelativeGaussian(0.3), cache=False)
    assert b.accuracy == ref.accuracy and torch.equal(b.logit_var, ref.logit_var)
    assert predict(model, x, y, "additive:0.01").diagnostics["derivative_pass"] == "computed"  # another family
    # a changed model gets a fresh pass, never a stale one
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        m2[1].weight.mul_(1.1)
    c = predict(m2, x, y, RelativeGaussian(0.3))
    assert c.diagnostics["derivative_pass"] == "computed" and not torch.equal(c.logit_var, b.logit_var)
    # Predictor: the same numbers, one pass per family
    pr = Predictor(model, x, y, accuracy_draws=8, seed=2)
    p1 = pr.predict(RelativeGaussian(0.3))
    curve = pr.sweep("relative", [0.1, 0.3])
    assert curve.predictions[1].diagnostics["derivative_pass"] == "cached"
    ref = predict(model, x, y, RelativeGaussian(0.3), accuracy_draws=8, seed=2, cache=False)
    for q in (p1, curve.predictions[1]):
        assert q.accuracy == pytest.approx(ref.accuracy, rel=1e-12)
        assert q.accuracy_std == pytest.approx(ref.accuracy_std, rel=1e-12)
    assert "1 derivative pass" in repr(pr)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="loss_increase must be one of"):
        predict(model, x, y, "relative:0.1", loss_increase="exact")
    with pytest.raises(TypeError, match="cache must be True or False"):
        predict(model, x, y, "relative:0.1", cache="yes")
    with pytest.raises(ValueError, match="levels is empty"):
        pr.sweep("relative", [])
    with pytest.raises(ValueError, match="needs loss_probes >= 2"):
        predict(model, x, y, "relative:0.1", loss_increase="hutchinson", loss_probes=0)


def test_closest_competitors_only():
    """classes=k: the slot covariance is the full one restricted to the label and its k
    closest competitors; the accuracy's truncation error is measured and reported."""
    mod = __import__("sys").modules[predict.__module__]
    model = trained("cnn")
    x, y = held_out(40)
    lin = LinearizedNetwork(model)
    u = lin.unit_scales(RelativeGaussian(1.0))
    full = jacobian_pass(lin, x, u, chunk_size=9)
    tk = jacobian_pass(lin, x, u, chunk_size=9, classes=3, labels=y)
    sel = tk.classes
    assert sel.shape == (40, 4) and torch.equal(sel[:, 0], y)
    ref = full.cov_unit.gather(1, sel[:, :, None].expand(-1, -1, 10)).gather(2, sel[:, None, :].expand(-1, 4, -1))
    torch.testing.assert_close(tk.cov_unit, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    f = predict(model, x, y, "relative:0.1", cache=False)
    k = predict(model, x, y, "relative:0.1", classes=3, cache=False)
    d = k.diagnostics
    assert d["classes"] == 3 and d["classes_truncation_inputs"] == 8  # an eighth of 40, at least 8
    assert [mod._truncation_check_inputs(n) for n in (5, 40, 64, 100, 359, 10000)] == [5, 8, 8, 13, 32, 32]
    assert abs(k.accuracy - f.accuracy) <= d["classes_truncation_max_abs"] + 1e-6
    assert k.accuracy >= f.accuracy - 1e-4  # fewer constraints: an upper bound (up to QMC error)
    assert torch.isnan(k.logit_var).sum() == 40 * 6
    known = ~torch.isnan(k.logit_var)
    torch.testing.assert_close(k.logit_var[known], f.logit_var[known])
    every = predict(model, x, y, "relative:0.1", classes=9, cache=False)  # all competitors: the full pass
    assert every.accuracy == f.accuracy and "classes" not in every.diagnostics
    with pytest.raises(ValueError, match="method='linear'"):
        predict(model, x, y, "relative:0.1", classes=3, method="moments")
    with pytest.raises(ValueError, match="cov=True"):
        predict(model, x, y, "relative:0.1", classes=3, cov=True)
    with pytest.raises(ValueError, match="classes must be an integer >= 1"):
        predict(model, x, y, "relative:0.1", classes=0)


def test_truncated_gauss_newton_adds_the_other_classes_from_the_check():
    """classes=k: the Gauss-Newton loss increase is the label-and-competitors part of every
    input, the exact terms of the truncation check's inputs (the half with the largest
    left-out softmax mass times logit variance, then evenly spaced ones), and a ratio estimate of what the left-out
    classes add to the rest. Against the full pass (the exact reference): its error is
    within the estimated part it reports, and far below the part alone's; exact when
    every input is checked."""
    mod = __import__("sys").modules[predict.__module__]
    from noiseprop.theory.flatness import gauss_newton_per_input

    model = trained("cnn")
    x, y = held_out(40)
    lin = LinearizedNetwork(model)
    unit = lin.unit_scales(RelativeGaussian(1.0))
    f = predict(model, x, y, "relative:0.1", cache=False)
    for k in (1, 2):
        p = predict(model, x, y, "relative:0.1", classes=k, cache=False)
        d = p.diagnostics
        assert d["classes_truncation_inputs"] == 8 and d["classes_truncation_largest"] == 4
        tk = jacobian_pass(lin, x, unit, classes=k, labels=y)
        proxy = mod._omitted_proxy(tk)
        idx, top = mod._check_split(proxy, 8)
        assert set(idx[top].tolist()) == set(torch.argsort(proxy, descending=True)[:4].tolist())
        part_only = 0.01 * float(gauss_newton_per_input(tk.clean_logits, mod._slot_cov_to_full(
            tk.cov_unit.double(), tk.classes, 10)).mean())
        err = abs(p.loss_increase_gn - f.loss_increase_gn)
        assert err <= d["classes_truncation_loss_estimated_share"] * p.loss_increase_gn + 1e-9 * f.loss_increase_gn
        assert err < 0.5 * abs(part_only - f.loss_increase_gn)
        assert math.isnan(p.loss_increase_se) and "estimated on the truncation check" in p.loss_increase_method
    few = predict(model, x[:6], y[:6], "relative:0.1", classes=1, cache=False)  # every input checked
    ref = predict(model, x[:6], y[:6], "relative:0.1", cache=False)
    assert few.diagnostics["classes_truncation_loss_estimated_share"] == 0.0
    assert few.loss_increase_gn == pytest.approx(ref.loss_increase_gn, rel=1e-5)


def test_truncated_gauss_newton_is_stable_where_the_sample_has_no_left_out_mass():
    """A float32 network whose evenly spaced check sample has almost no softmax mass
    outside the label and its competitor, while 24 other inputs do: the ratio estimate's
    scale comes from the check pass alone (two passes' float32 rounding once made it
    5.9e3 times too large here), so the error stays within the estimated part."""
    torch.manual_seed(0)
    c, n = 10, 400
    net = nn.Sequential(nn.Linear(c, c))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(c) + 0.05 * torch.randn(c, c))
        net[0].bias.zero_()
    y = torch.arange(n) % c
    z = torch.full((n, c), -40.0)
    z[torch.arange(n), y] = 0.0
    z[torch.arange(n), (y + 1) % c] = -10.0
    hard = torch.arange(3, n, 16)[:24]
    z[hard] = -torch.rand(len(hard), c)
    z[hard, y[hard]] = 0.3
    x = torch.linalg.solve(net[0].weight.detach(), z.T).T  # logits ≈ z
    full = predict(net, x, y, "relative:0.1", cache=False)
    for k in (1, 2):
        p = predict(net, x, y, "relative:0.1", classes=k, cache=False)
        share = p.diagnostics["classes_truncation_loss_estimated_share"]
        assert 0 < share < 0.05
        assert abs(p.loss_increase_gn / full.loss_increase_gn - 1) <= share


def test_cache_tells_models_with_equal_parameters_apart():
    """Two networks with the same parameters but another activation (or a forward replaced
    on an instance) never share a cached derivative pass."""
    outs = []
    for act in (nn.Tanh(), nn.Sigmoid(), nn.ReLU()):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 12), act, nn.Linear(12, 3)).eval()
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
        y = torch.zeros(16, dtype=torch.int64)
        p = predict(net, x, y, RelativeGaussian(0.3), diagnostic=False)
        q = predict(net, x, y, RelativeGaussian(0.3), diagnostic=False, cache=False)
        assert torch.equal(p.logit_var, q.logit_var)
        outs.append(p.logit_var)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_structure_memo_follows_the_network():
    """Trace-derived results (piecewise-linearity, the diagnostic's graph) are remembered per
    network object and recomputed when its structure changes in place."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    assert piecewise_linear(LinearizedNetwork(m))[0]
    m[2] = nn.Tanh()  # same object, new structure: no stale answer
    ok, why = piecewise_linear(LinearizedNetwork(m))
    assert not ok and "Tanh" in why
    x, y = held_out(16)
    p = predict(m, x, y, RelativeGaussian(0.1), cache=False)
    assert p.loss_increase_method == "hutchinson" and p.diagnostics["preact_source"] == "no ReLU-like activation in the model"


class _Switch(nn.Module):
    """A forward that branches on a plain attribute (not in the module tree)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(64, 8), nn.Linear(8, 10), "relu"

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.b(torch.relu(h) if self.act == "relu" else torch.tanh(h))


@pytest.mark.parametrize("cache", [True, False])
def test_structure_memo_sees_plain_attributes(cache):
    """Changing an attribute the forward branches on retraces (memo and derivative cache),
    and ``cache=False`` remembers nothing: the same answers as a fresh object."""
    torch.manual_seed(0)
    net = _Switch().eval()
    x, y = held_out(16)
    assert predict(net, x, y, RelativeGaussian(0.1), cache=cache).loss_increase_method.startswith("gauss_newton")
    net.act = "tanh"
    p = predict(net, x, y, RelativeGaussian(0.1), cache=cache)
    fresh = _Switch().eval()
    fresh.load_state_dict(net.state_dict())
    fresh.act = "tanh"
    q = predict(fresh, x, y, RelativeGaussian(0.1), cache=False)
    assert p.loss_increase_method == q.loss_increase_method == "hutchinson"
    assert p.diagnostics["preact_source"] == q.diagnostics["preact_source"] == "no ReLU-like activation in the model"
    assert torch.equal(p.logit_var, q.logit_var)



class _Attrs(nn.Module):
    """A forward that calls a function attribute, divides by a plain tensor attribute and
    reads a list attribute (none of them parameters, buffers or submodules)."""

    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)
        self.act, self.t, self.order = act, torch.tensor(1.0), list(range(10))

    def forward(self, x):
        return self.b(self.act(self.a(x.flatten(1))))[:, self.order] / self.t


def test_cache_sees_function_tensor_and_list_attributes_and_hooks():
    """Another model object with the same parameters but another function attribute, a
    tensor attribute changed, a list attribute reordered, a forward hook or a forward
    pre-hook added: each gets its own derivative pass (the clean accuracy and the
    prediction equal a fresh ``cache=False`` call), never the cached pass of before."""
    import torch.nn.functional as F

    x, y = held_out(48)
    clear_cache()
    first = _Attrs(F.relu).eval()
    predict(first, x, y, RelativeGaussian(0.1))

    def fresh_and_cached(net):
        p = predict(net, x, y, RelativeGaussian(0.1), diagnostic=False)
        q = predict(net, x, y, RelativeGaussian(0.1), diagnostic=False, cache=False)
        with torch.no_grad():
            clean = float((net(x).argmax(1) == y).double().mean())
        assert p.clean_accuracy == q.clean_accuracy == pytest.approx(clean)
        assert torch.equal(p.logit_var, q.logit_var)
        return p

    base = fresh_and_cached(first)
    other = _Attrs(torch.sigmoid).eval()  # another object, equal parameters, another function
    other.load_state_dict(first.state_dict())
    assert not torch.allclose(fresh_and_cached(other).logit_var, base.logit_var)
    first.t = torch.tensor(-1.0)
    assert fresh_and_cached(first).clean_accuracy != base.clean_accuracy
    first.t = torch.tensor(1.0)
    first.order.reverse()
    assert fresh_and_cached(first).clean_accuracy != base.clean_accuracy
    first.order.reverse()
    assert torch.equal(fresh_and_cached(first).logit_var, base.logit_var)  # back to the first state
    h = first.a.register_forward_hook(lambda mod, inp, out: -out)
    assert fresh_and_cached(first).clean_accuracy != base.clean_accuracy
    h.remove()
    h = first.b.register_forward_pre_hook(lambda mod, inp: (inp[0] * 0,))
    assert fresh_and_cached(first).clean_accuracy != base.clean_accuracy
    h.remove()
    assert torch.equal(predict(first, x, y, RelativeGaussian(0.1), diagnostic=False).logit_var, base.logit_var)

@pytest.mark.parametrize("kind,noise,dtype", [("mlp", "relative", torch.float64), ("resnet", "relative", torch.float64),
                                              ("resnet", "additive", torch.float64), ("resnet", "relative", torch.float32)])
def test_diagnostic_differences_match_forward_mode(kind, noise, dtype):
    """The diagnostic's one-sided differences (a perturbation of ``DIAGNOSTIC_STEP`` = t of
    the weights' rms) against forward mode (the exact ``J (u ⊙ ξ)``, same directions).
    In float64 rounding is out of the way, and what is left is the step's second-order
    term, relative ``≈ t × (noisy layers on the path)`` (a separate run at a step of 1e-5
    isolates it: at most ``2.6 ×`` the step), and the gates that flip within the step,
    which move a few units downstream of them by up to 30% on the residual net; additive
    noise is stepped at the level that perturbs the weights as much as relative noise at
    ``t``. In float32 (what runs) rounding adds ``≈ 1e-7 |μ| / (t sd₁)``. So: the median
    relative difference of the sds below ``10 t``, and the fractions outside the range at
    levels 0.1, 0.3 and 1 (what the diagnostic reports) within 1e-3, a 300th of the warning
    threshold and below the directions' own sampling error (another seed moves these
    fractions by 2e-3 to 1.6e-2 on the residual net)."""
    mod = __import__("sys").modules[predict.__module__]  # the module: `predict` is also its function's name

    net = copy.deepcopy(trained(kind)).to(dtype)
    x, _ = held_out(16)
    lin = LinearizedNetwork(net)
    unit = lin.unit_scales(parse_noise(f"{noise}:1"))
    fwd, how_f = mod._preact_ratios(lin, x.to(dtype), unit, 8, 0, step=None)
    dif, how_d = mod._preact_ratios(lin, x.to(dtype), unit, 8, 0)
    assert "forward-mode" in how_f and "one-sided differences" in how_d
    assert fwd.shape == dif.shape and np.array_equal(np.isinf(fwd), np.isinf(dif))
    fin = np.isfinite(fwd)
    rel = np.abs(dif[fin] / fwd[fin] - 1)
    assert np.median(rel) < 10 * mod.DIAGNOSTIC_STEP
    for lam in (0.1, 0.3, 1.0):
        assert abs(float((fwd < lam).mean()) - float((dif < lam).mean())) <= 1e-3


def test_diagnostic_directions_remembered_unchanged():
    """The diagnostic's standard normal directions, remembered with the network's
    structure, are the seeded draws themselves and are not modified by a call: a second
    call (from the memo) and a call with the memo off give the same ratios, bit for bit;
    another seed gives other directions."""
    mod = __import__("sys").modules[predict.__module__]
    net = trained("resnet")
    x, _ = held_out(8)
    lin = LinearizedNetwork(net)
    unit = lin.unit_scales(RelativeGaussian(1.0))
    tp0 = {k: lin.target_params[k] for k in lin.names}
    first = mod._preact_ratios(lin, x, unit, 8, 0)[0]
    z = mod._diagnostic_normals(lin, tp0, 8, 0)
    assert mod._diagnostic_normals(lin, tp0, 8, 0) is z  # remembered
    again = mod._preact_ratios(lin, x, unit, 8, 0)[0]
    off = LinearizedNetwork(net)
    off.memo = False
    fresh = mod._diagnostic_normals(off, tp0, 8, 0)
    assert fresh is not z and all(torch.equal(fresh[k], z[k]) for k in z)
    assert np.array_equal(first, again) and np.array_equal(first, mod._preact_ratios(off, x, unit, 8, 0)[0])
    other = mod._diagnostic_normals(lin, tp0, 8, 1)
    assert not torch.equal(other[lin.names[0]], z[lin.names[0]])
    back = mod._diagnostic_normals(lin, tp0, 8, 0)  # one set per network: redrawn, not accumulated
    assert back is not z and all(torch.equal(back[k], z[k]) for k in z)


def test_uniform_scale_pass_in_half_precision():
    """A scale uniform over a whole weight is applied after the contraction only in
    float32/float64: in float16 the unscaled Gram term of large inputs would overflow, so
    the signals are scaled first, as before (finite, and close to the float32 pass). With
    draws the per-sample Jacobian route runs (the Gram route without draws has its own
    float16 limit, ⟨x_p, x_q⟩ of large inputs, unchanged by this)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2000, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        net[0].weight.mul_(0.3)
    x = torch.randn(4, 2000) * 100
    ref = LinearizedNetwork(net)
    half = LinearizedNetwork(copy.deepcopy(net).half())
    for draws in (5,):
        c32 = jacobian_pass(ref, x, ref.scales(RelativeGaussian(1.0)), draws=draws).cov_unit
        c16 = jacobian_pass(half, x.half(), half.scales(RelativeGaussian(1.0)), draws=draws).cov_unit
        assert torch.isfinite(c16).all()
        torch.testing.assert_close(c16, c32, rtol=0.05, atol=0.05 * float(c32.abs().max()))


class _Affine(nn.Module):
    def forward(self, x):
        return 2 * x + 1


def test_diagnostic_keeps_a_hooked_batchnorm():
    """The diagnostic's forward-mode graph replaces only a plain torch BatchNorm by its
    affine map: one with a forward hook gives the same fractions as the same function
    written as BatchNorm followed by that map (a subclass is traced through, or the
    diagnostic says it is not available)."""
    mod = __import__("sys").modules[predict.__module__]

    def net(tail):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), *tail, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
        with torch.no_grad():
            m[1].running_mean.uniform_(-1, 1)
            m[1].running_var.uniform_(0.5, 2.0)
        return m.eval()

    hooked, ref = net([]), net([_Affine()])
    hooked[1].register_forward_hook(lambda mod_, inp, out: 2 * out + 1)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), ref(x))
    out = []
    for m in (hooked, ref):
        lin = LinearizedNetwork(m)
        ratios, why = mod._preact_ratios(lin, x, lin.unit_scales(RelativeGaussian(1.0)), 8, 0)
        assert ratios is not None, why
        out.append(torch.as_tensor(ratios))
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_logit_loss_is_shift_invariant():
    """The cross-entropy does not see a common shift of the logits: a final bias of +1000
    leaves the Gaussian-logit loss increase unchanged (float32 holds only the logits
    relative to the label's, not the offset that would swamp a small increase)."""
    net, x, y = tiny_problem()
    net, x = net.double(), x.double()
    shifted = copy.deepcopy(net)
    with torch.no_grad():
        shifted[2].bias += 1000.0
    for level in (0.003, 0.03):
        a = predict(net, x, y, RelativeGaussian(level), cache=False, diagnostic=False)
        b = predict(shifted, x, y, RelativeGaussian(level), cache=False, diagnostic=False)
        assert b.loss_increase_logits == pytest.approx(a.loss_increase_logits, rel=1e-5)


def test_gaussian_logit_loss_against_sampling():
    """The float32 QMC estimate of E[CE] under Gaussian logits (relative to the clean loss,
    so no float32 bias at small levels) against plain float64 sampling (4 s.e.), with the
    projections kept or recomputed per call."""
    from noiseprop.theory import predict as P

    mod = __import__("sys").modules[P.__module__]
    g = torch.Generator().manual_seed(3)
    n, c = 40, 6
    mean = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    A = torch.randn(n, c, c, generator=g, dtype=torch.float64)
    cov_u = A @ A.mT / c
    y = torch.randint(0, c, (n,), generator=g)
    ce0 = float(torch.nn.functional.cross_entropy(mean, y))
    kept = mod._LogitLoss(cov_u, points=128, seed=0)
    budget = mod.LOSS_PROJECTION_BUDGET
    try:
        mod.LOSS_PROJECTION_BUDGET = 0
        chunked = mod._LogitLoss(cov_u, points=128, seed=0)
    finally:
        mod.LOSS_PROJECTION_BUDGET = budget
    assert kept.W is not None and chunked.W is None
    L = torch.linalg.cholesky(cov_u)
    draws = 4000
    z = torch.randn(draws, n, c, generator=g, dtype=torch.float64)
    for lv in (1e-3, 0.3, 1.0):
        est = kept.at(mean, y, lv)
        assert est == pytest.approx(chunked.at(mean, y, lv), rel=1e-9, abs=1e-12)
        f = mean + lv * torch.einsum("nab,knb->kna", L, z)
        per_draw = torch.nn.functional.cross_entropy(f.reshape(-1, c), y.repeat(draws), reduction="none")
        per_draw = per_draw.reshape(draws, n).mean(1)
        se = float(per_draw.std()) / math.sqrt(draws)
        assert abs(est - float(per_draw.mean())) < 4 * se + 1e-6
        if lv == 1e-3:  # tiny level: the increase itself, second order, stays accurate
            inc = float(per_draw.mean()) - ce0
            assert abs((est - ce0) - inc) < 4 * se + 1e-6


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.05), nn.LeakyReLU(0.05, inplace=True), nn.ELU(), nn.GELU(),
                                 nn.SiLU()], ids=lambda m: repr(m))
def test_validity_diagnostic_reads_relu_variants(act):
    """The first order's validity diagnostic counted ReLU pre-activations only: a
    LeakyReLU network got "no ReLU in the model" and never the warning, and so did (until
    stop 38) networks with ELU, GELU or SiLU. Now their pre-activations count (in place
    too): where the first order misses Monte-Carlo's accuracy by more than a point (4 s.e.
    beyond), it warns; where it agrees, it does not. The network is ``tiny_problem``'s
    with the activation in place of its ReLU."""
    relu_net, x, y = tiny_problem(48)
    net = nn.Sequential(relu_net[0], act, relu_net[2]).eval()
    y = net(x).argmax(1).detach()
    draws = 2000
    for eta, warns in ((0.02, False), (1.5, True)):
        noise = RelativeGaussian(eta)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            p = predict(net, x, y, noise, accuracy_draws=0, loss_probes=0)
        hits = [w for w in rec if "first order outside its range" in str(w.message)]
        assert len(hits) == int(warns), (eta, p.diagnostics)
        assert p.diagnostics["preact_frac"] > 0  # the kinks are read (it was 0: no ReLU)
        acc = (mc_logits(net, x, noise, draws, seed=1).argmax(-1) == y).double().mean(1)
        mc, se = float(acc.mean()), float(acc.std() / math.sqrt(draws))
        miss = abs(p.accuracy - mc)
        assert (miss > 0.01 + 4 * se) if warns else (miss < 0.01), (eta, p.accuracy, mc, se)


def test_gaussian_logit_loss_from_a_factor():
    """``factor=Lh`` (``cov = Lh Lhᵀ``): the full Cholesky factor gives the covariance's
    estimate to the bit; a factor over some classes only (the slot covariance's Cholesky
    factor in the selected rows, the others noiseless, what ``predict_drift(classes=k)``
    hands over) agrees with the estimate from the singular expanded covariance within 4
    s.e. of their difference over eight QMC randomisations."""
    from noiseprop.theory import predict as P
    from noiseprop.theory.predict import _slot_cov_to_full

    mod = __import__("sys").modules[P.__module__]
    g = torch.Generator().manual_seed(4)
    n, c, s = 30, 6, 3
    mean = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    A = torch.randn(n, c, c, generator=g, dtype=torch.float64)
    cov = A @ A.mT / c
    y = torch.randint(0, c, (n,), generator=g)
    assert mod._gaussian_logit_loss(mean, None, y, seed=2, factor=torch.linalg.cholesky(cov)) == \
        mod._gaussian_logit_loss(mean, cov, y, seed=2)
    sel = torch.stack([torch.randperm(c, generator=g)[:s] for _ in range(n)])
    B = torch.randn(n, s, s, generator=g, dtype=torch.float64)
    cs = B @ B.mT / s
    F = torch.zeros(n, c, s, dtype=torch.float64).scatter_(1, sel[:, :, None].expand(-1, -1, s), torch.linalg.cholesky(cs))
    d = np.array([mod._gaussian_logit_loss(mean, None, y, seed=k, factor=F)
                  - mod._gaussian_logit_loss(mean, _slot_cov_to_full(cs, sel, c), y, seed=k) for k in range(8)])
    assert abs(d.mean()) < 4 * d.std(ddof=1) / math.sqrt(d.size) + 1e-12, d


class _Out(nn.Module):
    """A small MLP whose logits pass through ``how`` (a function of the logits and x)."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.how = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), how

    def forward(self, x):
        return self.how(self.net(x), x)


@pytest.mark.parametrize("how,match", [
    (lambda o, x: o + torch.where(x.flatten(1).mean(1, keepdim=True) < 0, float("inf"), 0.0),
     r"clean logits on x contain NaN or infinite values \(inputs \[1, 2, "),
    (lambda o, x: o + torch.where(x.flatten(1).mean(1, keepdim=True) < 0, float("nan"), 0.0),
     r"clean logits on x contain NaN or infinite values \(inputs \[1, 2, "),
    (lambda o, x: o * 1e30, r"first-order logit covariance is not finite .*largest clean logit magnitude"),
    (lambda o, x: o.mean(0, keepdim=True), r"returned 1 rows of logits for 48 inputs"),
    (lambda o, x: o[:, :1], r"returns 1 logit per input; accuracy and cross-entropy need at least 2 classes"),
])
def test_logits_the_prediction_cannot_use_are_refused(how, match):
    """Logits that are NaN or infinite on some inputs (the first input is finite), so
    large that the derivatives overflow, one row for the whole batch, or one class: a
    clear error from predict and sensitivity, where they gave NaN accuracy, an eigh
    failure or a shape error about ``cov`` (the first of these inputs has a positive mean,
    the next two negative ones)."""
    from noiseprop.theory import sensitivity

    x, y = held_out(48)
    y = y.clamp(max=0) if "1 logit" in match else y
    with torch.no_grad():
        assert torch.isfinite(_Out(how)(x[:1])).all() or "1 rows" in match
    calls = [lambda: predict(_Out(how).eval(), x, y, RelativeGaussian(0.05), cache=False),
             lambda: sensitivity(_Out(how).eval(), x, y, RelativeGaussian(0.05))]
    if "clean logits" in match:  # the curvature gave a NaN trace and an ARPACK failure
        from noiseprop.theory import hessian_top_eigenvalue, hessian_trace

        calls += [lambda: hessian_trace(_Out(how).eval(), x, y, RelativeGaussian(0.05), probes=4),
                  lambda: hessian_top_eigenvalue(_Out(how).eval(), x, y)]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


def test_moment_probabilities_stay_within_zero_and_one():
    """The moment method's per-input probabilities (the mixture's weighted average of
    ones, which rounding put at 1 + 2e-16) and its bounds lie in [0, 1]; at a level where
    the propagated moments overflow it says so."""
    x, y = held_out(32)
    net = trained("mlp")
    p = predict(net, x, y, RelativeGaussian(1e-8), method="moments", cache=False)
    for t in (p.correct_prob, torch.as_tensor(p.accuracy_upper), torch.as_tensor(p.accuracy_lower)):
        assert float(t.max()) <= 1.0 and float(t.min()) >= 0.0
    with torch.no_grad():
        assert p.accuracy == pytest.approx(float((net(x).argmax(1) == y).double().mean()), abs=1e-12)


def test_models_the_prediction_cannot_take_are_named():
    """A DataParallel wrapper, a TorchScript module and a weight_norm parametrization get
    errors that say what to pass instead; inputs without the channel dimension of a
    BatchNorm network (torch raises a ValueError there) read "x does not fit the model"."""
    from torch.nn.utils.parametrizations import weight_norm

    x, y = held_out(16)

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()

    with pytest.raises(ValueError, match=r"DataParallel.*pass the wrapped network, model.module"):
        predict(nn.DataParallel(mlp()), x, y, RelativeGaussian(0.1))
    for scripted in (torch.jit.script(mlp()), torch.jit.trace(mlp(), x)):
        with pytest.raises(TypeError, match=r"TorchScript module .* pass the original torch.nn.Module"):
            predict(scripted, x, y, RelativeGaussian(0.1))
    net = mlp()
    weight_norm(net[1])
    with pytest.raises(ValueError, match=r"\['1.weight'\] are parametrized .*remove_parametrizations"):
        predict(net, x, y, RelativeGaussian(0.1))
    # a parametrized layer left without noise: the first order runs, the moment method
    # (per-layer rules over the layers' weights) names it (a raw KeyError before)
    p = predict(net, x, y, RelativeGaussian(0.1), targets={"layers": ["3"]})
    assert 0 <= p.accuracy <= 1
    with pytest.raises(ValueError, match=r"cannot follow layer '1': its weight is computed .*remove_parametrizations"):
        predict(net, x, y, RelativeGaussian(0.1), targets={"layers": ["3"]}, method="moments")
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()
    with pytest.raises(ValueError, match=r"x does not fit the model: .* shape \(16, 8, 8\) .*expected 4D input"):
        predict(bn, x[:, 0], y, RelativeGaussian(0.1))


def test_numpy_inputs_torch_cannot_share_and_sparse_inputs():
    """Numpy inputs with negative strides, a non-native byte order or read-only memory
    give the same prediction as the tensors; an object-dtype y and a sparse x get errors
    naming them (before: torch's negative-stride message, a conversion TypeError, a
    NotImplementedError from isfinite)."""
    x, y = held_out(16)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    ref = predict(net, x.flip(0), y.flip(0), RelativeGaussian(0.1), cache=False, diagnostic=False)
    ro = x.flip(0).numpy().copy()
    ro.flags.writeable = False
    for xa in (x.numpy()[::-1], x.flip(0).numpy().astype(">f4"), ro):
        p = predict(net, xa, y.numpy()[::-1], RelativeGaussian(0.1), cache=False, diagnostic=False)
        assert torch.equal(p.logit_var, ref.logit_var) and p.accuracy == ref.accuracy
    with pytest.raises(TypeError, match="y must hold integer class labels; got a numpy array of dtype object"):
        predict(net, x, y.numpy().astype(object), RelativeGaussian(0.1))
    with pytest.raises(TypeError, match="x must be a dense tensor, got layout torch.sparse_coo"):
        predict(net, x.reshape(16, 64).to_sparse(), y, RelativeGaussian(0.1))


@pytest.mark.parametrize("classes", [None, 2])
def test_a_dead_head_predicts_its_clean_accuracy(classes):
    """Every logit equal and noiseless (a zero head under relative noise): argmax picks
    class 0, so the accuracy is the share of label 0, at every level, with every class
    differentiated or only the label and two competitors (ties by class, not slot)."""
    x, y = held_out(64)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        net[3].weight.zero_()
        net[3].bias.zero_()
    share = float((y == 0).double().mean())
    for lv in (0.0, 0.1):
        p = predict(net, x, y, RelativeGaussian(lv), classes=classes, accuracy_draws=8, cache=False)
        assert p.clean_accuracy == pytest.approx(share) and p.accuracy == pytest.approx(share)


def test_first_order_flagged_at_a_moderate_fraction_with_a_large_predicted_drop():
    """The validity warning fired only above 30% of pre-activations beyond the first
    order's range; on small residual nets the first order already missed by 3.7 points at
    22% (Monte-Carlo, below), unflagged. Now a fraction above 15% with a predicted drop
    above 5 points is flagged too (the zoo's levels in (0.15, 0.30] all had drops under 2
    points and were within: no new false alarm there, benchmarks/predict_vs_mc.py --parts
    calibrate); predict's flag, warning and the report's first_order_valid agree; for
    hardware noise the drop counts from the network with the expected weights."""
    from noiseprop.empirical import monte_carlo
    from noiseprop.empirical.studies.theory_helpers import first_order_valid
    from noiseprop.theory.predict import PREACT_WARN_FRACTION, PREACT_WARN_LOW, range_warning

    assert range_warning(0.2) is None and range_warning(0.2, drop=0.04) is None
    assert range_warning(0.12, drop=0.5) is None and range_warning(0.31) is not None
    assert "predicted accuracy drop of 10.0 points" in range_warning(0.2, drop=0.10)
    x, y = held_out(120)
    net = trained("resnet")
    with pytest.warns(RuntimeWarning, match="first order outside its range.*predicted accuracy drop"):
        p = predict(net, x, y, RelativeGaussian(0.2), cache=False)
    frac = p.diagnostics["preact_frac"]
    assert PREACT_WARN_LOW < frac <= PREACT_WARN_FRACTION and p.diagnostics["first_order_flagged"]
    assert not first_order_valid([frac], [p.diagnostics["first_order_flagged"]])[0]
    assert first_order_valid([frac])[0]  # the fraction alone (results recorded before the flag)
    mc = monte_carlo(net, x, y, RelativeGaussian(0.2), draws=400, seed=0, progress=False)
    lo, hi = mc.accuracy_ci
    assert p.accuracy - mc.accuracy > 0.01 and p.accuracy > hi  # a real miss, not a false alarm
    q = predict(net, x, y, RelativeGaussian(0.1), cache=False)
    assert not q.diagnostics["first_order_flagged"] and not q.warnings
    # hardware noise: the drop from the network with the expected weights (stuck-at
    # faults shift the mean too); the first order 6 points high at a fraction below 0.30
    with pytest.warns(RuntimeWarning, match="predicted accuracy drop"):
        h = predict(net, x, y, "stuck:0.01,max=0.005", accuracy_draws=0)
    frac = h.diagnostics["preact_frac"]
    assert PREACT_WARN_LOW < frac <= PREACT_WARN_FRACTION and h.diagnostics["first_order_flagged"]
    mc = monte_carlo(net, x, y, "stuck:0.01,max=0.005", draws=300, seed=0, progress=False)
    assert h.accuracy - mc.accuracy > 0.01 and h.accuracy > mc.accuracy_ci[1]


def test_loss_increase_is_the_methods_own():
    """``method="moments"`` and hardware noise give the expected cross-entropy increase
    under the Gaussian logits they predict (``loss_increase_logits``), labelled so;
    ``loss_increase_gn`` keeps the first order's ½ tr(Σ_ε H). On the digits MLP at
    η = 1 the moment method's loss is 1.232 against Monte-Carlo's 1.139-1.192 (four seeds,
    200-1000 draws): the Gaussian-logit closure's own bias, 3-8%, so within 10% plus 3 s.e.;
    ½ tr(Σ_ε H) is 0.32, far below."""
    from noiseprop.empirical import monte_carlo

    model = trained("mlp")
    x, y = held_out(120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = predict(model, x, y, "relative:1.0", method="moments", cache=False)
        h = predict(model, x, y, "pcm:3600", cache=False)
    assert p.loss_increase_method == "gaussian logits (moment method)" and p.loss_increase == p.loss_increase_logits
    assert h.loss_increase_method == "gaussian logits (hardware noise)" and h.loss_increase == h.loss_increase_logits
    mc = monte_carlo(model, x, y, "relative:1.0", draws=200, seed=0)
    obs = float(np.mean(mc.losses)) - mc.clean_loss
    se = float(np.std(mc.losses, ddof=1)) / math.sqrt(len(mc.losses))
    assert abs(p.loss_increase - obs) < 0.1 * obs + 3 * se, (p.loss_increase, obs, se)
    assert p.loss_increase_gn < 0.5 * obs - 3 * se  # the second-order term alone misses most of it here
    with pytest.raises(ValueError, match="method='moments' gives the loss of its own Gaussian logits"):
        predict(model, x, y, "relative:1.0", method="moments", loss_probes=8)
