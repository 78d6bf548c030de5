"""Per-layer sensitivity to weight noise, the noise budget and the layers to keep
digital, from the one derivative pass of :func:`~noiseprop.theory.linearize.jacobian_pass`
(docs/THEORY.md §3, §5, §7).

Independent noise splits over layers exactly: with ``C_l(x) = J_l diag(u_l²) J_lᵀ`` the
level-1 logit covariance that layer ``l``'s noise alone causes,

    Cov f(x) = Σ_l η_l² C_l(x)                    (first order, exact decomposition)

so, to first order,

* the share of the logit variance of layer ``l`` is ``Σ_i tr C_l(x_i) / Σ_i tr Cov f(x_i)``;
* its share of the loss increase is that of the Gauss-Newton form
  ``ΔL_l = ½ mean_i tr(H_z,i η² C_l(x_i))``, ``H_z = diag(p) − ppᵀ`` at the clean logits
  (:func:`~noiseprop.theory.flatness.loss_increase_gauss_newton`), linear in the
  covariance, so the shares add up to one; for networks that are piecewise linear in
  each weight (ReLU, max-pool, BatchNorm in eval) it equals ``½ tr(Σ_ε H)`` layer by
  layer (the Hessian's diagonal blocks equal the Gauss-Newton ones almost everywhere);
* the accuracy when only layer ``l`` is noisy is ``mean_i Φ_S(m_i)`` with the margins'
  covariance from ``η² C_l`` (Gaussian logits, an orthant probability:
  :func:`~noiseprop.theory.accuracy.correct_probability`), and the accuracy with a set
  ``K`` of layers kept digital uses ``η² Σ_{l∉K} C_l``.

Nothing is sampled: one Jacobian pass gives every ``C_l``; everything else is
arithmetic on ``[N, C, C]`` tensors and orthant probabilities. Accuracy is not additive
over layers (a probability of a sum of Gaussian terms): :func:`keep_digital` measures
how far the greedy choice is from additive (``interaction``) and, where it is cheap,
from the best set by exhaustive search.

The noise budget (:func:`noise_budget`) solves ``drop(η) = max_drop`` on the predicted
curve ``drop(η) = acc₀ − mean_i Φ_{η² S_i}(m_i)``: bracketed by the pairwise
(Bonferroni) bounds, which need no integration, then a per-input model (each input's
error is ``r_i`` times its union bound, ``r_i`` from the last orthant evaluation and
log-linear in ``1/η²``), whose root needs only the bounds: two cheap and one full
orthant evaluation per root. The first order misses the logits' mean shift: ReLU gates
that flip under noise lower the margins of the inputs near a decision boundary, the
very inputs a 1-point budget is about (measured at the first-order level, digits MLP:
Gaussian logits with Monte-Carlo's mean and the first-order covariance lose 1.19
points, with the clean mean and Monte-Carlo's covariance 0.97, with both of
Monte-Carlo's 1.15, Monte-Carlo itself 1.14: the mean, not the covariance or the tails).
``refine="moments"`` (default where the model allows it) runs one moment propagation
at the first-order root ``η₁`` on the inputs that can matter and fits the mean

    mean(η) = clean + (η/η₁)² (μ_m − clean),   cov(η) = η² C₁

(the mean shift is even in the noise and starts at η²; it moves a margin by O(η) of its
sd, the covariance beyond first order by O(η²), and at ``η₁`` the moment method's own
covariance error, 10% of the logit variance on residual networks, exceeds that term, so
the covariance stays first order), then solves again on that curve.
The per-layer allocation minimises the precision cost ``Σ_l n_l log₂(1/η_l)`` (bits per
weight of a device whose relative noise is η_l, ``n_l`` weights) subject to a fixed
first-order loss increase ``Σ_l η_l² g_l`` (``g_l`` = ``ΔL_l`` at level 1); the
Lagrange condition ``n_l/η_l = 2λ g_l η_l`` gives

    η_l ∝ √(n_l / g_l)    (every layer's loss increase proportional to its weight count),

the reverse water-filling rule of rate-distortion bit allocation. The common factor is
then set by root finding so that the first-order predicted drop is ``max_drop``.

Measured (``benchmarks/sensitivity.py``, digits, all 359 test inputs, 100–300
Monte-Carlo draws): the accuracy with one layer alone noisy is within 0.08 point
(ResNet-20, 22 layers) and 0.34 point (VGG with BatchNorm, 9 layers) of Monte-Carlo at
the level where the whole network loses 7.2 and 7.0 points. The whole network is where
the first order falls short: it misses the mean shift and the noise of each layer
acting on the perturbation of its input, so there it overestimates the accuracy by 3.8
and 3.9 points, and :func:`keep_digital`'s accuracies, which have most layers noisy,
inherit that error with ``method="linear"`` (0.4–3.4 points after 1–3 layers kept
digital, three training seeds); the full moment method (``"moments"``) is within 0.5 on
the VGG but 0.6–2.1 high on ResNet-20 (its limit on residual networks); its mean with
the first-order covariance (``"refined"``) is within 0.74 on both.
``noise_budget(max_drop=0.01)``, 300 draws: Monte-Carlo drop at the refined level
1.02% [0.95, 1.10] (MLP), 0.94% [0.86, 1.02] (VGG), 0.96% [0.90, 1.03] (ResNet-20); at
the first-order level 1.20%, 1.26%, 1.03%. On two more training seeds 7
of 9 intervals contain 1 point (the two others on the safe side: 0.91% [0.82, 1.00],
0.88% [0.78, 0.98]). Refitting the covariance to the moment method too (before issue
13's closing) gave 1.06%, 1.03% and 1.13% [1.06, 1.20] (ResNet-20, outside: the moment
method's variance deficit on residual networks raised the level).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from .accuracy import (DEFAULT_N_POINTS, OrthantCurve, _phi_cdf, check_n_points, correct_probability, margin_moments,
                       orthant_probability, pairwise_bounds_sd)
from .flatness import loss_increase_gauss_newton
from .linearize import LinearizedNetwork, jacobian_pass
from .moments import MomentPropagator, propagate_moments
from .moments.head import moment_correct_probability
from .moments.surrogate import moment_chunk_size
from .noise import NOISE_STRING_FORMS, WeightNoise, parse_noise
from .predict import DIAGNOSTIC_DIRECTIONS, DIAGNOSTIC_INPUTS, _preact_ratios, range_warning
from .targets import Targets, resolve_targets
from .validation import _user_stacklevel, check_figure_path, check_inputs, check_int, check_number, save_figure

__all__ = ["Sensitivity", "NoiseBudget", "KeepDigital", "sensitivity", "noise_budget", "keep_digital"]


# ----------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------
def _zero_mean_forms() -> list[str]:
    """The string forms of the zero-mean families (what sensitivity, noise_budget and
    keep_digital accept; the hardware forms in NOISE_STRING_FORMS are not)."""
    out = []
    for k, make in NOISE_STRING_FORMS.items():
        try:
            if make(1.0).zero_mean:
                out.append(k)
        except (ValueError, TypeError):
            pass
    return out


def _noise_with_level(noise, arg: str = "noise") -> WeightNoise:
    """A noise model with its level (``'relative:0.05'`` or a WeightNoise)."""
    if isinstance(noise, str) and ":" not in noise and noise.strip() in NOISE_STRING_FORMS:
        raise ValueError(f"{arg}={noise!r} has no level; give the family with its level, e.g. "
                         f"'{noise.strip()}:0.05' (accepted: {', '.join(k + ':LEVEL' for k in _zero_mean_forms())})")
    try:
        out = parse_noise(noise)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{arg}: {e}") from None
    return _zero_mean(out, arg)


def _zero_mean(noise: WeightNoise, arg: str) -> WeightNoise:
    """The decomposition and the budget scale one zero-mean covariance by the level."""
    if not noise.zero_mean:
        raise ValueError(f"{arg}: {type(noise).__name__} noise has a non-zero mean, and sensitivity, noise_budget "
                         "and keep_digital split and scale a zero-mean covariance (accepted: "
                         f"{', '.join(_zero_mean_forms())}); for hardware noise use predict(model, x, y, noise) or "
                         "predict_drift(...)")
    return noise


def _noise_family(noise, arg: str = "noise_family") -> WeightNoise:
    """A zero-mean noise family without level (``'relative'``, or a WeightNoise whose
    level is ignored); the hardware families (``'pcm'``, ``'stuck'``, ...) are refused
    as their objects are."""
    if isinstance(noise, WeightNoise):
        return _zero_mean(noise, arg).with_level(1.0)
    if not isinstance(noise, str):
        raise TypeError(f"{arg} must be a family name such as 'relative' or a WeightNoise, got {type(noise).__name__}")
    if ":" in noise:
        fam = noise.partition(":")[0].strip()
        raise ValueError(f"{arg}={noise!r} gives a level, but the level is what noise_budget finds; give the family "
                         f"alone, e.g. {fam!r} (accepted: {', '.join(_zero_mean_forms())})")
    if noise.strip() not in NOISE_STRING_FORMS:
        raise ValueError(f"unknown {arg} {noise!r}; accepted: {', '.join(_zero_mean_forms())} (or a WeightNoise)")
    return _zero_mean(parse_noise(noise.strip(), default_level=1.0), arg)


def _check_fraction(name, v):
    return check_number(name, v, 0, 1, open_min=True, open_max=True, wrong_type=ValueError,
                        what="a number in the open interval (0, 1) (a drop in accuracy, e.g. 0.01 for one point)")


# ----------------------------------------------------------------------------
# The shared pass
# ----------------------------------------------------------------------------
@dataclass
class _Pass:
    lin: LinearizedNetwork
    x: torch.Tensor  # the checked inputs
    y: torch.Tensor
    clean: torch.Tensor  # [N, C] float64
    cov_unit: torch.Tensor  # [N, C, C] float64, level 1
    layer_cov: dict  # module -> [N, C, C] level 1
    params: dict  # module -> number of noisy elements
    seconds: float


def _pass(model, x, y, noise: WeightNoise, targets, chunk_size) -> _Pass:
    t0 = time.perf_counter()
    x, y = check_inputs(model, x, y)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, 1)
    lin = LinearizedNetwork(model, targets)
    unit = lin.unit_scales(noise)
    # the pass probes one input first (validation.probe_logits): inputs that do not fit the
    # model ("x does not fit the model: ..."), a model that does not return one [N, C]
    # tensor (a tuple, a dict) and labels outside [0, C) are refused there, before any
    # derivative is taken, and a model returning probabilities warns once
    jp = jacobian_pass(lin, x, unit, chunk_size=chunk_size, per_layer=True, labels=y)
    params: dict[str, int] = {}
    for n in lin.names:
        m = n.rpartition(".")[0]
        params[m] = params.get(m, 0) + int(lin.target_params[n].numel())
    layer_cov = {m: jp.layer_cov_unit[m].double().cpu() for m in params}
    return _Pass(lin, x, y.cpu(), jp.clean_logits.double().cpu(), jp.cov_unit.double().cpu(), layer_cov, params,
                 time.perf_counter() - t0)


def _first_order_range(ps: _Pass, noise: WeightNoise, seed: int, hint: str) -> float:
    """:func:`~.predict.predict`'s validity diagnostic at ``noise`` (every layer noisy):
    the fraction of ReLU-like pre-activations whose first-order noise sd exceeds their
    magnitude, on the same inputs and directions as ``predict`` (NaN where it cannot be
    computed); warns, at the caller's line and ending with ``hint``, where it is above
    predict's calibrated limit, as ``predict`` would at that level."""
    ratio, _ = _preact_ratios(ps.lin, ps.x, ps.lin.unit_scales(noise), directions=DIAGNOSTIC_DIRECTIONS, seed=seed,
                              max_inputs=DIAGNOSTIC_INPUTS)
    if ratio is None:
        return float("nan")
    frac = float((ratio < noise.level).mean()) if ratio.size else 0.0
    msg = range_warning(frac, hint)
    if msg:
        warnings.warn(msg, RuntimeWarning, stacklevel=_user_stacklevel())
    return frac


def _accuracy(clean, cov, y, n_points, seed) -> float:
    p, _, _ = correct_probability(clean, cov, y, n_points=n_points, seed=seed)
    return float(p.mean())


def _clean_accuracy(clean, y) -> float:
    return float((clean.argmax(1) == y).double().mean())


def _gn_per_unit(clean, layer_cov) -> dict:
    return {m: loss_increase_gauss_newton(clean, c) for m, c in layer_cov.items()}


# ----------------------------------------------------------------------------
# sensitivity
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sensitivity:
    """Per-layer sensitivity at one noise level (:func:`sensitivity`).

    ``layers`` (module names, network order) index every per-layer tuple:
    ``share_logit_var`` (exact first-order shares, sum 1), ``share_loss`` (shares of the
    Gauss-Newton loss increase, sum 1), ``loss_increase`` (each layer's own
    ``ΔL_l``), ``accuracy_alone`` (predicted accuracy with only that layer noisy),
    ``params`` (noisy elements), ``rank`` (1 = most damaging: largest accuracy drop
    alone, ties broken by ``share_loss``). ``accuracy`` is the predicted accuracy with
    every layer noisy, ``loss_increase_total`` the whole ``ΔL``. ``channels``: per output
    channel shares for the layers asked for (or ``None``). ``preact_frac``: predict's
    validity diagnostic at this level (warned above its limit: the accuracies, first
    order, are then too high; the shares stay the exact split of the first order).
    """

    noise: str
    targets: str
    layers: tuple
    share_logit_var: tuple
    share_loss: tuple
    loss_increase: tuple
    accuracy_alone: tuple
    params: tuple
    rank: tuple
    clean_accuracy: float
    accuracy: float
    loss_increase_total: float
    n_inputs: int
    channels: pd.DataFrame | None = field(default=None, repr=False)
    seconds: float = float("nan")
    preact_frac: float = float("nan")

    def to_frame(self) -> pd.DataFrame:
        """One row per noisy layer (network order)."""
        return pd.DataFrame({
            "layer": list(self.layers), "share_logit_var": list(self.share_logit_var),
            "share_loss": list(self.share_loss), "loss_increase": list(self.loss_increase),
            "accuracy_alone": list(self.accuracy_alone),
            "drop_alone": [self.clean_accuracy - a for a in self.accuracy_alone],
            "params": list(self.params), "rank": list(self.rank),
        })

    def summary(self) -> str:
        df = self.to_frame().sort_values("rank")
        w = max(8, max(len(s) for s in self.layers))
        lines = [f"Sensitivity under {self.noise} noise on {self.targets} ({self.n_inputs} inputs, {self.seconds:.2f} s)",
                 f"  accuracy clean {self.clean_accuracy:.4f}, all layers noisy {self.accuracy:.4f} (predicted); "
                 f"loss increase {self.loss_increase_total:.4g} (Gauss-Newton)",
                 f"  {'rank':>4}  {'layer':<{w}} {'params':>8} {'logit var':>10} {'loss':>8} {'acc alone':>10} "
                 f"{'drop':>7}"]
        for _, r in df.iterrows():
            lines.append(f"  {int(r['rank']):>4}  {r['layer']:<{w}} {int(r['params']):>8} {r['share_logit_var']:>10.1%} "
                         f"{r['share_loss']:>8.1%} {r['accuracy_alone']:>10.4f} {r['drop_alone']:>7.4f}")
        lines.append("  shares of the first-order logit variance and of the loss increase are exact and add to 100%; "
                     "accuracies do not add")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()

    def plot(self, path=None, ax=None):
        """Bar chart of the shares (logit variance and loss) and the accuracy drop with the
        layer alone noisy, per layer in network order. Returns the figure; saves it when
        ``path`` is given: a file name whose extension is a format matplotlib writes
        (``.png``, ``.pdf``, ``.svg``, ...; checked first, as is that the file can be
        created; a folder or a name without extension is refused), written whole or not
        at all."""
        if path is not None:
            path = check_figure_path(path, "path")
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        df = self.to_frame()
        n = len(df)
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * n + 2), 4.2))
        else:
            fig = ax.figure
        pos = np.arange(n)
        wd = 0.28
        ax.bar(pos - wd, 100 * df["share_logit_var"], wd, label="share of logit variance (%)", color="#4C72B0")
        ax.bar(pos, 100 * df["share_loss"], wd, label="share of loss increase (%)", color="#DD8452")
        ax.bar(pos + wd, 100 * df["drop_alone"], wd, label="accuracy drop, layer alone noisy (points)",
               color="#55A868")
        ax.set_xticks(pos)
        ax.set_xticklabels(df["layer"], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("% / points")
        ax.set_title(f"Per-layer sensitivity, {self.noise} on {self.targets}: all noisy {100 * self.accuracy:.1f}% "
                     f"(clean {100 * self.clean_accuracy:.1f}%)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            save_figure(fig, path, dpi=110)
        return fig


def _channel_frame(model, x, noise, targets, layers, chunk_size, clean) -> pd.DataFrame:
    """Per output channel of each layer in ``layers``: share of the layer's and of the
    whole logit variance and loss increase (from that layer's Jacobian alone)."""
    base = Targets.parse(targets)
    rows = []
    for layer in layers:
        lin = LinearizedNetwork(model, dataclasses.replace(base, layers=(layer,)), warn_train_mode=False)
        unit = lin.unit_scales(noise)
        first = unit[lin.names[0]]
        nch = int(first.shape[0])
        extra = []
        for c in range(nch):
            m = {}
            for k, u in unit.items():
                z = torch.zeros_like(u)
                if u.dim() >= 1 and u.shape[0] == nch:
                    z[c] = u[c]
                m[k] = z
            extra.append(m)
        jp = jacobian_pass(lin, x, unit, chunk_size=chunk_size, extra_units=extra)
        tot_v = float(torch.diagonal(jp.cov_unit, dim1=1, dim2=2).sum())
        tot_l = loss_increase_gauss_newton(clean, jp.cov_unit.double().cpu())
        for c, cv in enumerate(jp.extra_cov):
            v = float(torch.diagonal(cv, dim1=1, dim2=2).sum())
            li = loss_increase_gauss_newton(clean, cv.double().cpu())
            rows.append({"layer": layer, "channel": c, "share_of_layer_logit_var": v / tot_v if tot_v > 0 else 0.0,
                         "share_of_layer_loss": li / tot_l if tot_l > 0 else 0.0, "loss_increase": li})
    return pd.DataFrame(rows)


_CHANNELS_ACCEPTED = ("a layer name, a list of layer names, True (every noisy layer) or None / False (none)")


def _check_channels(channels):
    """``sensitivity(channels=...)`` before the pass: ``None`` (none), ``True`` (all), or a
    list of layer names (the names are checked against the noisy layers after the pass)."""
    if channels is None or channels is False or (isinstance(channels, np.bool_) and not channels):
        return None
    if channels is True or isinstance(channels, np.bool_):
        return True
    if isinstance(channels, str):
        return [channels]
    if isinstance(channels, (bytes, Mapping)) or not hasattr(channels, "__iter__"):
        raise TypeError(f"channels must be {_CHANNELS_ACCEPTED}, got {type(channels).__name__} {channels!r}")
    out = list(channels)
    wrong = [c for c in out if not isinstance(c, str)]
    if wrong:
        raise TypeError(f"channels must be {_CHANNELS_ACCEPTED}; the list holds {type(wrong[0]).__name__} "
                        f"{wrong[0]!r}, not a layer name")
    return list(dict.fromkeys(out)) or None


def sensitivity(model: nn.Module, x, y, noise, targets=None, *, channels=None, chunk_size: int | None = None,
                n_points: int = DEFAULT_N_POINTS, seed: int = 0) -> Sensitivity:
    """Per noisy layer: share of the first-order logit variance, share of the loss
    increase, predicted accuracy with only that layer noisy, parameter count, rank.

    One Jacobian pass (:func:`~noiseprop.theory.linearize.jacobian_pass` with
    ``per_layer=True``) and one orthant probability per layer; no sampling.

    Parameters
    ----------
    model, x, y: the network (never modified), inputs and integer labels.
    noise: a :class:`~noiseprop.theory.noise.WeightNoise` or ``'family:level'``
        (``'relative:0.05'``); a level is needed.
    targets: what gets noise (:class:`~noiseprop.theory.targets.Targets`), as for
        :func:`~noiseprop.theory.predict.predict`; the layers are its noisy modules.
    channels: the layers for which per-output-channel shares are also computed
        (``Sensitivity.channels``; one extra pass per layer): a layer name, a list (or
        other iterable) of layer names, ``True`` for every noisy layer, or ``None`` /
        ``False`` for none (the default; ``False`` is the natural opposite of ``True``).
        Anything else (a number, a name that is not a noisy layer) is an error.
    n_points, seed: quasi-Monte-Carlo points and seed of the orthant probabilities.

    >>> import torch
    >>> from noiseprop.theory.examples import tiny_problem
    >>> net, x, y = tiny_problem()  # a seeded ReLU net and the labels it gets right
    >>> s = sensitivity(net, x, y, "relative:0.1")
    >>> list(s.to_frame().layer), round(float(s.to_frame().share_logit_var.sum()), 6)
    (['0', '2'], 1.0)
    """
    t0 = time.perf_counter()
    noise = _noise_with_level(noise)
    n_points = check_n_points(n_points)
    seed = check_int("seed", seed, 0)
    channels = _check_channels(channels)
    ps = _pass(model, x, y, noise, targets, chunk_size)
    lv2 = noise.level ** 2
    layers = list(ps.layer_cov)
    if channels is True:
        channels = list(layers)
    elif channels is not None:
        bad = [c for c in channels if c not in layers]
        if bad:
            raise ValueError(f"channels: {bad} are not noisy layers; accepted: {layers} (or True for all, "
                             "None or False for none)")
    tr_tot = float(torch.diagonal(ps.cov_unit, dim1=1, dim2=2).sum())
    tr = {m: float(torch.diagonal(c, dim1=1, dim2=2).sum()) for m, c in ps.layer_cov.items()}
    gn_unit = _gn_per_unit(ps.clean, ps.layer_cov)  # at level 1: the shares do not depend on the level
    gn = {m: v * lv2 for m, v in gn_unit.items()}
    gn_tot = sum(gn.values())
    gn_unit_tot = sum(gn_unit.values())
    clean_acc = _clean_accuracy(ps.clean, ps.y)
    acc_all = _accuracy(ps.clean, ps.cov_unit * lv2, ps.y, n_points, seed)
    frac = _first_order_range(ps, noise, seed, "the accuracies (every layer noisy, each layer alone) are first order "
                              "and too high; the shares stay its exact split")
    alone = [_accuracy(ps.clean, ps.layer_cov[m] * lv2, ps.y, n_points, seed) for m in layers]
    share_v = [tr[m] / tr_tot if tr_tot > 0 else 0.0 for m in layers]
    share_l = [gn_unit[m] / gn_unit_tot if gn_unit_tot > 0 else 0.0 for m in layers]  # also at level 0
    order = sorted(range(len(layers)), key=lambda i: (-(clean_acc - alone[i]), -share_l[i], i))
    rank = [0] * len(layers)
    for r, i in enumerate(order):
        rank[i] = r + 1
    ch = None
    if channels:
        ch = _channel_frame(model, ps.x, noise, targets, channels, chunk_size, ps.clean)
    return Sensitivity(
        noise=noise.to_string(), targets=ps.lin.plan.targets.describe(), layers=tuple(layers),
        share_logit_var=tuple(share_v), share_loss=tuple(share_l), loss_increase=tuple(gn[m] for m in layers),
        accuracy_alone=tuple(alone), params=tuple(ps.params[m] for m in layers), rank=tuple(rank),
        clean_accuracy=clean_acc, accuracy=acc_all, loss_increase_total=gn_tot, n_inputs=int(ps.y.shape[0]),
        channels=ch, seconds=time.perf_counter() - t0, preact_frac=frac,
    )


# ----------------------------------------------------------------------------
# noise_budget
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseBudget:
    """The largest level of a noise family within an accuracy budget (:func:`noise_budget`).

    ``level``: the global level (every layer at it) whose predicted drop is
    ``predicted_drop`` (= ``max_drop`` to the root finder's tolerance). ``layer_levels``:
    the per-layer allocation (``η_l ∝ √(n_l/g_l)``, scaled to the same predicted drop;
    ``inf`` for a layer whose noise has no first-order effect), ``layer_drop`` its
    first-order predicted drop (neither refined nor checked by Monte-Carlo: on the digits
    MLP at a 1-point budget, Monte-Carlo of the allocation gave 1.26 ± 0.04 points),
    ``bits_saved`` the mean over weights of ``log₂(η_l/level)`` (bits
    per weight of precision the allocation saves against the uniform level).
    ``mc_*``: the Monte-Carlo check at ``level`` when asked for (``mc_draws > 0``).
    ``refine``: ``"moments"`` when the level was refined by moment propagation (then
    ``first_order_level`` is the first-order root, ``refine_inputs`` the inputs
    propagated, ``refine_neglected`` the mean first-order union bound of the others at
    ``level``; under the mean shift they err up to about twice that, see
    :data:`REFINE_MASS`), ``None`` for the first order (``refine_note``: why, when asked for).
    ``analytic_level``: the level the prediction alone gives (first order or refined);
    ``level`` differs from it only when it was calibrated by Monte-Carlo
    (``calibrate_draws > 0``; ``calibration``: one ``(level, mc_drop, mc_drop_lo,
    mc_drop_hi)`` per Monte-Carlo step, the last at ``level``; ``calibrate_note`` says
    when the steps did not converge). ``predicted_drop`` is the prediction's drop at
    ``level`` either way.
    """

    noise: str
    targets: str
    max_drop: float
    level: float
    predicted_drop: float
    clean_accuracy: float
    predicted_accuracy: float
    layers: tuple
    layer_levels: tuple
    layer_drop: float
    bits_saved: float
    evaluations: int
    refine: str | None = None
    first_order_level: float = float("nan")
    refine_inputs: int = 0
    refine_neglected: float = 0.0
    refine_seconds: float = 0.0
    refine_note: str = ""
    mc_accuracy: float | None = None
    mc_accuracy_ci: tuple | None = None
    mc_drop: float | None = None
    mc_drop_ci: tuple | None = None
    mc_draws: int = 0
    analytic_level: float = float("nan")
    calibration: tuple = ()
    calibrate_draws: int = 0
    calibrate_note: str = ""
    seconds: float = float("nan")

    @property
    def noise_model(self) -> WeightNoise:
        return parse_noise(self.noise)

    def to_frame(self) -> pd.DataFrame:
        """One row per noisy layer: its level under the uniform budget and under the
        allocation."""
        return pd.DataFrame({"layer": list(self.layers), "uniform_level": [self.level] * len(self.layers),
                             "allocated_level": list(self.layer_levels)})

    def summary(self) -> str:
        how = " (calibrated by Monte-Carlo, below)" if self.calibrate_draws else ""
        lines = [f"Noise budget for {self.noise.split(':')[0]} noise on {self.targets}, max drop {self.max_drop:g}",
                 f"  level {self.level:.5g}{how}: predicted accuracy {self.predicted_accuracy:.4f} "
                 f"(clean {self.clean_accuracy:.4f}, drop {self.predicted_drop:.4f}); {self.evaluations} evaluations, "
                 f"{self.seconds:.2f} s"]
        if self.refine == "moments":
            lines.append(f"  refined by moment propagation on {self.refine_inputs} inputs ({self.refine_seconds:.2f} s); "
                         f"first-order level {self.first_order_level:.5g}")
        elif self.refine_note:
            lines.append(f"  {self.refine_note}")
        if self.calibrate_draws:
            lines.append(f"  calibrated by Monte-Carlo ({len(self.calibration)} steps of {self.calibrate_draws} draws, "
                         f"common random numbers) from the predicted level {self.analytic_level:.5g}:")
            for lv, d, lo, hi in self.calibration:
                lines.append(f"    level {lv:.5g}: Monte-Carlo drop {d:.4f} [{lo:.4f}, {hi:.4f}]")
            if self.calibrate_note:
                lines.append(f"    {self.calibrate_note}")
        if self.mc_draws:
            lo, hi = self.mc_drop_ci
            lines.append(f"  Monte-Carlo at that level ({self.mc_draws} draws): accuracy {self.mc_accuracy:.4f}, "
                         f"drop {self.mc_drop:.4f} [{lo:.4f}, {hi:.4f}]")
        lines.append(f"  per-layer allocation η_l ∝ √(n_l/g_l) (loss increase proportional to weight count; minimises "
                     f"Σ n_l log2(1/η_l)): first-order predicted drop {self.layer_drop:.4f} (neither refined nor "
                     f"checked by Monte-Carlo), {self.bits_saved:+.2f} bits/weight against the uniform level")
        for m, l in zip(self.layers, self.layer_levels):
            lines.append(f"    {m:<24} {l:.5g}")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


class _Curve:
    """Predicted accuracy of one zero-mean noise family as a function of its scale ``s``.

    The logits are Gaussian with mean ``clean + s² δ`` and covariance ``s² C₁`` (first
    order: ``δ = 0``; the moment refinement fits ``δ`` at one level, docs/THEORY.md §11).
    The margins' moments are linear in the logits', so they are formed once
    (``m(s) = m₀ + s² a``, ``S(s) = s² S₁``) and a level costs one orthant probability;
    the pairwise bounds cost ``O(N C)``."""

    def __init__(self, clean, y, cov1, clean_acc, n_points, seed, shift=None):
        self.m0, self.s1 = margin_moments(clean, cov1, y)
        self.a = None if shift is None else margin_moments(shift, torch.zeros_like(cov1), y)[0]
        self.clean_acc, self.n_points, self.seed = clean_acc, n_points, seed
        self.evaluations = 0
        self.hint = None  # the ratio model of the last _solve_scale on this curve
        # the pairwise bounds need only the margins' standard deviations: O(N C) per level
        self.v1 = torch.diagonal(self.s1, dim1=1, dim2=2)
        self.sd1 = self.v1.clamp_min(0).sqrt()
        self.err0 = 1.0 - clean_acc
        noisy = bool((self.sd1 > 0).all())
        self._z1 = -self.m0 / self.sd1 if noisy else None
        self._zeta = self.a / self.sd1 if noisy and self.a is not None else None
        # without a mean shift the margins are N(m₀, s² S₁): order and Cholesky factor once
        self._orthant = None if shift is not None else OrthantCurve(self.m0, self.s1, n_points=n_points, seed=seed)

    def _mean(self, s):
        return self.m0 if self.a is None else self.m0 + (s * s) * self.a

    def _bounds(self, s):
        return pairwise_bounds_sd(self._mean(s), self.sd1 * abs(s))

    def _p(self, s):
        """``p_k = Φ(−m_k/s_k)`` per input and margin at ``s`` (what the bounds are made
        of): ``z = z₁/s − s ζ`` with ``z₁ = −m₀/sd₁`` and ``ζ = a/sd₁`` formed once when every
        margin carries noise (the root finders call this a hundred times per solve);
        otherwise through :func:`pairwise_bounds_sd`'s limits for noiseless margins."""
        if self._z1 is None:
            return self._bounds(s)[0]
        z = self._z1 / abs(s) if self._zeta is None else self._z1 / abs(s) - abs(s) * self._zeta
        return _phi_cdf(z)

    def margins(self, s):
        return self._mean(s), self.s1 * (s * s)

    def union(self, s) -> torch.Tensor:
        """Per input, the union (Bonferroni) bound on the error probability, ``min(1, Σ_k p_k)``."""
        return self._p(s).sum(dim=1).clamp(max=1.0)

    def bound_drops(self, s):
        """``(smallest, largest)`` possible predicted drop at ``s`` (pairwise bounds)."""
        p = self._p(s)
        return float(p.amax(dim=1).mean()) - self.err0, float(p.sum(dim=1).clamp(max=1.0).mean()) - self.err0

    def errors(self, s, cheap=False) -> torch.Tensor:
        """Per-input error probability ``1 − P_i(correct)`` at ``s``, whose mean is exact to
        :data:`CURVE_MEAN_TOL` (inputs whose pairwise bounds nearly meet take the bounds'
        middle: each input only within its bounds); ``cheap``: fewer quasi-Monte-Carlo
        points and looser tolerances (used only to steer the root finder, never reported)."""
        self.evaluations += 1
        npnt, tol, mtol = ((min(STEER_POINTS, self.n_points), 1e-6, 10 * CURVE_MEAN_TOL) if cheap
                           else (self.n_points, 1e-9, CURVE_MEAN_TOL))
        if self._orthant is not None:
            return 1.0 - self._orthant.at(s, n_points=npnt, bound_tol=tol, mean_tol=mtol)[0]
        return 1.0 - orthant_probability(*self.margins(s), n_points=npnt, seed=self.seed, bound_tol=tol,
                                         mean_tol=mtol)

    def drop(self, s) -> float:
        return float(self.errors(s).mean()) - (1.0 - self.clean_acc)


_BIG = 1e12
#: Quasi-Monte-Carlo points of the evaluations that only steer the root finder (never
#: reported): the expected accuracy moves by at most 4e-4 against 8,192 points at 64 on
#: the zoo models (``benchmarks/predict_vs_mc.py --parts qmc``, per input 4e-3), well
#: inside the error the per-input ratio model of :func:`_solve_scale` already makes.
STEER_POINTS = 64
#: Relative precision of the roots of the pairwise bounds and of the ratio model
#: (:func:`_bound_root`): a twentieth of ``_solve_scale``'s ``rtol``.
BOUND_RTOL = 1e-4
#: The curves of the budget need only the mean error over the inputs: an evaluation may
#: move it by at most this (1e-4 accuracy points; the quasi-Monte-Carlo error of 256
#: points is ~1e-4, a hundred times more), leaving the inputs whose bounds nearly meet
#: to the bounds (:meth:`~.accuracy.OrthantCurve.at`'s ``mean_tol``): two thirds of the
#: integrals on the digits MLP and VGG at their 1-point budgets.
CURVE_MEAN_TOL = 1e-6
#: First log step of :func:`_bound_root`'s bracket (then ×4 per step).
BRACKET_STEP = 0.02
#: Relative precision of :func:`_solve_scale`'s bracket from the pairwise bounds (its
#: ends only start the search and bound the bisection fallback).
BRACKET_XTOL = 1e-2
#: ``noise_budget(refine=...)`` choices: ``"moments"`` (one moment propagation at the
#: first-order root refines the curve there; an error if the model is outside the moment
#: method's layers), ``"auto"`` (the default: ``"moments"`` where the model allows it,
#: the first order otherwise, said in ``NoiseBudget.refine_note``) or ``None`` (first
#: order only, the cheapest).
REFINE = ("auto", "moments", None)
#: ``keep_digital(method=...)``: how the accuracy after each step is predicted (the
#: greedy choice is always made on the exact first-order decomposition).
KEEP_METHODS = ("auto", "linear", "moments", "refined")
#: The budget's moment refinement propagates only inputs that can matter: inputs are
#: left to the first order, smallest first, while the mean over all inputs of their union
#: bounds on the error at ``reach`` times the level stays within ``REFINE_MASS`` (0.01
#: accuracy point), so they cannot move the drop by more (reported as
#: ``refine_neglected``). Reach 1.0 (the mean shift lowers the margins, so the refined
#: level is below the first-order one: by 8%, 16% and 7% on the digits MLP, VGG and
#: ResNet-20; the neglected mass is checked again at the refined level, and the
#: selection widened to 1.1 times it where it exceeds ``REFINE_MASS`` there). The bound
#: is the first order's: under the mean shift the inputs left out err 1.5–2.4 times as
#: often (digits MLP, VGG, ResNet-20 at their 1-point budgets: 5.9e-5, 2.9e-5, 8.8e-5 of
#: the mean error, against 3.8e-5, 1.2e-5, 5.0e-5; the drop over every input moves by
#: at most 4e-5). ``keep_digital``'s moment accuracies propagate every input
#: (:func:`_moment_steps`): at its larger levels the shift is no longer small.
REFINE_MASS = 1e-4
REFINE_REACH = 1.0


def _select(curve, level: float, reach: float):
    """``(mask of inputs to propagate, neglected mass)`` (see :data:`REFINE_MASS`)."""
    u = curve.union(reach * level)
    order = torch.argsort(u)
    left = order[torch.cumsum(u[order], 0) / u.numel() <= REFINE_MASS]
    sel = torch.ones_like(u, dtype=torch.bool)
    sel[left] = False
    return sel, float(u[left].sum()) / u.numel()


def _bound_root(f, target, s0=1.0, xtol=BOUND_RTOL, side=None):
    """The root in ``s`` of ``f(s) = target`` for a non-decreasing ``f``, to ``xtol``
    relative; ``None`` if ``f`` stays below ``target`` up to ``_BIG``. ``side``: ``None``
    returns the root's estimate, ``"below"`` a level where ``f`` was evaluated below
    ``target`` and ``"above"`` one where it was at or above it (each within ``xtol`` of
    the root), so a bracket end is certain without a further check.

    The bracket grows from ``s0`` in log steps of 2%, 8%, 32%, ... (the callers' ``s0``
    is usually within a few per cent of the root), then the Illinois variant of regula
    falsi in ``log s`` narrows it, keeping both ends."""
    lim = math.log(_BIG)
    g = lambda u: f(math.exp(u)) - target  # noqa: E731
    t0 = math.log(s0)
    g0, step = g(t0), BRACKET_STEP
    if g0 >= 0:  # the root is below s0
        b, gb = t0, g0
        while True:
            a = max(t0 - step, -lim)
            ga = g(a)
            if ga < 0:
                break
            b, gb = a, ga
            if a <= -lim:
                return math.exp(a)
            step *= 4
    else:
        a, ga = t0, g0
        while True:
            b = t0 + step
            if b > lim:
                return None
            gb = g(b)
            if gb >= 0:
                break
            a, ga = b, gb
            step *= 4
    last = 0
    for _ in range(100):
        if b - a <= xtol:
            break
        c = b - gb * (b - a) / (gb - ga) if gb != ga else 0.5 * (a + b)
        if not a < c < b:
            c = 0.5 * (a + b)
        gc = g(c)
        if gc >= 0:
            b, gb = c, gc
            if last == 1:
                ga *= 0.5  # Illinois: the same end moved twice, halve the other's value
            last = 1
        else:
            a, ga = c, gc
            if last == -1:
                gb *= 0.5
            last = -1
    if side == "below":
        return math.exp(a)
    if side == "above":
        return math.exp(b)
    return math.exp(a - ga * (b - a) / (gb - ga)) if gb != ga else math.exp(0.5 * (a + b))


def _solve_scale(curve: _Curve, target: float, rtol: float = 2e-3, hint: list | None = None):
    """Largest ``s`` with predicted drop ``≤ target`` (to ``rtol`` relative). Returns
    ``(s, drop)``.

    Bracket without integration: the pairwise bounds give ``lo_drop(s) ≤ drop(s) ≤
    hi_drop(s)`` (the orthant estimate is clamped between them), so the root of
    ``hi_drop`` is feasible and that of ``lo_drop`` is not. Then a per-input model: each
    input's error probability is ``r_i`` times its union bound ``U_i(s) = min(1, Σ_k
    Φ(−m_ik/s_ik))``, with ``r_i`` taken from the last orthant evaluation (``r_i = 1``
    when one competitor dominates; it varies slowly with the level, while ``U_i`` carries
    the steep Gaussian tail). The model's root needs only the bounds. One cheap
    evaluations (fewer QMC points) at the feasible end and at the model's root set ``r_i``
    and its log-linear trend in ``1/s²``; one full evaluation just below the model's root
    usually ends it; otherwise repeat from there, bisecting in ``1/s²`` if the model's
    root leaves the bracket.

    ``hint``: the ratio model (``curve.hint`` after a solve) of a solve on a curve of the
    same inputs near this one (the moment-refined curve after the first-order one, the
    per-layer allocation's): one cheap evaluation at that model's root instead of two,
    its ratios taking the hint's trend in ``1/s²``, then full evaluations as above. The
    model only steers: the result is decided by full evaluations either way. Sets
    ``curve.hint``."""
    if not bool((curve.v1 > 0).any()):
        raise ValueError("the noisy parameters do not affect the logits to first order: no level reaches the budget")
    base = 1.0 - curve.clean_acc
    s0 = 1.0 if not hint else hint[-1][0] ** -0.5
    # the bracket: hi_drop(s_feas) < target (surely feasible), lo_drop(s_inf) ≥ target
    # (surely infeasible from there); its ends need no precision
    s_feas = _bound_root(lambda q: curve.bound_drops(q)[1], target, s0, xtol=BRACKET_XTOL, side="below")
    if s_feas is None:
        raise ValueError(f"max_drop={target:g} is never reached: the predicted accuracy stays within it at any level")
    s_inf = _bound_root(lambda q: curve.bound_drops(q)[0], target, s_feas, xtol=BRACKET_XTOL, side="above")
    if s_inf is None:  # the bounds cannot tell whether the drop ever reaches the target: ask the curve
        top = curve.drop(_BIG)
        if top < target:
            raise ValueError(f"max_drop={target:g} is never reached: the predicted drop stays below {top:.4g} at "
                             f"any level (accuracy {curve.clean_acc - top:.4g} under unbounded noise, from a "
                             f"clean {curve.clean_acc:.4g}); give a smaller max_drop")
    lo, hi = s_feas, (s_inf if s_inf is not None else math.inf)
    best = None  # (s, drop) of the largest fully evaluated feasible level

    def model_root(hist, s):
        """The ratio model's root from ``hist`` (``(1/s², log r_i)`` of the last one or two
        evaluations: ``r_i`` constant, or log-linear in ``1/s²``), searched from ``s``."""
        if len(hist) == 2 and hist[0][0] != hist[1][0]:
            (u1, l1), (u2, l2) = hist
            rate = (l2 - l1) / (u2 - u1)
            ratio = lambda q: (l2 + rate * (1.0 / (q * q) - u2)).exp().clamp(max=1.0)  # noqa: E731
        else:
            ratio = lambda q, rr=hist[-1][1].exp(): rr  # noqa: E731
        return _bound_root(lambda q: float((ratio(q) * curve.union(q)).mean()) - base, target, s)

    def step(nxt):
        if nxt is not None and n_cheap <= 0:
            nxt *= 1 - rtol / 4  # a full evaluation next: aim just below the root, to end on the feasible side
        if nxt is None or not (lo < nxt < hi):
            nxt = 2 * lo if not math.isfinite(hi) else (0.5 / lo ** 2 + 0.5 / hi ** 2) ** -0.5
        return nxt

    anchor = None
    if hint:
        hist, n_cheap = list(hint)[-2:], 1
        anchor = hist if len(hist) == 2 and hist[0][0] != hist[1][0] else None
        s = step(model_root(hist, min(max(s0, lo), hi if math.isfinite(hi) else s0)))
    else:
        hist, s, n_cheap = [], s_feas, 2
    for _ in range(12):
        cheap = n_cheap > 0
        n_cheap -= 1
        err = curve.errors(s, cheap=cheap)
        if not cheap:
            d = float(err.mean()) - base
            if d <= target:
                lo = max(lo, s)
                if best is None or s > best[0]:
                    best = (s, d)
            else:
                hi = min(hi, s)
            if best is not None and hi <= best[0] * (1 + rtol):
                break
        u = curve.union(s)
        r = torch.where(u > 0, err / u.clamp_min(1e-300), torch.ones_like(u)).clamp(1e-12, 1.0)
        if anchor:  # the first evaluation on a hinted curve: the hint's trend, anchored here
            (u1, l1), (u2, l2) = anchor
            hist, anchor = [(1.0 / (s * s) - (u2 - u1), r.log() - (l2 - l1))], None
        hist = (hist + [(1.0 / (s * s), r.log())])[-2:]
        nxt = model_root(hist, s)
        if not cheap and best is not None and best[0] == s and nxt is not None and nxt <= s * (1 + rtol):
            break  # feasible, and the model puts the root within rtol above it
        s = step(nxt)
    curve.hint = hist
    if best is None:
        best = (s_feas, curve.drop(s_feas))
    return best


def _moment_curve(ps: _Pass, noise: WeightNoise, curve: _Curve, n_points: int, seed: int, refit_cov: bool = False,
                  reach: float = REFINE_REACH):
    """The predicted curve refined by one moment propagation at ``level`` (the first-order
    root, ``noise``'s level): logit mean ``clean + s² δ``, ``δ`` fitted so that the mean equals the moment
    method's at ``level``, and the first-order covariance ``s² C₁`` (docs/THEORY.md §11:
    the mean shift is the leading correction; the moment method's covariance is not used,
    its compression error there exceeds the ``s⁴`` term it would add; ``refit_cov=True``,
    measured as an alternative by ``benchmarks/sensitivity.py --parts budget_refit``,
    takes the moment method's covariance ``s² C_m/η²`` too). Only inputs that
    can matter are propagated (:func:`_select`; the others keep the first order, and the
    mean of their union bounds at ``reach × level``, ``refine_neglected`` ≤
    ``REFINE_MASS``, bounds what they could add to the drop there). The returned curve's
    ``refined`` is the mask of the inputs propagated."""
    level = noise.level
    prop = MomentPropagator(ps.lin, noise)  # ValueError: a model the moment method does not cover
    mask, neglected = _select(curve, level, reach)
    sel = torch.nonzero(mask).flatten()
    shift = torch.zeros_like(ps.clean)
    cov1 = ps.cov_unit.clone() if refit_cov else ps.cov_unit
    t = time.perf_counter()
    if sel.numel():
        xs = ps.x[sel.to(ps.x.device)].to(ps.lin.device)
        res = propagate_moments(ps.lin, xs, noise, propagator=prop, mean_only=not refit_cov,
                                chunk_size=moment_chunk_size(ps.lin, xs, prop))
        shift[sel] = (res.mean.double().cpu() - ps.clean[sel]) / level ** 2
        if refit_cov:
            cov1[sel] = res.cov.double().cpu() / level ** 2
    extra = dict(refine_inputs=int(sel.numel()), refine_neglected=neglected, refine_seconds=time.perf_counter() - t)
    out = _Curve(ps.clean, ps.y, cov1, curve.clean_acc, n_points, seed, shift=shift)
    out.refined = mask
    return out, extra


#: Monte-Carlo calibration of the budget (:func:`_calibrate`): stop when the
#: Monte-Carlo drop is within this fraction of ``max_drop`` (with common random
#: numbers the drop is a smooth function of the level, so this is reached in two or
#: three steps; the draws' own sampling error, a few per cent of the drop for a few
#: hundred draws, is the error that remains) or after ``CALIBRATE_STEPS`` steps.
CALIBRATE_RTOL = 0.02
CALIBRATE_STEPS = 6


def _calibrate(model, ps: _Pass, fam: WeightNoise, curve: _Curve, level: float, max_drop: float, clean_acc: float,
               draws: int, seed: int, targets, rtol: float):
    """Monte-Carlo calibration of the predicted level: Monte-Carlo (``draws``, the same
    ``seed`` at every step: common random numbers) at the predicted level, then the next
    level from the predicted curve scaled by the Monte-Carlo drop over the predicted one
    at the last step (``drop_MC(s) ≈ c · drop_pred(s)``: the prediction carries the
    curve's shape, Monte-Carlo its scale), or, from the second step on, the secant of
    ``log drop_MC`` against ``log s`` through the last two steps when it is increasing.
    Returns ``(level, steps, note, last Monte-Carlo result)``; the level is the step whose
    Monte-Carlo drop is closest to ``max_drop`` among those within it, else the closest."""
    from noiseprop.empirical import monte_carlo  # optional: theory does not depend on empirical

    steps, results, s, note = [], [], level, ""
    for _ in range(CALIBRATE_STEPS):
        mc = monte_carlo(model, ps.x, ps.y, fam.with_level(s), draws=draws, seed=seed, targets=targets, progress=False)
        lo, hi = mc.accuracy_ci
        d = clean_acc - float(mc.accuracy)
        steps.append((float(s), d, clean_acc - float(hi), clean_acc - float(lo)))
        results.append(mc)
        if abs(d - max_drop) <= CALIBRATE_RTOL * max_drop:
            break
        nxt = None
        if len(steps) >= 2:
            (s1, d1, *_), (s2, d2, *_) = steps[-2:]
            b = (math.log(d2 / d1) / math.log(s2 / s1)) if d1 > 0 and d2 > 0 and s1 != s2 else 0.0
            if b > 0:  # log drop increasing in log level: the secant's root, at most 4× away
                step = math.log(max_drop / d2) / b
                nxt = s2 * math.exp(max(-math.log(4.0), min(math.log(4.0), step)))
        if nxt is None:
            p = curve.drop(s)
            try:  # ValueError: the scaled target is out of the predicted curve's reach
                nxt = _solve_scale(curve, max_drop * p / d, rtol)[0] if d > 0 and p > 0 else None
            except ValueError:
                nxt = None
            if nxt is None:  # no drop yet (by either), or beyond the curve: double or halve the level
                nxt = 2 * s if d < max_drop else s / 2
        s = nxt
    else:
        note = (f"not converged in {CALIBRATE_STEPS} steps: the level is the step whose Monte-Carlo drop is closest "
                f"to max_drop={max_drop:g}")
    within = [i for i, st in enumerate(steps) if st[1] <= max_drop * (1 + CALIBRATE_RTOL)]
    pool = within or range(len(steps))
    best = min(pool, key=lambda i: abs(steps[i][1] - max_drop))
    return steps[best][0], tuple(steps), note, results[best]


def noise_budget(model: nn.Module, x, y, noise_family, max_drop: float = 0.01, targets=None, *,
                 refine: str | None = "auto", mc_draws: int = 0, mc_seed: int = 0,
                 calibrate: int = 0, calibrate_seed: int = 1,
                 chunk_size: int | None = None, n_points: int = DEFAULT_N_POINTS, seed: int = 0,
                 rtol: float = 2e-3) -> NoiseBudget:
    """The largest level of ``noise_family`` whose predicted accuracy drop stays within
    ``max_drop``, and a per-layer allocation of levels within the same budget.

    The first-order drop at level η is ``acc₀ − mean_i Φ_{η² S_i}(m_i)`` (Gaussian
    logits; one Jacobian pass at level 1, then only orthant probabilities). Root finding
    (:func:`_solve_scale`): bracket by the pairwise bounds (no integration), then a
    per-input model of the error against its union bound; about three orthant
    evaluations (two with fewer points), relative tolerance ``rtol`` on the level (a
    number in the open interval (0, 1); default 2e-3).

    ``refine``: the first order misses the logits' mean shift (ReLU gates that flip
    lower the margins of the inputs near a decision boundary, which are the ones a
    1-point budget is about), so at its root the network loses more than ``max_drop``
    (digits, 300 draws: 1.19 and 1.26 points for a 1-point budget on the MLP and VGG).
    ``"moments"`` runs one moment propagation (:mod:`noiseprop.theory.moments`) at the
    first-order root, on the inputs that can matter (``REFINE_MASS``), fits the mean
    ``clean + η² δ`` to it there (the covariance stays first order) and solves again on that
    curve (docs/THEORY.md §11). ``"auto"`` (default) does so where the model is one the
    moment method covers (Linear, Conv2d, BatchNorm, ReLU, pooling, residual add) and
    falls back to the first order otherwise (``refine_note`` says why); ``None``: first
    order only. The refinement costs one moment pass over the selected inputs, about one
    ``predict`` call on the digits MLP and VGG (``benchmarks/sensitivity.py --parts
    cost``); the first order alone costs 1–1.5 ``predict`` calls there.
    ``first_order_level`` is the first-order root either way. Only the mean is taken from
    the moment method: on residual networks its covariance misses about 10% of the logit
    variance (docs/THEORY.md §9), and refitting the covariance too moved the level up
    (digits ResNet-20: Monte-Carlo drop 1.13% [1.06, 1.20] for a 1-point budget; with the
    mean alone 0.97% [0.91, 1.04]).

    Allocation: ``η_l = s √(n_l / g_l)``, ``g_l`` the first-order loss increase of layer
    ``l`` at level 1 and ``n_l`` its noisy weight count (the levels that minimise the
    total precision ``Σ_l n_l log₂(1/η_l)`` at a fixed loss increase), with ``s`` found
    by root finding on the first-order predicted drop (not refined; ``bits_saved`` is
    against the first-order uniform level, same model).

    noise_family: ``'relative'``, ``'additive'``, ... (no level: the level is the
    answer) or a WeightNoise (its level is ignored). max_drop: in (0, 1), e.g. 0.01 for
    one accuracy point. mc_draws: > 0 checks the level by Monte-Carlo (needs
    ``noiseprop.empirical``) and reports the drop with its 95% interval.

    ``calibrate``: > 0 calibrates the level by Monte-Carlo with this many draws per step
    (:func:`_calibrate`: the predicted curve gives the shape, Monte-Carlo at the level
    the scale; two to four steps). Use it where the prediction's error matters at the
    scale of the budget: the analytic level misses a 1-point budget by 0.1-0.3 points
    on the zoo's VGG and ResNet-20 on digits (``benchmarks/sensitivity.py --parts
    budget``). ``level`` is then the calibrated level, ``analytic_level`` the
    prediction's, ``calibration`` the steps, and ``mc_*`` the last step's Monte-Carlo
    unless ``mc_draws`` asks for an independent check (``mc_seed`` must then differ from
    ``calibrate_seed``). The allocation stays the prediction's.

    >>> import torch
    >>> from noiseprop.theory.examples import tiny_problem
    >>> net, x, y = tiny_problem()  # a seeded ReLU net and the labels it gets right
    >>> b = noise_budget(net, x, y, "relative", max_drop=0.01)
    >>> b.level > 0, b.predicted_drop <= 0.01 + 1e-6
    (True, True)
    """
    t0 = time.perf_counter()
    fam = _noise_family(noise_family)
    max_drop = _check_fraction("max_drop", max_drop)
    rtol = check_number("rtol", rtol, 0, 1, open_min=True, open_max=True,
                        what="a relative tolerance on the level in the open interval (0, 1), e.g. 2e-3")
    n_points = check_n_points(n_points)
    seed = check_int("seed", seed, 0)
    mc_draws = check_int("mc_draws", mc_draws, 0)
    if mc_draws == 1:
        raise ValueError("mc_draws must be 0 (no Monte-Carlo check) or >= 2")
    calibrate = check_int("calibrate", calibrate, 0)
    if calibrate == 1:
        raise ValueError("calibrate must be 0 (no Monte-Carlo calibration) or the draws per step, >= 2")
    calibrate_seed = check_int("calibrate_seed", calibrate_seed, 0)
    mc_seed = check_int("mc_seed", mc_seed, 0)
    if calibrate and mc_draws and calibrate_seed == mc_seed:
        raise ValueError(f"mc_seed={mc_seed} equals calibrate_seed: the Monte-Carlo check would reuse the calibration's "
                         "draws; give them different seeds")
    if refine not in REFINE:
        raise ValueError(f"refine must be one of {list(REFINE)}, got {refine!r}")
    ps = _pass(model, x, y, fam, targets, chunk_size)
    clean_acc = _clean_accuracy(ps.clean, ps.y)
    curve = _Curve(ps.clean, ps.y, ps.cov_unit, clean_acc, n_points, seed)
    level, drop = _solve_scale(curve, max_drop, rtol)
    fo_level, ev = level, curve.evaluations
    extra, used, pcurve = {}, None, curve
    if refine is not None:
        reach = REFINE_REACH
        while True:
            try:
                rcurve, extra = _moment_curve(ps, fam.with_level(fo_level), curve, n_points, seed, reach=reach)
            except ValueError as e:
                if refine == "moments":
                    raise ValueError(f"refine='moments': {e}") from e
                extra = dict(refine_note=f"first order only: {e}")
                break
            level, drop = _solve_scale(rcurve, max_drop, rtol, hint=curve.hint)
            ev += rcurve.evaluations
            used, pcurve = "moments", rcurve
            # what the inputs left to the first order could add to the drop at the refined level
            extra["refine_neglected"] = float(curve.union(level)[~rcurve.refined].sum()) / curve.m0.shape[0]
            if extra["refine_neglected"] <= REFINE_MASS or reach > REFINE_REACH:
                break
            reach = 1.1 * level / fo_level  # the level moved above the selection's reach: widen it, once
    extra["analytic_level"] = float(level)
    mc = None
    if calibrate:
        n0 = pcurve.evaluations
        level, steps, note, mc = _calibrate(model, ps, fam, pcurve, level, max_drop, clean_acc, calibrate,
                                            calibrate_seed, targets, rtol)
        drop = pcurve.drop(level)
        ev += pcurve.evaluations - n0
        extra.update(calibration=steps, calibrate_draws=calibrate, calibrate_note=note)
    layers = list(ps.layer_cov)
    g = _gn_per_unit(ps.clean, ps.layer_cov)
    active = [m for m in layers if g[m] > 0]
    w = {m: math.sqrt(ps.params[m] / g[m]) for m in active}
    # normalise so that the weight-averaged log level equals 0 (s is then comparable to η)
    norm = math.exp(sum(ps.params[m] * math.log(w[m]) for m in active) / sum(ps.params[m] for m in active))
    w = {m: v / norm for m, v in w.items()}
    alloc = _Curve(ps.clean, ps.y, sum(ps.layer_cov[m] * w[m] ** 2 for m in active), clean_acc, n_points, seed)
    s, ldrop = _solve_scale(alloc, max_drop, rtol, hint=curve.hint)
    levels = [s * w[m] if m in w else math.inf for m in layers]
    n_act = sum(ps.params[m] for m in active)
    bits = sum(ps.params[m] * math.log2(s * w[m] / fo_level) for m in active) / n_act
    out = dict(noise=fam.with_level(level).to_string(), targets=ps.lin.plan.targets.describe(), max_drop=max_drop,
               level=float(level), predicted_drop=float(drop), clean_accuracy=clean_acc,
               predicted_accuracy=clean_acc - float(drop), layers=tuple(layers), layer_levels=tuple(levels),
               layer_drop=float(ldrop), bits_saved=float(bits), evaluations=ev + alloc.evaluations,
               refine=used, first_order_level=float(fo_level), **extra)
    if mc_draws or mc is not None:
        if mc_draws:
            from noiseprop.empirical import monte_carlo  # optional: theory does not depend on empirical

            mc = monte_carlo(model, ps.x, ps.y, fam.with_level(level), draws=mc_draws, seed=mc_seed, targets=targets,
                             progress=False)
        else:
            mc_draws = calibrate
        lo, hi = mc.accuracy_ci
        out.update(mc_accuracy=float(mc.accuracy), mc_accuracy_ci=(float(lo), float(hi)),
                   mc_drop=clean_acc - float(mc.accuracy), mc_drop_ci=(clean_acc - float(hi), clean_acc - float(lo)),
                   mc_draws=mc_draws)
    return NoiseBudget(**out, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------
# keep_digital
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KeepDigital:
    """The layers to keep digital (noise-free), chosen greedily (:func:`keep_digital`).

    ``layers``: the chosen module names in the order chosen; ``accuracy[j]``: predicted
    accuracy with the first ``j + 1`` of them digital (``accuracy_all_noisy`` with none).
    ``gain_alone``: per noisy layer, the accuracy gained by keeping it alone digital;
    ``interaction[j]``: gain of the first ``j + 1`` chosen layers together minus the sum
    of their gains alone (0 when accuracy were additive over layers; what greedy
    ignores). ``exhaustive_layers`` / ``exhaustive_accuracy``: the best set of ``k``
    layers by exhaustive search, when it was run (``None`` otherwise).
    ``method``: how ``accuracy`` and ``accuracy_all_noisy`` were predicted (``"linear"``:
    first order; ``"moments"``: moment propagation, one pass per step, on
    ``moment_inputs`` inputs (all); ``"refined"``: the moment method's logit mean with the
    first-order covariance, as ``noise_budget``'s refinement; ``method_note``: why
    ``method="auto"`` fell back to the first order); ``accuracy_first_order`` and
    ``accuracy_all_noisy_first_order`` are the first-order values either way (the ones
    the greedy choice, ``gain_alone`` and ``interaction`` use). ``preact_frac``:
    predict's validity diagnostic with every layer noisy (``method="linear"``; warned
    above its limit, where ``method="moments"`` is the better estimate).
    """

    noise: str
    targets: str
    k: int
    layers: tuple
    accuracy: tuple
    clean_accuracy: float
    accuracy_all_noisy: float
    gain_alone: Mapping = field(repr=False)
    interaction: tuple
    exhaustive_layers: tuple | None
    exhaustive_accuracy: float | None
    subsets_searched: int
    method: str = "linear"
    method_note: str = ""
    accuracy_first_order: tuple = ()
    accuracy_all_noisy_first_order: float = float("nan")
    moment_inputs: int = 0
    seconds: float = float("nan")
    preact_frac: float = float("nan")

    @property
    def noisy_layers(self) -> tuple:
        """The layers left noisy after keeping all chosen layers digital."""
        return tuple(m for m in self.gain_alone if m not in self.layers)

    def targets_after(self, step: int | None = None, base=None) -> Targets:
        """``Targets`` with the first ``step`` (default all) chosen layers digital, for a
        Monte-Carlo check (``base``: the targets the search used)."""
        step = self.k if step is None else step
        keep = set(self.layers[:step])
        rest = tuple(m for m in self.gain_alone if m not in keep)
        return dataclasses.replace(Targets.parse(base), layers=rest)

    def to_frame(self) -> pd.DataFrame:
        """One row per step: the layer made digital, the predicted accuracy after it, its
        gain alone, and the interaction so far."""
        return pd.DataFrame({"step": list(range(1, self.k + 1)), "layer": list(self.layers),
                             "accuracy": list(self.accuracy),
                             "accuracy_first_order": list(self.accuracy_first_order or self.accuracy),
                             "gain_alone": [self.gain_alone[m] for m in self.layers],
                             "interaction": list(self.interaction)})

    def summary(self) -> str:
        how = "first order" if self.method == "linear" else (
            f"{'moment propagation' if self.method == 'moments' else 'moment mean, first-order covariance'}; "
            f"first order {self.accuracy_all_noisy_first_order:.4f}")
        lines = [f"Layers to keep digital under {self.noise} noise on {self.targets}",
                 f"  accuracy clean {self.clean_accuracy:.4f}, all noisy {self.accuracy_all_noisy:.4f} (predicted, {how})"]
        if self.method_note:
            lines.append(f"  ({self.method_note})")
        for j, (m, a, it) in enumerate(zip(self.layers, self.accuracy, self.interaction)):
            lines.append(f"  {j + 1}. {m:<24} -> {a:.4f}  (gain alone {self.gain_alone[m]:+.4f}; "
                         f"interaction {it:+.4f})")
        if self.exhaustive_layers is not None:
            lines.append(f"  exhaustive best {self.k} ({self.subsets_searched} sets): {list(self.exhaustive_layers)} -> "
                         f"{self.exhaustive_accuracy:.4f} (greedy {(self.accuracy_first_order or self.accuracy)[-1]:.4f}; first order)")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


def _moment_steps(model, ps: _Pass, noise: WeightNoise, targets, chosen, n_points, seed, refined: bool = False):
    """Predicted accuracy by moment propagation with every layer noisy and after each
    step of ``chosen`` kept digital (one moment pass per step over every input, noise on
    the remaining layers, as ``KeepDigital.targets_after`` gives them to Monte-Carlo).
    ``refined``: Gaussian logits with the moment method's mean (a mean-only pass) and the
    first-order covariance of the remaining layers, the curve of ``noise_budget``'s
    refinement; otherwise the moment method's mean, covariance and head. Returns ``(all
    noisy, per step, inputs propagated)``.

    Every input is propagated: at the levels where layers are kept digital the mean shift
    lowers margins the first order holds safe (digits VGG, every layer noisy at a 7-point
    drop: inputs whose first-order error probability is below 6e-5 reach 8%), so leaving
    the inputs with small first-order union bounds to the first order, as the budget's
    refinement does at its much smaller levels, overstated the accuracy by 0.3 point."""
    lv2 = noise.level ** 2
    base = Targets.parse(targets)
    layers = list(ps.layer_cov)
    xs = ps.x.to(ps.lin.device)
    out = []
    for step in range(len(chosen) + 1):
        keep = set(chosen[:step])
        rest = [m for m in layers if m not in keep]
        lin = LinearizedNetwork(model, dataclasses.replace(base, layers=tuple(rest)), warn_train_mode=False)
        try:
            prop = MomentPropagator(lin, noise)
        except ValueError as e:
            raise ValueError(f"method='moments': {e}") from e
        if refined:
            res = propagate_moments(lin, xs, noise, propagator=prop, mean_only=True,
                                    chunk_size=moment_chunk_size(lin, xs, prop))
            cov = sum(ps.layer_cov[m] for m in rest) * lv2
            p = correct_probability(res.mean.double().cpu(), cov, ps.y, n_points=n_points, seed=seed)[0]
        else:
            res = propagate_moments(lin, xs, noise, propagator=prop, with_head=True)
            p = moment_correct_probability(res.mean.double().cpu(), res.cov.double().cpu(), res.head, ps.y,
                                           n_points, seed)[0]
        out.append(float(p.mean()))
    return out[0], out[1:], int(ps.y.shape[0])


def check_keep_k(model: nn.Module, targets, k, name: str = "k") -> int:
    """``k`` of :func:`keep_digital` (``name``: the argument, or the command line's flag)
    against the number of noisy layers, from the targets alone (no pass)."""
    check_int(name, k, what="an integer number of layers >= 1", wrong_type=ValueError)
    layers = list(dict.fromkeys(n.rpartition(".")[0] for n in resolve_targets(model, targets).names))
    if len(layers) < 2:
        raise ValueError(f"keep_digital needs at least 2 noisy layers to choose from; the targets give "
                         f"{len(layers)} ({', '.join(layers) or 'none'}), and keeping it digital leaves no noise")
    return check_int(name, k, 1, len(layers) - 1, what=f"an integer in [1, {len(layers) - 1}] (fewer than the "
                     f"{len(layers)} noisy layers: keeping every layer digital leaves no noise)")


def keep_digital(model: nn.Module, x, y, noise, k: int = 1, targets=None, *, exhaustive: bool | None = None,
                 max_subsets: int = 200, chunk_size: int | None = None, n_points: int = DEFAULT_N_POINTS,
                 seed: int = 0, method: str = "linear") -> KeepDigital:
    """The ``k`` layers whose removal from the noisy set most raises the predicted
    accuracy, chosen greedily on the exact per-layer decomposition of the first-order
    covariance (each step: the layer whose removal gives the highest predicted accuracy
    ``mean_i Φ(m_i; η² Σ_{l noisy} C_l)``).

    Accuracy is not additive over layers, so greedy can miss the best set: the result
    gives the interaction (joint gain minus the sum of gains alone) after each step and,
    with ``exhaustive`` (default: when ``C(L, k) ≤ max_subsets``), the best set of ``k``
    by exhaustive search for comparison.

    noise: ``'family:level'`` or a WeightNoise. k: 1 ≤ k < number of noisy layers.
    method: how the accuracy after each step is predicted (the choice is the first
    order's either way). ``"linear"`` (default, the cheapest): the first order, with
    ``predict``'s warning where it is outside its range. ``"moments"``: moment
    propagation (one pass per step and one with every layer noisy, over every input).
    ``"refined"``: Gaussian logits with the moment method's mean (one mean-only pass per
    step) and the first-order covariance, ``noise_budget``'s refined curve. ``"auto"``:
    ``"refined"`` where the moment method covers the model, ``"linear"`` otherwise
    (``method_note`` says why). Where the whole network loses about 7 points (digits,
    359 inputs, 100 draws, three training seeds each; after 1–3 layers kept digital) the
    first order overestimates the accuracy by 0.4–3.4 points, moments by 0.0–2.1
    (ResNet-20: 0.6–2.1, the moment method's limit on residual networks; VGG within
    0.5), refined is within 0.74 on both (docs/THEORY.md §11): use it for the accuracies
    there. It costs one moment pass per step (ResNet-20 12.6 s, VGG 35 s, against 1.1
    and 1.9 s for the first order; the VGG's is more than 100 Monte-Carlo draws per step).

    >>> import torch
    >>> from noiseprop.theory.examples import tiny_problem
    >>> net, x, y = tiny_problem()  # a seeded ReLU net and the labels it gets right
    >>> kd = keep_digital(net, x, y, "relative:0.3", k=1)
    >>> len(kd.layers), kd.layers[0] in ("0", "2"), len(kd.accuracy)
    (1, True, 1)
    """
    t0 = time.perf_counter()
    noise = _noise_with_level(noise)
    n_points = check_n_points(n_points)
    seed = check_int("seed", seed, 0)
    max_subsets = check_int("max_subsets", max_subsets, 1)
    if exhaustive is not None and not isinstance(exhaustive, bool):
        raise TypeError(f"exhaustive must be True, False or None, got {exhaustive!r}")
    if method not in KEEP_METHODS:
        raise ValueError(f"method must be one of {list(KEEP_METHODS)}, got {method!r}")
    k = check_keep_k(model, targets, k)
    ps = _pass(model, x, y, noise, targets, chunk_size)
    layers = [m for m in ps.layer_cov if bool(ps.layer_cov[m].any())]  # a layer the forward never uses: no choice
    if k > len(layers) - 1:
        raise ValueError(f"k must be an integer in [1, {len(layers) - 1}]: only {len(layers)} of the {len(ps.layer_cov)} "
                         f"noisy layers reach the logits ({', '.join(m for m in ps.layer_cov if m not in layers)} "
                         f"does not), and keeping them all digital leaves no noise; got {k}")
    lv2 = noise.level ** 2
    acc = lambda cov: _accuracy(ps.clean, cov * lv2, ps.y, n_points, seed)  # noqa: E731
    total = ps.cov_unit
    acc0 = acc(total)
    gain_alone = {m: acc(total - ps.layer_cov[m]) - acc0 for m in layers}
    chosen, accs, inter = [], [], []
    cur = total.clone()
    for step in range(k):
        if step == 0:
            best = max(layers, key=lambda m: (gain_alone[m], -layers.index(m)))
            best_acc = acc0 + gain_alone[best]
        else:
            best, best_acc = None, -1.0
            for m in layers:
                if m in chosen:
                    continue
                a = acc(cur - ps.layer_cov[m])
                if a > best_acc:
                    best, best_acc = m, a
        chosen.append(best)
        cur = cur - ps.layer_cov[best]
        accs.append(best_acc)
        inter.append(best_acc - acc0 - sum(gain_alone[m] for m in chosen))
    n_sub = math.comb(len(layers), k)
    run_ex = (n_sub <= max_subsets) if exhaustive is None else exhaustive
    ex_layers, ex_acc, searched = None, None, 0
    if run_ex and k == 1:
        ex_layers, ex_acc, searched = (chosen[0],), accs[0], len(layers)  # greedy step 1 is the exhaustive search
    elif run_ex:
        ex_acc = -1.0
        for sub in itertools.combinations(layers, k):
            a = acc(total - sum(ps.layer_cov[m] for m in sub))
            searched += 1
            if a > ex_acc:
                ex_layers, ex_acc = tuple(sub), a
    fo = dict(accuracy_first_order=tuple(accs), accuracy_all_noisy_first_order=acc0)
    auto = method == "auto"
    if auto:
        try:
            MomentPropagator(ps.lin, noise)
            method = "refined"
        except ValueError as e:  # a model the moment method does not cover
            method, fo["method_note"] = "linear", f"first order: {e}"
    if method in ("moments", "refined"):
        try:
            acc0, accs, n_sel = _moment_steps(model, ps, noise, targets, chosen, n_points, seed, method == "refined")
            fo["moment_inputs"] = n_sel
        except ValueError as e:  # a layer the moment pass refuses on these inputs (e.g. a Linear on 3-D input)
            if not auto:
                raise
            method, fo["method_note"] = "linear", f"first order: {e}"
    if method == "linear":
        fo["preact_frac"] = _first_order_range(ps, noise, seed, "keep_digital(..., method='refined') reports the "
                                               "accuracies with the moment method's mean shift")
    return KeepDigital(
        noise=noise.to_string(), targets=ps.lin.plan.targets.describe(), k=k, layers=tuple(chosen),
        accuracy=tuple(accs), clean_accuracy=_clean_accuracy(ps.clean, ps.y), accuracy_all_noisy=acc0,
        gain_alone=dict(gain_alone), interaction=tuple(inter), exhaustive_layers=ex_layers,
        exhaustive_accuracy=ex_acc, subsets_searched=searched, method=method, **fo,
        seconds=time.perf_counter() - t0,
    )
