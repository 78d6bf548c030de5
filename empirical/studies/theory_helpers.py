"""What the cells measure besides Monte-Carlo: the theory's curve, folding factors,
curvature and per-layer gains of one trained model."""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch

from noiseprop.theory import RelativeGaussian, Targets, predict_sweep
from noiseprop.theory.flatness import hessian_top_eigenvalue, hessian_trace
from noiseprop.theory.linearize import LinearizedNetwork, jacobian_pass
from noiseprop.theory.predict import OUTSIDE_RANGE, PREACT_WARN_FRACTION
from noiseprop.theory.symbolic.batchnorm import batchnorm_lognormal_scales
from noiseprop.theory.targets import find_fold_pairs, folding_affine, resolve_targets

from ..compare import compare
from ..montecarlo import sweep

__all__ = ["folding_factors", "layer_gains", "PREDICT_SETTINGS", "MOMENT_SETTINGS", "THEORY_METHODS", "resolve_theory",
           "first_order_valid"]


def _norm_pairs(model):
    try:
        return find_fold_pairs(model)
    except Exception:  # noqa: BLE001 - a model without foldable pairs
        return []


def folding_factors(model) -> dict:
    """Per folded layer, the measured folding amplification and the theory's value
    (derivation ``batchnorm.folded_noise``).

    ``inflation``: the mean over output channels of the relative-noise variance
    inflation when noise hits the folded weights ``W' = diag(a) W`` instead of ``W``
    with BatchNorm digital (docs/THEORY.md §4): channel ``c`` is inflated by
    ``std(W')/(|a_c| std(W))``, so its variance by the square; ``≥ 1`` whenever the
    gains ``a_c`` differ (``E[a²]E[1/a²] ≥ 1`` for rows of equal spread).
    ``log_gain_std``: ``τ``, the spread of ``log|a_c|``; ``lognormal``: the closed form
    ``1/C + (1 − 1/C) e^{4τ²}`` of :func:`noiseprop.theory.symbolic.batchnorm.batchnorm_lognormal_scales`
    (log-normal gains, rows of equal spread).
    """
    closed = batchnorm_lognormal_scales().numeric("inflation_mean")
    mods = dict(model.named_modules())
    out = {}
    for conv_name, bn_name in _norm_pairs(model):
        w = mods[conv_name].weight.detach().double()
        a, _ = folding_affine(mods[bn_name])
        a = a.detach().double()
        wf = w * a.reshape((-1,) + (1,) * (w.dim() - 1))
        s, sf = w.std(correction=0), wf.std(correction=0)
        with torch.no_grad():
            infl = (sf / (a.abs() * s)) ** 2
        tau = float(torch.log(a.abs()).std(correction=1)) if a.numel() > 1 else 0.0
        out[conv_name] = {"inflation": float(infl[torch.isfinite(infl)].mean()), "log_gain_std": tau,
                          "lognormal": float(closed(tau=tau, C=int(a.numel()))) if tau > 0
                          else float("nan")}
    return out


#: predict_sweep settings for the studies: no Hutchinson probes (for these piecewise
#: linear networks the Gauss-Newton form ½ tr(H_z Cov f) equals ½ tr(Σ_ε H) exactly and
#: costs nothing more), no draws for the chip-to-chip spread, 512 quasi-Monte-Carlo
#: points per orthant probability.
PREDICT_SETTINGS = {"loss_probes": 0, "accuracy_draws": 0, "n_points": 512}

#: moment-propagation settings of the studies: 16 columns per input, no random features
#: for the second Hermite part (``h2_rank=0``) and chunks of 90 inputs. On the report's
#: models (seed 0, 180 inputs, η = 0.1 … 1.0, one thread) they cost 0.25 (MLP), 0.62
#: (VGG), 0.60 (ResNet-8) and 0.62 (ResNet-20) of the defaults (32, 16, 32), and their
#: predicted accuracy is within 1.25 points of the defaults' at every level (the largest:
#: ResNet-8 at η = 0.5, +0.60 against −0.63), while both miss Monte-Carlo by up to 3
#: (VGG) and 8–9 points (ResNet-20) at η = 0.5 (``benchmarks/moment_settings.py``). The
#: chunks of 90: the whole default report took 527 s against 586 s with chunks of 32
#: (``benchmarks/report_time.py``).
MOMENT_SETTINGS = {"rank": 16, "h2_rank": 0, "moment_chunk": 90}


class _StudyPrediction:
    """A Prediction whose ``loss_increase`` is its Gauss-Newton form (see
    :data:`PREDICT_SETTINGS`), as compared with Monte-Carlo."""

    def __init__(self, p):
        self._p = p

    def __getattr__(self, name):
        return getattr(self._p, name)

    @property
    def loss_increase(self):
        return self._p.loss_increase_gn

    @property
    def loss_increase_se(self):
        return 0.0


def _theory_curve(model, x, y, etas, targets, method):
    """The theory's Prediction at every level (``None`` at η = 0), from one pass of
    derivatives (:func:`noiseprop.theory.predict_sweep`)."""
    noisy = [e for e in etas if e > 0]
    settings = dict(PREDICT_SETTINGS, **(MOMENT_SETTINGS if method == "moments" else {}))
    curve = predict_sweep(model, x, y, RelativeGaussian(1.0), noisy, targets=targets, method=method, **settings)
    it = iter(curve.predictions)
    return [None if e == 0 else _StudyPrediction(next(it)) for e in etas]


def _compare_rows(pred, mc, calibrate: bool, alpha: float, confidence: float) -> list[dict]:
    c = compare(pred, mc, calibrate=calibrate, alpha=alpha, confidence=confidence)
    rows = []
    for _, r in c.to_frame().iterrows():
        d = {k: (None if (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()
             if k in ("quantity", "predicted", "observed", "ci_low", "ci_high", "tost_p", "margin_low",
                      "margin_high", "equivalent", "cal_slope", "cal_slope_ci_low", "cal_slope_ci_high",
                      "cal_intercept", "cal_intercept_ci_low", "cal_intercept_ci_high", "cal_f_pvalue", "cal_n")}
        rows.append(d)
    return rows


#: Theory methods of the grid: "linear" (first order), "moments" (moment propagation on
#: every curve, with :data:`MOMENT_SETTINGS`: the default grid's) or "auto": moments on
#: the MLP family only and the first order elsewhere (the cheapest overlay).
THEORY_METHODS = ("linear", "moments", "auto")


def resolve_theory(method: str, family: str) -> str:
    """The prediction method a model of ``family`` gets under the grid's ``method``.

    >>> resolve_theory("auto", "mlp"), resolve_theory("auto", "resnet"), resolve_theory("moments", "vgg")
    ('moments', 'linear', 'moments')
    """
    if method not in THEORY_METHODS:
        raise ValueError(f"theory must be one of {list(THEORY_METHODS)}, got {method!r}")
    if method == "auto":
        return "moments" if family == "mlp" else "linear"
    return method


def first_order_valid(preact_frac, flagged=None) -> np.ndarray:
    """Where the first order's validity diagnostic holds: ``predict`` did not flag it
    (``flagged``, its ``diagnostics["first_order_flagged"]``: the fraction of ReLU-like
    pre-activations with a predicted noise sd above their magnitude beyond
    :data:`noiseprop.theory.predict.PREACT_WARN_FRACTION`, or beyond ``PREACT_WARN_LOW``
    with a large predicted drop); without ``flagged`` (results cached before it was
    recorded), the fraction alone at most ``PREACT_WARN_FRACTION``."""
    f = np.asarray(preact_frac, float)
    if flagged is not None:
        g = np.asarray(flagged, float)  # NaN where not recorded: the fraction alone there
        alone = f <= PREACT_WARN_FRACTION
        return np.isfinite(f) & np.where(np.isfinite(g), g == 0, alone)
    return np.isfinite(f) & (f <= PREACT_WARN_FRACTION)


def _variant(model, x, y, grid: dict, targets, alpha, confidence, method: str | None = None) -> dict:
    """Monte-Carlo sweep + theory curve(s) + comparisons for one placement of the noise.

    ``method``: the prediction method compared with Monte-Carlo (default the grid's;
    "auto" is resolved by the caller). When it is "moments", the first-order curve is
    computed too (seconds) for its validity diagnostic and to be drawn where it holds."""
    method = method or grid["theory"]
    if method == "auto":
        method = "linear"
    etas = grid["etas"]
    sw = sweep(model, x, y, RelativeGaussian(1.0), etas, draws=grid["draws"], seed=grid["mc_seed"],
               targets=targets, keep_logits=True, progress=False)
    out = {"accuracies": sw.accuracies, "losses": sw.losses, "clean_accuracy": sw.clean_accuracy,
           "clean_loss": sw.clean_loss, "theory_method": method}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # the validity diagnostic is recorded per level (pred_preact_frac) and reported
            for words in OUTSIDE_RANGE.values():
                warnings.filterwarnings("ignore", message=words, category=RuntimeWarning)
            lin = _theory_curve(model, x, y, etas, targets, "linear")
            preds = lin if method == "linear" else _theory_curve(model, x, y, etas, targets, method)
    except Exception as e:  # noqa: BLE001 - recorded and shown in the report, never silent
        out["theory_error"] = f"{type(e).__name__}: {e}"
        return out
    out["theory_seconds"] = time.perf_counter() - t0
    pa, pl, plo, phi, pf, plin, pg = [], [], [], [], [], [], []
    comps = []
    first = next((i for i, e in enumerate(etas) if e > 0), None)
    for i, (eta, p, q) in enumerate(zip(etas, preds, lin)):
        if p is None:
            pa.append(sw.clean_accuracy)
            pl.append(0.0)
            plo.append(sw.clean_accuracy)
            phi.append(sw.clean_accuracy)
            pf.append(0.0)
            plin.append(sw.clean_accuracy)
            pg.append(0.0)
            continue
        pa.append(float(p.accuracy))
        plin.append(float(q.accuracy))
        pl.append(float(getattr(p, "loss_increase", float("nan"))))
        plo.append(float(getattr(p, "accuracy_lower", float("nan"))))
        phi.append(float(getattr(p, "accuracy_upper", float("nan"))))
        qd = dict(getattr(q, "diagnostics", {}) or {})
        pf.append(float(qd.get("preact_frac", float("nan"))))
        pg.append(float(qd.get("first_order_flagged", float("nan"))))
        rows = _compare_rows(p, sw.result(i), calibrate=(i == first), alpha=alpha, confidence=confidence)
        for r in rows:
            r["eta"] = float(eta)
            r["preact_frac"] = pf[-1]
            r["first_order_flagged"] = pg[-1]
            r["method"] = method
        comps.extend(rows)
    out.update(pred_accuracy=np.asarray(pa), pred_loss_increase=np.asarray(pl), pred_accuracy_lower=np.asarray(plo),
               pred_accuracy_upper=np.asarray(phi), pred_preact_frac=np.asarray(pf),
               pred_first_order_flagged=np.asarray(pg),
               pred_accuracy_linear=np.asarray(plin), compare=comps)
    return out


def _mechanisms(model, data, grid: dict, has_norm: bool) -> dict:
    """Folding factors, tr(Σ_ε H) (BN digital and folded), top Hessian eigenvalue and
    per-layer gains of one model."""
    n = min(grid["curvature_inputs"], data.n_train)
    xc, yc = data.x_train[:n], data.y_train[:n]
    unit = RelativeGaussian(1.0)
    out = {}
    tr = hessian_trace(model, xc, yc, noise=unit, probes=grid["trace_probes"], seed=grid["mc_seed"])
    out["trace_digital"], out["trace_digital_se"] = float(tr.estimate), float(tr.se)
    if has_norm:
        trf = hessian_trace(model, xc, yc, noise=unit, probes=grid["trace_probes"], seed=grid["mc_seed"],
                            targets=Targets(fold_bn=True))
        out["trace_folded"], out["trace_folded_se"] = float(trf.estimate), float(trf.se)
        out["folding_factors"] = folding_factors(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-convergence is recorded below
        eig = hessian_top_eigenvalue(model, xc, yc, tol=1e-2, maxiter=grid["eig_iters"], seed=grid["mc_seed"])
    out["top_eigenvalue"] = float(eig.eigenvalue)
    out["top_eigenvalue_converged"] = bool(eig.converged)
    out["top_eigenvalue_matvecs"] = int(eig.matvecs)
    ng = min(grid["gain_inputs"], data.n_test)
    if ng > 0:
        try:
            out["layer_gains"] = layer_gains(model, data.x_test[:ng], data.y_test[:ng])
        except Exception as e:  # noqa: BLE001 - recorded and shown in the report
            out["layer_gains_error"] = f"{type(e).__name__}: {e}"
    return out


def layer_gains(model, xg, yg) -> dict:
    """Per noisy layer ``l``: the first-order logit variance when only layer ``l``
    gets relative noise at η = 1 (``diag J_l diag(u_l²) J_lᵀ``, docs/THEORY.md §3: the
    layer's exact share of one Jacobian pass of
    :func:`noiseprop.theory.linearize.jacobian_pass` with ``per_layer=True``), averaged
    over inputs and classes and divided by the clean logits' spread across classes (mean
    squared deviation from each input's mean logit): the output noise power per unit η²
    contributed by that layer."""
    unit = RelativeGaussian(1.0)
    with torch.inference_mode():
        clean = model(xg).double()
    spread = float(((clean - clean.mean(1, keepdim=True)) ** 2).mean())
    lin = LinearizedNetwork(model)
    jp = jacobian_pass(lin, xg, lin.unit_scales(unit), per_layer=True)
    layers = dict.fromkeys(name.rsplit(".", 1)[0] for name in resolve_targets(model, None).names)
    shares = jp.layer_cov_unit
    return {layer: (float(torch.diagonal(shares[layer], dim1=-2, dim2=-1).double().mean()) / spread
                    if layer in shares else 0.0)  # a layer the inputs do not reach
            for layer in layers}
