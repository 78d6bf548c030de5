"""Stage-by-stage diagnosis of moment propagation against Monte-Carlo (issue 11).

For a trained model and one noise level: per ReLU, the pooled ratio of the moment
pass's pre-activation variance to Monte-Carlo's (``Σ predicted var / Σ MC var``), and
of the mean shift; the logit variance and mean shift of the final prediction; the
accuracy predicted, the accuracy Monte-Carlo measures, and the accuracy of Gaussian
logits with Monte-Carlo's own mean and covariance (the Gaussian-logit limit).
One JSON line per (setting, stage).

Two further parts locate the error of the moment method on residual networks:

* ``groups``: noise on one group of layers at a time (each top-level child of the model
  holding noisy layers: for ResNet-20 the stem ``conv1``, the stages ``layer1``–``layer3``
  and ``fc``), the first order, the moment method and Monte-Carlo (``--draws``) on
  ``--n`` inputs: which noise sources the moment method loses.
* ``chaos``: noise on one layer (``--chaos-layer``, default the stem): the logit-margin
  variance of Monte-Carlo, of the moment method, and of its two parts (the surrogate's
  linear response ``Σ σ² J̃ J̃ᵀ`` through the expected slopes, and the injected
  nonlinear excess), against the exact first Wiener chaos ``E[J] Σ E[J]ᵀ`` (the
  Jacobian averaged over the Monte-Carlo draws, less its sampling variance): what the
  product of expected slopes loses against the expected product of the gates. Margins
  are the live ones (first-order error probability > 1e-3), each quantity as a ratio to
  the first order's margin variance.
* ``stein``: every layer noisy; the first chaos taken through the moment pass itself
  (``mean_map_first_chaos``: autograd of the propagated mean, the per-unit variances'
  dependence on the means included; Stein's lemma) in place of the surrogate's linear
  response, plus the same injected part: live-margin variance and accuracy against the
  shipped moment method and Monte-Carlo (``--draws``), and both costs; ``--stein-ranks
  full,1`` also differentiates a rank-1 pass (one column, nearly diagonal).
* ``skew``: the skewness of the logit margins (label minus a competitor) that the
  Gaussian-logit model leaves out. For a sample of live margins (Monte-Carlo
  z = mean/sd < 2.5, ``--skew-pairs`` of them) the gate-flip third cumulant
  ``κ₃ ≈ 3 Σ_u (∂m/∂a_u) p_u(0) Cov(h_u, m)²`` (``h_u`` a ReLU's input, ``a_u`` its
  output, ``p_u(0) = φ(μ_u/s_u)/s_u`` the first-order density of ``h_u`` at the kink,
  ``Cov(h_u, m) = ∇h_uᵀ Σ ∇m`` by one forward-mode product per margin, ``s_u`` from 128
  forward-mode directions per input) and the smooth weight-Hessian term ``3 gᵀΣHΣg``,
  each as a skewness ``κ₃ / s_m³`` against Monte-Carlo's; and the margins' summed error
  probabilities: Monte-Carlo, Gaussian with Monte-Carlo's mean and variance, and
  Edgeworth ``Φ(x) − γ/6 (x² − 1) φ(x)`` with Monte-Carlo's or the predicted skewness.
  Single-input ``torch.func`` products on models whose ReLUs are ``nn.ReLU`` modules: a
  diagnostic, minutes on the zoo's models.
* ``skew_accuracy``: the moment method's accuracy with that skewness added to every
  margin (moment-predicted z < 3) by the same Edgeworth term, against the shipped moment
  method and Monte-Carlo.

    .venv/bin/python benchmarks/moments_diagnose.py --model resnet20 --eta 0.3 --draws 200 --n 200
    .venv/bin/python benchmarks/moments_diagnose.py --parts groups,chaos --model resnet20 --eta 0.5 --draws 300 --n 359
    .venv/bin/python benchmarks/moments_diagnose.py --parts stein --model resnet20 --eta 0.5 --draws 300 --n 359
    .venv/bin/python benchmarks/moments_diagnose.py --parts stein --stein-ranks full,1 --model resnet32 --eta 0.4
    .venv/bin/python benchmarks/moments_diagnose.py --parts skew --model resnet20 --eta 0.2209 --draws 2000 --n 359
    .venv/bin/python benchmarks/moments_diagnose.py --parts skew_accuracy --model resnet20 --eta 0.5 --draws 1000 --n 120
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings

import numpy as np
import torch
from scipy.stats import norm
from torch.func import functional_call, grad, jvp, vmap

from noiseprop.empirical.data import load_dataset
from noiseprop.empirical.train import train
from noiseprop.theory import Targets, predict
from noiseprop.theory._graph import relu_input_graph
from noiseprop.theory.accuracy import _other_classes, correct_probability, margin_moments
from noiseprop.theory.linearize import LinearizedNetwork
from noiseprop.theory.moments import MomentPropagator
from noiseprop.theory.noise import parse_noise
from noiseprop.theory.targets import resolve_targets

MODELS = {
    "mlp": {"name": "mlp", "norm": "none"},
    "vgg": {"name": "vgg", "norm": "bn"},
    "resnet20": {"name": "resnet20", "norm": "bn"},
    "resnet32": {"name": "resnet32", "norm": "bn"},
    "resnet56": {"name": "resnet56", "norm": "bn"},
}


def mc_stages(model, x, noise, draws, seed):
    """Monte-Carlo pre-activations (mean, var per unit) and logits ``[D, N, C]``."""
    net = copy.deepcopy(model).eval()
    gm, k = relu_input_graph(net)
    plan = resolve_targets(net)
    params = dict(net.named_parameters())
    names = [n for n in plan.names] if hasattr(plan, "names") else list(plan.params)
    clean = {n: params[n].detach().clone() for n in names}
    gen = torch.Generator().manual_seed(seed)
    s1 = s2 = None
    logits = []
    with torch.no_grad():
        for _ in range(draws):
            for n in names:
                params[n].copy_(noise.sample(clean[n], gen))
            out, pre = gm(x)
            logits.append(out.double())
            if s1 is None:
                s1 = [p.double() for p in pre]
                s2 = [p.double() ** 2 for p in pre]
            else:
                for i, p in enumerate(pre):
                    s1[i] += p.double()
                    s2[i] += p.double() ** 2
    m = [a / draws for a in s1]
    v = [(b - draws * mm * mm) / (draws - 1) for b, mm in zip(s2, m)]
    relu_nodes = [n.name for n in gm.graph.nodes if n.op == "output"]
    return m, v, torch.stack(logits), gm


def _groups(model):
    """Top-level children of ``model`` that hold noisy layers, in order."""
    names = resolve_targets(model).names
    out = []
    for n in names:
        g = n.split(".")[0]
        if g not in out:
            out.append(g)
    return out


def groups(model, x, y, noise, draws):
    from noiseprop.empirical import monte_carlo

    for g in [None] + _groups(model):
        t = Targets(layers=[g]) if g else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lin = predict(model, x, y, noise, targets=t, diagnostic=False)
            mom = predict(model, x, y, noise, targets=t, method="moments", diagnostic=False)
        mc = monte_carlo(model, x, y, noise, draws=draws, seed=3, targets=t, progress=False)
        se = float(mc.accuracies.std(ddof=1) / math.sqrt(draws))
        print(json.dumps(dict(stage="groups", noise=noise.to_string(), noisy=g or "(all)", clean=lin.clean_accuracy,
                              mc=float(mc.accuracy), mc_se=se, linear=lin.accuracy, moments=mom.accuracy,
                              mc_drop=lin.clean_accuracy - float(mc.accuracy),
                              moments_drop=lin.clean_accuracy - mom.accuracy,
                              moments_error_points=100 * (mom.accuracy - float(mc.accuracy)),
                              linear_error_points=100 * (lin.accuracy - float(mc.accuracy)))), flush=True)


def _moments_with_injected(model, x, y, noise, targets=None):
    """The first-order and the moment prediction (covariances included), and the part of
    the moment covariance the surrogate injects (noise on each layer's input perturbation
    and the nonlinear excess; recorded by wrapping a private function for the one call)."""
    import noiseprop.theory.moments.surrogate as sur

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fo = predict(model, x, y, noise, targets=targets, cov=True, diagnostic=False)
        injected = []
        orig = sur._injection_covariance

        def record(*a, **k):
            out = orig(*a, **k)
            injected.append(out.clone())
            return out

        sur._injection_covariance = record
        try:
            mom = predict(model, x, y, noise, targets=targets, method="moments", cov=True, diagnostic=False,
                          cache=False)
        finally:
            sur._injection_covariance = orig
    return fo, mom, torch.cat(injected)


def stein(model, x, y, noise, draws, stein_ranks=("full",)):
    """The first chaos through the moment pass itself (:func:`mean_map_first_chaos`:
    autograd of the propagated mean, Stein's lemma) in place of the surrogate's linear
    response, plus the same injected part, against the shipped moment method and
    Monte-Carlo (live-margin variance as a ratio to the first order's, and accuracy).
    ``stein_ranks``: the differentiated pass at the moment method's rank (``full``) and/or
    at rank 1 (``1``: one column, nearly diagonal); one line each, with its own time."""
    from sensitivity import _mc_logits, live_margin_variance  # benchmarks/sensitivity.py (this script's folder)

    from noiseprop.theory.moments.surrogate import mean_map_first_chaos

    t0 = time.perf_counter()
    fo, mom, inj = _moments_with_injected(model, x, y, noise)
    t_mom = time.perf_counter() - t0
    lin = LinearizedNetwork(model)
    L = _mc_logits(model, x, noise, draws, seed=5)
    Lc = torch.einsum("dna,dnb->nab", L - L.mean(0), L - L.mean(0)) / (draws - 1)
    accs = (L.argmax(2) == y).double().mean(1)
    ratio, (_, _, live) = live_margin_variance(fo.clean_logits.double(), fo.logit_cov.double(), y, 1e-3)
    cov = mom.logit_cov.double()
    mom_mean = mom.logit_mean.double()
    acc = lambda c: float(correct_probability(mom_mean, c, y, n_points=2048, seed=0)[0].mean())  # noqa: E731
    for r in stein_ranks:
        t0 = time.perf_counter()
        mean, first = mean_map_first_chaos(lin, x, noise, chunk_size=64, rank=None if r == "full" else int(r))
        t_stein = time.perf_counter() - t0
        print(json.dumps(dict(stage="stein", noise=noise.to_string(), n=int(x.shape[0]), draws=draws, stein_rank=r,
                              live_margins=int(live.sum()), margin_var_mc=ratio(Lc), margin_var_moments=ratio(cov),
                              moments_linear_response=ratio(cov - inj), moments_injected=ratio(inj),
                              stein_first_chaos=ratio(first), stein_total=ratio(first + inj),
                              mean_max_diff=float((mean - mom_mean).abs().max()),
                              mc_accuracy=float(accs.mean()), mc_se=float(accs.std() / math.sqrt(draws)),
                              moments_accuracy=mom.accuracy, stein_accuracy=acc(first + inj),
                              moments_error_points=100 * (mom.accuracy - float(accs.mean())),
                              stein_error_points=100 * (acc(first + inj) - float(accs.mean())),
                              linear_accuracy=fo.accuracy, moments_s=t_mom, stein_s=t_stein)), flush=True)


def chaos(model, x, y, noise, draws, layer):
    from torch.func import jacrev

    from sensitivity import live_margin_variance  # benchmarks/sensitivity.py (this script's folder)

    t = Targets(layers=[layer])
    name = resolve_targets(model, t).names
    if len(name) != 1:
        raise SystemExit(f"--chaos-layer must name one noisy layer, got {layer!r} ({len(name)} noisy tensors)")
    name = name[0]
    P = {k: v.detach() for k, v in model.named_parameters()}
    B = dict(model.named_buffers())
    w0 = P[name]
    var = noise.variance(w0).double()

    def f(w, xi):
        return functional_call(model, ({**P, name: w}, B), (xi[None],))[0]

    jf = vmap(jacrev(f), in_dims=(None, 0))
    gen = torch.Generator().manual_seed(4)
    n, c = x.shape[0], None
    js = jq = None
    logits = []
    for _ in range(draws):
        w = noise.sample(w0, gen)
        J = jf(w, x).detach().double().reshape(n, -1, w0.numel())  # [N, C, P]
        c = J.shape[1]
        q = torch.einsum("nap,p,nbp->nab", J, var.reshape(-1), J)
        js = J if js is None else js + J
        jq = q if jq is None else jq + q
        with torch.no_grad():
            logits.append(functional_call(model, ({**P, name: w}, B), (x,)).double())
    jbar = js / draws
    first = torch.einsum("nap,p,nbp->nab", jbar, var.reshape(-1), jbar)
    spread = (jq - draws * first) / (draws - 1)  # sample covariance of J Σ^½ over draws
    chaos1 = first - spread / draws  # E[J] Σ E[J]ᵀ without the average's own sampling variance
    L = torch.stack(logits)
    Lc = torch.einsum("dna,dnb->nab", L - L.mean(0), L - L.mean(0)) / (draws - 1)
    fo, mom, inj = _moments_with_injected(model, x, y, noise, t)
    ratio, (_, _, live) = live_margin_variance(fo.clean_logits.double(), fo.logit_cov.double(), y, 1e-3)

    mc_margin_var = ratio(Lc)
    print(json.dumps(dict(stage="chaos", noise=noise.to_string(), noisy=layer, draws=draws, live_margins=int(live.sum()),
                          mc=mc_margin_var, first_chaos=ratio(chaos1), moments=ratio(mom.logit_cov.double()),
                          moments_linear_response=ratio(mom.logit_cov.double() - inj), moments_injected=ratio(inj),
                          higher_chaoses_mc=mc_margin_var - ratio(chaos1),
                          mc_accuracy=float((L.argmax(2) == y).double().mean()), moments_accuracy=mom.accuracy,
                          linear_accuracy=fo.accuracy)), flush=True)


class _KinkSkew:
    """Per-margin skewness of a ReLU network's logit margin ``m = z_y − z_c`` under weight
    noise, to leading order: the kinks, ``3 Σ_u (∂m/∂a_u) p_u(0) Cov(h_u, m)² / s_m³``, and
    the smooth weight products, ``3 gᵀΣHΣg / s_m³`` (``skew`` in the module docstring).
    First-order ingredients at the clean weights: ``s_u`` from ``probes`` forward-mode
    directions per input (cached for consecutive margins of one input), ``g = ∇m``,
    ``Cov(h_u, m)`` by one forward-mode product, ``H (Σ g)`` by forward-over-reverse.
    Both skewnesses are ``κ₃ / s_m³`` with ``s_m²`` the first-order margin variance: the
    shape the first-order ingredients imply (a common scale error of the first-order
    variances cancels in it, and it is compared with and used on margins standardised by
    another variance). Single-input ``torch.func`` calls on a float64 copy; the ReLUs must
    be ``nn.ReLU`` modules, each called once per forward and not in place (checked)."""

    def __init__(self, model, x, noise, probes=128):
        net = copy.deepcopy(model).double().eval()
        self.names = resolve_targets(net).names
        self.P = {k: v.detach() for k, v in net.named_parameters()}
        self.B = dict(net.named_buffers())
        self.var = {k: noise.variance(self.P[k]).double() for k in self.names}
        relus = [(k, m) for k, m in net.named_modules() if isinstance(m, torch.nn.ReLU)]
        if not relus:
            raise SystemExit("the skew parts need nn.ReLU modules")
        self.state = {"pre": {}, "probe": None}
        for k, m in relus:
            m.register_forward_hook(self._hook(k))  # on the private copy
        self.net, self.x, self.probes = net, x.double(), probes
        self.q0 = {k: self.P[k] for k in self.names}
        self._n = None
        bad = [k for k, m in relus if m.inplace]
        calls = {}
        counters = [m.register_forward_pre_hook(lambda mod, inp, k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
                    for k, m in relus]
        self._run(self.q0, 0)
        for h in counters:  # the check's counters off again: not on every later forward
            h.remove()
        bad += [k for k, c in calls.items() if c != 1]
        if bad:
            raise SystemExit(f"the skew parts need each nn.ReLU called once per forward, not in place: {bad}")

    def _hook(self, key):
        def h(mod, inp, out):
            self.state["pre"][key] = inp[0]
            if self.state["probe"] is not None:
                return out + self.state["probe"][key]
        return h

    def _run(self, q, n, probe=None):
        self.state["pre"], self.state["probe"] = {}, probe
        out = functional_call(self.net, ({**self.P, **q}, self.B), (self.x[n:n + 1],))[0]
        self.state["probe"] = None
        return out, dict(self.state["pre"])

    def _input(self, n):
        """Each ReLU input's clean value, first-order sd and density at the kink."""
        if self._n == n:
            return
        g = torch.Generator().manual_seed(1000 + n)
        dirs = {k: torch.randn((self.probes,) + self.P[k].shape, generator=g, dtype=torch.float64)
                * self.var[k].sqrt() for k in self.names}
        self.pre0 = {k: v.detach() for k, v in self._run(self.q0, n)[1].items()}
        dh = vmap(lambda d: jvp(lambda q: self._run(q, n)[1], (self.q0,), (d,))[1], chunk_size=32)(dirs)
        s_u = {k: (v ** 2).mean(0).sqrt().clamp_min(1e-30) for k, v in dh.items()}
        self.dens = {k: torch.exp(-0.5 * (self.pre0[k] / s_u[k]) ** 2) / (math.sqrt(2 * math.pi) * s_u[k])
                     for k in self.pre0}
        self._n = n

    def __call__(self, n, y, c, smooth=True):
        """``(s_m², skewness from the kinks, from the smooth products)`` of ``z_y − z_c`` at
        input ``n`` (the last NaN when ``smooth`` is False)."""
        self._input(n)
        zeros = {k: torch.zeros_like(v) for k, v in self.pre0.items()}

        def margin(q, probe):
            out = self._run(q, n, probe)[0]
            return out[y] - out[c]

        g, ga = grad(margin, argnums=(0, 1))(self.q0, zeros)
        v = {k: self.var[k] * g[k] for k in self.names}
        s2 = sum(float((g[k] * v[k]).sum()) for k in self.names)
        cov_h = jvp(lambda q: self._run(q, n)[1], (self.q0,), (v,))[1]
        k3_kinks = 3 * sum(float((ga[k] * self.dens[k] * cov_h[k] ** 2).sum()) for k in self.pre0)
        if not smooth:
            return s2, k3_kinks / s2 ** 1.5, math.nan
        hv = jvp(grad(lambda q: margin(q, zeros)), (self.q0,), (v,))[1]
        k3_smooth = 3 * sum(float((v[k] * hv[k]).sum()) for k in self.names)
        return s2, k3_kinks / s2 ** 1.5, k3_smooth / s2 ** 1.5


def _edgeworth_cdf(x, gamma):
    """``P(X < x)`` for a standardised variable of skewness ``gamma``, first Edgeworth term."""
    return norm.cdf(x) - gamma / 6 * (x ** 2 - 1) * norm.pdf(x)


def skew(model, x, y, noise, draws, pairs):
    """Gate-flip skewness of the live logit margins against Monte-Carlo (``skew`` above)."""
    from sensitivity import _mc_logits  # benchmarks/sensitivity.py (this script's folder)

    L = _mc_logits(model, x, noise, draws, seed=11)  # [D, N, C]
    ks = _KinkSkew(model, x, noise)
    y = y.long()
    live = []
    for n in range(x.shape[0]):
        m = L[:, n, y[n]:y[n] + 1] - L[:, n]
        z = m.mean(0) / m.std(0).clamp_min(1e-30)
        live += [(n, c) for c in range(L.shape[2]) if c != int(y[n]) and float(z[c]) < 2.5]
    if not live:
        raise SystemExit(f"--parts skew: no live margin (Monte-Carlo z < 2.5) at {noise.to_string()}")
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(live), generator=gen)[:pairs].sort().values.tolist()
    rows = []
    for i in pick:
        n, c = live[i]
        s2, sk_kinks, sk_smooth = ks(n, int(y[n]), c)
        mc = (L[:, n, y[n]] - L[:, n, c]).double()
        mv = float(mc.var())
        rows.append((float(mc.mean()), mv, float(((mc - mc.mean()) ** 3).mean()) / mv ** 1.5, s2,
                     sk_kinks, sk_smooth, float((mc < 0).double().mean())))
    a = np.array(rows)
    mean, mvar, sk_mc, s2, sk_gate, sk_smooth, emp = a.T
    xs = -mean / np.sqrt(mvar)
    edge = lambda g: float(_edgeworth_cdf(xs, g).sum())  # noqa: E731
    corr = lambda p: float(np.corrcoef(p, sk_mc)[0, 1])  # noqa: E731
    print(json.dumps(dict(stage="skew", noise=noise.to_string(), n=int(x.shape[0]), draws=draws,
                          live_margins=len(live), pairs=len(rows), mc_skew_se=math.sqrt(6 / draws),
                          skew_mc_mean=float(sk_mc.mean()), skew_gate_mean=float(sk_gate.mean()),
                          skew_smooth_mean=float(sk_smooth.mean()), corr_gate=corr(sk_gate), corr_smooth=corr(sk_smooth),
                          corr_total=corr(sk_gate + sk_smooth), var_fo_over_mc_median=float(np.median(s2 / mvar)),
                          err_sum_mc=float(emp.sum()), err_sum_gauss_mc_moments=float(norm.cdf(xs).sum()),
                          err_sum_edgeworth_mc_skew=edge(sk_mc), err_sum_edgeworth_gate_skew=edge(sk_gate),
                          err_sum_edgeworth_total_skew=edge(sk_gate + sk_smooth))), flush=True)


def skew_accuracy(model, x, y, noise, draws, max_z=3.0):
    """The moment method's accuracy with the kinks' skewness added by Edgeworth: for every
    margin whose moment-predicted ``z = mean/sd`` is below ``max_z``, the error probability
    moves by ``−γ/6 (x² − 1) φ(x)`` (``x = −z``, ``γ`` from :class:`_KinkSkew`) and the
    input's probability of being right by minus that (first inclusion-exclusion term);
    against the shipped moment method and Monte-Carlo (``--draws``)."""
    from sensitivity import _mc_logits  # benchmarks/sensitivity.py (this script's folder)

    y = y.long()
    L = _mc_logits(model, x, noise, draws, seed=11)
    accs = (L.argmax(2) == y).double().mean(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = predict(model, x, y, noise, method="moments", cov=True, diagnostic=False)
    m, S = margin_moments(pm.logit_mean, pm.logit_cov, y)  # [N, C-1], margins z_y - z_k
    z = (m / torch.diagonal(S, dim1=1, dim2=2).clamp_min(1e-60).sqrt()).numpy()
    others = _other_classes(y, m.shape[1] + 1)
    ks = _KinkSkew(model, x, noise)
    shift = np.zeros(x.shape[0])
    live = np.argwhere(z < max_z)  # (input, margin slot), by input
    for n, j in live:
        gamma = ks(int(n), int(y[n]), int(others[n, j]), smooth=False)[1]
        shift[n] += float(_edgeworth_cdf(-z[n, j], gamma) - norm.cdf(-z[n, j]))
    margins = len(live)
    print(json.dumps(dict(stage="skew_accuracy", noise=noise.to_string(), n=int(x.shape[0]), draws=draws,
                          margins=margins, mc_accuracy=float(accs.mean()), mc_se=float(accs.std() / math.sqrt(draws)),
                          moments_accuracy=pm.accuracy, moments_edgeworth_accuracy=pm.accuracy - float(shift.mean()),
                          edgeworth_shift_points=-100 * float(shift.mean()))), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="stages", help="stages,groups,chaos,stein,skew,skew_accuracy")
    ap.add_argument("--skew-pairs", type=int, default=100)
    ap.add_argument("--chaos-layer", default="conv1")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--noise", default="relative")
    ap.add_argument("--eta", type=float, default=0.3)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--ranks", default="32")
    ap.add_argument("--stein-ranks", default="full", help="stein: full and/or 1 (comma-separated)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("digits")
    model = train(MODELS[args.model], data, seed=0).model.eval()
    x, y = data.x_test[:args.n], data.y_test[:args.n]
    noise = parse_noise(f"{args.noise}:{args.eta}")
    parts = args.parts.split(",")
    if "groups" in parts:
        groups(model, x, y, noise, args.draws)
    if "chaos" in parts:
        chaos(model, x, y, noise, args.draws, args.chaos_layer)
    if "stein" in parts:
        stein(model, x, y, noise, args.draws, args.stein_ranks.split(","))
    if "skew" in parts:
        skew(model, x, y, noise, args.draws, args.skew_pairs)
    if "skew_accuracy" in parts:
        skew_accuracy(model, x, y, noise, args.draws)
    if "stages" not in parts:
        return
    t0 = time.perf_counter()
    mc_m, mc_v, L, gm = mc_stages(model, x, noise, args.draws, seed=11)
    t_mc = time.perf_counter() - t0
    from noiseprop.theory._graph import is_relu, trace
    g = trace(model)
    mods = dict(model.named_modules())
    relu_names = [nd.name for nd in g.nodes if is_relu(nd, mods)]
    with torch.no_grad():
        clean_pre = gm(x)[1]
    accs = (L.argmax(2) == y).double().mean(1)
    mc_acc, mc_se = float(accs.mean()), float(accs.std() / math.sqrt(args.draws))
    Lm, Lc = L.mean(0), torch.einsum("dna,dnb->nab", L - L.mean(0), L - L.mean(0)) / (args.draws - 1)
    p_gauss, _, _ = correct_probability(Lm, Lc, y, n_points=1024, seed=0)
    print(json.dumps(dict(model=args.model, noise=str(noise.to_string()), stage="mc", draws=args.draws, n=args.n,
                          mc_accuracy=mc_acc, mc_se=mc_se, gaussian_logits_with_mc_moments=float(p_gauss.mean()),
                          seconds_mc=t_mc)), flush=True)
    lin = LinearizedNetwork(model)
    for rank in [int(r) for r in args.ranks.split(",")]:
        for spatial in (4,):
            t0 = time.perf_counter()
            prop = MomentPropagator(lin, noise, rank=rank, spatial_rank=spatial)
            vs, ms = {}, {}
            for i in range(0, x.shape[0], 32):
                with torch.no_grad():
                    res = prop.run(x[i:i + 32])
                for nm in relu_names:
                    rc = res.rec.get(nm)
                    if rc is None or "s" not in rc:
                        continue
                    vs.setdefault(nm, []).append(rc["s"].double() ** 2)
            t_pass = time.perf_counter() - t0
            stages = []
            for i, nm in enumerate(relu_names):
                if nm not in vs:
                    continue
                pv = torch.cat(vs[nm])
                stages.append(dict(relu=nm, var_ratio=float(pv.sum() / mc_v[i].sum()),
                                   median_unit_ratio=float((pv / mc_v[i].clamp_min(1e-12)).median()),
                                   mc_shift_rms=float(((mc_m[i] - clean_pre[i]) ** 2).mean().sqrt()),
                                   mc_sd_rms=float(mc_v[i].mean().sqrt())))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t1 = time.perf_counter()
                p = predict(model, x, y, noise, method="moments", rank=rank, spatial_rank=spatial, accuracy_draws=0,
                            loss_probes=0, cov=True)
                t_pred = time.perf_counter() - t1
            var_ratio = float(p.logit_var.sum() / Lc.diagonal(dim1=1, dim2=2).sum())
            shift = Lm - p.clean_logits
            proj = float((p.logit_mean_shift * shift).sum() / (shift ** 2).sum())
            p_own_mean, _, _ = correct_probability(p.logit_mean, Lc, y, n_points=1024, seed=0)
            p_own_cov, _, _ = correct_probability(Lm, p.logit_cov, y, n_points=1024, seed=0)
            print(json.dumps(dict(model=args.model, noise=noise.to_string(), stage="predict", rank=rank,
                                  spatial_rank=spatial, accuracy=p.accuracy, error=p.accuracy - mc_acc,
                                  logit_var_ratio=var_ratio, shift_projection=proj,
                                  acc_pred_mean_mc_cov=float(p_own_mean.mean()),
                                  acc_mc_mean_pred_cov=float(p_own_cov.mean()),
                                  compression_loss=p.diagnostics.get("compression_loss"),
                                  seconds_pass=t_pass, seconds_predict=t_pred)), flush=True)
            for s in stages:
                print(json.dumps(dict(stage="preact", rank=rank, **s)), flush=True)


if __name__ == "__main__":
    main()
