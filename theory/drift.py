"""Prediction under non-zero-mean hardware noise (PCM drift over time, quantisation,
stuck-at faults): :func:`predict_drift` (a curve over times since programming) and
:func:`predict_hardware` (one model, the :func:`~noiseprop.theory.predict.predict`
entry point for hardware noise).

For a noise model with per-element mean ``μ = E[w̃]`` and variance ``v``
(:mod:`noiseprop.theory.hardware`), the logits are expanded to first order around a
linearisation point ``θ*``:

    f(w̃) ≈ f(θ*) + J(θ*) (w̃ − θ*),

* ``linearize_at="mean"`` (the default of :func:`predict_hardware`, one time):
  ``θ* = μ``, so the logit mean is ``f(μ)`` (the network with the expected weights, the
  mean shift ``J·E[δw]`` to all orders along the mean) and the covariance is
  ``J(μ) Σ J(μ)ᵀ``: one pass of derivatives per time.
* ``linearize_at="earliest"`` (the default of :func:`predict_drift`): the mean is still
  ``f(μ_t)`` but the covariance at every time uses the Jacobian at the expected weights
  of the curve's earliest time ``μ_0``, each layer's share rescaled by the other layers'
  drift since then (:func:`_drift_factors`): one pass of derivatives serves the whole
  curve (``jacobian_pass(..., extra_units=...)``). For one time it is ``"mean"``.
* ``linearize_at="programmed"``: the same from the programmed weights ``w``.

The derivative pass (:func:`_fast_pass`) takes each Linear/Conv2d weight from the
signals backpropagated to its output: a convolution with a large feature map forms its
per-sample Jacobian once and contracts it with every scale map, tangent and draw; one
with a small feature map (:func:`_element_gram_cheaper`) never forms it
(:func:`_conv_element_cov`: the per-element scale inside the patch Gram matrix, the
tangents and draws through one stacked convolution). Each layer's compensation draws
are made once for the whole curve (:meth:`~noiseprop.theory.hardware.PCMLike.alpha_over_times`).

With global drift compensation the layer weight is ``α W`` with the layer scalar
``α`` random; to first order ``δ(αW) = ᾱ δW + E[W] δα``, so the layer's share of the
logit covariance is

    ᾱ² J diag(Var W) Jᵀ + Var α · v vᵀ + ᾱ (u vᵀ + v uᵀ),     v = J E[W],  u = J Cov(α, W),

(``ᾱ``, ``Var α``, ``Cov(α, W)`` from :meth:`~noiseprop.theory.hardware.PCMLike.compensation_moments`;
``v`` and ``u`` by forward-mode products, ``torch.func.jvp``, vectorised over layers).
Derivation: :func:`noiseprop.theory.symbolic.derive` ``("hardware")``.
Accuracy per time from the Gaussian logits ``N(f(μ), Σ)`` by
:func:`~noiseprop.theory.accuracy.correct_probability`; the chip-to-chip spread from
``K`` shared draws of the linearised network (plus ``sd(α_l) v_l η``).
``method="moments"`` (docs/THEORY.md §10, "Beyond first order"): moment propagation
(:mod:`noiseprop.theory.moments`) of the network at the expected weights ``E[w̃]`` with
independent per-element noise of variance ``Var(w̃)`` (``ᾱ² Var W`` under compensation):
the devices of a layer are drawn independently given the programmed weights, and a
pre-activation sums many of them, so their first two moments are what reaches it. The
compensation scalar's own variance and its covariance with the weights (which couple
the elements of a layer) enter to first order as in the linear method. This keeps the
ReLU mean shift and the noise acting on perturbed inputs, which the first order misses
once drift and read noise are large.
"""
from __future__ import annotations

import copy
import math
import time
import types
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vmap

from ._graph import unfold_input
from .accuracy import DEFAULT_N_POINTS, check_n_points, correct_probability, sampled_accuracies
from .hardware import HardwareNoise, PCMLike, programmed_abs_moments
from .hashing import inputs_fingerprint
from .results import Deferred
from .linearize import (DEFAULT_JACOBIAN_BUDGET, PASS_CHUNK_CAP, LinearizedNetwork, _fast_ok, check_no_recompute,
                        check_noise_reaches,
                        split_calls, tap_route_problems, _patch_size, read_without_call,
                        backprop_signals, graph_and_signals, jacobian_pass, scaled_jacobian, tap_jacobian,
                        tapping)
from .moments import DEFAULT_RANK, DEFAULT_SPATIAL_RANK, MomentPropagator, propagate_moments
from .noise import WeightNoise, parse_noise
from .predict import (DIAGNOSTIC_DIRECTIONS, DIAGNOSTIC_INPUTS, MAX_ACCURACY_DRAWS, METHODS, OUTSIDE_RANGE, Prediction,
                      _check_split, _class_mask, _cov_factor, _logit_loss_increase, _moment_risks, _preact_ratios, _rescale_draws,
                      _slot_cov_to_full, _slot_rows_to_full, _truncation_accuracy_diag, _truncation_check_inputs, curve_range_warning,
                      moments_range_warning, range_warning, tail_diagnostics)
from .validation import (check_bool, check_finite_logits, check_inputs, check_int, check_labels, check_logits, check_seed, check_times,
                         probe_logits)

__all__ = ["DriftPrediction", "predict_drift", "predict_hardware", "LINEARIZE_AT"]

LINEARIZE_AT = ("earliest", "mean", "programmed")
#: How a summary names each linearisation point.
_LINEARIZE_WORDS = {"earliest": "the earliest time's expected weights (rescaled by the drift)",
                    "mean": "each time's expected weights", "programmed": "the programmed weights (rescaled by the drift)"}


def _moment_settings(rank, spatial_rank, moment_chunk) -> tuple[int, int, int]:
    return (check_int("rank", rank, 1), check_int("spatial_rank", spatial_rank, 1),
            check_int("moment_chunk", moment_chunk, 1))


def _check_options(method, linearize_at):
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)} for hardware noise, got {method!r}")
    if linearize_at not in LINEARIZE_AT:
        raise ValueError(f"linearize_at must be one of {list(LINEARIZE_AT)}, got {linearize_at!r}")


# ----------------------------------------------------------------------------
# Per-parameter moments
# ----------------------------------------------------------------------------
@dataclass
class _Moments:
    mean: dict  # name -> E[w̃] (effective, float of the model's dtype)
    unit: dict  # name -> sd of the independent part (ᾱ·sd(W) with compensation)
    raw_mean: dict  # name -> E[W] (compensated layers only)
    cov_w: dict  # name -> Cov(α, W) (compensated layers only)
    alpha_var: dict  # name -> Var α
    alpha_mean: dict


def _moments(lin: LinearizedNetwork, noise: WeightNoise, sampled: dict | None = None, raw: dict | None = None,
             prog_abs: dict | None = None) -> _Moments:
    """Per-parameter moments under ``noise``; ``sampled``, ``raw``, ``prog_abs``: per
    parameter name, a PCM layer's compensation draws, raw moments at this time and
    programmed weights' absolute moments, already computed (:func:`_moments_over_times`)."""
    mean, unit, raw_mean, cov_w, avar, amean = {}, {}, {}, {}, {}, {}
    for n, w in lin.target_params.items():
        if isinstance(noise, PCMLike):
            eff = noise.effective_moments(w, sampled=None if sampled is None else sampled[n],
                                          raw=None if raw is None else raw[n],
                                          prog_abs=None if prog_abs is None else prog_abs[n])
            mean[n] = eff["mean"].to(w.dtype)
            comp = eff["comp"]
            if comp is None:  # without compensation
                unit[n] = eff["var"].to(w.dtype).clamp_min(0).sqrt()
                continue
            unit[n] = (comp.alpha_mean * eff["raw"]["var"].sqrt()).to(w.dtype)
            raw_mean[n] = eff["raw"]["mean"].to(w.dtype)
            cov_w[n] = comp.cov_w.to(w.dtype)
            avar[n] = comp.alpha_var
            amean[n] = comp.alpha_mean
        else:
            mean[n] = noise.mean(w).to(w.dtype)
            unit[n] = noise.variance(w).clamp_min(0).sqrt().to(w.dtype)
    return _Moments(mean, unit, raw_mean, cov_w, avar, amean)


def _moments_over_times(lin: LinearizedNetwork, noises: Sequence[HardwareNoise]) -> list[_Moments]:
    """:func:`_moments` at every noise model of a curve. When they are one
    :class:`~noiseprop.theory.hardware.PCMLike` at several times, the device tables of
    all the times are computed on one set of quadrature nodes and each weight's place in
    them is found once (:meth:`~noiseprop.theory.hardware.PCMLike.raw_moments_over_times`), and with
    compensation each layer's compensation draws are made once for all the times
    (:meth:`~noiseprop.theory.hardware.PCMLike.alpha_over_times`): the same numbers as
    one time at a time."""
    first = noises[0] if noises else None
    one_model = len(noises) > 1 and PCMLike.one_model_over_times(noises)
    if not one_model:
        return [_moments(lin, nz) for nz in noises]
    raws = [{} for _ in noises]  # every time's device table on one set of quadrature nodes
    per_time = [{} if first.compensation else None for _ in noises]
    prog_abs = {} if first.compensation else None
    for n, w in lin.target_params.items():
        for k, raw in enumerate(PCMLike.raw_moments_over_times(w, noises)):
            raws[k][n] = raw
        if first.compensation:
            prog_abs[n] = programmed_abs_moments(raws[0][n])  # the same at every time
            for k, st in enumerate(first.alpha_over_times(w, [nz.t for nz in noises])):
                per_time[k][n] = st
    return [_moments(lin, nz, st, raw, prog_abs) for nz, st, raw in zip(noises, per_time, raws)]


def _at(lin: LinearizedNetwork, point: dict) -> LinearizedNetwork:
    """A shallow copy of ``lin`` whose target parameters are ``point``."""
    out = copy.copy(lin)
    out.params = {**lin.params, **point}
    out.target_params = {n: point[n] for n in lin.names}
    return out


class _ElementNoise(WeightNoise):
    """Zero-mean Gaussian noise with given per-element standard deviations (one tensor
    per target, matched by storage and shape): how :func:`_moment_logits` hands the
    hardware model's ``Var(w̃)`` to the moment propagation."""

    kind = "element"

    def __init__(self, pairs):
        object.__setattr__(self, "_sd", {(t.data_ptr(), tuple(t.shape)): s for t, s in pairs})

    @property
    def level(self) -> float:
        return 1.0

    def with_level(self, level):
        return self

    def unit_scale(self, w):
        key = (w.data_ptr(), tuple(w.shape))
        if key not in self._sd:
            raise KeyError(f"no noise variance given for a weight of shape {tuple(w.shape)}")
        return self._sd[key]

    def to_string(self) -> str:
        return "element"


def _moment_logits(lin_mu: LinearizedNetwork, x: torch.Tensor, mo: "_Moments", rank: int, spatial_rank: int,
                   chunk: int):
    """Logit mean and covariance ``[N, C]``, ``[N, C, C]`` by moment propagation at the
    expected weights (``lin_mu``) with independent element noise of sd ``mo.unit``
    (without the compensation terms, added by the caller), and the propagation's result."""
    noise = _ElementNoise([(lin_mu.target_params[n], mo.unit[n]) for n in lin_mu.names])
    prop = MomentPropagator(lin_mu, noise, rank=rank, spatial_rank=spatial_rank)
    res = propagate_moments(lin_mu, x, noise, chunk_size=chunk, propagator=prop)
    return res.mean.double().cpu(), res.cov.double().cpu(), res


def _forward(lin: LinearizedNetwork, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([lin.forward(x[i:i + batch_size].to(lin.device)) for i in range(0, x.shape[0], batch_size)])


def _layer_jvps(lin: LinearizedNetwork, x: torch.Tensor, tangents: list[dict], batch_size: int) -> torch.Tensor:
    """``J t_k`` ``[K, N, C]`` for tangents ``t_k`` (dicts over some target names), by
    forward-mode products vectorised over ``k``."""
    names = sorted({n for t in tangents for n in t})
    stacked = {n: torch.stack([t.get(n, torch.zeros_like(lin.target_params[n])) for t in tangents]) for n in names}
    primals = {n: lin.target_params[n] for n in names}
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(lin.device)

        def f(tp):
            return lin.forward(xb, tp)

        def one(tang):
            return jvp(f, (primals,), (tang,))[1]

        with torch.no_grad():
            try:
                outs.append(vmap(one)(stacked))
            except Exception:  # an op without a batching rule: one tangent at a time
                outs.append(torch.stack([one({n: stacked[n][k] for n in names}) for k in range(len(tangents))]))
    return torch.cat(outs, dim=1)


def _layer_op(module: nn.Module, xin: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's linear map with another weight (no bias): ``W x`` or ``conv(x, W)``."""
    if isinstance(module, nn.Linear):
        return F.linear(xin, weight.to(xin.dtype))
    return F.conv2d(xin, weight.to(xin.dtype), None, module.stride, module.padding, module.dilation, module.groups)


def _fast_pass(lin_pt: LinearizedNetwork, x: torch.Tensor, units: Sequence[dict], tangents: Sequence[dict],
               draws: int, seed: int, chunk_size: int | None, index: torch.Tensor | None = None):
    """One pass of derivatives at ``lin_pt``'s weights, for weights of Linear/Conv2d
    layers: ``J diag(u_k²) Jᵀ`` ``[N, C, C]`` for every scale map ``u_k`` in ``units``,
    ``J t_j`` ``[N, C]`` for every tangent ``t_j`` and ``draws`` shared draws
    ``J (u_0 ⊙ ξ)`` ``[N, C, K]``. The backpropagated signal δ at each layer's output
    (one backward pass per class) gives them without forming the per-sample Jacobian
    where a closed form exists: for a Linear layer (one position)
    ``Σ_{o,i} u²_{oi} δ_{ao} δ_{bo} x_i² = δ_a diag(u² x²) δ_bᵀ`` and ``J t = δ · (t x)``;
    for a convolution ``J t = Σ_{o,p} δ_{o,p} conv(x, t)_{o,p}`` and the covariance from the
    per-sample Jacobian (:func:`~noiseprop.theory.linearize.tap_jacobian`).
    ``index`` (``[N, k+1]``: each input's label, then its competitors,
    :func:`_curve_classes`): only those classes are differentiated, ``k + 1`` backward
    passes and every output over those slots (``C`` becomes ``k + 1``).
    Returns ``None`` when a target is not such a weight (the caller falls back)."""
    modules = dict(lin_pt.net.named_modules())
    fast = {}
    for name in lin_pt.names:
        mname, _, pname = name.rpartition(".")
        mod = modules.get(mname)
        ok = pname == "weight" and mname and _fast_ok(mod)
        if not ok:
            return None
        fast[mname] = name
    watch = {id(modules[m]): (m, modules[m]) for m in fast}
    n = x.shape[0]
    with torch.no_grad(), tapping(watch) as probe:  # one input: the classes, and what one input holds
        c0 = lin_pt.forward(x[:1].to(lin_pt.device)).shape[-1]
    if read_without_call(lin_pt, [fast[m] for m in fast if m not in {t.name for t in probe}], x[:1].to(lin_pt.device)):
        return None  # a weight read without calling its layer (attention's out_proj): the generic route
    if tap_route_problems(lin_pt, x, {m: ["weight"] for m in fast}):
        return None  # input rows that are not the batch's, or a weight also used outside its layer: the generic route
    cs = c0 if index is None else index.shape[1]  # the classes (slots) differentiated
    if chunk_size is None:
        chunk_size = _fast_chunk_size(probe, cs, len(units), len(tangents) + draws,
                                      torch.tensor([], dtype=lin_pt.dtype).element_size())
    del probe
    dirs = None
    if draws:
        g = torch.Generator(device=lin_pt.device).manual_seed(int(seed))
        dirs = {nm: torch.randn((draws,) + tuple(p.shape), generator=g, dtype=lin_pt.dtype, device=lin_pt.device)
                * units[0][nm] for nm, p in lin_pt.target_params.items()}
    covs = [[] for _ in units]
    jts = [[] for _ in tangents]
    zs = []
    scratch: dict = {}  # a layer's per-sample Jacobian and its scaled copy, buffers reused (scratch_view)
    for i in range(0, n, chunk_size):
        xb = x[i:i + chunk_size].to(lin_pt.device)
        b = xb.shape[0]
        with torch.enable_grad(), tapping(watch) as taps:
            out = lin_pt.forward(xb)
        if out.dim() != 2:
            raise ValueError(f"the model must map a batch of inputs to logits of shape [N, C]; got shape {tuple(out.shape)}")
        if split_calls(taps, b):
            return None  # a layer called on part of the chunk (a batch split inside the forward): the generic route
        sel = None if index is None else index[i:i + chunk_size].to(out.device)
        n_fwd = len(taps)
        deltas = backprop_signals(out, [t.e for t in taps], index=sel)
        check_no_recompute(taps, n_fwd)
        cov_c = [torch.zeros(b, cs, cs, dtype=torch.float64) for _ in units]
        jt_c = [torch.zeros(b, cs, dtype=torch.float64) for _ in tangents]
        z_c = torch.zeros(b, cs, draws, dtype=torch.float64) if draws else None
        by_module: dict[str, list] = {}
        for t, dl in zip(taps, deltas):
            by_module.setdefault(t.name, []).append((t, dl.detach()))
        with torch.no_grad():
            for mname, pname in fast.items():
                calls = by_module.get(mname, [])
                if not calls:
                    continue
                mod = modules[mname]
                simple = isinstance(mod, nn.Linear) and len(calls) == 1 and calls[0][0].x.dim() == 2
                if simple:
                    t, dl = calls[0]  # dl [C, B, out], t.x [B, in]
                    x2 = t.x * t.x
                    d = dl.permute(1, 0, 2)  # [B, C, out]
                    for u, cv in zip(units, cov_c):
                        s = x2 @ (u[pname] ** 2).to(x2.dtype).T  # [B, out]
                        # one batched product (a three-operand einsum took 15× longer)
                        cv += torch.bmm(d * s[:, None, :], d.transpose(1, 2)).double()
                    _tangent_products(mod, pname, calls, None, tangents, jt_c, dirs, z_c, draws)
                elif _element_gram_cheaper(mod, calls, cs, len(units), sum(pname in tg for tg in tangents) + draws):
                    t, dl = calls[0]  # small feature map: the per-sample Jacobian is never formed
                    for cv, term in zip(cov_c, _conv_element_cov(t, dl, [u[pname] for u in units])):
                        cv += term
                    _tangent_products(mod, pname, calls, None, tangents, jt_c, dirs, z_c, draws)
                else:
                    J = None
                    for t, dl in calls:  # a layer called once: its Jacobian in the reused buffer
                        Jt = tap_jacobian(t, dl, "weight", scratch=scratch if len(calls) == 1 else None)
                        J = Jt if J is None else J + Jt
                    for u, cv in zip(units, cov_c):
                        Js = scaled_jacobian(J, u[pname], scratch)
                        cv += torch.bmm(Js, Js.mT).double()
                        del Js
                    # with the per-sample Jacobian formed, every tangent and draw of this
                    # layer is one matrix product with it (no convolution per tangent)
                    _tangent_products(mod, pname, calls, J, tangents, jt_c, dirs, z_c, draws)
                    del J
        del deltas, taps, out, by_module
        for lst, cv in zip(covs, cov_c):
            lst.append(cv)
        for lst, jc in zip(jts, jt_c):
            lst.append(jc)
        if z_c is not None:
            zs.append(z_c)
    return ([torch.cat(c) for c in covs], [torch.cat(j) for j in jts], torch.cat(zs) if zs else None)


def _fast_chunk_size(taps, num_classes: int, num_units: int, num_maps: int, itemsize: int,
                     budget: int = DEFAULT_JACOBIAN_BUDGET, cap: int = PASS_CHUNK_CAP) -> int:
    """Inputs per chunk of :func:`_fast_pass` from what one input holds, measured on the
    taps of a one-input forward: the forward graph (each tapped layer's input and output,
    twice), the backpropagated signals (one per class, twice for the batched backward's
    working gradients) and the largest single layer's contraction. A layer's per-sample
    Jacobian ``[C, P]`` is formed, used and freed before the next layer's, so the budget
    holds one layer's: that Jacobian, its scaled copy and the product's working memory
    (``3·C·P``), or for a convolution on the element-Gram route its ``U`` per-channel
    ``L × L`` Gram matrices and unfolded patches, whichever is larger, plus the ``T``
    tangent and draw outputs of the layer. (The older all-parameter budget,
    :func:`~noiseprop.theory.linearize.auto_chunk_size`, held every layer's Jacobian at
    once: 5 inputs per chunk on the digits VGG.) At most ``cap``, at least 1."""
    work = 0
    for t in taps:
        m = t.module
        nout = t.e[0].numel()
        w = 3 * num_classes * m.weight.numel()
        if isinstance(m, nn.Conv2d):
            L = nout // m.out_channels
            w = max(w, num_units * m.out_channels * L * L + _patch_size(m) * m.groups * L)
        work = max(work, w + num_maps * nout)
    per = itemsize * (graph_and_signals(taps, num_classes) + work)
    return int(max(1, min(cap, budget // max(1, per))))


#: What one element read or written by the per-sample Jacobian route's memory-bound steps
#: (the scaled copy ``J ⊙ u`` and the product ``(J ⊙ u)(J ⊙ u)ᵀ`` that reads it, about
#: ``3·C`` per weight element and scale map) costs in multiply-adds of a compute-bound
#: product. Measured on the digits VGG, compensated, six times (docs/THEORY.md §10): with
#: multiply-adds alone its 4×4 layers took the Jacobian route and the curve took
#: 17.6–19.0 s; on the element-Gram route 11.9–13.6 s; its 8×8 layers on that route,
#: 35–38 s. 8 sends the 4×4 layers to the Gram route and keeps the 8×8 ones.
MEMORY_ELEMENT_COST = 8


def _element_gram_cheaper(mod: nn.Module, calls, num_classes: int, num_units: int, num_maps: int) -> bool:
    """Whether :func:`_conv_element_cov` (and a convolution per tangent or draw) costs
    less than forming the per-sample Jacobian ``J [C, P]`` and its products, for a
    convolution called once with ``L`` output positions: per input and weight element,
    ``U·Q + L·T`` (``Q = L(L+1)/2`` pairs of the symmetric patch Gram matrix from
    :data:`GRAM_TRIANGLE_MIN` positions, ``L²`` below) against ``C·L + U·C² + C·T``
    multiply-adds (``U`` scale maps, ``T`` tangents and draws, ``C`` classes) plus the
    Jacobian route's memory-bound ``3·U·C`` element reads and writes at
    :data:`MEMORY_ELEMENT_COST` each: the small feature maps of deep layers."""
    if not isinstance(mod, nn.Conv2d) or len(calls) != 1:
        return False
    dl = calls[0][1]
    L = dl[0, 0].numel() // mod.out_channels
    C, U, T = num_classes, num_units, num_maps
    pairs = L * (L + 1) // 2 if L >= GRAM_TRIANGLE_MIN else L * L
    return U * pairs + L * T < C * L + U * C * C + C * T + MEMORY_ELEMENT_COST * 3 * U * C


#: Output positions from which :func:`_conv_element_cov` forms only the pairs ``p ≤ q`` of
#: its symmetric patch Gram matrix. Measured (six scale maps, 20 inputs, one thread):
#: 16 positions 66 → 50 ms (64 → 128 channels), 130 → 89 ms (128 → 128), 64 positions
#: 87 → 68 ms; at 9 the same (18 ms); at 4 (2×2 maps) 21 → 49 ms, the products over
#: 10 instead of 16 pairs and the copies costing more than they save.
GRAM_TRIANGLE_MIN = 16


def _conv_element_cov(tap, delta: torch.Tensor, scales: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``J diag(u_k²) Jᵀ`` ``[B, C, C]`` (float64) of a convolution's weight for every
    per-element scale map ``u_k``, without the per-sample Jacobian: with ``J_{a,(o,j)} =
    Σ_p δ_{a,o,p} X_{j,p}`` (``X`` the unfolded input patches), ``Σ_{o,j} u²_{oj} J_{a,oj}
    J_{c,oj} = Σ_o Σ_{p,q} δ_{a,o,p} δ_{c,o,q} G_{o,pq}``, ``G_{o,pq} = Σ_j u²_{oj} X_{j,p}
    X_{j,q}`` (the Gram route of :func:`~noiseprop.theory.linearize.tap_covariance`, with
    the scale inside the patch Gram matrix because it varies within an output channel).
    ``G`` is symmetric in ``(p, q)``: from :data:`GRAM_TRIANGLE_MIN` positions only its
    ``L(L+1)/2`` pairs ``p ≤ q`` are formed (the product over ``j``, this route's cost,
    nearly halves) and copied to both triangles."""
    m = tap.module
    C, B = delta.shape[:2]
    O, g = m.out_channels, m.groups
    X = unfold_input(tap.x, m)
    L = X.shape[-1]
    X = X.reshape(B, g, -1, L)  # [B, g, Jp, L]
    tri = L >= GRAM_TRIANGLE_MIN
    if tri:  # the pairs p ≤ q, row by row (triu_indices' order): [B, g, Jp, L(L+1)/2]
        XX = torch.cat([X[..., p:p + 1] * X[..., p:] for p in range(L)], dim=-1)
        iu, ju = torch.triu_indices(L, L, device=X.device)
        upper, lower = iu * L + ju, ju * L + iu
        G = torch.empty(B, O, L * L, dtype=X.dtype, device=X.device)
    else:
        XX = (X.unsqueeze(-1) * X.unsqueeze(-2)).reshape(B, g, X.shape[2], L * L)  # [B, g, Jp, L²]
    d = delta.reshape(C, B, O, L)
    out = []
    for u in scales:
        u2 = (u.reshape(g, O // g, -1) ** 2).to(X.dtype)  # [g, O/g, Jp]
        Gu = torch.matmul(u2.unsqueeze(0), XX).reshape(B, O, -1)  # [B, g, O/g, pairs] → per output channel
        if tri:
            G.index_copy_(-1, upper, Gu)
            G.index_copy_(-1, lower, Gu)
            Gu = G
        T = torch.einsum("abop,bopq->baoq", d, Gu.view(B, O, L, L))
        out.append(torch.einsum("baoq,cboq->bac", T, d).double())
    return out


def _tangent_products(mod, pname, calls, J, tangents, jt_c, dirs, z_c, draws) -> None:
    """Add ``J t`` for every tangent with a share in this layer (into ``jt_c``) and the
    draws ``J (u ⊙ ξ_k)`` (into ``z_c``): from the per-sample Jacobian ``J [B, C, P]`` when it
    is formed, all tangents and draws stacked into one matrix product; otherwise from the
    layer's map applied to its recorded input (``Σ_{o,p} δ_{o,p} (t x)_{o,p}``)."""
    idx = [k for k, tg in enumerate(tangents) if pname in tg]
    if J is not None:
        cols = [tangents[k][pname].reshape(-1).to(J.dtype) for k in idx]
        if z_c is not None:
            cols += [dirs[pname][k].reshape(-1).to(J.dtype) for k in range(draws)]
        if not cols:
            return
        out = torch.matmul(J, torch.stack(cols, dim=1)).double()  # [B, C, T]
        for j, k in enumerate(idx):
            jt_c[k] += out[:, :, j]
        if z_c is not None:
            z_c += out[:, :, len(idx):]
        return
    ws = [tangents[k][pname] for k in idx] + ([dirs[pname][k] for k in range(draws)] if z_c is not None else [])
    if not ws:
        return
    for t, dl in calls:
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:  # stacked kernels would change the grouping
            out = torch.stack([torch.einsum("cb...,b...->bc", dl, _layer_op(mod, t.x, w)) for w in ws], -1)
        else:  # every tangent and draw in one map: [B, T·out, …] → [B, C, T]
            o = _layer_op(mod, t.x, torch.cat(ws)).reshape((t.x.shape[0], len(ws)) + tuple(dl.shape[2:]))
            out = torch.einsum("cb...,bt...->bct", dl, o)
        out = out.double()
        for j, k in enumerate(idx):
            jt_c[k] += out[:, :, j]
        if z_c is not None:
            z_c += out[:, :, len(idx):]


def _comp_tangents(mo: _Moments, factors: dict | None = None) -> list[dict]:
    """Tangents ``E[W_l]`` then ``Cov(α_l, W_l)`` for every compensated layer (each
    times its :func:`_drift_factors` entry when given)."""
    names = list(mo.raw_mean)
    f = factors or {}
    return ([{n: mo.raw_mean[n] * f.get(n, 1.0)} for n in names]
            + [{n: mo.cov_w[n] * f.get(n, 1.0)} for n in names])


def _earliest(noises: Sequence[HardwareNoise]) -> int:
    """Index of the noise model with the smallest time since programming (its ``t``; 0
    for a model without one): ``linearize_at="earliest"`` linearises there."""
    return int(np.argmin([float(getattr(nz, "t", 0.0)) for nz in noises]))


def _drift_factors(lin: LinearizedNetwork, mo: _Moments, used: set | None = None) -> dict:
    """Per target parameter, the factor that maps its Jacobian at ``lin``'s weights ``w``
    (the programmed weights, or the earliest time's expected weights) to its Jacobian at
    the drifted mean ``μ_t`` (``linearize_at="programmed"``, ``"earliest"``):
    with ``c_m = ‖μ_m‖/‖w_m‖`` the drift of weight layer ``m``, the product of the other
    weight layers' ``c_m``. Exact for a chain of bias-free Linear/Conv layers and ReLUs
    whose every layer drifts by one factor (``f(c₁W₁, …, c_LW_L) = Π c_m f(W)``, so
    ``∂f/∂W_l`` scales by ``Π_{m≠l} c_m``); otherwise (a drift that depends on the
    weight's size, biases, BatchNorm, skip connections) an approximation, measured in
    docs/THEORY.md §10. Without it, the programmed Jacobian ignores that uncompensated
    drift shrinks every layer (digits MLP, one year: 13 points low). ``used``: the target
    weights that reach the logits (:func:`~.linearize.read_without_call`); a layer the
    forward never uses has no place in the products."""
    ratio = {}
    for n in lin.names:
        mname, _, pname = n.rpartition(".")
        if pname == "weight" and (used is None or n in used):  # a layer that never reaches the logits: no factor
            nw = float(lin.target_params[n].double().norm())
            ratio[mname] = float(mo.mean[n].double().norm()) / nw if nw > 0 else 1.0
    if not ratio or min(ratio.values()) <= 0:
        return {n: 1.0 for n in lin.names}
    total = sum(math.log(r) for r in ratio.values())
    return {n: math.exp(total - math.log(ratio.get(n.rpartition(".")[0], 1.0))) for n in lin.names}


def _compensation_cov(jt: Sequence[torch.Tensor], mo: _Moments):
    """``Σ_l [Var α_l v_l v_lᵀ + ᾱ_l (u_l v_lᵀ + v_l u_lᵀ)]`` ``[N, C, C]`` from
    ``v_l = J E[W_l]``, ``u_l = J Cov(α_l, W_l)`` (``jt`` in :func:`_comp_tangents` order),
    and the ``(sd α_l, v_l)`` pairs for the chip-to-chip draws."""
    names = list(mo.raw_mean)
    if not names:
        return None, []
    L = len(names)
    n, c = jt[0].shape
    cov = torch.zeros(n, c, c, dtype=torch.float64)
    pairs = []
    for i, nm in enumerate(names):
        v, u = jt[i].double().cpu(), jt[L + i].double().cpu()
        cov += mo.alpha_var[nm] * v[:, :, None] * v[:, None, :]
        cov += mo.alpha_mean[nm] * (u[:, :, None] * v[:, None, :] + v[:, :, None] * u[:, None, :])
        pairs.append((math.sqrt(mo.alpha_var[nm]), v))
    return cov, pairs


def _slow_derivatives(lin_pt, x, units, tangents, draws, seed, chunk_size, batch_size, index=None):
    """:func:`_fast_pass`'s outputs for any differentiable target (``jacobian_pass`` with
    ``extra_units`` and forward-mode products; ``index`` as there)."""
    jp = jacobian_pass(lin_pt, x, units[0], chunk_size=chunk_size, draws=draws, seed=seed, extra_units=list(units[1:]),
                       index=index)
    covs = [jp.cov_unit] + list(jp.extra_cov)
    jts = list(_layer_jvps(lin_pt, x, tangents, batch_size)) if tangents else []
    if index is not None:  # the tangent products over the same slots
        jts = [j.gather(1, index.to(j.device)) for j in jts]
    return covs, jts, jp.draws_unit


def _derivatives(lin_pt, x, units, tangents, draws, seed, chunk_size, batch_size, index=None):
    out = _fast_pass(lin_pt, x, units, tangents, draws, seed, chunk_size, index)
    if out is None:
        out = _slow_derivatives(lin_pt, x, units, tangents, draws, seed, chunk_size, batch_size, index)
    covs, jts, z = out
    return [c.double().cpu() for c in covs], [j.double().cpu() for j in jts], (None if z is None else z.double().cpu())


class _DriftCheck(NamedTuple):
    """``classes=k``: the truncation check's inputs (sorted), which of them are the
    stratum of largest omitted mass, and every class's covariances and tangent products
    on them (per time, in the curve's order)."""

    idx: torch.Tensor
    is_top: torch.Tensor
    covs: dict
    jts: dict


def _curve_classes(means: Sequence[torch.Tensor], y: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k+1]``: each input's label, then the ``k`` other classes whose mean logit
    comes closest to (or beyond) the label's at any time of the curve (largest
    ``max_t f_c(t) − f_y(t)``): the classes whose margins decide whether it stays correct
    somewhere on the curve. (The linearisation point's own logits would miss a class
    that the drift's mean shift brings up later: uncompensated drift takes a network to
    one class everywhere.)"""
    rows = torch.arange(y.shape[0])
    score = torch.stack([m - m[rows, y][:, None] for m in means]).amax(0)
    score[rows, y] = -torch.inf
    return torch.cat([y[:, None], score.topk(k, dim=1).indices], dim=1)


def _truncation_check(base, x, units, flat, cov_first, means, sel, seed, chunk_size, batch_size, order,
                      offsets) -> _DriftCheck:
    """The inputs of the ``classes=k`` truncation check, chosen as
    :func:`~noiseprop.theory.predict.predict`'s (:func:`~noiseprop.theory.predict._check_split`
    on ``½ q_i v̄_i``: the largest softmax mass of the mean logits that the slots leave
    out at any time, times the mean logit variance they keep at the earliest time), and
    the pass with every class on them."""
    left_out = ~_class_mask(sel, means[0].shape[1])
    q = torch.stack([(torch.softmax(m, dim=1) * left_out).sum(1) for m in means]).amax(0)
    proxy = 0.5 * q * torch.diagonal(cov_first, dim1=1, dim2=2).mean(1)
    idx, is_top = _check_split(proxy, _truncation_check_inputs(x.shape[0]))
    covs, jts, _ = _derivatives(base, x[idx], units, flat, 0, seed, chunk_size, batch_size)
    return _DriftCheck(idx, is_top, *_by_time(covs, jts, order, offsets))


def _by_time(covs, jts, order, offsets) -> tuple[dict, dict]:
    """A one-pass curve's outputs per time index: the covariance of each time (the pass's
    scale maps are in ``order``) and its tangent products (``jts[offsets[i]:offsets[i+1]]``)."""
    return ({k: covs[i] for i, k in enumerate(order)},
            {k: jts[offsets[i]:offsets[i + 1]] for i, k in enumerate(order)})


def _truncation_diag(check: _DriftCheck, k: int, mean: torch.Tensor, mo: _Moments, p: torch.Tensor,
                     y: torch.Tensor, classes: int, n_points: int, seed: int) -> dict:
    """At time ``k``: the accuracy with every class on the check's inputs against the
    truncated one, as :func:`~noiseprop.theory.predict.predict` reports it
    (``classes_truncation_*``; the accuracy error is the stratified estimate of the mean
    over all inputs)."""
    idx, is_top = check.idx, check.is_top
    cov = check.covs[k]
    comp, _ = _compensation_cov(check.jts[k], mo)
    if comp is not None:
        cov = cov + comp
    pf = correct_probability(mean[idx], 0.5 * (cov + cov.mT), y[idx], n_points=n_points, seed=seed)[0]
    return _truncation_accuracy_diag(p, pf, idx, is_top, classes)


# ----------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftPrediction:
    """Predicted accuracy against time since programming (:func:`predict_drift`).

    ``predictions[i]`` is the full :class:`~noiseprop.theory.predict.Prediction` at
    ``times[i]``; ``accuracy``, ``accuracy_lower``/``accuracy_upper`` (pairwise bounds),
    ``accuracy_std`` (chip to chip) and ``loss`` are arrays over times, and so is the
    validity diagnostic: ``preact_frac`` (NaN where not computed) and ``outside_range``
    (the method's validity warning fired there: the first order's, or the moment
    method's on networks with residual connections or max pooling); ``to_frame()`` has
    them all.
    """

    noise: str
    targets: str
    linearize_at: str
    times: np.ndarray
    predictions: tuple
    clean_accuracy: float
    seconds: float

    def _arr(self, name):
        return np.asarray([getattr(p, name) for p in self.predictions], dtype=np.float64)

    @property
    def accuracy(self):
        return self._arr("accuracy")

    @property
    def accuracy_lower(self):
        return self._arr("accuracy_lower")

    @property
    def accuracy_upper(self):
        return self._arr("accuracy_upper")

    @property
    def accuracy_std(self):
        return self._arr("accuracy_std")

    @property
    def preact_frac(self):
        return np.asarray([p.diagnostics.get("preact_frac", float("nan")) for p in self.predictions], dtype=np.float64)

    @property
    def outside_range(self):
        return np.asarray([bool(p.warnings) for p in self.predictions])

    @property
    def loss(self):
        return np.asarray([p.clean_loss + p.loss_increase_logits for p in self.predictions])

    @property
    def truncation_error(self):
        """``classes=k``: the accuracy's truncation error measured at each time
        (``diagnostics["classes_truncation_accuracy_error"]``); NaN without ``classes``."""
        return np.asarray([p.diagnostics.get("classes_truncation_accuracy_error", float("nan"))
                           for p in self.predictions], dtype=np.float64)

    def to_frame(self) -> pd.DataFrame:
        cols = dict(level=self.times, time_s=self.times, accuracy=self.accuracy, accuracy_lower=self.accuracy_lower,
                    accuracy_upper=self.accuracy_upper, accuracy_std=self.accuracy_std, loss=self.loss,
                    loss_increase=[p.loss_increase for p in self.predictions],
                    clean_accuracy=np.full(len(self.predictions), self.clean_accuracy),
                    clean_loss=[p.clean_loss for p in self.predictions],
                    mean_logit_var=[float(np.nanmean(p.logit_var.numpy())) for p in self.predictions],
                    mean_abs_logit_shift=[float(p.logit_mean_shift.abs().mean()) for p in self.predictions],
                    preact_frac=self.preact_frac, outside_range=self.outside_range)
        if "classes" in self.predictions[0].diagnostics:
            cols["truncation_error"] = self.truncation_error
        return pd.DataFrame(cols)

    def summary(self) -> str:
        lines = [f"Predicted accuracy vs time since programming: {self.noise} on {self.targets}",
                 f"  linearised at {_LINEARIZE_WORDS.get(self.linearize_at, self.linearize_at)}; "
                 f"clean accuracy {self.clean_accuracy:.4f}; "
                 f"{self.seconds:.2f} s",
                 f"  {'t (s)':>10}{'accuracy':>10}{'bounds':>20}{'chip sd':>9}{'loss':>9}"]
        flag = "   " + OUTSIDE_RANGE[self.predictions[0].method]
        for _, r in self.to_frame().iterrows():
            lines.append(f"  {r.time_s:>10.3g}{r.accuracy:>10.4f}   [{r.accuracy_lower:.4f}, {r.accuracy_upper:.4f}]"
                         f"{r.accuracy_std:>9.4f}{r.loss:>9.4f}" + (flag if r.outside_range else ""))
        d = self.predictions[0].diagnostics
        if "classes" in d:
            err = self.truncation_error
            k = d["classes"]
            lines.append(f"  classes={k}: label and {k} competitor{'s' if k != 1 else ''} differentiated; truncation "
                         f"error of the accuracy, measured on {d['classes_truncation_inputs']} inputs with every class: "
                         f"{err.min():+.4f} to {err.max():+.4f}")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


# ----------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------
def _predict_models(model, x, y, noises: Sequence[HardwareNoise], targets, linearize_at, accuracy_draws, seed,
                    n_points, chunk_size, batch_size, keep_cov, method="linear", rank=DEFAULT_RANK,
                    spatial_rank=DEFAULT_SPATIAL_RANK, moment_chunk=32, diagnostic=True, classes=None):
    x, y = check_inputs(model, x, y)
    lin = LinearizedNetwork(model, targets)
    probe_logits(lin.forward, x[:1].to(lin.device), x.shape)  # "x does not fit the model", a tuple output: clear errors
    check_noise_reaches(lin, x[:1].to(lin.device))
    clean = _forward(lin, x, batch_size).double().cpu()
    if clean.dim() != 2:
        raise ValueError(f"the model must map a batch of inputs to logits of shape [N, C]; got shape {tuple(clean.shape)}")
    check_logits(clean, x.shape[0])
    check_finite_logits(clean)
    check_labels(y, clean.shape[1])
    clean_loss = float(F.cross_entropy(clean, y))
    clean_acc = float((clean.argmax(1) == y).double().mean())
    if classes is not None and classes >= clean.shape[1] - 1:
        classes = None  # every class is a competitor: the full pass
    moments = _moments_over_times(lin, noises)
    shared = check = None
    first = _earliest(noises)
    means = [_forward(_at(lin, mo.mean), x, batch_size).double().cpu() for mo in moments]  # f(E w̃) at every time
    sel = None if classes is None else _curve_classes(means, y, classes)
    if linearize_at != "mean":  # one pass serves every time
        base = lin if linearize_at == "programmed" else _at(lin, moments[first].mean)
        # the earliest time first: the pass draws its shared chip-to-chip draws at the
        # first scale map, so they are the earliest time's whatever the order of ``times``
        order = [first] + [k for k in range(len(moments)) if k != first]
        used = set(read_without_call(base, list(base.names), x[:1].to(base.device)))  # the weights that reach the logits
        facs = {k: _drift_factors(base, moments[k], used) for k in order}
        tangents = {k: _comp_tangents(moments[k], facs[k]) for k in order}
        flat = [t for k in order for t in tangents[k]]
        units = [{n: u * facs[k][n] for n, u in moments[k].unit.items()} for k in order]
        covs, jts, z0 = _derivatives(base, x, units, flat, accuracy_draws, seed, chunk_size, batch_size, sel)
        offsets = np.cumsum([0] + [len(tangents[k]) for k in order])
        shared = (*_by_time(covs, jts, order, offsets), z0)
        if sel is not None:  # the truncation check: every class on a share of the inputs
            check = _truncation_check(base, x, units, flat, covs[0], means, sel, seed, chunk_size, batch_size, order,
                                      offsets)
    preds = []
    for k, (nz, mo) in enumerate(zip(noises, moments)):
        t1 = time.perf_counter()
        lin_mu = _at(lin, mo.mean)
        mean = means[k]
        if shared is None:
            covs, jt, z = _derivatives(lin_mu, x, [mo.unit], _comp_tangents(mo), accuracy_draws, seed, chunk_size,
                                       batch_size)
            cov = covs[0]
        else:
            cov, jt, z = shared[0][k], shared[1][k], shared[2]
            if z is not None and k != first:  # rescale the shared draws per class to this time's marginal sd
                z = _rescale_draws(z, torch.diagonal(cov, dim1=1, dim2=2),
                                   torch.diagonal(shared[0][first], dim1=1, dim2=2))
        comp_cov, pairs = _compensation_cov(jt, mo)
        mdiag, warns = {}, []
        if method == "linear" and diagnostic:  # the validity diagnostic of predict, at this time's noise
            ratio, note = _preact_ratios(lin_mu, x, mo.unit, directions=DIAGNOSTIC_DIRECTIONS, seed=seed,
                                         max_inputs=DIAGNOSTIC_INPUTS)
            mdiag = dict(preact_source=note if ratio is None else note + ", around the expected weights")
            if ratio is not None:
                mdiag["preact_frac"] = float((ratio < 1.0).mean()) if ratio.size else 0.0
        if method == "moments":
            v_lin = torch.diagonal(cov, dim1=1, dim2=2)
            mean, cov, res = _moment_logits(lin_mu, x, mo, rank, spatial_rank, moment_chunk)
            mdiag = dict(preact_frac=res.preact_frac, preact_source="moment propagation, all inputs",
                         compression_loss=res.compression_loss, rank=res.rank, **tail_diagnostics(res.tail_kurtosis))
            if z is not None:  # the linearised network's draws, rescaled per class to the moments' sd
                z = _rescale_draws(z, torch.diagonal(cov, dim1=1, dim2=2), v_lin)
        if comp_cov is not None:
            cov = cov + comp_cov
        cov = 0.5 * (cov + cov.mT)
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError(f"noise {nz.to_string()}: the predicted logit moments are not finite: the noise model's weight "
                             "moments overflow at this time and these scales (e.g. a drift-compensation factor beyond "
                             "float range); reduce the scales or the time")
        if sel is not None:  # every class: the left-out ones at their mean logits, noiseless
            slot_cov = cov
            cov = _slot_cov_to_full(slot_cov, sel, mean.shape[1])
        p, lo, hi = correct_probability(mean, cov, y, n_points=n_points, seed=seed)
        # the validity warnings (predict's rules) take the drop the noise's spread causes: from
        # the network with the expected weights (the deterministic drift, which f(μ) carries to
        # all orders) to the prediction, not from the clean one (their drop limits were
        # calibrated on zero-mean noise, where the two are the same)
        drop = float((means[k].argmax(1) == y.to(means[k].device)).double().mean()) - float(p.mean())
        msg = None
        if method == "linear" and "preact_frac" in mdiag:
            msg = range_warning(mdiag["preact_frac"], drop=drop)
            mdiag["first_order_flagged"] = msg is not None
        elif method == "moments":
            msg = moments_range_warning(res.preact_frac, _moment_risks(lin_mu),
                                        tail=(mdiag["tail_kurtosis"], mdiag["tail_kurtosis_layer"]), drop=drop)
        if msg:
            warns.insert(0, msg)
        if check is not None:
            mdiag.update(_truncation_diag(check, k, mean, mo, p, y, sel.shape[1] - 1, n_points, seed))
        acc_std, kd = float("nan"), 0
        if z is not None:
            z = z.double().cpu().clone()
            if pairs:
                g = torch.Generator().manual_seed(int(seed) + 7919)
                eta = torch.randn(len(pairs), z.shape[-1], generator=g, dtype=torch.float64)
                for (sd, v), e in zip(pairs, eta):
                    z += sd * v[:, :, None] * e[None, None, :]
            if sel is not None:  # the slots' draws in their classes' rows, the others at their means
                z = _slot_rows_to_full(z, sel, mean.shape[1])
            accs = sampled_accuracies(mean, z, y)
            kd, acc_std = accs.size, float(accs.std(ddof=1))
        logit_var = torch.diagonal(cov, dim1=1, dim2=2).clone()
        factor = None
        if sel is not None:  # the left-out classes' variance is unknown (NaN in the result)
            # the loss's factor: the slots' Cholesky factor in the selected classes' rows
            factor = _slot_rows_to_full(_cov_factor(slot_cov), sel, mean.shape[1])
            logit_var = torch.where(_class_mask(sel, mean.shape[1]), logit_var, torch.full_like(logit_var, float("nan")))
        # computed when first read, as predict's extras: the accuracy does not pay for it
        gl = Deferred(_logit_loss_increase(None, mean, None if factor is not None else cov, y, 1.0, seed, clean_loss,
                                           factor))
        diag = dict(labels=y.clone(), linearize_at=linearize_at,
                    frac_inputs_uncertain=float(((p > 0.01) & (p < 0.99)).double().mean()), **mdiag)
        if isinstance(nz, PCMLike) and nz.compensation:
            diag["alpha_mean"] = float(np.mean(list(mo.alpha_mean.values())))
        preds.append(Prediction(
            method=method, noise=nz.to_string(), targets=lin.plan.targets.describe(), clean_logits=clean,
            logit_mean=mean, logit_var=logit_var, logit_cov=cov if keep_cov else None,
            correct_prob=p, clean_accuracy=clean_acc, accuracy=float(p.mean()), accuracy_lower=float(lo.mean()),
            accuracy_upper=float(hi.mean()), accuracy_std=acc_std, accuracy_std_draws=int(kd), clean_loss=clean_loss,
            loss_increase=gl, loss_increase_se=float("nan"), loss_increase_gn=float("nan"), loss_increase_logits=gl,
            loss_probes=0, diagnostics=types.MappingProxyType(diag), warnings=tuple(warns),
            seconds=time.perf_counter() - t1, loss_increase_method="gaussian logits (hardware noise)",
            noise_model=nz, targets_spec=lin.plan.targets, inputs_fingerprint=inputs_fingerprint(x, y)))
    return preds, lin, clean_acc


def predict_drift(model: nn.Module, x, y, noise, times, targets=None, *, method: str = "linear",
                  linearize_at: str = "earliest", accuracy_draws: int = 0, seed: int = 0, n_points: int = DEFAULT_N_POINTS,
                  chunk_size: int | None = None, batch_size: int = 512, cov: bool = False,
                  rank: int = DEFAULT_RANK, spatial_rank: int = DEFAULT_SPATIAL_RANK, moment_chunk: int = 32,
                  diagnostic: bool = True, classes: int | None = None) -> DriftPrediction:
    """Predicted accuracy of ``model`` on ``(x, y)`` at each time since programming in
    ``times`` (seconds >= 0) under a time-dependent hardware noise model ``noise``
    (:class:`~noiseprop.theory.hardware.PCMLike`; its own ``t`` is ignored).

    ``linearize_at``: ``"earliest"`` (default: the Jacobian at the expected weights of
    the earliest time, each layer's share at a later time rescaled by the other layers'
    drift since then, :func:`_drift_factors`; one derivative pass for the whole curve),
    ``"mean"`` (the Jacobian at the expected weights of each time: one pass per time)
    or ``"programmed"`` (as ``"earliest"``, from the programmed weights instead; less
    accurate at large noise on networks with BatchNorm, because the programming noise's
    own mean shift is left out of the Jacobian). Measured in docs/THEORY.md §10:
    ``"earliest"`` is as accurate as ``"mean"`` (closer to Monte-Carlo at twice
    aihwkit's scales on ResNet-20) and 1.2–2.3× faster on the VGG and ResNet-20 (the
    MLP's curve is mostly fixed costs). ``accuracy_draws``: shared draws of the
    linearised network for the chip-to-chip spread (``accuracy_std``); the default 0
    skips them (``accuracy_std`` NaN), as :func:`~noiseprop.theory.predict.predict`
    does: 32 draws add about a fifth to the curve's time (digits VGG, 7.2 → 8.6 s
    compensated; ResNet-20 1.40 → 1.58 s). ``seed`` seeds those draws and the
    quasi-Monte-Carlo points. ``method="moments"``: moment propagation at each time
    (``rank``, ``spatial_rank``, ``moment_chunk`` as in
    :func:`~noiseprop.theory.predict.predict`), needed once drift and read noise take
    the accuracy far below clean, where the first order is optimistic.
    ``diagnostic`` (``method="linear"``): at each time, the validity diagnostic of
    :func:`~noiseprop.theory.predict.predict` (the fraction of ReLU-like pre-activations whose
    first-order noise sd exceeds their magnitude, around that time's expected weights:
    ``diagnostics["preact_frac"]``, the ``preact_frac`` column of ``to_frame()``), with
    one ``RuntimeWarning`` naming the times where it exceeds
    :data:`~noiseprop.theory.predict.PREACT_WARN_FRACTION` (the compensation scalar's
    own spread is not part of it). ``method="moments"`` carries the propagation's own
    fraction at every time (whatever ``diagnostic``) and warns, naming the times, above
    :data:`~noiseprop.theory.predict.MOMENTS_WARN_FRACTION` on networks with residual
    sums or max pooling.
    ``classes=k`` (``method="linear"``, one derivative pass: ``linearize_at`` ``"earliest"``
    or ``"programmed"``): as :func:`~noiseprop.theory.predict.predict`'s, only each input's
    label and ``k`` competitors are differentiated (``k + 1`` backward passes and every
    contraction over ``k + 1`` classes instead of ``C``): the classes whose mean logit
    comes closest to the label's at any time of the curve (:func:`_curve_classes`). The
    other classes keep their mean logits, without noise (a class that the mean shift
    takes past the label still wins), and the accuracy's truncation error is measured at
    every time with every class on an eighth of the inputs, 8 to 32
    (``diagnostics["classes_truncation_*"]``, as ``predict``'s).

    >>> import torch
    >>> from noiseprop.theory.examples import tiny_problem
    >>> net, x, y = tiny_problem()  # a seeded ReLU net and the labels it gets right
    >>> from noiseprop.theory import PCMLike
    >>> d = predict_drift(net, x, y, PCMLike(t=1.0), [1.0, 3600.0, 3.15e7])
    >>> len(d.predictions), [float(t) for t in d.times]
    (3, [1.0, 3600.0, 31500000.0])
    """
    t0 = time.perf_counter()
    _check_options(method, linearize_at)
    tv = check_times(times)
    noise = parse_noise(noise)
    if not isinstance(noise, PCMLike):
        raise TypeError(f"noise must be a time-dependent hardware model such as PCMLike(...), got {noise!r}")
    accuracy_draws = check_int("accuracy_draws", accuracy_draws, 0, MAX_ACCURACY_DRAWS)
    if accuracy_draws == 1:
        raise ValueError("accuracy_draws must be 0 (no chip-to-chip spread) or >= 2")
    classes = check_int("classes", classes, 1, allow_none=True)
    if classes is not None and method != "linear":
        raise ValueError(f"classes=k truncates the first order's derivative pass: it needs method='linear', "
                         f"got method={method!r} (the moment propagation carries every class)")
    if classes is not None and linearize_at == "mean":
        raise ValueError("classes=k needs one derivative pass for the curve: linearize_at='earliest' or "
                         "'programmed', got 'mean'")
    preds, lin, clean_acc = _predict_models(
        model, x, y, [noise.with_level(float(t)) for t in tv], targets, linearize_at, accuracy_draws,
        check_seed("seed", seed), check_n_points(n_points),
        None if chunk_size is None else check_int("chunk_size", chunk_size, 1), check_int("batch_size", batch_size, 1),
        check_bool("cov", cov), method, *_moment_settings(rank, spatial_rank, moment_chunk), check_bool("diagnostic", diagnostic),
        classes)
    flagged = [f"{t:g} s" for t, p in zip(tv, preds) if p.warnings]
    if flagged:  # one warning for the curve (each time's own stays in its prediction)
        warnings.warn(curve_range_warning(f"{', '.join(flagged)} after programming", method), RuntimeWarning,
                      stacklevel=2)
    head, _, tail = noise.to_string().partition(":")
    opts = tail.split(",", 1)[1] if "," in tail else ""
    return DriftPrediction(noise=head + (f"({opts})" if opts else ""),
                           targets=lin.plan.targets.describe(), linearize_at=linearize_at, times=tv,
                           predictions=tuple(preds), clean_accuracy=clean_acc, seconds=time.perf_counter() - t0)


def predict_hardware(model: nn.Module, x, y, noise, targets=None, *, method: str = "linear",
                     linearize_at: str = "mean", accuracy_draws: int = 0, seed: int = 0, n_points: int = DEFAULT_N_POINTS,
                     chunk_size: int | None = None, batch_size: int = 512, cov: bool = False,
                     rank: int = DEFAULT_RANK, spatial_rank: int = DEFAULT_SPATIAL_RANK, moment_chunk: int = 32,
                     diagnostic: bool = True, stacklevel: int = 2):
    """:class:`~noiseprop.theory.predict.Prediction` for one hardware noise model
    (:class:`~noiseprop.theory.hardware.PCMLike` at its ``t``, :class:`Quantized`,
    :class:`StuckAt`): logit mean ``f(μ)``, covariance ``J Σ Jᵀ`` (+ the compensation
    terms), accuracy from the Gaussian logits. What ``predict`` calls for such noise.
    ``diagnostic``: the linear method's validity diagnostic and warning, as in
    :func:`predict_drift` (the moment method's warning as there too); ``stacklevel`` places the warning as :func:`warnings.warn`'s
    does (2: the caller's line; ``predict`` passes 3, its own caller's).

    >>> import torch
    >>> from noiseprop.theory.examples import tiny_problem
    >>> net, x, y = tiny_problem()  # a seeded ReLU net and the labels it gets right
    >>> from noiseprop.theory import PCMLike
    >>> p = predict_hardware(net, x, y, PCMLike(t=86400.0))
    >>> 0.0 <= p.accuracy <= 1.0
    True
    """
    _check_options(method, linearize_at)
    noise = parse_noise(noise)
    if not isinstance(noise, HardwareNoise):
        raise TypeError(f"noise must be a hardware noise model (PCMLike, Quantized, StuckAt), got {noise!r}")
    accuracy_draws = check_int("accuracy_draws", accuracy_draws, 0, MAX_ACCURACY_DRAWS)
    if accuracy_draws == 1:
        raise ValueError("accuracy_draws must be 0 (no chip-to-chip spread) or >= 2")
    stacklevel = check_int("stacklevel", stacklevel, 1)
    t0 = time.perf_counter()
    preds, _, _ = _predict_models(model, x, y, [noise], targets, linearize_at, accuracy_draws,
                                  check_seed("seed", seed), check_n_points(n_points),
                                  None if chunk_size is None else check_int("chunk_size", chunk_size, 1),
                                  check_int("batch_size", batch_size, 1), check_bool("cov", cov), method,
                                  *_moment_settings(rank, spatial_rank, moment_chunk),
                                  check_bool("diagnostic", diagnostic))
    p = preds[0]
    object.__setattr__(p, "seconds", time.perf_counter() - t0)
    for w in p.warnings:
        warnings.warn(w, RuntimeWarning, stacklevel=stacklevel)
    return p
