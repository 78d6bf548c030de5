"""What the four studies share: the grid, the cells, the robustness metrics, the
findings and their verdicts.

A study is a grid of trained models (factors × training seeds). Each model is two
cells of the task graph (:mod:`noiseprop.empirical.executor`):

``train``
    :func:`train_cell`: trains the model (or loads it from the checkpoint cache of
    :func:`noiseprop.empirical.train.train`) and returns its clean accuracy and history.
``eval``
    :func:`eval_cell`: the measurements of one trained model, the same protocol for
    every study so that a model shared by two studies is measured once: a Monte-Carlo
    sweep over the η grid with relative noise ``σ_l = η·std(W_l)`` on the Conv/Linear
    weights (BatchNorm digital), and, for a model with normalisation layers, the same
    sweep with BatchNorm folded into the weights first; the theory's predicted curve
    for each (:func:`noiseprop.theory.predict`), the prediction-vs-Monte-Carlo
    comparison at every level (:func:`noiseprop.empirical.compare.compare`), and the
    mechanisms (folding amplification factors, ``tr(Σ_ε H)`` for both placements of the
    noise, the top Hessian eigenvalue, per-layer gains).

Common random numbers: every sweep uses the same ``mc_seed``, so models of the same
architecture (any seed, any normalisation, folded or not) see the very same
standard-normal draws, and within a sweep every η reuses them (THEORY.md §8).

Verdicts are computed, never written by hand (:func:`directional_verdict`,
:func:`equivalence_verdict`), from p-values adjusted by Holm's method over the findings
of a study.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..cells import config_key
from ..executor import Task
from ..stats import Effect, holm, mean_ci, tost_t

__all__ = [
    "Grid",
    "StudyPlan",
    "StudyResult",
    "Finding",
    "directional_verdict",
    "equivalence_verdict",
    "theory_verdict",
    "model_cells",
    "train_cell",
    "eval_cell",
    "curve_metrics",
    "model_frame",
    "curve_frame",
    "compare_frame",
    "finalise_findings",
    "CELL_VERSION",
]

#: Bumped whenever a change to the cell functions changes what they compute; part of
#: every cell configuration, so stored cells of an older protocol are not reused.
CELL_VERSION = 2

VERDICTS = ("reproduced", "contradicted", "inconclusive")


# ----------------------------------------------------------------------------
# The grid shared by every study
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """Scale and protocol shared by the studies.

    dataset, data_dir: :func:`noiseprop.empirical.data.load_dataset` arguments.
    etas: relative noise levels ``η`` (``σ_l = η·std(W_l)``); 0 is the clean network.
    draws: Monte-Carlo draws per level (common random numbers across levels and models).
    seeds: training seeds (the unit of replication of every test).
    mc_seed: the seed of the standard-normal draws, shared by every sweep.
    epochs: training epochs (``None``: the family default of
        :func:`noiseprop.empirical.train.default_train_config`).
    widths: per-family width overrides, e.g. ``{"vgg": 8}`` (``None``: defaults).
    n_test: test inputs used (``None``: all). n_train: training examples used (``None``:
        all; part of the data fingerprint, hence of every cell key).
    theory: the prediction method, ``"linear"`` or ``"moments"``.
    curvature_inputs: training inputs used for Hessian quantities.
    trace_probes, eig_iters: Hutchinson probes for ``tr(Σ_ε H)``; iterations cap of
        the top-eigenvalue solver.
    gain_inputs: test inputs used for the per-layer gains (0 disables them).
    alpha: level of every test; confidence: of every interval.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    etas: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
    draws: int = 20
    seeds: tuple = (0, 1, 2)
    mc_seed: int = 20240
    epochs: int | None = None
    widths: dict | None = None
    n_test: int | None = None
    n_train: int | None = None
    theory: str = "linear"
    curvature_inputs: int = 256
    trace_probes: int = 16
    eig_iters: int = 20
    gain_inputs: int = 64
    alpha: float = 0.05
    confidence: float = 0.95

    def __post_init__(self):
        etas = tuple(float(e) for e in self.etas)
        if len(etas) < 2 or any(not math.isfinite(e) or e < 0 for e in etas) or list(etas) != sorted(set(etas)):
            raise ValueError(f"etas must be at least two distinct increasing levels >= 0, got {self.etas!r}")
        from noiseprop.theory.noise import MAX_LEVEL
        from noiseprop.theory.validation import check_seed

        if max(etas) > MAX_LEVEL:
            raise ValueError(f"etas must be <= {MAX_LEVEL:.3g} (the noise variance must fit in float32), "
                             f"got {max(etas):g}")
        for s in self.seeds:
            check_seed("seeds", s)
        object.__setattr__(self, "etas", etas)
        seeds = tuple(int(s) for s in self.seeds)
        if len(seeds) < 1 or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct integers, got {self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)
        if not isinstance(self.draws, int) or self.draws < 2:
            raise ValueError(f"draws must be an integer >= 2, got {self.draws!r}")
        if self.theory not in ("linear", "moments"):
            raise ValueError(f"theory must be 'linear' or 'moments', got {self.theory!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"epochs must be None or an integer >= 1, got {self.epochs!r}")
        if self.widths is not None:
            object.__setattr__(self, "widths", dict(sorted(dict(self.widths).items())))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["etas"] = list(self.etas)
        d["seeds"] = list(self.seeds)
        return d

    def protocol(self) -> dict:
        """The part of the grid that defines an eval cell (hashed into its key)."""
        return {"etas": list(self.etas), "draws": self.draws, "mc_seed": self.mc_seed, "n_test": self.n_test,
                "theory": self.theory, "curvature_inputs": self.curvature_inputs,
                "trace_probes": self.trace_probes, "eig_iters": self.eig_iters, "gain_inputs": self.gain_inputs}

    def width(self, family: str):
        if self.widths and family in self.widths:
            return int(self.widths[family])
        return None


# ----------------------------------------------------------------------------
# Data (cached per process)
# ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _dataset_cached(spec_json: str):
    from ..data import load_dataset

    spec = json.loads(spec_json)
    return load_dataset(**spec)


def load_data(dataset: str, data_dir=None, n_train: int | None = None):
    """The dataset (cached per process), restricted to its first ``n_train`` training
    examples when given."""
    spec = {"name": dataset}
    if data_dir is not None:
        spec["data_dir"] = str(data_dir)
    data = _dataset_cached(json.dumps(spec, sort_keys=True))
    if n_train is not None and n_train < data.n_train:
        data = data.subset(n_train=int(n_train))
    return data


def _family_of(name: str) -> str:
    from ..models import _family

    return _family(name, None)[0]


# ----------------------------------------------------------------------------
# The cells
# ----------------------------------------------------------------------------
def _train(model: dict, train: dict, dataset: str, data_dir, seed: int, cache_dir, n_train=None):
    from ..train import train as _train_fn

    data = load_data(dataset, data_dir, n_train)
    return _train_fn(dict(model), data, seed=seed, cache_dir=cache_dir, progress=False, **train), data


def train_cell(model: dict, train: dict, dataset: str, data_dir, seed: int, cache_dir, n_train=None) -> dict:
    """Train one model (or load it from the checkpoint cache); return its clean
    accuracy, loss and per-epoch history (``{"diverged": message}`` when the loss
    became NaN: the model is then left out of the analysis, with a note)."""
    from ..train import TrainingDivergedError

    try:
        res, _ = _train(model, train, dataset, data_dir, seed, cache_dir, n_train)
    except TrainingDivergedError as e:
        return {"diverged": str(e)}
    h = res.history
    hist = h.to_dict() if hasattr(h, "to_dict") else {}
    return {"test_accuracy": float(res.test_accuracy), "train_accuracy": float(res.train_accuracy),
            "final": {k: float(v) for k, v in dict(res.final).items() if isinstance(v, (int, float))},
            "history": {k: [float(x) for x in v] for k, v in hist.items() if isinstance(v, (list, tuple))},
            "train_seconds": float(res.train_seconds), "cache_key": res.cache_key,
            "n_params": int(sum(p.numel() for p in res.model.parameters()))}


def _norm_pairs(model):
    from noiseprop.theory.targets import find_fold_pairs

    try:
        return find_fold_pairs(model)
    except Exception:  # noqa: BLE001 - a model without foldable pairs
        return []


def folding_factors(model) -> dict:
    """Per folded layer, the measured folding amplification and the theory's value
    (derivation ``batchnorm.folded_noise``).

    ``inflation``: the mean over output channels of the relative-noise variance
    inflation when noise hits the folded weights ``W' = diag(a) W`` instead of ``W``
    with BatchNorm digital (THEORY.md §4): channel ``c`` is inflated by
    ``std(W')/(|a_c| std(W))``, so its variance by the square; ``≥ 1`` whenever the
    gains ``a_c`` differ (``E[a²]E[1/a²] ≥ 1`` for rows of equal spread).
    ``log_gain_std``: ``τ``, the spread of ``log|a_c|``; ``lognormal``: the closed form
    ``1/C + (1 − 1/C) e^{4τ²}`` of :func:`noiseprop.theory.symbolic.batchnorm.batchnorm_lognormal_scales`
    (log-normal gains, rows of equal spread).
    """
    import torch

    from noiseprop.theory.targets import folding_affine

    try:
        from noiseprop.theory.symbolic.batchnorm import batchnorm_lognormal_scales

        closed = batchnorm_lognormal_scales().numeric("inflation_mean")
    except ImportError:  # the symbolic topic is optional here
        closed = None
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
                          "lognormal": float(closed(tau=tau, C=int(a.numel()))) if closed is not None and tau > 0
                          else float("nan")}
    return out


#: predict_sweep settings for the studies: no Hutchinson probes (for these piecewise
#: linear networks the Gauss-Newton form ½ tr(H_z Cov f) equals ½ tr(Σ_ε H) exactly and
#: costs nothing more), no draws for the chip-to-chip spread, 512 quasi-Monte-Carlo
#: points per orthant probability.
PREDICT_SETTINGS = {"loss_probes": 0, "accuracy_draws": 0, "n_points": 512}


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
    from noiseprop.theory import RelativeGaussian, predict_sweep

    noisy = [e for e in etas if e > 0]
    curve = predict_sweep(model, x, y, RelativeGaussian(1.0), noisy, targets=targets, method=method,
                          **PREDICT_SETTINGS)
    it = iter(curve.predictions)
    return [None if e == 0 else _StudyPrediction(next(it)) for e in etas]


def _compare_rows(pred, mc, calibrate: bool, alpha: float, confidence: float) -> list[dict]:
    from ..compare import compare

    c = compare(pred, mc, calibrate=calibrate, alpha=alpha, confidence=confidence, n_resamples=1000)
    rows = []
    for _, r in c.to_frame().iterrows():
        d = {k: (None if (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()
             if k in ("quantity", "predicted", "observed", "ci_low", "ci_high", "tost_p", "margin_low",
                      "margin_high", "equivalent", "cal_slope", "cal_slope_ci_low", "cal_slope_ci_high",
                      "cal_intercept", "cal_intercept_ci_low", "cal_intercept_ci_high", "cal_f_pvalue", "cal_n")}
        rows.append(d)
    return rows


def _variant(model, x, y, grid: dict, targets, alpha, confidence) -> dict:
    """Monte-Carlo sweep + theory curve + comparisons for one placement of the noise."""
    from noiseprop.theory import RelativeGaussian

    from ..montecarlo import sweep

    etas = grid["etas"]
    sw = sweep(model, x, y, RelativeGaussian(1.0), etas, draws=grid["draws"], seed=grid["mc_seed"],
               targets=targets, keep_logits=True, progress=False)
    out = {"accuracies": sw.accuracies, "losses": sw.losses, "clean_accuracy": sw.clean_accuracy,
           "clean_loss": sw.clean_loss}
    t0 = time.perf_counter()
    import warnings

    try:
        with warnings.catch_warnings():
            # the validity diagnostic is recorded per level (pred_preact_frac) and reported
            warnings.filterwarnings("ignore", message="first order outside its range", category=RuntimeWarning)
            preds = _theory_curve(model, x, y, etas, targets, grid["theory"])
    except Exception as e:  # noqa: BLE001 - recorded and shown in the report, never silent
        out["theory_error"] = f"{type(e).__name__}: {e}"
        return out
    out["theory_seconds"] = time.perf_counter() - t0
    pa, pl, plo, phi, pf = [], [], [], [], []
    comps = []
    first = next((i for i, e in enumerate(etas) if e > 0), None)
    for i, (eta, p) in enumerate(zip(etas, preds)):
        if p is None:
            pa.append(sw.clean_accuracy)
            pl.append(0.0)
            plo.append(sw.clean_accuracy)
            phi.append(sw.clean_accuracy)
            pf.append(0.0)
            continue
        pa.append(float(p.accuracy))
        pl.append(float(getattr(p, "loss_increase", float("nan"))))
        plo.append(float(getattr(p, "accuracy_lower", float("nan"))))
        phi.append(float(getattr(p, "accuracy_upper", float("nan"))))
        pf.append(float(dict(getattr(p, "diagnostics", {}) or {}).get("preact_frac", float("nan"))))
        rows = _compare_rows(p, sw.result(i), calibrate=(i == first), alpha=alpha, confidence=confidence)
        for r in rows:
            r["eta"] = float(eta)
            r["preact_frac"] = pf[-1]
        comps.extend(rows)
    out.update(pred_accuracy=np.asarray(pa), pred_loss_increase=np.asarray(pl), pred_accuracy_lower=np.asarray(plo),
               pred_accuracy_upper=np.asarray(phi), pred_preact_frac=np.asarray(pf), compare=comps)
    return out


def _mechanisms(model, data, grid: dict, has_norm: bool) -> dict:
    """Folding factors, tr(Σ_ε H) (BN digital and folded), top Hessian eigenvalue and
    per-layer gains of one model."""
    import warnings

    from noiseprop.theory import RelativeGaussian, Targets
    from noiseprop.theory.flatness import hessian_top_eigenvalue, hessian_trace

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
    gets relative noise at η = 1 (``diag J_l diag(u_l²) J_lᵀ``, THEORY.md §3, from one
    Jacobian pass of :func:`noiseprop.theory.linearize.jacobian_pass` per layer),
    averaged over inputs and classes and divided by the clean logits' spread across
    classes (mean squared deviation from each input's mean logit): the output noise
    power per unit η² contributed by that layer."""
    import torch

    from noiseprop.theory import RelativeGaussian, Targets
    from noiseprop.theory.linearize import LinearizedNetwork, jacobian_pass
    from noiseprop.theory.targets import resolve_targets

    unit = RelativeGaussian(1.0)
    with torch.inference_mode():
        clean = model(xg).double()
    spread = float(((clean - clean.mean(1, keepdim=True)) ** 2).mean())
    gains = {}
    for name in resolve_targets(model, None).names:
        layer = name.rsplit(".", 1)[0]
        lin = LinearizedNetwork(model, Targets(layers=(layer,)))
        jp = jacobian_pass(lin, xg, lin.unit_scales(unit))
        gains[layer] = float(torch.diagonal(jp.cov_unit, dim1=-2, dim2=-1).double().mean()) / spread
    return gains


def eval_cell(model: dict, train: dict, dataset: str, data_dir, seed: int, cache_dir, grid: dict,
              alpha: float = 0.05, confidence: float = 0.95, n_train=None, deps=None) -> dict:
    """All measurements of one trained model (see the module doc)."""
    from noiseprop.theory import Targets

    from ..models import count_norm_layers

    if deps and any(isinstance(d, dict) and d.get("diverged") for d in deps.values()):
        return {"diverged": True, "variants": {}}
    res, data = _train(model, train, dataset, data_dir, seed, cache_dir, n_train)
    net = res.model.eval()
    n = data.n_test if grid["n_test"] is None else min(grid["n_test"], data.n_test)
    x, y = data.x_test[:n], data.y_test[:n]
    has_norm = count_norm_layers(net) > 0
    out = {"has_norm": has_norm, "variants": {}}
    t0 = time.perf_counter()
    out["variants"]["digital"] = _variant(net, x, y, grid, Targets(), alpha, confidence)
    if has_norm:
        out["variants"]["folded"] = _variant(net, x, y, grid, Targets(fold_bn=True), alpha, confidence)
    out["mc_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        out["mechanisms"] = _mechanisms(net, data, grid, has_norm)
    except Exception as e:  # noqa: BLE001 - recorded and shown in the report
        out["mechanisms"] = {"error": f"{type(e).__name__}: {e}"}
    out["mechanism_seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyPlan:
    """A study's cells: ``tasks`` for the executor and ``index``, one row per trained
    model with its factors and the keys of its ``train`` and ``eval`` cells."""

    name: str
    title: str
    tasks: tuple
    index: pd.DataFrame
    params: dict

    @property
    def n_models(self) -> int:
        return len(self.index)


def model_cells(study: str, grid: Grid, arch: str, norm: str = "none", norm_layers=None, seed: int = 0,
                cache_dir=None, train_overrides: dict | None = None, factors: dict | None = None):
    """The ``train`` and ``eval`` tasks of one model, and its index row.

    ``train_overrides`` replace defaults of
    :func:`noiseprop.empirical.train.default_train_config` (e.g. ``lr``).
    """
    from ..models import model_spec
    from ..train import default_train_config

    data = load_data(grid.dataset, grid.data_dir, grid.n_train)
    family = _family_of(arch)
    d = default_train_config(arch, norm=norm, dataset=data.name)
    width = grid.width(family)
    spec = model_spec(arch, list(data.in_shape), int(data.num_classes), norm=norm, norm_layers=norm_layers,
                      width=d["width"] if width is None else width, depth=d["depth"])
    tcfg = {k: d[k] for k in ("lr", "epochs", "batch_size", "momentum", "weight_decay", "schedule", "warmup_epochs")}
    if grid.epochs is not None:
        tcfg["epochs"] = grid.epochs
    tcfg.update(train_overrides or {})
    common = {"model": spec, "train": tcfg, "dataset": grid.dataset, "data_fingerprint": data.fingerprint,
              "seed": int(seed), "version": CELL_VERSION}
    tconf = dict(common, kind="train")
    tkey = config_key(tconf)
    kwargs = {"model": spec, "train": tcfg, "dataset": grid.dataset, "data_dir": grid.data_dir, "seed": int(seed),
              "cache_dir": None if cache_dir is None else str(cache_dir), "n_train": grid.n_train}
    label = f"{arch} norm={spec['norm']}" + (f" k={spec['norm_layers']}" if spec["norm_layers"] is not None else "") + \
        "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in (train_overrides or {}).items()) + \
        f" seed={seed}"
    ttask = Task(tkey, train_cell, kwargs, tconf, label=f"train {label}", group=study)
    econf = dict(common, kind="eval", protocol=grid.protocol(), alpha=grid.alpha, confidence=grid.confidence)
    ekey = config_key(econf)
    ekw = dict(kwargs, grid=grid.protocol(), alpha=grid.alpha, confidence=grid.confidence)
    etask = Task(ekey, eval_cell, ekw, econf, deps=(tkey,), label=f"measure {label}", group=study)
    row = {"arch": arch, "family": family, "norm": spec["norm"],
           "n_norm": _n_norm(spec), "seed": int(seed), "lr": tcfg["lr"], "train_key": tkey, "eval_key": ekey}
    row.update(factors or {})
    return [ttask, etask], row


def _n_norm(spec: dict) -> int:
    from ..models import norm_places

    if spec["norm"] == "none":
        return 0
    if spec["norm_layers"] is not None:
        return int(spec["norm_layers"])
    return int(norm_places(spec["name"], spec["depth"]))


# ----------------------------------------------------------------------------
# Metrics of one accuracy-vs-η curve
# ----------------------------------------------------------------------------
def eta_drop(etas, acc, clean, drop: float = 0.10) -> float:
    """The η at which the accuracy curve first falls ``drop`` below ``clean`` (linear
    interpolation between grid levels); ``inf`` when it never does on the grid."""
    etas = np.asarray(etas, float)
    acc = np.asarray(acc, float)
    target = clean - drop
    below = np.nonzero(acc <= target)[0]
    if below.size == 0:
        return float("inf")
    j = int(below[0])
    if j == 0:
        return float(etas[0])
    e0, e1, a0, a1 = etas[j - 1], etas[j], acc[j - 1], acc[j]
    return float(e0 + (a0 - target) * (e1 - e0) / (a0 - a1)) if a0 != a1 else float(e1)


def curve_metrics(etas, acc, clean) -> dict:
    """``auc``: the area under accuracy-vs-η divided by the η range (the mean accuracy
    over the range, trapezoid rule); ``robustness``: the normalised accuracy
    ``acc(η)/clean`` averaged over the noisy levels (η > 0), the measure of the BatchNorm
    paper (arXiv 2205.07372); ``eta10``: the η at which accuracy falls 10 points."""
    etas = np.asarray(etas, float)
    acc = np.asarray(acc, float)
    auc = float(np.trapezoid(acc, etas) / (etas[-1] - etas[0]))
    noisy = etas > 0
    rob = float(np.mean(acc[noisy] / clean)) if clean > 0 else float("nan")
    return {"auc": auc, "robustness": rob, "eta10": eta_drop(etas, acc, clean)}


def model_frame(plan: StudyPlan, results: dict, grid: Grid) -> pd.DataFrame:
    """One row per (model, noise placement): factors, clean accuracy, observed and
    predicted curve metrics, mechanisms."""
    rows = []
    for _, r in plan.index.iterrows():
        ev = results[r["eval_key"]]
        tr = results[r["train_key"]]
        if ev.get("diverged"):
            continue  # listed by diverged_notes()
        mech = ev.get("mechanisms", {})
        for variant, v in ev["variants"].items():
            acc = np.asarray(v["accuracies"]).mean(axis=1)
            loss = np.asarray(v["losses"]).mean(axis=1)
            clean = float(v["clean_accuracy"])
            noisy = np.asarray(grid.etas) > 0
            m = curve_metrics(grid.etas, acc, clean)
            row = {k: r[k] for k in plan.index.columns if k not in ("train_key", "eval_key")}
            row.update(variant=variant, clean_accuracy=clean, **m, clean_loss=float(v["clean_loss"]),
                       noise_loss=float(np.mean(loss[noisy] - float(v["clean_loss"]))),
                       train_test_accuracy=tr["test_accuracy"], n_params=tr["n_params"])
            if "pred_accuracy" in v:
                pm = curve_metrics(grid.etas, np.asarray(v["pred_accuracy"]), clean)
                row.update({f"pred_{k}": val for k, val in pm.items()})
                row["pred_noise_loss"] = float(np.mean(np.asarray(v["pred_loss_increase"])[noisy]))
            else:
                row.update(pred_auc=np.nan, pred_robustness=np.nan, pred_eta10=np.nan, pred_noise_loss=np.nan)
            row["theory_error"] = v.get("theory_error", "")
            for k in ("trace_digital", "trace_folded", "top_eigenvalue"):
                row[k] = mech.get(k, np.nan)
            if not ev.get("has_norm", True):  # nothing to fold: the folded network is the network
                row["trace_folded"] = mech.get("trace_digital", np.nan)
            ff = mech.get("folding_factors") or {}
            geo = lambda k: float(np.exp(np.mean(np.log([d[k] for d in ff.values()])))) if ff else np.nan  # noqa: E731
            row["folding_inflation"] = geo("inflation")
            row["folding_inflation_lognormal"] = geo("lognormal")
            lg = mech.get("layer_gains") or {}
            row["layer_gain_total"] = float(sum(lg.values())) if lg else np.nan
            row["mechanism_error"] = mech.get("error", "")
            rows.append(row)
    return pd.DataFrame(rows)


def layer_gain_frame(plan: StudyPlan, results: dict) -> pd.DataFrame:
    """Per model and noisy layer: the per-layer gain (:func:`layer_gains`) and, for
    layers followed by a BatchNorm-like layer, the measured folding inflation, the
    spread of log BN gains and the log-normal closed form (:func:`folding_factors`)."""
    rows = []
    for _, r in plan.index.iterrows():
        ev = results[r["eval_key"]]
        mech = ev.get("mechanisms", {}) if not ev.get("diverged") else {}
        gains = mech.get("layer_gains") or {}
        ff = mech.get("folding_factors") or {}
        for layer in list(dict.fromkeys(list(gains) + list(ff))):
            row = {k: r[k] for k in plan.index.columns if k not in ("train_key", "eval_key")}
            row.update(layer=layer, gain=gains.get(layer, np.nan))
            f = ff.get(layer, {})
            row.update(folding_inflation=f.get("inflation", np.nan), log_gain_std=f.get("log_gain_std", np.nan),
                       folding_inflation_lognormal=f.get("lognormal", np.nan))
            rows.append(row)
    return pd.DataFrame(rows)


def diverged_notes(plan: StudyPlan, results: dict) -> list[str]:
    """One note per model whose training diverged (left out of every table)."""
    out = []
    for _, r in plan.index.iterrows():
        tr = results[r["train_key"]]
        if isinstance(tr, dict) and tr.get("diverged"):
            out.append(f"training diverged, model left out: {tr['diverged']}")
    return out


def curve_frame(plan: StudyPlan, results: dict, grid: Grid) -> pd.DataFrame:
    """One row per (model, noise placement, η): observed accuracy (mean over draws,
    t interval), loss, predicted accuracy and bounds."""
    rows = []
    for _, r in plan.index.iterrows():
        ev = results[r["eval_key"]]
        for variant, v in ev["variants"].items():
            A = np.asarray(v["accuracies"])
            Lo = np.asarray(v["losses"])
            for i, eta in enumerate(grid.etas):
                m, se, (lo, hi) = mean_ci(A[i], grid.confidence)
                row = {k: r[k] for k in plan.index.columns if k not in ("train_key", "eval_key")}
                row.update(variant=variant, eta=eta, accuracy=m, accuracy_se=se, accuracy_ci_low=lo,
                           accuracy_ci_high=hi, loss=float(Lo[i].mean()),
                           clean_accuracy=float(v["clean_accuracy"]))
                for k in ("pred_accuracy", "pred_accuracy_lower", "pred_accuracy_upper", "pred_loss_increase",
                          "pred_preact_frac"):
                    row[k] = float(np.asarray(v[k])[i]) if k in v else np.nan
                rows.append(row)
    return pd.DataFrame(rows)


def compare_frame(plan: StudyPlan, results: dict) -> pd.DataFrame:
    """One row per (model, noise placement, η, quantity) of prediction vs Monte-Carlo."""
    rows = []
    for _, r in plan.index.iterrows():
        ev = results[r["eval_key"]]
        for variant, v in ev["variants"].items():
            for c in v.get("compare", []):
                row = {k: r[k] for k in plan.index.columns if k not in ("train_key",)}
                row.update(variant=variant, **c)
                rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------
# Findings and verdicts
# ----------------------------------------------------------------------------
def directional_verdict(p: float, estimate: float, expected_sign: int, alpha: float) -> str:
    """``reproduced`` when the effect is significant (``p < alpha``) in the claimed
    direction, ``contradicted`` when significant in the opposite one, else
    ``inconclusive``."""
    if not (np.isfinite(p) and np.isfinite(estimate)):
        return "inconclusive"
    if p < alpha and np.sign(estimate) == np.sign(expected_sign):
        return "reproduced"
    if p < alpha and np.sign(estimate) == -np.sign(expected_sign):
        return "contradicted"
    return "inconclusive"


def equivalence_verdict(effect: Effect, margin: float, alpha: float) -> tuple[str, float]:
    """For a claim of *no difference*: TOST of ``|difference| < margin`` on the effect
    (its estimate, standard error and degrees of freedom). ``reproduced`` when
    equivalence is shown (TOST p < alpha), ``contradicted`` when the ``1 − 2α``
    interval lies wholly outside ``[−margin, margin]`` (a difference larger than the
    margin is shown), else ``inconclusive``. Returns ``(verdict, tost_p)``."""
    if not (np.isfinite(effect.se) and effect.se > 0 and np.isfinite(effect.estimate)):
        return "inconclusive", float("nan")
    p, _, _ = tost_t(effect.estimate, effect.se, effect.df, -margin, margin)
    from scipy import stats as st

    q = st.t.ppf(1 - alpha, effect.df) if np.isfinite(effect.df) else st.norm.ppf(1 - alpha)
    lo, hi = effect.estimate - q * effect.se, effect.estimate + q * effect.se
    if p < alpha:
        return "reproduced", p
    if lo > margin or hi < -margin:
        return "contradicted", p
    return "inconclusive", p


def theory_verdict(verdict_of_prediction: str | None) -> str:
    """What the theory's predicted values say about a claim, from the same test run on
    them: ``predicted`` / ``predicted the opposite`` / ``not predicted`` / ``no
    prediction`` (theory unavailable)."""
    return {"reproduced": "predicted", "contradicted": "predicted the opposite",
            "inconclusive": "not predicted", None: "no prediction"}[verdict_of_prediction]


@dataclass(frozen=True)
class Finding:
    """One claim, its test on the measurements and the same test on the theory's
    predictions.

    ``kind``: "direction" (``expected_sign`` ±1) or "equivalence" (``margin``).
    ``effect``: the test on measurements; ``theory_effect``: on predicted values.
    ``p_holm``: ``effect.p_value`` (or the TOST p for equivalence) adjusted by Holm over
    the findings of the study; ``verdict`` and ``theory`` are computed from it by
    :func:`finalise_findings`.
    """

    study: str
    claim: str
    source: str
    kind: str
    effect: Effect
    expected_sign: int = 0
    margin: float = float("nan")
    theory_effect: Effect | None = None
    p_raw: float = float("nan")
    p_holm: float = float("nan")
    verdict: str = "inconclusive"
    theory: str = "no prediction"
    note: str = ""

    def to_dict(self) -> dict:
        e, t = self.effect, self.theory_effect
        return {"study": self.study, "claim": self.claim, "source": self.source, "test": e.method,
                "effect": e.estimate, "unit": e.unit, "ci_low": e.ci_low, "ci_high": e.ci_high,
                "effect_size": e.standardized, "n": e.n, "p": self.p_raw, "p_holm": self.p_holm,
                "verdict": self.verdict, "theory": self.theory,
                "theory_effect": t.estimate if t is not None else np.nan,
                "theory_ci_low": t.ci_low if t is not None else np.nan,
                "theory_ci_high": t.ci_high if t is not None else np.nan,
                "theory_p": t.p_value if t is not None else np.nan, "note": self.note}


def _raw_p(f: Finding, alpha: float) -> float:
    if f.kind == "equivalence":
        return equivalence_verdict(f.effect, f.margin, alpha)[1]
    return f.effect.p_value


def finalise_findings(findings: Sequence[Finding], alpha: float) -> list[Finding]:
    """Holm-adjust the findings' p-values (within the study) and compute every
    verdict from the adjusted values; the theory's verdict from the same test on the
    predicted values (Holm-adjusted over the theory tests of the study)."""
    findings = list(findings)
    if not findings:
        return []
    raw = np.array([_raw_p(f, alpha) for f in findings])
    adj, _ = holm(raw, alpha)
    traw = np.array([(_raw_p(replace(f, effect=f.theory_effect), alpha) if f.theory_effect is not None else np.nan)
                     for f in findings])
    tadj, _ = holm(traw, alpha)
    out = []
    for f, p, pa, tp in zip(findings, raw, adj, tadj):
        v = _verdict_from(f, f.effect, pa, alpha)
        tv = None
        if f.theory_effect is not None and np.isfinite(tp):
            tv = _verdict_from(f, f.theory_effect, tp, alpha)
        out.append(replace(f, p_raw=float(p), p_holm=float(pa), verdict=v, theory=theory_verdict(tv)))
    return out


def _verdict_from(f: Finding, effect: Effect, p_adj: float, alpha: float) -> str:
    if f.kind == "equivalence":
        v, _ = equivalence_verdict(effect, f.margin, alpha)
        if v == "reproduced" and not p_adj < alpha:
            return "inconclusive"
        return v
    return directional_verdict(p_adj, effect.estimate, f.expected_sign, alpha)


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyResult:
    """A study's tables (``tables``: name → DataFrame, each written as a CSV), its
    findings, and what it was run with (``params``)."""

    name: str
    title: str
    params: dict
    tables: dict
    findings: tuple
    notes: tuple = ()
    figures: tuple = ()

    def findings_frame(self) -> pd.DataFrame:
        return pd.DataFrame([f.to_dict() for f in self.findings])

    def summary(self) -> str:
        lines = [f"{self.title}"]
        for f in self.findings:
            lines.append(f"  [{f.verdict}] {f.claim}: {f.effect.describe()}; Holm p={f.p_holm:.3g}; theory: {f.theory}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        return self.findings_frame()

    def __str__(self):
        return self.summary()


def seed_paired(frame: pd.DataFrame, value: str, factor: str, a, b, keys: Sequence[str] = ("seed",)):
    """Values of ``value`` for levels ``a`` and ``b`` of ``factor``, matched on
    ``keys`` (the training seed): two aligned arrays for a paired test."""
    fa = frame[frame[factor] == a].set_index(list(keys))[value]
    fb = frame[frame[factor] == b].set_index(list(keys))[value]
    idx = fa.index.intersection(fb.index).sort_values()
    return fa.loc[idx].to_numpy(float), fb.loc[idx].to_numpy(float)


def seed_matrix(frame: pd.DataFrame, col: str, level: str) -> tuple[list, np.ndarray]:
    """``(levels, M)`` with ``M[s, j]`` the mean of ``col`` for seed ``s`` (sorted) at
    level ``j`` of ``level`` (NaN where a seed lacks a level)."""
    piv = frame.pivot_table(index="seed", columns=level, values=col, aggfunc="mean", dropna=False)
    return list(piv.columns), piv.sort_index().to_numpy(float)


def bootstrap_seed_means(M: np.ndarray, stat: Callable[[np.ndarray], np.ndarray], n_resamples: int = 2000,
                         seed: int = 0, confidence: float = 0.95) -> tuple[float, float, np.ndarray]:
    """Percentile interval of ``stat`` over resamples of the training seeds, for
    statistics of the per-level means: each resample draws the rows (seeds) of ``M``
    with replacement and averages them per level; ``stat`` maps the ``[R, levels]``
    array of resampled means to ``R`` values (vectorised)."""
    rng = np.random.default_rng(seed)
    S = M.shape[0]
    idx = rng.integers(0, S, size=(int(n_resamples), S))
    with np.errstate(all="ignore"), warnings_ignored():
        means = np.nanmean(M[idx], axis=1)
        vals = np.asarray(stat(means), float)
    ok = vals[np.isfinite(vals)]
    a = (1 - confidence) / 2
    if ok.size < 0.5 * n_resamples:
        return float("nan"), float("nan"), vals
    return float(np.quantile(ok, a)), float(np.quantile(ok, 1 - a)), vals


def warnings_ignored():
    import warnings

    cm = warnings.catch_warnings()

    class _Ctx:
        def __enter__(self):
            cm.__enter__()
            warnings.simplefilter("ignore", RuntimeWarning)

        def __exit__(self, *exc):
            return cm.__exit__(*exc)

    return _Ctx()


# ----------------------------------------------------------------------------
# Aggregation over seeds
# ----------------------------------------------------------------------------
def seed_summary(frame: pd.DataFrame, by: Sequence[str], cols: Sequence[str], confidence: float = 0.95) -> pd.DataFrame:
    """Mean over training seeds of each column in ``cols`` per group ``by``, with the
    Student-t interval across seeds (``<col>_ci_low``/``_ci_high``) and ``n_seeds``."""
    rows = []
    for key, d in frame.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["n_seeds"] = int(d["seed"].nunique())
        for c in cols:
            v = d[c].to_numpy(float)
            v = v[np.isfinite(v)]
            if v.size == 0:
                row[c], row[f"{c}_ci_low"], row[f"{c}_ci_high"] = np.nan, np.nan, np.nan
                continue
            m, _, (lo, hi) = mean_ci(v, confidence)
            row[c], row[f"{c}_ci_low"], row[f"{c}_ci_high"] = m, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def curves_figure_frame(curves: pd.DataFrame, group: Callable[[pd.Series], str], confidence: float = 0.95,
                        panel: Callable[[pd.Series], str] | None = None) -> pd.DataFrame:
    """The data of a ``curves`` figure: per group and η, the mean over seeds of each
    model's Monte-Carlo accuracy with a t interval across seeds (a single seed: its
    Monte-Carlo interval), and the mean predicted accuracy."""
    c = curves.copy()
    c["group"] = c.apply(group, axis=1)
    c["panel"] = c.apply(panel, axis=1) if panel is not None else ""
    rows = []
    for (p, g, eta), d in c.groupby(["panel", "group", "eta"], sort=False):
        v = d["accuracy"].to_numpy(float)
        if v.size >= 2:
            m, _, (lo, hi) = mean_ci(v, confidence)
        else:
            m, lo, hi = float(v[0]), float(d["accuracy_ci_low"].iloc[0]), float(d["accuracy_ci_high"].iloc[0])
        pred = d["pred_accuracy"].to_numpy(float)
        rows.append({"panel": p, "group": g, "eta": eta, "accuracy": m, "ci_low": lo, "ci_high": hi,
                     "predicted": float(np.mean(pred)) if np.isfinite(pred).all() else np.nan,
                     "n_seeds": int(d["seed"].nunique())})
    out = pd.DataFrame(rows)
    if panel is None:
        out = out.drop(columns="panel")
    return out


def calibration_figure_frame(comp: pd.DataFrame, quantity: str, group: Callable[[pd.Series], str]) -> pd.DataFrame:
    """The data of a ``calibration`` figure: one point per (model, noise placement, η)
    for ``quantity``."""
    d = comp[comp["quantity"] == quantity].copy() if "quantity" in comp.columns else comp.iloc[0:0]
    if d.empty:
        return pd.DataFrame(columns=["group", "predicted", "observed", "ci_low", "ci_high"])
    d["group"] = d.apply(group, axis=1)
    cols = [c for c in ("group", "arch", "norm", "n_norm", "seed", "variant", "eta", "predicted", "observed",
                        "ci_low", "ci_high", "tost_p") if c in d.columns]
    return d[cols].reset_index(drop=True)


def validation_tables(comp: pd.DataFrame, alpha: float, confidence: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prediction vs Monte-Carlo over all cells of a study: per quantity, the number of
    cells, the median |relative error|, the TOST equivalences after Holm's correction
    (within the quantity), and the calibration regression of observed on predicted
    across cells (log scale for variances and the loss increase). Returns
    ``(cells, summary)``."""
    from ..stats import calibration

    if comp.empty or "quantity" not in comp.columns:
        return comp, pd.DataFrame()
    comp = comp.copy()
    comp["tost_p_holm"] = np.nan
    comp["equivalent_holm"] = False
    rows = []
    for q, idx in comp.groupby("quantity", sort=False).groups.items():
        p = comp.loc[idx, "tost_p"].to_numpy(float)
        adj, rej = holm(p, alpha)
        comp.loc[idx, "tost_p_holm"] = adj
        comp.loc[idx, "equivalent_holm"] = rej
        sub = comp.loc[idx]
        obs, pred = sub["observed"].to_numpy(float), sub["predicted"].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(pred - obs) / np.abs(obs)
        inside = (sub["ci_low"].to_numpy(float) <= pred) & (pred <= sub["ci_high"].to_numpy(float))
        cal = calibration(obs, pred, log=q in ("logit_var", "loss_increase", "accuracy_std"), confidence=confidence)
        rows.append({"quantity": q, "cells": int(len(sub)), "median_abs_rel_error": float(np.nanmedian(rel)),
                     "ci_contains_prediction": float(np.mean(inside)),
                     "equivalent_after_holm": int(np.sum(rej)), **{f"cal_{k}": v for k, v in cal.to_dict().items()}})
    return comp, pd.DataFrame(rows)


def validation_by_eta(comp: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Where the theory holds: per noise placement and η, for the accuracy, the number
    of cells, the median and largest |predicted − observed| (accuracy points), the
    share of cells whose Monte-Carlo interval contains the prediction, the median
    relative error of the logit variance, and the mean first-order validity diagnostic
    (fraction of ReLU pre-activations whose predicted noise sd exceeds their magnitude)."""
    if comp.empty or "quantity" not in comp.columns:
        return pd.DataFrame()
    rows = []
    for (variant, eta), d in comp.groupby(["variant", "eta"], sort=True):
        a = d[d["quantity"] == "accuracy"]
        v = d[d["quantity"] == "logit_var"]
        err = (a["predicted"] - a["observed"]).abs().to_numpy(float)
        inside = ((a["ci_low"] <= a["predicted"]) & (a["predicted"] <= a["ci_high"])).to_numpy(bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            vrel = np.abs((v["predicted"] - v["observed"]) / v["observed"]).to_numpy(float)
        rows.append({"variant": variant, "eta": float(eta), "cells": int(len(a)),
                     "accuracy_median_abs_error": float(np.median(err)) if err.size else np.nan,
                     "accuracy_max_abs_error": float(np.max(err)) if err.size else np.nan,
                     "accuracy_ci_contains_prediction": float(np.mean(inside)) if inside.size else np.nan,
                     "logit_var_median_rel_error": float(np.nanmedian(vrel)) if vrel.size else np.nan,
                     "preact_frac": float(d["preact_frac"].astype(float).mean()) if "preact_frac" in d else np.nan})
    return pd.DataFrame(rows)
