"""The linearised network (theory/linearize.py): functional evaluation, unit scales,
forward-mode products against finite differences, chunking, the first-order loss
change against its definition, and the guarantees (no mutation, eval mode, non-finite
parameters refused)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from noiseprop.theory import Multiplicative, RelativeGaussian
from noiseprop.theory.linearize import (
    LinearizedNetwork,
    auto_chunk_size,
    pass_chunk_size,
    first_order_loss_change,
    jacobian_pass,
)
from predict_nets import held_out, trained


@pytest.fixture(scope="module")
def cnn():
    return trained("cnn")


def test_forward_equals_the_model_and_replaces_only_the_given_parameters(cnn):
    x, _ = held_out(16)
    lin = LinearizedNetwork(cnn)
    with torch.no_grad():
        assert torch.allclose(lin.forward(x), cnn(x), rtol=1e-5, atol=1e-5)
        zero = {n: torch.zeros_like(p) for n, p in lin.target_params.items()}
        out = lin.forward(x, zero)
    # every Conv/Linear weight zeroed: the logits are the last layer's bias, the same for every input
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)
    assert torch.allclose(lin.logits(x, batch_size=5), cnn(x), rtol=1e-5, atol=1e-4)  # float32, other batch shapes


def test_unit_scales_are_the_noise_model_at_level_one(cnn):
    lin = LinearizedNetwork(cnn)
    for noise in (RelativeGaussian(0.3), Multiplicative(0.2)):
        unit = lin.unit_scales(noise)
        full = lin.scales(noise)
        for n, p in lin.target_params.items():
            assert torch.allclose(unit[n] * noise.level, full[n], rtol=1e-6)
            assert torch.allclose(full[n] ** 2, noise.variance(p), rtol=1e-5)


def test_linearized_logits_match_central_finite_differences(cnn):
    """f + Jδ from forward-mode AD equals (f(θ+hδ) − f(θ−hδ))/2h in float64."""
    x, _ = held_out(8)
    net = copy.deepcopy(cnn).double()
    lin = LinearizedNetwork(net)
    g = torch.Generator().manual_seed(3)
    delta = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1 for n, p in lin.target_params.items()}
    f0, fl = lin.linearized_logits(x.double(), delta)
    h = 1e-5
    with torch.no_grad():
        up = lin.forward(x.double(), {n: p + h * delta[n] for n, p in lin.target_params.items()})
        dn = lin.forward(x.double(), {n: p - h * delta[n] for n, p in lin.target_params.items()})
    assert torch.allclose(fl - f0, (up - dn) / (2 * h), rtol=1e-5, atol=1e-8)
    # a sequence in target order is accepted too; a wrong shape is named
    _, fl2 = lin.linearized_logits(x.double(), [delta[n] for n in lin.names])
    assert torch.allclose(fl, fl2)
    bad = dict(delta)
    bad[lin.names[0]] = torch.zeros(3)
    with pytest.raises(ValueError, match=lin.names[0]):
        lin.linearized_logits(x.double(), bad)


def test_chunking_does_not_change_the_covariance(cnn):
    x, _ = held_out(23)
    lin = LinearizedNetwork(cnn)
    unit = lin.unit_scales(RelativeGaussian(1.0))
    a = jacobian_pass(lin, x, unit, chunk_size=4).cov_unit
    b = jacobian_pass(lin, x, unit, chunk_size=23).cov_unit
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-10)
    assert auto_chunk_size(10, 10**9) == 1 and auto_chunk_size(10, 10, cap=64) == 64


def test_default_chunk_follows_what_one_input_holds(cnn):
    """The default chunk of the pass (:func:`pass_chunk_size`, from a one-input probe):
    the covariance is the same as in chunks of 4; the size scales with the budget
    and stops at the cap, or at the small-working-set bound where that is more (this
    network: about 230 kB per input, 141 inputs in 32 MiB); and each convolution is
    budgeted for the route that ``tap_covariance`` actually takes (Gram matrices exactly
    when it does not return ``None``)."""
    from noiseprop.theory.linearize import SMALL_CHUNK_WORKSET, _gram_cheaper, tap_covariance, tapping

    x, _ = held_out(23)
    lin = LinearizedNetwork(cnn)
    unit = lin.unit_scales(RelativeGaussian(1.0))
    jp = jacobian_pass(lin, x, unit)
    assert 1 < jp.chunk_size
    assert torch.allclose(jp.cov_unit, jacobian_pass(lin, x, unit, chunk_size=4).cov_unit, rtol=1e-6, atol=1e-10)
    mods = {id(m): (n, m) for n, m in cnn.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    with torch.no_grad(), tapping(mods) as taps:
        lin.forward(x[:1])
    one = pass_chunk_size(taps, 10, 0, budget=2**40, cap=10**9)  # budget // bytes per input
    per = 2**40 // one
    assert pass_chunk_size(taps, 10, 0, budget=7 * per) == 7
    assert pass_chunk_size(taps, 10, 0, budget=per // 2) == 1
    assert jp.chunk_size == max(128, SMALL_CHUNK_WORKSET // per) == 141
    assert pass_chunk_size(taps, 10, 0, budget=2**40) == 141
    assert pass_chunk_size(taps, 10, 0, budget=2**40, cap=200) == 200
    assert pass_chunk_size(taps, 10, 0, budget=100 * per, cap=200) == 100
    convs = [t for t in taps if isinstance(t.module, nn.Conv2d)]
    assert convs
    for t in convs:
        delta = torch.zeros((10,) + tuple(t.e.shape))
        L = t.e[0].numel() // t.module.out_channels
        assert _gram_cheaper(t.module, L, 10) == (tap_covariance(t, delta) is not None)


def test_chunk_keeps_the_all_parameter_budget_where_every_layer_forms_its_jacobian(cnn):
    """Per-element scales (multiplicative noise), draws or further scale maps make every
    layer form its per-sample Jacobian: the default chunk is then the all-parameter
    budget of ``auto_chunk_size``, not the Gram-route probe."""
    x, _ = held_out(40)
    lin = LinearizedNetwork(cnn)
    old = auto_chunk_size(10, lin.num_target_elements)
    rel = lin.unit_scales(RelativeGaussian(1.0))
    mult = lin.unit_scales(Multiplicative(1.0))
    assert old == 256  # this small network: the all-parameter budget reaches its cap, the probe's is 141
    assert jacobian_pass(lin, x, rel).chunk_size == 141
    assert jacobian_pass(lin, x, mult).chunk_size == old
    assert jacobian_pass(lin, x, rel, draws=4).chunk_size == old
    assert jacobian_pass(lin, x, rel, extra_units=(mult,)).chunk_size == old


def test_first_order_loss_change_is_the_directional_derivative():
    """gᵀδ of the mean cross-entropy: the derivative of CE(f + tΔ) at t = 0."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(30, 5, generator=g, dtype=torch.float64)
    d = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (30,), generator=g)
    t = 1e-6
    ce = lambda z: torch.nn.functional.cross_entropy(z, y).item()  # noqa: E731
    numeric = (ce(f + t * d) - ce(f - t * d)) / (2 * t)
    assert first_order_loss_change(f, f + d, y) == pytest.approx(numeric, rel=1e-6)


def test_model_untouched_eval_copy_and_non_finite_refused(cnn):
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    model = copy.deepcopy(cnn).train()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lin = LinearizedNetwork(model)
    assert any("training mode" in str(m.message) for m in w)
    assert model.training and not lin.net.training
    x, _ = held_out(4)
    lin.forward(x)
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    broken = copy.deepcopy(cnn)
    with torch.no_grad():
        next(p for p in broken.parameters() if p.dim() > 1)[0].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        LinearizedNetwork(broken)
    tiny = nn.Sequential(nn.Linear(3, 2))
    assert LinearizedNetwork(tiny).names == ("0.weight",)


def test_tap_jacobian_into_a_reused_buffer():
    """``tap_jacobian(..., scratch=...)`` writes a layer's per-sample Jacobian into one
    flat buffer reused across layers and chunks (grown when a larger one comes): the same
    values as a fresh tensor for a Linear and a convolution, a smaller one after a larger
    one reuses the memory, and a grouped convolution (not written into the buffer) is
    unchanged."""
    from noiseprop.theory.linearize import Tap, scratch_view, tap_jacobian

    g = torch.Generator().manual_seed(0)
    scratch = {}
    cases = [(nn.Conv2d(3, 8, 3, padding=1), (5, 3, 6, 6)), (nn.Linear(12, 7), (5, 12)),
             (nn.Conv2d(4, 6, 3, groups=2), (5, 4, 5, 5)), (nn.Conv2d(3, 4, 3), (2, 3, 4, 4))]
    sizes = []
    for mod, shape in cases:
        mod = mod.double()
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        out = mod(x)
        delta = torch.randn((3,) + tuple(out.shape), generator=g, dtype=torch.float64)
        tap = Tap("m", mod, x, torch.zeros_like(out))
        fresh = tap_jacobian(tap, delta, "weight")
        reused = tap_jacobian(tap, delta, "weight", scratch=scratch)
        assert torch.equal(fresh, reused)
        sizes.append(scratch["jacobian"].numel())
    assert sizes[0] == sizes[1] == sizes[2] == sizes[3]  # the first (largest) buffer serves every later layer
    v = scratch_view(scratch, "jacobian", (2, 3), torch.zeros(1, dtype=torch.float64))
    assert v.shape == (2, 3) and v.data_ptr() == scratch["jacobian"].data_ptr()
    assert scratch_view(None, "jacobian", (2, 3), v) is None


@pytest.mark.parametrize("norm", ["bn", "l1", "topk"])
def test_batchnorm_differentiated_as_its_affine_map_gives_the_same_pass(norm, monkeypatch):
    """In the tap pass an eval-mode BatchNorm-like layer (L2, L1, TopK) is differentiated
    as the affine map ``a ⊙ y + c`` it is (``affine_backward``, one product in the
    backward): the clean logits are bit-identical and the level-1 covariance, over every
    class and over ``classes=2``, equals the pass through the layer's own backward
    (``affine_backward`` switched off) to float32 rounding (rtol 1e-5: about 100 units of
    float32 roundoff over the network's depth). A BatchNorm with batch statistics
    (``track_running_stats=False``) is not affine and is left as it is (same pass)."""
    import noiseprop.theory.linearize as L
    from noiseprop.empirical.models import build_model

    g = torch.Generator().manual_seed(1)
    net = build_model("resnet8", (1, 8, 8), 5, norm=norm, width=4, seed=0)
    with torch.no_grad():  # running statistics away from (0, 1), so that the affine map is not trivial
        net.train()
        for _ in range(3):
            net(torch.randn(32, 1, 8, 8, generator=g) * 2 + 0.5)
    net.eval()
    x = torch.randn(24, 1, 8, 8, generator=g)
    y = torch.randint(0, 5, (24,), generator=g)
    lin = LinearizedNetwork(net)
    u = lin.unit_scales(RelativeGaussian(1.0))
    calls = []
    orig = L.affine_backward

    def counted(*a):
        out = orig(*a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(L, "affine_backward", counted)
    fast = [jacobian_pass(lin, x, u), jacobian_pass(lin, x, u, classes=2, labels=y)]
    assert any(calls)
    monkeypatch.setattr(L, "affine_backward", lambda *a: None)
    ref = [jacobian_pass(lin, x, u), jacobian_pass(lin, x, u, classes=2, labels=y)]
    for a, b in zip(fast, ref):
        assert torch.equal(a.clean_logits, b.clean_logits)
        torch.testing.assert_close(a.cov_unit, b.cov_unit, rtol=1e-5, atol=1e-5 * float(b.cov_unit.abs().max()))
    assert torch.equal(fast[1].classes, ref[1].classes)

    bn = nn.BatchNorm2d(3, track_running_stats=False).eval()
    xi = torch.randn(4, 3, 2, 2, requires_grad=True)
    assert L.affine_backward(bn, xi, bn(xi)) is None  # eval mode with batch statistics: not affine
    assert L.affine_backward(nn.BatchNorm2d(3).train(), xi, xi) is None  # training mode


class _Detached(nn.Module):
    """The same function whatever ``mode``; ``"detach"`` and ``"no_grad"`` cut fc1 from the
    gradient (its noise still moves the output), ``aux`` is called and never used."""

    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.aux, self.mode = nn.Linear(64, 32), nn.Linear(32, 10), nn.Linear(64, 3), mode

    def forward(self, x):
        x = x.flatten(1)
        self.aux(x)
        if self.mode == "no_grad":
            with torch.no_grad():
                h = torch.relu(self.fc1(x))
        else:
            h = torch.relu(self.fc1(x))
            h = h.detach() if self.mode == "detach" else h
        return self.fc2(h)


@pytest.mark.parametrize("mode", ["detach", "no_grad"])
def test_noise_without_a_gradient_path_is_refused(mode):
    """A forward that detaches fc1's output (or runs fc1 under ``no_grad``) computes the
    same logits, and Monte-Carlo sees fc1's noise, but every derivative would leave it
    out: predict (both methods), hessian_trace and sensitivity refuse it, naming fc1; the
    same network without the cut runs, and a layer called but unused (``aux``) is no
    reason to refuse."""
    from noiseprop.theory import hessian_trace, predict, sensitivity

    x, y = held_out(24)
    plain = _Detached("plain").eval()
    predict(plain, x, y, RelativeGaussian(0.1), cache=False)
    cut = _Detached(mode).eval()
    with torch.no_grad():
        assert torch.equal(cut(x), plain(x))
    calls = [lambda: predict(cut, x, y, RelativeGaussian(0.1), cache=False),
             lambda: predict(cut, x, y, RelativeGaussian(0.1), method="moments", cache=False),
             lambda: hessian_trace(cut, x, y, RelativeGaussian(0.1), probes=4),
             lambda: sensitivity(cut, x, y, RelativeGaussian(0.1))]
    for call in calls:
        with pytest.raises(ValueError, match=r"\['fc1.weight'\] change the model's output but get no gradient"):
            call()


class _WSLinear(nn.Linear):
    """Weight standardisation: a subclass whose forward is not x Wᵀ + b."""

    def forward(self, x):
        w = (self.weight - self.weight.mean(1, keepdim=True)) / (self.weight.std(1, keepdim=True) + 1e-5)
        return nn.functional.linear(x, w, self.bias)


class _Odd(nn.Module):
    """Layers the tapped route cannot read per input: ``kind`` picks one."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.a = _WSLinear(64, 16) if kind == "subclass" else nn.Linear(64, 16)
        self.tok = nn.Parameter(torch.randn(1, 16))
        self.q = nn.Linear(16, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        x = x.flatten(1)
        if self.kind == "keyword":
            h = torch.relu(self.a(input=x))
        elif self.kind == "split":  # the batch through a layer in slices of 5
            h = torch.relu(torch.cat([self.a(xs) for xs in x.split(5)]))
        else:
            h = torch.relu(self.a(x))
        if self.kind == "token":  # a layer applied to a learned [1, F] token
            h = h * self.q(self.tok)
        if self.kind == "tied":  # a weight also read outside its layer's call
            h = h + nn.functional.linear(h, self.q.weight) + self.q(h)
        if self.kind == "seq_first":  # [S, N, F] through a layer, S = N
            s = h.reshape(h.shape[0], 4, 4).permute(1, 0, 2)[:, :, :4]
            h = h + self.q(torch.nn.functional.pad(s, (0, 12))).permute(1, 0, 2).reshape(h.shape[0], -1)[:, :16]
        return self.out(h)


@pytest.mark.parametrize("kind", ["subclass", "keyword", "split", "token", "tied", "seq_first"])
def test_layers_the_tapped_route_cannot_read_take_the_exact_route(kind):
    """A Linear subclass with its own forward, a keyword call, a batch split inside the
    forward, a layer on a learned token, a weight also read outside its layer, a
    sequence-first layer: the first-order covariance equals the exact reference
    ``J diag(u²) Jᵀ`` (``torch.func.jacrev`` per input) to float32 rounding, where the
    tapped route gave 0.2-1.8x or crashed; and the moment method, which has only
    per-layer rules, refuses them (the split: torch.fx cannot trace its loop)."""
    from torch.func import functional_call, jacrev

    from noiseprop.theory import predict

    x, y = held_out(20)
    net = _Odd(kind).eval()
    lin = LinearizedNetwork(net)
    unit = lin.unit_scales(RelativeGaussian(1.0))
    got = jacobian_pass(lin, x, unit).cov_unit
    params = dict(net.named_parameters())
    names = list(lin.names)

    def f(tp, xi):
        return functional_call(net, {**params, **tp}, (xi[None],))[0]

    ref = []
    for xi in x:
        jac = jacrev(f)({n: params[n].detach() for n in names}, xi)
        J = torch.cat([(jac[n] * unit[n]).reshape(10, -1) for n in names], 1).double()
        ref.append(J @ J.T)
    ref = torch.stack(ref)
    assert torch.allclose(got, ref, rtol=2e-4, atol=1e-6 * float(ref.abs().max()))
    match = "needs a torch.fx-traceable model" if kind == "split" else "method='moments' cannot follow the noisy layer"
    with pytest.raises(ValueError, match=match):
        predict(net, x, y, RelativeGaussian(0.05), method="moments", cache=False)


class _CalledTwice(nn.Module):
    """The same layer called twice from a forward (registered once)."""

    def __init__(self, seq):
        super().__init__()
        self.first, self.shared, self.head = seq[1], seq[3], seq[7]

    def forward(self, x):
        h = torch.relu(self.first(x.flatten(1)))
        return self.head(torch.relu(self.shared(torch.relu(self.shared(h)))))


def test_a_layer_held_twice_in_a_sequential_is_one_device_array():
    """A Sequential holding the same layer twice was refused as tied weights, while a
    forward calling a layer twice was accepted; allowed, ``torch.func.functional_call``'s
    default restore left plain tensors in place of the layer's parameters (the user's
    model changed; ``copy.deepcopy`` of it failed). Now: the same predictions as the
    forward that calls the layer twice (linear and moments, both the one-device-array
    model, noise drawn once for both calls), the first-order covariance equal to the exact
    ``J diag(u²) Jᵀ`` (``torch.func.jacrev``), the model's parameters and values unchanged,
    and the second name refused as a layer name with the first one to use."""
    from torch.func import functional_call, jacrev

    from noiseprop.theory import predict

    torch.manual_seed(0)
    x, y = held_out(20)
    shared = nn.Linear(16, 16)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(),
                        nn.Linear(16, 10)).eval()
    before = copy.deepcopy(seq.state_dict())
    twice = _CalledTwice(seq).eval()
    for method in ("linear", "moments"):
        a = predict(seq, x, y, RelativeGaussian(0.2), method=method, cache=False)
        b = predict(twice, x, y, RelativeGaussian(0.2), method=method, cache=False)
        assert torch.allclose(torch.as_tensor(a.logit_var), torch.as_tensor(b.logit_var), rtol=1e-5)
        assert a.accuracy == pytest.approx(b.accuracy, abs=1e-6)
    assert all(type(p) is nn.Parameter for p in seq.parameters())
    assert all(torch.equal(before[k], v) for k, v in seq.state_dict().items())
    copy.deepcopy(seq)
    lin = LinearizedNetwork(seq)
    assert lin.names == ("1.weight", "3.weight", "7.weight")
    unit = lin.unit_scales(RelativeGaussian(1.0))
    got = jacobian_pass(lin, x, unit).cov_unit
    params = {n: p.detach() for n, p in seq.named_parameters()}

    def f(tp, xi):
        return functional_call(seq, {**params, **tp}, (xi[None],), tie_weights=False)[0]

    ref = []
    for xi in x:
        jac = jacrev(f)({n: params[n] for n in lin.names}, xi)
        J = torch.cat([(jac[n] * unit[n]).reshape(10, -1) for n in lin.names], 1).double()
        ref.append(J @ J.T)
    ref = torch.stack(ref)
    assert torch.allclose(got, ref, rtol=2e-4, atol=1e-6 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="'5' is the module '3' held under a second name .* name it '3'"):
        predict(seq, x, y, RelativeGaussian(0.2), targets={"layers": ["5"]})


class _Constants(nn.Module):
    """A forward with tensors built in it (``1 + buffer``, ``torch.tensor(2.0)``), which
    torch.fx stores as constants on the root; ``folded``: the same product as one
    registered buffer."""

    def __init__(self, folded=False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)
        self.folded = folded
        self.register_buffer("a", torch.rand(32))
        self.register_buffer("c", 2.0 * (1 + self.a))

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        h = h * self.c if self.folded else h * (1 + self.a) * torch.tensor(2.0)
        return self.fc2(torch.relu(h - 0.5))


def test_tensors_built_in_the_forward_are_graph_constants():
    """fx stores a tensor built in the forward as ``_tensor_constant0`` on the model; the
    trace put the model's attributes back (as it must) and then the validity diagnostic's
    graph module and the moment pass looked the constant up on the model: AttributeError
    in ``predict`` (both methods). Now the constants stay with the graph: the same
    predictions and diagnostic as the model holding the product as a buffer, nothing left
    on the model."""
    from noiseprop.theory import predict

    x, y = held_out(40)
    net, ref = _Constants().eval(), _Constants(folded=True).eval()
    before = set(net.__dict__)
    for method in ("linear", "moments"):
        a = predict(net, x, y, RelativeGaussian(0.3), method=method, cache=False)
        b = predict(ref, x, y, RelativeGaussian(0.3), method=method, cache=False)
        assert a.accuracy == pytest.approx(b.accuracy, abs=1e-6)
        fa, fb = a.diagnostics["preact_frac"], b.diagnostics["preact_frac"]
        assert fa == pytest.approx(fb, abs=1e-6) and fa > 0
    assert set(net.__dict__) == before and not hasattr(net, "_tensor_constant0")


class _LeafAttributes(nn.Module):
    """A forward reading a layer's own tensor attributes: a plain one and a
    non-persistent buffer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.out = nn.Linear(64, 16), nn.Linear(16, 10)
        self.fc.mask = (torch.rand(16) > 0.3).float()
        self.out.register_buffer("gain", torch.rand(16) + 0.5, persistent=False)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x.flatten(1)) * self.fc.mask) * self.out.gain)


def test_the_diagnostics_graph_module_leaves_the_users_layers_alone():
    """Building the diagnostic's graph module from a dict of targets (this stop's first
    fix for the constants) registered a layer's tensor attribute as a buffer on the user's
    layer: a KeyError for a plain attribute, a non-persistent buffer made persistent (the
    user's state_dict grew). Now the module is built over a shallow copy of the model's
    registries: predict runs, the layers' registries and state_dict are unchanged."""
    from noiseprop.theory import predict

    x, y = held_out(20)
    net = _LeafAttributes().eval()
    keys, bufs = list(net.state_dict()), [dict(m._buffers) for m in net.modules()]
    p = predict(net, x, y, RelativeGaussian(0.2), cache=False)
    assert p.diagnostics["preact_frac"] >= 0
    assert list(net.state_dict()) == keys and [dict(m._buffers) for m in net.modules()] == bufs
    assert "mask" in net.fc.__dict__ and "mask" not in net.fc._buffers


class _Stateful(nn.Module):
    """A forward that stores attributes (a feature, the device) and adds noise of its own;
    tensor attributes fx and hashing find awkward; an unused noisy head."""

    def __init__(self, noisy=False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.out, self.aux = nn.Linear(64, 16), nn.Linear(16, 10), nn.Linear(64, 3)
        self.noisy = noisy
        self.meta = torch.empty(3, device="meta")
        self.sparse = torch.eye(3).to_sparse()
        self.conj = torch.ones(2, dtype=torch.complex64).conj()

    def forward(self, x):
        h = torch.relu(self.a(x.flatten(1)))
        self.feat, self.device = h, x.device
        if self.noisy:
            h = h + 1e-3 * torch.randn_like(h)
        self.aux(x.flatten(1))
        return self.out(h)


def test_stateful_forwards_and_awkward_attributes():
    """Attributes a forward assigns do not keep an fx Proxy after the moment method's
    trace (the second call crashed) and do not defeat the cache (``self.device``: compared
    by value); meta, sparse and conjugate tensor attributes are keyed without error; a
    forward with noise of its own is not taken for a detached path; the predictions equal
    a fresh ``cache=False`` call."""
    import torch.fx

    from noiseprop.theory import predict
    from noiseprop.theory.linearize import module_structure

    x, y = held_out(24)
    net = _Stateful().eval()
    for _ in range(2):
        p = predict(net, x, y, RelativeGaussian(0.05), method="moments")
        assert not isinstance(net.__dict__.get("feat"), torch.fx.Proxy)
    q = predict(net, x, y, RelativeGaussian(0.05), method="moments", cache=False)
    assert p.accuracy == q.accuracy
    def device_key():
        return [a for a in module_structure(net)[1][4] if a[0] == "device"]

    first = device_key()
    net(x)
    assert device_key() == first == [("device", "device(type='cpu')")]  # a new device object, the same key
    predict(_Stateful(noisy=True).eval(), x, y, RelativeGaussian(0.05), cache=False)


def test_half_precision_networks_keep_the_tapped_route():
    """A bfloat16 or float16 network's tapped gradients differ from autograd's by their
    rounding (a few hundredths), not by a missing use: no layer is sent to the generic
    route."""
    from noiseprop.theory.linearize import tap_route_problems

    x, _ = held_out(4)
    for dt in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval().to(dt)
        lin = LinearizedNetwork(net)
        assert tap_route_problems(lin, x.to(dt), {"1": ["weight"], "3": ["weight"]}) == set()


def test_a_split_restarts_with_the_generic_routes_own_chunk():
    """A batch split inside the forward, found on the first chunk, restarts the pass
    with the chunk sized for the generic route's parameters (the pass that knows them from
    the start), not the tapped route's larger one."""
    x, _ = held_out(40)
    net = _Odd("split").eval()
    lin = LinearizedNetwork(net)
    unit = lin.unit_scales(RelativeGaussian(1.0))
    jp = jacobian_pass(lin, x, unit)
    known = jacobian_pass(lin, x, unit, _slow_modules=frozenset({"a"}))
    assert jp.chunk_size == known.chunk_size
    assert torch.equal(jp.cov_unit, known.cov_unit)


class _Checkpointed(nn.Module):
    """A block run through activation checkpointing (``use_reentrant=False``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.out = nn.Linear(64, 16), nn.Linear(16, 10)
        self.blk = nn.Sequential(nn.Linear(16, 16), nn.ReLU())

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = torch.relu(self.a(x.flatten(1)))
        return self.out(h + checkpoint(self.blk, h, use_reentrant=False))


def test_activation_checkpointing_is_refused_by_name():
    """Checkpointing re-runs its segment's forward, hooks included, during the backward
    pass: the tapped signals reached the recomputed taps (the first-order variance came
    out 1.43x that of the same network without checkpointing), and torch.func refuses
    its hooks. Every derivative entry point now names it."""
    from noiseprop.theory import PCMLike, hessian_trace, predict, predict_drift, sensitivity

    x, y = held_out(16)
    calls = [lambda m: predict(m, x, y, RelativeGaussian(0.1), cache=False),
             lambda m: predict(m, x, y, RelativeGaussian(0.1), method="moments", cache=False),
             lambda m: sensitivity(m, x, y, RelativeGaussian(0.1)),
             lambda m: hessian_trace(m, x, y, RelativeGaussian(0.1), probes=4),
             lambda m: predict_drift(m, x, y, PCMLike(), [1.0])]
    for call in calls:
        with pytest.raises(ValueError, match=r"activation checkpointing \(torch.utils.checkpoint\)"):
            call(_Checkpointed().eval())
