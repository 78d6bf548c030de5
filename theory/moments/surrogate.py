"""The surrogate pass and the logit covariance (second pass of the package docstring).

The network's mean path with every ReLU / smooth activation replaced by its Gaussian
expectation at the std the moment pass recorded, and every max-pool by Clark's
expectation, plus zero-valued injection points: ``e`` after every noisy layer (its noise
acting on the input's perturbation) and ``r`` after every nonlinearity (the variance
the expected-slope linearisation misses). Its output is the propagated logit mean; the
gradients of the logits with respect to the injection points, one batched backward
pass per class, map every noise source to the logits.

Beside each mean the surrogate carries a diagonal variance channel (stop 37,
:data:`VARIANCE_CHANNEL`): each unit's noise variance as a function of the means
upstream, so that a ReLU's smoothed mean ``zΦ(z/s) + sφ(z/s)`` moves with them through
``s`` too (``∂/∂s = φ(z/s)``): a mean shift upstream changes the noise the next layers
see (``σ²μ²`` at every noisy layer, a ReLU's variance as its mean moves), and so their
expected outputs. The fixed-``s`` surrogate differentiated only through the expected
slopes and missed this (docs/THEORY.md §9, issue 11's fifth to eighth passes: the first
chaos is the derivative of the Gaussian closure's mean map, and a rank-1, nearly
diagonal, map gives most of it). The channel's value only scales the derivative: ``s``
itself stays the moment pass's. Stop 38: every activation the moment pass has (LeakyReLU,
ELU, GELU, SiLU, tanh, sigmoid, softplus: each smoothed mean also moves through its
``s``), ``torch.cat``, arithmetic with numbers, selections and means over units. Tests:
``test_surrogate_variance_channel_is_the_derivative_of_the_diagonal_closure`` (eight
activations), ``test_surrogate_variance_channel_through_max_pooling``,
``test_surrogate_variance_channel_through_cat_arithmetic_and_means``.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..linearize import (DEFAULT_JACOBIAN_BUDGET, PASS_CHUNK_CAP, LinearizedNetwork, Tap, _patch_size,
                         layer_rule_problems,
                         backprop_signals, tapping, weight_terms)
from ..noise import WeightNoise
from ..validation import check_bool
from .gaussian import (TINY, activation_function, activation_variance, clark_max, safe_sqrt,
                       smooth_activation, smooth_elu, smooth_leaky_relu, smooth_max, smooth_relu)
from .head import head_terms
from .interpreter import GraphInterpreter
from .lowrank import pair
from .rules import (_ADAPTIVE_AVG_POOL_FUNCTIONS, _ADD_OPS, _ARITH_METHODS, _PASS_MODULES, _SELECTION_FUNCTIONS,
                    _SELECTION_METHODS, MomentPropagator, _adaptive_len, _MomentPass, activation_kind, is_maxpool, maxpool_args,
                    window_slices)

__all__ = ["MomentResult", "propagate_moments", "moment_chunk_size", "DEFAULT_MOMENT_CHUNK", "mean_map_first_chaos"]

from dataclasses import dataclass


@dataclass(frozen=True)
class MomentResult:
    """Logit mean ``[N, C]`` and covariance ``[N, C, C]`` (float64) from moment
    propagation, and diagnostics: for every input of ReLU and its variants
    (:func:`~noiseprop.theory._graph.is_rectifier`), the fraction of units whose
    predicted noise std exceeds their mean magnitude (``preact_frac``), and the share
    of variance moved into the diagonal part by compression (``compression_loss``).
    ``cov`` is ``None`` when only the mean was asked for (``mean_only=True``). ``head``:
    the output layer's scale-mixture terms ``(E v, c_m, c_v)`` (:mod:`.head`), each
    ``[N, C]``, when asked for (``with_head``) and the logits are a noisy Linear layer's
    output, else ``None``. ``tail_kurtosis``: ``(layer, excess kurtosis)`` of the outputs
    of every Linear/Conv layer fed by an affine map of a ReLU output (BatchNorm after the
    ReLU), over all inputs (:meth:`~.rules._MomentPass._record_tail`), in the order of the pass."""

    mean: torch.Tensor
    cov: torch.Tensor | None
    preact_frac: float
    preact_frac_per_layer: tuple
    compression_loss: float
    rank: int
    spatial_rank: int
    head: tuple | None = None
    tail_kurtosis: tuple = ()


#: An activation's noise std from the moment pass over its variance channel's, ``s/s_diag``,
#: outside ``[1/VARIANCE_RATIO_MAX, VARIANCE_RATIO_MAX]``: the channel does not describe
#: that unit (a variance near zero, or one its diagonal recursion cannot follow), and the
#: unit keeps a fixed ``s``.
VARIANCE_RATIO_MAX = 1e3

#: Gauss–Hermite points of the variance channel's smooth-activation variances
#: (:func:`~.gaussian.activation_variance`; the means keep :data:`~.gaussian.GH_NODES`):
#: the channel uses only their relative derivative. Against 300 points over means
#: |μ| ≤ 2, the variance and its two derivatives at 32 points are within 1e-3 for GELU,
#: SiLU, sigmoid and softplus up to a noise std of 2 and 6% for tanh (64 points: 4e-3);
#: at a std of 3 within 3% but for tanh (64 points: 12%). At 64 points the channel
#: doubled the moment method's time on a GELU network.
CHANNEL_GH_NODES = 32

#: Whether the surrogate carries its variance channel (:class:`_Surrogate`); ``False``
#: gives the fixed-``s`` surrogate of stops 19–36 (kept for comparisons).
VARIANCE_CHANNEL = True


class _Surrogate(GraphInterpreter):
    """One surrogate forward over a batch, given the moment pass's records ``rec``.

    ``variance_channel`` (default :data:`VARIANCE_CHANNEL`): beside each value, its
    diagonal noise variance ``v``, propagated as a function of the surrogate's means
    (module docstring), so that a ReLU's smoothed mean ``E relu = zΦ(z/s) + sφ(z/s)`` also
    moves with the means upstream through its ``s`` (:meth:`_moving_std`; ``∂E relu/∂s =
    φ(z/s)``, a LeakyReLU's ``(1 − a)φ(z/s)``, each smoothed function attaching its own
    derivative in ``s``), the variance channel the fixed-``s`` surrogate drops."""

    def __init__(self, prop: MomentPropagator, rec: dict, variance_channel: bool | None = None):
        lin = prop.lin
        super().__init__(prop.graph, lin.net, lin.params, lin.buffers)
        self.prop = prop
        self.rec = rec
        self.noisy = set(lin.params_by_module)
        self.taps: list = []  # (node name, Tap) of the noisy layers
        self.rtaps: list = []  # (node name, [r tensors]) of the nonlinearities
        self.vc = VARIANCE_CHANNEL if variance_channel is None else bool(variance_channel)
        self.var: dict = {}  # graph node -> its value's diagonal variance (absent: not followed)

    def placeholder(self, node, x):
        if self.vc:
            self.var[node] = torch.zeros_like(x)
        return x

    def _v(self, a):
        return self.var.get(a) if isinstance(a, fx.Node) else None

    def _moving_std(self, s, v):
        """A std ``s`` of the moment pass (an activation's, or Clark's ``θ`` at max
        pooling) that moves with the variance channel ``v``: equal to ``s`` in value, with
        the derivative of ``s·√v/√v₀`` (``v₀`` the channel's value), so that a smoothed
        function of it (each attaches its own derivative in ``s``) moves with the means
        upstream; ``s`` itself where the channel does not describe the unit
        (:data:`VARIANCE_RATIO_MAX`) or is not carried (``v`` ``None``)."""
        if v is None:
            return s
        sd = safe_sqrt(v.clamp_min(0))
        sdd = sd.detach()
        ok = (s > TINY) & (sdd * VARIANCE_RATIO_MAX > s) & (s * VARIANCE_RATIO_MAX > sdd)
        ratio = torch.where(ok, s / torch.where(ok, sdd, torch.ones_like(sdd)), torch.zeros_like(s))
        ds = sd * ratio
        return s + (ds - ds.detach())

    def call(self, node, args, kwargs, env, i):
        out = self._call(node, args, kwargs, env, i)
        if self.vc:
            v = self._var_rule(node, args, kwargs, out)
            if v is not None:
                self.var[node] = v
        return out

    def _var_rule(self, node, args, kwargs, out):
        """The diagonal variance of ``node``'s value (``None``: not followed; the
        nonlinearities downstream then keep a fixed ``s``). Each unit's variance as if its
        inputs were independent, the moment pass's diagonal rules: ``(W∘W) v + Σ σ²(μ² +
        v)`` at a (noisy) Linear/Conv2d layer, ``a² v`` at an affine normalisation, the sum
        at a residual sum (``v_a + α² v_b`` for ``a ± αb``), ``v`` at a constant added,
        ``c² v`` at a product with a constant ``c`` (a number, or a parameter or buffer
        without noise; ``v/c²`` at a quotient), the
        concatenation at ``torch.cat``, ``Σ v/n²`` at a mean over ``n`` units (``Σ v`` at a
        sum) and per window at average pooling (adaptive too), an activation's Gaussian variance
        (:func:`~.gaussian.activation_variance`: ReLU, LeakyReLU, ELU, the smooth ones),
        Clark's variance at max pooling (pairwise, the two independent), the element
        copies of selections (flatten, view, reshape, indexing, permutations) and constant
        padding (zero variance). Only its derivative is used: the value ``s`` at each
        nonlinearity stays the moment pass's (:meth:`_moving_std`)."""
        if not isinstance(out, torch.Tensor):
            return None
        op, tgt = node.op, node.target
        if op == "call_function" and tgt is torch.cat:
            ts = node.args[0] if node.args else node.kwargs.get("tensors")
            vs = [self._v(a) for a in ts] if isinstance(ts, (list, tuple)) else [None]
            if not vs or any(v is None for v in vs):
                return None
            return torch.cat(vs, kwargs.get("dim", args[1] if len(args) > 1 else 0))
        arith = (_ADD_OPS.get(tgt) if op == "call_function" else
                 _ARITH_METHODS.get(tgt) if op == "call_method" else None)
        if arith is not None:
            return self._arith_var(node, arith, args, kwargs)
        vin = self._v(node.args[0]) if node.args else None
        if vin is None:
            return None
        if is_maxpool(node, self.modules):
            return None  # set by _maxpool, which follows the window's running maximum
        kind = activation_kind(node, self.modules)
        if kind is not None:
            return activation_variance(kind, args[0], vin, CHANNEL_GH_NODES)
        if op == "call_method" and tgt == "view_as":
            return vin.reshape(out.shape)
        if (op == "call_method" and tgt in _SELECTION_METHODS) or (op == "call_function" and tgt in _SELECTION_FUNCTIONS):
            return self.plain(node, [vin] + list(args[1:]), kwargs)
        if op == "call_function" and tgt in _ADAPTIVE_AVG_POOL_FUNCTIONS:
            return _adaptive_avg_var(vin, out)
        if (op == "call_method" and tgt in ("mean", "sum")) or (op == "call_function" and tgt in (torch.mean, torch.sum)):
            v = self.plain(node, [vin] + list(args[1:]), kwargs)
            n = vin[0].numel() // max(1, out[0].numel())
            mean = tgt == "mean" or tgt is torch.mean
            return v / n if mean else v  # Σ v / n² for a mean (v holds Σ v / n), Σ v for a sum
        if op == "call_function" and tgt is F.pad:  # constant padding: no variance added
            pad = args[1] if len(args) > 1 else kwargs.get("pad")
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            return F.pad(vin, pad) if mode == "constant" else None
        if op != "call_module":
            return None
        m = self.modules[tgt]
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            W = self.params[tgt + ".weight"]
            wv = self.prop.noise_var.get(tgt + ".weight")
            if wv is None:
                v = _layer_map(m, vin, W * W)
            else:  # (W∘W)v + σ²∘(μ² + v) as one map of [v, μ²] (one convolution, not two)
                g = getattr(m, "groups", 1)
                wv = wv.to(vin.dtype)
                Wc = torch.cat([W * W + wv, wv], dim=1)  # a group's inputs: its v, then its μ²
                z2 = args[0] * args[0]
                xin = torch.cat([vin.unflatten(1, (g, -1)), z2.unflatten(1, (g, -1))], 2).flatten(1, 2)
                v = _layer_map(m, xin, Wc)
            bv = self.prop.noise_var.get(tgt + ".bias")
            if bv is not None:
                v = v + bv.to(vin.dtype).reshape((1, -1) + (1,) * (v.dim() - 2))
            return v
        if tgt in self.prop.affines:
            a = self.prop.affines[tgt][0].to(vin.dtype)
            return vin * (a * a).reshape((1, -1) + (1,) * (vin.dim() - 2))
        if isinstance(m, _PASS_MODULES + (nn.Flatten,)):
            return m(vin)
        if isinstance(m, nn.ConstantPad2d):
            return F.pad(vin, m.padding)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return _adaptive_avg_var(vin, out)
        if isinstance(m, nn.AvgPool2d) and m.divisor_override is None and m.padding == 0 and not m.ceil_mode:
            k = pair(m.kernel_size)
            return m(vin) / (k[0] * k[1])
        return None

    def _arith_var(self, node, op, args, kwargs):
        """The channel's variance of ``a op b`` (operands as :meth:`.rules._MomentPass._binary`
        reads them): ``v_a + α²v_b`` for ``a ± αb`` of two followed values, the followed
        one's for a constant added (a number, or a parameter or buffer without noise),
        ``c²v`` (``v/c²``) for a product (quotient) with a constant ``c``; ``None``
        otherwise."""
        nargs = list(node.args)
        an = nargs[0] if nargs else node.kwargs.get("input")
        bn = nargs[1] if len(nargs) > 1 else node.kwargs.get("other")
        av = args[0] if args else kwargs.get("input")
        bv = args[1] if len(args) > 1 else kwargs.get("other")
        alpha = kwargs.get("alpha", 1)
        if an is None or bn is None or not isinstance(alpha, (int, float)):
            return None
        ca, cb = self._constant(an), self._constant(bn)
        va, vb = self._v(an), self._v(bn)
        if op in (operator.add, operator.sub):
            if ca and vb is not None:
                return alpha * alpha * vb
            if cb and va is not None:
                return va
            return va + alpha * alpha * vb if va is not None and vb is not None else None
        if cb and va is not None:
            return va * (bv * bv) if op is operator.mul else va / (bv * bv)
        if op is operator.mul and ca and vb is not None:
            return vb * (av * av)
        return None

    def _constant(self, a) -> bool:
        """Whether an operand is noiseless and not followed by the channel: a number, or a
        parameter or buffer (``get_attr``) that carries no noise."""
        if isinstance(a, fx.Node):
            return a.op == "get_attr" and a.target not in self.prop.noise_var
        return isinstance(a, (int, float)) and not isinstance(a, bool)

    def _call(self, node, args, kwargs, env, i):
        name = node.name
        rc = self.rec.get(name)
        kind = activation_kind(node, self.modules)
        if kind is not None and rc is not None and "s" in rc:
            s = rc["s"].to(args[0].dtype)
            z = args[0]
            # with the channel (the input's variance recorded), the smoothed mean also moves
            # through its s
            se = self._moving_std(s, self._v(node.args[0]))
            if kind == "relu":
                val = smooth_relu(z, se, rc.get("g1"))
            elif isinstance(kind, tuple):
                val = (smooth_leaky_relu if kind[0] == "leaky_relu" else smooth_elu)(z, se, kind[1])
            else:
                val = smooth_activation(activation_function(kind), z, se)
            r = torch.zeros_like(val, requires_grad=True)
            self.rtaps.append((name, [r]))
            return val + r
        if is_maxpool(node, self.modules) and rc is not None:
            m = self.modules.get(node.target) if node.op == "call_module" else None
            kernel, stride, *_ = maxpool_args(node, m, args, kwargs)
            cur, vcur = self._maxpool(name, args[0], kernel, stride, rc["theta"], rc.get("g1"), self._v(node.args[0]))
            if vcur is not None:
                self.var[node] = vcur
            return cur
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                W, b = self.params[node.target + ".weight"], (self.params[node.target + ".bias"]
                                                             if m.bias is not None else None)
                val = _layer_map(m, args[0], W, b)
                if node.target in self.noisy:
                    e = torch.zeros_like(val, requires_grad=True)
                    self.taps.append((name, Tap(node.target, m, args[0].detach(), e)))
                    val = val + e
                return val
        return self.plain(node, args, kwargs)

    def _maxpool(self, name, x, kernel, stride, thetas, g1s=None, v=None):
        """Clark's expected maximum over each window, pairwise, at the moment pass's
        ``θ = sd(a − b)``; with the variance channel ``v`` (the input's), ``θ`` also moves
        with it (``∂E max/∂θ = φ(α)``, as a ReLU's ``s``) and the window's running maximum
        gets Clark's variance of two independent Gaussians. Returns ``(maximum, its
        variance or None)``."""
        cur = vcur = None
        rs = []
        for step, sl in enumerate(window_slices(*x.shape[-2:], kernel, stride)):
            el = x[sl]
            if cur is None:
                cur, vcur = el, None if v is None else v[sl]
            else:
                r = torch.zeros_like(el, requires_grad=True)
                rs.append(r)
                g1 = None if not g1s or g1s[step - 1] is None else g1s[step - 1]
                th = thetas[step - 1].to(x.dtype)
                if vcur is None:
                    val = smooth_max(cur, el, th, g1)
                else:
                    vel = v[sl]
                    val = smooth_max(cur, el, self._moving_std(th, vcur + vel), g1)
                    vcur = clark_max(cur, el, vcur, vel, torch.zeros_like(vel))[1].to(vel.dtype)
                cur = val + r
        self.rtaps.append((name, rs))
        return cur, vcur


def _adaptive_avg_var(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The variance of an adaptive average pooling of independent units of variance ``v``
    to ``out``'s size: ``Σ v/n²`` per window of ``n`` units (windows overlap and differ in
    size where the sizes do not divide), as the moment pass forms it."""
    H, W = v.shape[-2:]
    oh, ow = out.shape[-2:]
    n = (torch.tensor([_adaptive_len(i, H, oh) for i in range(oh)], dtype=v.dtype, device=v.device)[:, None]
         * torch.tensor([_adaptive_len(j, W, ow) for j in range(ow)], dtype=v.dtype, device=v.device)[None, :])
    return F.adaptive_avg_pool2d(v, (oh, ow)) / n


def _layer_map(m: nn.Module, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The Linear or Conv2d layer ``m`` with weight ``W`` (and bias ``b``) applied to
    ``x``: the surrogate's means, and its variance channel with ``W∘W`` and ``σ²``."""
    if isinstance(m, nn.Linear):
        return F.linear(x, W, b)
    return F.conv2d(x, W, b, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)


def _quad(Jf: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Σ_i J[a, b, i] w[b, i] J[c, b, i]`` → ``[B, C, C]`` float64 (``Jf [C, B, I]``,
    ``w [B, I]``), as one batched matrix product in ``Jf``'s dtype (measured 1.6× the
    three-operand einsum)."""
    X = Jf.permute(1, 0, 2)
    return ((X * w.to(X.dtype).unsqueeze(1)) @ X.mT).double()


def _injection_covariance(deltas_e: dict, deltas_r: dict, rec: dict, B: int, C: int) -> torch.Tensor:
    """The noise of each layer acting on its input's perturbation (``e``) and the
    variance the expected-slope linearisation misses (``r``), mapped to the logits by
    the surrogate's signals ``δ [C, B, *shape]``. Each term is a sum of products in the
    signals' dtype (as the first-order weight terms, :func:`~..linearize.tap_covariance`),
    accumulated in float64."""
    cov = torch.zeros(B, C, C, dtype=torch.float64)
    for name, de in deltas_e.items():
        rc = rec[name]
        dt = de.dtype
        if "gpert" not in rc:  # Linear: independent per output unit
            cov += _quad(de.reshape(C, B, -1), rc["vpert"].reshape(B, -1))
        else:  # Conv: per channel σ̄_c² G_pert off the diagonal + the exact diagonal
            Cout = rc["vpert"].shape[1]
            Jf = de.reshape(C, B, Cout, -1)  # [C, B, Cout, L]
            Lp = Jf.shape[-1]
            vp = rc["vpert"].reshape(B, -1)
            G = rc["gpert"].to(dt)  # [B, g, L, L]
            g = G.shape[1]
            Goff = G - torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1))
            sb = rc["sbar2"].to(dt).reshape(g, Cout // g)
            # Σ_c σ̄_c² J_c Goff J_cᵀ, grouped (no per-channel copy of G), as batched
            # products: X [B, g, C·Cout/g, L] @ Goff, then contracted with X over (c, q)
            X = Jf.reshape(C, B, g, Cout // g, Lp).permute(1, 2, 0, 3, 4)  # [B, g, C, c, L]
            A = (X.reshape(B, g, -1, Lp) @ Goff).reshape(B, g, C, Cout // g, Lp) * sb[None, :, None, :, None]
            cov += (A.permute(0, 2, 1, 3, 4).reshape(B, C, -1) @ X.permute(0, 2, 1, 3, 4).reshape(B, C, -1).mT).double()
            cov += _quad(Jf.reshape(C, B, -1), vp)
    for name, drs in deltas_r.items():
        cols = rec[name].get("cols") or [None] * len(drs)
        for dr, ex, cl in zip(drs, rec[name]["excess"], cols):
            Jf = dr.reshape(C, B, -1)
            cov += _quad(Jf, ex.reshape(B, -1))
            if cl is not None:  # correlated second-order part: Σ_m (J l_m)(J l_m)ᵀ
                t = torch.einsum("abi,mbi->bam", Jf, cl.to(Jf.dtype).reshape(cl.shape[0], B, -1))
                cov += torch.einsum("bam,bcm->bac", t, t).double()
    return cov


#: Inputs per chunk of :func:`propagate_moments` by default.
DEFAULT_MOMENT_CHUNK = 32


def moment_chunk_size(lin: LinearizedNetwork, x1: torch.Tensor, propagator: MomentPropagator,
                      budget: int = DEFAULT_JACOBIAN_BUDGET, cap: int = PASS_CHUNK_CAP) -> int:
    """Inputs per chunk of the moment pass: more than the default
    (:data:`DEFAULT_MOMENT_CHUNK`) only where an estimate of what one input holds,
    measured on a one-input forward (``x1``), fits ``budget`` that many times; never
    fewer than the default (the memory the pass had before). The estimate, per input:
    each convolution's unfolded columns ``3 · (rank + h2_rank + 2) · J · L`` and four
    ``[L, L]`` patch Gram matrices in float64, and four activations of the largest
    Linear/Conv2d input or output as columns. Measured peak increments per input
    (``propagate_moments(mean_only=True)``, rank 32, ``h2_rank`` 16): 0.2 MB (digits
    MLP), 0.6 MB (ResNet-20, width 16, digits), 10 MB (VGG, digits), 163 MB (ResNet-20,
    width 16, 3×32×32); the estimate gives 0.2, 12, 190 and 224 MB (conservative: the
    convolutional models keep the default chunk, the MLP gets 128)."""
    mods = {id(m): (n, m) for n, m in lin.net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    with torch.no_grad(), tapping(mods) as taps:
        lin.forward(x1[:1].to(lin.device))
    if not taps:
        return DEFAULT_MOMENT_CHUNK
    cols = propagator.rank + propagator.h2_rank + 2
    big = max(max(t.x[0].numel(), t.e[0].numel()) for t in taps)
    conv = 0
    for t in taps:
        m = t.module
        if isinstance(m, nn.Conv2d):
            L = t.e[0].numel() // m.out_channels
            J = _patch_size(m)
            conv = max(conv, 3 * cols * J * L + 4 * L * L)
    per = 8 * conv + torch.tensor([], dtype=lin.dtype).element_size() * 4 * cols * big
    return int(max(DEFAULT_MOMENT_CHUNK, min(cap, budget // max(1, per))))


def propagate_moments(lin: LinearizedNetwork, x: torch.Tensor, noise: WeightNoise, rank: int | None = None,
                      spatial_rank: int | None = None, chunk_size: int = DEFAULT_MOMENT_CHUNK,
                      propagator: MomentPropagator | None = None, mean_only: bool = False,
                      with_head: bool = False) -> MomentResult:
    """Logit mean and covariance of every input under ``noise`` (package docstring), in
    chunks of ``chunk_size`` inputs: a moment pass (per-unit variances, window
    correlations, perturbation Gram matrices), then one batched backward pass per class
    through the surrogate network for the covariance. ``propagator`` (built for any
    level of the same noise family) is reused at ``noise``; otherwise one is built with
    ``rank``/``spatial_rank`` (defaults of :class:`MomentPropagator`). ``mean_only``:
    the logit mean only (it is the moment pass's output): the surrogate pass is skipped
    and ``cov`` is ``None``. ``with_head``: also the output layer's scale-mixture terms
    (``head``; :mod:`.head`) where the logits are a noisy Linear layer's output."""
    check_bool("mean_only", mean_only)
    check_bool("with_head", with_head)
    odd = layer_rule_problems(lin, x)
    if odd:
        raise ValueError(f"method='moments' cannot follow the noisy layer(s) {odd}: a subclass of Linear/Conv2d "
                         "with its own forward, a weight also used outside its layer's call, or a layer whose "
                         "input rows are not the batch's inputs (a learned token, sequence-first or per-input "
                         "calls); its per-layer rules would be silently wrong there. Use method='linear' (the "
                         "first order differentiates such layers exactly)")
    if propagator is not None:
        prop = propagator.with_noise(noise)
    else:
        kw = {k: v for k, v in (("rank", rank), ("spatial_rank", spatial_rank)) if v is not None}
        prop = MomentPropagator(lin, noise, **kw)
    scale = lin.scales(noise)
    params = lin.params_by_module
    means, covs, heads = [], [], []
    hname, tgt = prop.head, prop.head_target
    hw = (with_head and hname is not None and not prop.first_order
          and prop.noise_var.get(f"{tgt}.weight") is not None)
    pre_count = pre_exceed = None
    lost = total = 0.0
    tails: dict = {}  # layer -> [Σ κ₄, Σ Var²] over the chunks
    mdt = lin.dtype
    scratch: dict = {}  # the weight terms' per-sample Jacobians, buffers reused across chunks
    for i in range(0, x.shape[0], chunk_size):
        xb = x[i:i + chunk_size].to(lin.device)
        with torch.no_grad():
            res = prop.run(xb)
        mu, rec, st = res.mean, res.rec, res.stats
        B, C = mu.shape
        means.append(mu.double())
        if pre_count is None:
            pre_count, pre_exceed = list(st["pre_count"]), list(st["pre_exceed"])
        else:
            pre_count = [a + b for a, b in zip(pre_count, st["pre_count"])]
            pre_exceed = [a + b for a, b in zip(pre_exceed, st["pre_exceed"])]
        lost += st["lost"]
        total += st["total"]
        for name, (k4, v2) in st["tail"].items():
            acc = tails.setdefault(name, [0.0, 0.0])
            acc[0] += k4
            acc[1] += v2
        if mean_only:
            continue
        if hw:
            hm, hF, hd, hsrc = rec[hname]["head"]
            heads.append(head_terms(hm, hF, hd, prop.weights[tgt][0], prop.noise_var[f"{tgt}.weight"],
                                    prop.noise_var.get(f"{tgt}.bias"), src=hsrc))
        sur = _Surrogate(prop, rec)
        with torch.enable_grad():
            out = sur.run(xb.to(mdt))
            leaves = [t.e for _, t in sur.taps] + [r for _, rs in sur.rtaps for r in rs]
            deltas = backprop_signals(out, leaves) if leaves else []
        de, dr = deltas[:len(sur.taps)], deltas[len(sur.taps):]
        cov = torch.zeros(B, C, C, dtype=torch.float64)
        by_module: dict[str, list] = {}
        deltas_e = {}
        for (node_name, t), dl in zip(sur.taps, de):
            by_module.setdefault(t.name, []).append((t, dl.detach()))
            if node_name in rec and "vpert" in rec[node_name]:
                deltas_e[node_name] = dl.detach()
        weight_terms(by_module, params, scale, cov, scratch=scratch)
        deltas_r, k = {}, 0
        for name, rs in sur.rtaps:
            deltas_r[name] = [d.detach() for d in dr[k:k + len(rs)]]
            k += len(rs)
        cov += _injection_covariance(deltas_e, deltas_r, rec, B, C)
        covs.append(cov)
    per_layer = tuple(e / c if c else 0.0 for e, c in zip(pre_exceed or [], pre_count or []))
    frac = (sum(pre_exceed) / sum(pre_count)) if pre_count and sum(pre_count) else 0.0
    return MomentResult(mean=torch.cat(means), cov=None if mean_only else torch.cat(covs), preact_frac=float(frac),
                        preact_frac_per_layer=per_layer, compression_loss=float(lost / total) if total > 0 else 0.0,
                        rank=prop.rank, spatial_rank=prop.spatial_rank,
                        head=tuple(torch.cat(t) for t in zip(*heads)) if heads else None,
                        tail_kurtosis=tuple((n, k4 / v2 if v2 > 0 else 0.0) for n, (k4, v2) in tails.items()))


def mean_map_first_chaos(lin: LinearizedNetwork, x: torch.Tensor, noise: WeightNoise,
                         propagator: MomentPropagator | None = None, chunk_size: int = DEFAULT_MOMENT_CHUNK,
                         rank: int | None = None, dtype: torch.dtype = torch.float64):
    """``(mean [N, C], cov [N, C, C])``: the logit mean of the moment pass and the
    covariance ``Σ_θ σ_θ² J̄_θ J̄_θᵀ`` of its *first Wiener chaos* taken through the moment
    pass itself: ``J̄`` is the derivative of the propagated mean (the Gaussian closure of
    ``E[f(θ + ξ)]``) with respect to each noisy layer's output mean, by autograd through
    the whole pass (per-unit variances, correlations and compression included; no
    eigenvector is differentiated, :func:`.rules._eigen_factor`), times the layer's mean
    input. By Stein's lemma ``E[∂f/∂ξ] = ∂E[f(θ + ξ)]/∂θ``; the surrogate of
    :func:`propagate_moments` differentiates a network with every unit's variance held
    fixed (the product of the expected slopes), which misses how a mean shift moves the
    variances downstream (the gates along a path moving together). What this leaves out
    of ``∂E f/∂W``: the layer's weights acting on its input's perturbation (the
    covariance of the downstream gates with that perturbation); exact for noise on the
    first noisy layer, whose input is the clean input. A diagnostic
    (``benchmarks/moments_diagnose.py --parts stein``): one backward pass per class
    through the moment pass: in float32 15–25× the cost of ``propagate_moments``, in
    float64 about a hundred times (553 s against 5 s on 256 inputs of a digits ResNet-20).

    ``propagator`` gives the pass's settings (default: :class:`MomentPropagator`'s);
    ``rank`` overrides its rank (``rank=1``: one column, ``spatial_rank = 1``,
    ``h2_rank = 0``, the first chaos through a nearly diagonal moment map: 14 s on those
    inputs, 3–4× ``propagate_moments``; docs/THEORY.md §9, issue 11's eighth pass). The
    pass runs in ``dtype``: in float32 its derivatives overflowed (the first non-finite
    one at the sketch's row rescaling ``target/cur``: NaN for 85 of 128 inputs of that
    ResNet-20 at η = 0.2, rank 1). A non-finite result raises ``ValueError``."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    # the propagator's settings (the defaults without one), at ``rank`` and in ``dtype``
    kw = {} if propagator is None else dict(
        rank=propagator.rank, spatial_rank=propagator.spatial_rank, first_order=propagator.first_order,
        unit_space_max=propagator.unit_space_max, compression=propagator.compression, seed=propagator.seed,
        h2_rank=propagator.h2_rank, d_rank=propagator.d_rank)
    if rank is not None:
        kw["rank"] = rank
    if rank == 1:
        kw.update(spatial_rank=1, h2_rank=0)
    prop = MomentPropagator(lin, noise, dtype=dtype, **kw)
    scale, params = lin.scales(noise), lin.params_by_module
    means, covs = [], []
    for i in range(0, x.shape[0], chunk_size):
        xb = x[i:i + chunk_size].to(lin.device)
        ps = _MomentPass(prop, tap=True)
        with torch.enable_grad():
            mu = ps.result(xb).mean
            deltas = backprop_signals(mu, [t.e for _, t in ps.taps]) if ps.taps else []
        B, C = mu.shape
        cov = torch.zeros(B, C, C, dtype=torch.float64)
        by_module: dict[str, list] = {}
        for (_, t), dl in zip(ps.taps, deltas):
            by_module.setdefault(t.name, []).append((t, dl.detach()))
        weight_terms(by_module, params, scale, cov)
        if not bool(torch.isfinite(cov).all()):
            bad = int((~torch.isfinite(cov)).flatten(1).any(1).sum())
            raise ValueError(f"mean_map_first_chaos: the derivatives of the moment pass are not finite for {bad} of "
                             f"inputs {i}..{i + B - 1} (dtype {dtype})"
                             + ("; run it in float64 (dtype=torch.float64)" if dtype != torch.float64 else ""))
        means.append(mu.detach().double())
        covs.append(cov)
    return torch.cat(means), torch.cat(covs)
