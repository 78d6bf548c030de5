"""Flatness of the loss at the trained weights and the loss increase under noise
(docs/THEORY.md §5).

The loss is the mean cross-entropy over ``(x, y)``, as a function of the parameters
that get noise (the same :func:`~noiseprop.theory.targets.resolve_targets` selection as
Monte-Carlo and :func:`~noiseprop.theory.predict.predict`); ``H`` is its Hessian.

* :func:`hessian_trace`: Hutchinson's estimator ``tr(A) = E[vᵀ A v]`` with Rademacher
  ``v`` (Hutchinson 1990). With a noise model the probes are scaled by the noise scale,
  ``u = σ ⊙ v``, so that ``E[uᵀ H u] = tr(Σ_ε H)`` exactly: no diagonal estimate is
  needed. One probe has variance ``2(‖A‖_F² − Σ A_ii²)`` (``A = Σ^½ H Σ^½``); the
  standard error reported is the sample standard deviation of the probes over ``√probes``.
* :func:`hessian_top_eigenvalue`: Lanczos (ARPACK, ``scipy.sparse.linalg.eigsh``) on a
  ``LinearOperator`` of Hessian-vector products, with a tolerance and an iteration cap.
* ``E[ΔL] ≈ ½ tr(Σ_ε H)`` (second-order Taylor expansion; the first-order term has
  mean zero: half of :func:`hessian_trace` with noise), and
  :func:`loss_increase_gauss_newton`, the
  Gauss-Newton form ``½ mean_i tr(H_z,i Cov f_i)`` with ``H_z = diag(p) − ppᵀ`` at the
  clean logits and the first-order logit covariance (docs/THEORY.md §3). For networks that
  are piecewise linear in each weight (ReLU, max-pool, BatchNorm in eval) the
  Hessian's diagonal equals the Gauss-Newton diagonal almost everywhere, so the two
  forms estimate the same number: a consistency check.

Hessian-vector products are ``torch.func.jvp`` of ``torch.func.grad`` (forward over
reverse), accumulated over chunks of inputs so memory is bounded.

Library choice: curvlinops (``HessianLinearOperator`` + its Hutchinson/Hutch++
estimators) gives the same estimates; it is not a dependency. With the probes batched
(``vmap`` over the tangents of forward-over-reverse, :meth:`HessianOperator.hvp_batch`)
the hand-written operator was 1.25–1.4× *faster* than curvlinops' ``hutchinson_trace``
on the same Hessian (zoo MLP and ResNet-20 on 128 digits inputs, 32 probes; 3–5× faster
than one probe at a time), the noise-scaled probe ``σ ⊙ v`` and the input chunking are a
few lines on top of ``torch.func``, ``scipy.sparse.linalg.eigsh`` already provides
Lanczos, and curvlinops installs beside torch 2.13 only with a constraints file (its
dependency backpack otherwise pulls a newer torchvision and a CUDA torch).
``benchmarks/predict_vs_mc.py`` repeats the comparison when curvlinops is importable.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch.func import grad, jvp, vmap

from .linearize import LinearizedNetwork, check_noise_reaches, checkpointing_named
from .noise import parse_noise
from .validation import (check_bool, check_finite_logits, check_inputs, check_int, check_number, check_seed,
                         probe_logits)

__all__ = [
    "HessianTrace",
    "TopEigenvalue",
    "hessian_trace",
    "hessian_top_eigenvalue",
    "loss_increase_gauss_newton",
    "HessianOperator",
]


class HessianOperator:
    """Hessian-vector products of the mean cross-entropy over ``(x, y)`` with respect to
    the target parameters of a :class:`~noiseprop.theory.linearize.LinearizedNetwork`."""

    def __init__(self, lin: LinearizedNetwork, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512):
        self.lin = lin
        self.x = x
        self.y = y.long()
        self.n = x.shape[0]
        self.batch_size = int(batch_size)
        self.shapes = {k: v.shape for k, v in lin.target_params.items()}
        self.numel = sum(v.numel() for v in lin.target_params.values())

    def _loss(self, tp, xb, yb):
        out = self.lin.forward(xb, tp)
        return F.cross_entropy(out, yb, reduction="sum") / self.n

    def hvp(self, v: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``H v`` (a dict shaped like the target parameters)."""
        out = {k: torch.zeros_like(p) for k, p in self.lin.target_params.items()}
        tang = {k: v[k].to(dtype=self.lin.dtype, device=self.lin.device) for k in self.lin.names}
        for i in range(0, self.n, self.batch_size):
            xb = self.x[i:i + self.batch_size].to(self.lin.device)
            yb = self.y[i:i + self.batch_size].to(self.lin.device)
            g = grad(lambda tp: self._loss(tp, xb, yb))
            with checkpointing_named():  # activation checkpointing: torch.func refuses its hooks
                _, hv = jvp(g, (self.lin.target_params,), (tang,))
            for k in out:
                out[k] += hv[k].detach()
        return out

    def hvp_batch(self, V: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``H v_j`` for a batch of vectors ``V[name] [k, *shape]`` at once: ``vmap`` over
        the tangents of forward-over-reverse, so the forward and backward passes are
        shared by the ``k`` vectors (as curvlinops does). Inputs go in chunks of
        ``max(1, batch_size // 4)`` when ``k > 1`` (the tangents multiply the memory);
        one product at a time where an operation has no batching rule."""
        names = self.lin.names
        k = int(next(iter(V.values())).shape[0])
        tang = {n: V[n].to(dtype=self.lin.dtype, device=self.lin.device) for n in names}
        if k == 1:
            hv = self.hvp({n: t[0] for n, t in tang.items()})
            return {n: v.unsqueeze(0) for n, v in hv.items()}
        out = {n: torch.zeros_like(t) for n, t in tang.items()}
        step = max(1, self.batch_size // 4)
        try:
            for i in range(0, self.n, step):
                xb = self.x[i:i + step].to(self.lin.device)
                yb = self.y[i:i + step].to(self.lin.device)
                g = grad(lambda tp: self._loss(tp, xb, yb))

                def one(t):
                    return jvp(g, (self.lin.target_params,), (t,))[1]

                hv = vmap(one)(tang)
                for n in out:
                    out[n] += hv[n].detach()
            return out
        except RuntimeError:
            pass
        res = [self.hvp({n: t[j] for n, t in tang.items()}) for j in range(k)]
        return {n: torch.stack([r[n] for r in res]) for n in names}

    # flat numpy views for scipy
    def _unflatten(self, vec: np.ndarray) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float64))
        out, i = {}, 0
        for k in self.lin.names:
            n = int(np.prod(self.shapes[k])) if len(self.shapes[k]) else 1
            out[k] = t[i:i + n].reshape(self.shapes[k])
            i += n
        return out

    def _flatten(self, d: Mapping[str, torch.Tensor]) -> np.ndarray:
        return torch.cat([d[k].reshape(-1).double().cpu() for k in self.lin.names]).numpy()


def _noise_scale(lin: LinearizedNetwork, noise):
    """``(per-parameter noise scale, noise string)`` for scaled probes; ``(None, None)``
    without noise (plain Hessian)."""
    if noise is None:
        return None, None
    noise = parse_noise(noise)
    if not noise.zero_mean:  # scaled probes take a zero-mean covariance; a mean shift is not curvature
        raise ValueError(f"noise: {type(noise).__name__} noise ({noise.to_string()}) has a non-zero mean, and the "
                         "noise-scaled Hessian (tr(Σ_ε H), Σ^½ H Σ^½) takes zero-mean Gaussian noise (additive, relative, "
                         "relative-max, relative-channel, relative-max-channel, multiplicative) or None; for "
                         "hardware noise use predict(model, x, y, noise) or predict_drift(...)")
    return lin.scales(noise), noise.to_string()


def _check_xy(lin: LinearizedNetwork, x, y):
    x, y = check_inputs(lin.net, x, y)
    x1 = x[:1].to(lin.device)
    with warnings.catch_warnings():  # the probability warning comes once, from the caller's own probe
        warnings.simplefilter("ignore", UserWarning)
        probe_logits(lin.forward, x1, x.shape)  # "x does not fit the model", a tuple output: clear errors
    check_noise_reaches(lin, x1)  # a detached path: its curvature would be left out
    check_finite_logits(lin.logits(x))  # NaN/inf logits: a NaN trace, an ARPACK failure
    return x, y


@dataclass(frozen=True)
class HessianTrace:
    """Hutchinson estimate of ``tr(H)`` (no noise) or ``tr(Σ_ε H)`` (noise-scaled probes).

    ``values`` are the per-probe ``uᵀ H u``; ``se`` = their standard deviation / √probes.
    """

    estimate: float
    se: float
    probes: int
    values: np.ndarray
    noise: str | None
    targets: str
    n_inputs: int
    #: ``"hutchinson"`` or ``"hutch++"`` (then ``values`` are the residual probes and ``se``
    #: the standard error of the residual part, given the low-rank sketch)
    method: str = "hutchinson"
    #: Hutchinson: noisy module -> its block's share ``tr(Σ_l H_ll)`` (the shares add up to
    #: ``estimate``; per-probe sums over that module's parameters)
    layer_estimates: Mapping | None = None

    def ci(self, confidence: float = 0.95) -> tuple[float, float]:
        from scipy import stats  # lazy: scipy.stats adds ~0.7 s (measured, -X importtime) to importing theory

        h = float(stats.t.ppf(0.5 + confidence / 2, max(self.probes - 1, 1))) * self.se
        return (self.estimate - h, self.estimate + h)

    def to_frame(self) -> pd.DataFrame:
        lo, hi = self.ci()
        what = "tr(Σ_ε H)" if self.noise else "tr(H)"
        rows = [dict(quantity=what, layer=None, estimate=self.estimate, se=self.se, ci_low=lo, ci_high=hi,
                     probes=self.probes, method=self.method, noise=self.noise, targets=self.targets,
                     n_inputs=self.n_inputs)]
        for name, v in (self.layer_estimates or {}).items():
            rows.append(dict(quantity=what, layer=name, estimate=v, se=float("nan"), ci_low=float("nan"),
                             ci_high=float("nan"), probes=self.probes, method=self.method, noise=self.noise,
                             targets=self.targets, n_inputs=self.n_inputs))
        return pd.DataFrame(rows)

    def summary(self) -> str:
        lo, hi = self.ci()
        what = f"tr(Σ_ε H) under {self.noise}" if self.noise else "tr(H)"
        name = "Hutch++" if self.method == "hutch++" else "Hutchinson"
        unit = "Hessian-vector products" if self.method == "hutch++" else "Rademacher probes"
        s = (f"{name} {what} on {self.targets} ({self.n_inputs} inputs, {self.probes} {unit}): "
             f"{self.estimate:.6g} ± {self.se:.2g} (s.e.), 95% CI [{lo:.6g}, {hi:.6g}]")
        if self.layer_estimates:
            s += "\n  per layer: " + ", ".join(f"{k} {v:.4g}" for k, v in self.layer_estimates.items())
        return s

    def __str__(self):
        return self.summary()


def _rademacher(shapes: Mapping[str, torch.Size], gen: torch.Generator, dtype, device) -> dict[str, torch.Tensor]:
    return {k: (torch.randint(0, 2, tuple(s), generator=gen, device=device).to(dtype) * 2 - 1) for k, s in shapes.items()}


#: ``probe_batch=None`` (:func:`auto_probe_batch`): the vectors of one ``vmap`` group times
#: the noisy parameters are kept near this many elements (every product of the group
#: holds a tangent and a result of the parameters' size)...
PROBE_PARAMETER_ELEMENTS = 1 << 23
#: ... and the group times the inputs of a chunk times one input's activations below this
#: many (the tangents of the forward and backward graphs).
PROBE_ACTIVATION_ELEMENTS = 1 << 26


def activation_elements(lin: LinearizedNetwork, x: torch.Tensor) -> int:
    """Elements of every leaf module's output for one input (a one-input forward)."""
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    leaves = [m for m in lin.net.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            lin.forward(x[:1].to(lin.device))
    finally:
        for h in handles:
            h.remove()
    return max(1, total[0])


def auto_probe_batch(op: "HessianOperator", probes: int) -> int:
    """Hessian-vector products per ``vmap`` group for ``probes`` products on ``op``: as
    many as keep the group's parameter-sized tensors near :data:`PROBE_PARAMETER_ELEMENTS`
    and its activation tangents below :data:`PROBE_ACTIVATION_ELEMENTS`. Larger groups
    share one forward and backward over more vectors (per-operation overheads dominate on
    small networks) until their tensors leave the cache (``benchmarks/predict_vs_mc.py``
    cases, 16 inputs, one thread, seconds for 100 probes at groups of 16 / the best
    measured: ResNet-20 on digits 1.27-1.35 / 0.67 at 100; MLP 0.084 / 0.07 at 64; VGG
    2.8-3.2, best at 14-16, 3.6 at 32 and 5.4 at 100; 3×32×32 ResNet-20 16.2-17.2, 17.5
    at 8, 24.6 at 50). This gives 100, 100, 15 and 6 there."""
    by_params = -(-PROBE_PARAMETER_ELEMENTS // max(1, op.numel))
    step = min(op.n, max(1, op.batch_size // 4))
    by_acts = PROBE_ACTIVATION_ELEMENTS // (step * activation_elements(op.lin, op.x))
    return int(max(1, min(probes, by_params, by_acts)))


def _probe_batches(op: HessianOperator, scale, probes: int, seed: int, probe_batch: int):
    """Rademacher probes (scaled by ``scale``) in groups of ``probe_batch``, drawn in the
    same order as one at a time, with their Hessian-vector products."""
    gen = torch.Generator(device=op.lin.device).manual_seed(int(seed))
    done = 0
    while done < probes:
        k = min(probe_batch, probes - done)
        vs = [_rademacher(op.shapes, gen, op.lin.dtype, op.lin.device) for _ in range(k)]
        V = {n: torch.stack([v[n] for v in vs]) for n in op.lin.names}
        if scale is not None:
            V = {n: V[n] * scale[n] for n in V}
        yield V, op.hvp_batch(V)
        done += k


def _trace_probes(op: HessianOperator, scale: Mapping[str, torch.Tensor] | None, probes: int, seed: int,
                  probe_batch: int | None = None, per_layer: bool = False):
    """Per-probe ``vᵀ H v`` (``v`` scaled by ``scale``); with ``per_layer`` also the
    per-probe sums over each module's parameters (``{module: [probes]}``).
    ``probe_batch=None``: :func:`auto_probe_batch`."""
    if probe_batch is None:
        probe_batch = auto_probe_batch(op, probes)
    vals = np.zeros(probes)
    layers: dict[str, np.ndarray] = {}
    j = 0
    for V, HV in _probe_batches(op, scale, probes, seed, probe_batch):
        k = next(iter(V.values())).shape[0]
        for n in V:
            t = (V[n].double() * HV[n].double()).reshape(k, -1).sum(1).cpu().numpy()
            vals[j:j + k] += t
            if per_layer:
                m = n.rpartition(".")[0]
                layers.setdefault(m, np.zeros(probes))[j:j + k] += t
        j += k
    return (vals, layers) if per_layer else vals


def _flat_operator(op: HessianOperator, scale):
    """``A = S H S`` (``S = diag(scale)``, identity without noise) on flat ``[D, k]``
    float64 matrices, ``k`` products at a time."""
    names = op.lin.names
    sizes = [int(np.prod(op.shapes[n])) if len(op.shapes[n]) else 1 for n in names]
    sflat = None if scale is None else torch.cat([scale[n].reshape(-1).double().cpu() for n in names])

    def matmat(M: torch.Tensor, probe_batch: int) -> torch.Tensor:
        M = M if sflat is None else M * sflat[:, None]
        out = torch.empty_like(M)
        for j in range(0, M.shape[1], probe_batch):
            blk = M[:, j:j + probe_batch]
            V, i = {}, 0
            for n, sz in zip(names, sizes):
                V[n] = blk[i:i + sz].T.reshape((blk.shape[1],) + tuple(op.shapes[n])).to(op.lin.dtype)
                i += sz
            HV = op.hvp_batch(V)
            out[:, j:j + probe_batch] = torch.cat([HV[n].reshape(blk.shape[1], -1).double().cpu() for n in names], 1).T
        return out if sflat is None else out * sflat[:, None]

    return matmat, sum(sizes)


def _hutchpp(op: HessianOperator, scale, matvecs: int, seed: int,
             probe_batch: int | None) -> tuple[float, float, np.ndarray]:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): ``m/3`` products sketch the top
    of the spectrum, ``tr(QᵀAQ)`` is taken exactly on that sketch, and Hutchinson with the
    remaining ``m/3`` Rademacher probes on the deflated ``(I−QQᵀ)A(I−QQᵀ)``. Returns
    ``(estimate, s.e. of the residual part, residual probe values)``."""
    matmat, d = _flat_operator(op, scale)
    k = max(1, matvecs // 3)
    if probe_batch is None:
        probe_batch = auto_probe_batch(op, k)
    gen = torch.Generator().manual_seed(int(seed))
    S = (torch.randint(0, 2, (d, k), generator=gen).double() * 2 - 1)
    G = (torch.randint(0, 2, (d, matvecs - 2 * k), generator=gen).double() * 2 - 1)
    Q, _ = torch.linalg.qr(matmat(S, probe_batch))
    low = float((Q * matmat(Q, probe_batch)).sum())
    R = G - Q @ (Q.T @ G)
    vals = (R * matmat(R, probe_batch)).sum(0).numpy()
    se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
    return low + float(vals.mean()), se, vals


def hessian_trace(model, x, y, noise=None, targets=None, probes: int = 100, seed: int = 0,
                  batch_size: int = 512, *, method: str = "hutchinson", probe_batch: int | None = None,
                  per_layer: bool = False) -> HessianTrace:
    """Estimate of ``tr(H)`` or, with ``noise``, of ``tr(Σ_ε H)``.

    ``H`` is the Hessian of the mean cross-entropy over ``(x, y)`` with respect to the
    parameters selected by ``targets``. ``method="hutchinson"``: ``probes`` Rademacher
    vectors (scaled by the noise scale ``σ_θ`` when ``noise`` is given) drawn from a
    private generator seeded by ``seed``; ``method="hutch++"``: Hutch++ with ``probes``
    Hessian-vector products in all (lower variance when a few eigenvalues dominate).
    ``probe_batch`` products are computed at once (``vmap`` over the probes: one forward
    and backward pass shared by the group); ``None`` (default) chooses the group from the
    network's parameter and activation sizes (:func:`auto_probe_batch`; the values do not
    depend on it). ``per_layer=True`` (Hutchinson) also gives
    each noisy module's share ``tr(Σ_l H_ll)`` (``layer_estimates``; ½ of it is the
    module's share of the loss increase under noise). See the module docstring
    (docs/THEORY.md §5).

    Derivations ``flatness.quadratic`` (``E[ΔL] = ½ tr(Σ_ε H)``) and ``flatness.hutchinson``
    (the variance of one noise-scaled probe).

    >>> import torch
    >>> from noiseprop.theory.examples import tiny_problem
    >>> net, x, y = tiny_problem()  # a seeded ReLU net and the labels it gets right
    >>> from noiseprop.theory import RelativeGaussian
    >>> t = hessian_trace(net, x, y, noise=RelativeGaussian(0.1), probes=8, seed=0)
    >>> t.probes, t.values.shape
    (8, (8,))
    """
    lin = LinearizedNetwork(model, targets)
    x, y = _check_xy(lin, x, y)
    probes = check_int("probes", probes, 2)
    seed = check_seed("seed", seed)
    probe_batch = check_int("probe_batch", probe_batch, 1, allow_none=True)
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    if method == "hutch++" and probes < 6:
        raise ValueError(f"method='hutch++' needs probes >= 6 (a third sketch the range, a third project onto it, a third probe the rest), got {probes}")
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be True or False, got {per_layer!r}")
    if per_layer and method != "hutchinson":
        raise ValueError("per_layer=True is available with method='hutchinson' only")
    op = HessianOperator(lin, x, y, batch_size=check_int("batch_size", batch_size, 1))
    _check_labels_against(lin, x, y)
    scale, nz = _noise_scale(lin, noise)
    common = dict(probes=probes, noise=nz, targets=lin.plan.targets.describe(), n_inputs=int(x.shape[0]), method=method)
    if method == "hutch++":
        est, se, vals = _hutchpp(op, scale, probes, seed, probe_batch)
        return HessianTrace(estimate=est, se=se, values=vals, **common)
    vals, layers = _trace_probes(op, scale, probes, seed, probe_batch, per_layer=True)
    return HessianTrace(estimate=float(vals.mean()), se=float(vals.std(ddof=1) / math.sqrt(probes)), values=vals,
                        layer_estimates={m: float(v.mean()) for m, v in layers.items()} if per_layer else None,
                        **common)


def _check_labels_against(lin, x, y):
    c = probe_logits(lin.forward, x[:1].to(lin.device), x.shape).shape[-1]  # logits [1, C], or a clear error
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= c:
        raise ValueError(f"labels must lie in [0, {c}) for a model with {c} logits; found range [{lo}, {hi}]")


@dataclass(frozen=True)
class TopEigenvalue:
    """Largest (algebraic) eigenvalue of ``H`` (or of ``Σ^½ H Σ^½`` with a noise model),
    by Lanczos; ``converged`` is False when the iteration cap was hit first (then
    ``eigenvalue`` is ARPACK's best Ritz value so far, or NaN)."""

    eigenvalue: float
    eigenvector: np.ndarray | None
    converged: bool
    matvecs: int
    tol: float
    maxiter: int
    noise: str | None
    targets: str
    #: the ``k`` largest eigenvalues, descending (``which="largest"`` or ``"both"``)
    eigenvalues: np.ndarray | None = None
    #: the ``k`` smallest (most negative) eigenvalues, ascending (``which="smallest"`` or
    #: ``"both"``): the Hessian at a trained minimum of a ReLU network is indefinite
    smallest: np.ndarray | None = None

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for q, vals in (("lambda_max", self.eigenvalues), ("lambda_min", self.smallest)):
            for i, v in enumerate(vals if vals is not None else []):
                rows.append(dict(quantity=q, rank=i + 1, estimate=float(v), converged=self.converged,
                                 matvecs=self.matvecs, tol=self.tol, noise=self.noise, targets=self.targets))
        if not rows:
            rows.append(dict(quantity="lambda_max", rank=1, estimate=self.eigenvalue, converged=self.converged,
                             matvecs=self.matvecs, tol=self.tol, noise=self.noise, targets=self.targets))
        return pd.DataFrame(rows)

    def summary(self) -> str:
        state = "converged" if self.converged else f"NOT converged within maxiter={self.maxiter}"
        what = f"of Σ^½HΣ^½ under {self.noise}" if self.noise else "of H"
        s = f"top eigenvalue {what} on {self.targets}: {self.eigenvalue:.6g} ({state}, {self.matvecs} Hessian-vector products, tol {self.tol:g})"
        if self.eigenvalues is not None and len(self.eigenvalues) > 1:
            s += "\n  largest: " + ", ".join(f"{v:.6g}" for v in self.eigenvalues)
        if self.smallest is not None:
            s += "\n  smallest: " + ", ".join(f"{v:.6g}" for v in self.smallest)
        return s

    def __str__(self):
        return self.summary()


def hessian_top_eigenvalue(model, x, y, targets=None, noise=None, tol: float = 1e-3, maxiter: int = 200, seed: int = 0,
                           batch_size: int = 512, return_vector: bool = False, ncv: int = 20, *, k: int = 1,
                           which: str = "largest") -> TopEigenvalue:
    """Extreme eigenvalues of the loss Hessian by Lanczos (``scipy.sparse.linalg.eigsh``)
    on Hessian-vector products (``torch.func``), with relative tolerance ``tol`` and at
    most ``maxiter`` Lanczos restarts. ``seed`` fixes the start vector; ``ncv`` Lanczos
    vectors are kept between restarts (at least ``2k + 1``). ``which="largest"``: the
    ``k`` largest (``eigenvalue`` the largest, ``eigenvalues`` all ``k``, descending);
    ``"smallest"``: the ``k`` smallest, most negative (``eigenvalue`` the smallest,
    ``smallest`` all ``k``, ascending); ``"both"``: ``k`` from each end in one Lanczos run.
    With ``noise``, the operator is ``Σ^½ H Σ^½`` (curvature in units of the noise).
    Non-convergence is reported (``converged=False``, with a warning), never silently
    returned as converged.

    >>> import torch
    >>> from noiseprop.theory.examples import tiny_problem
    >>> net, x, y = tiny_problem()  # a seeded ReLU net and the labels it gets right
    >>> e = hessian_top_eigenvalue(net, x, y, k=2, which="both", tol=1e-6, maxiter=500)
    >>> len(e.eigenvalues), bool(e.eigenvalues[0] >= e.smallest[0])
    (2, True)
    """
    lin = LinearizedNetwork(model, targets)
    x, y = _check_xy(lin, x, y)
    _check_labels_against(lin, x, y)
    maxiter = check_int("maxiter", maxiter, 1)
    seed = check_seed("seed", seed)
    k = check_int("k", k, 1)
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    tol = check_number("tol", tol, 0.0)
    return_vector = check_bool("return_vector", return_vector)
    op = HessianOperator(lin, x, y, batch_size=check_int("batch_size", batch_size, 1))
    nev = 2 * k if which == "both" else k
    if nev >= op.numel and op.numel > 1:
        raise ValueError(f"k={k} asks for {nev} eigenvalues of a {op.numel}-dimensional Hessian: at most "
                         f"{op.numel - 1} (Lanczos)")
    scale, nz = _noise_scale(lin, noise)
    count = [0]

    def matvec(v):
        count[0] += 1
        d = op._unflatten(np.asarray(v).ravel())
        if scale is not None:
            d = {kk: d[kk] * scale[kk].double().cpu() for kk in d}
        hv = op.hvp(d)
        if scale is not None:
            hv = {kk: hv[kk] * scale[kk] for kk in hv}
        return op._flatten(hv)

    A = LinearOperator((op.numel, op.numel), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(op.numel)
    ncv = min(op.numel, max(check_int("ncv", ncv, 3), 2 * nev + 1))
    desc = lin.plan.targets.describe()

    def split(w, vecs):
        order = np.argsort(w)
        w, vecs = w[order], (vecs[:, order] if vecs is not None else None)
        if which == "largest":
            top, vtop, low = w[::-1], (vecs[:, ::-1] if vecs is not None else None), None
        elif which == "smallest":
            top, vtop, low = None, vecs, w
        else:
            top, low = w[k:][::-1], w[:k]
            vtop = vecs[:, k:][:, ::-1] if vecs is not None else None
        if which == "smallest":
            return float(low[0]), (vtop[:, 0] if (return_vector and vtop is not None) else None), None, low
        return float(top[0]), (vtop[:, 0] if (return_vector and vtop is not None) else None), top, low

    if op.numel == 1:
        val = float(matvec(np.ones(1))[0])
        arr = np.array([val])
        return TopEigenvalue(val, np.ones(1) if return_vector else None, True, count[0], float(tol), maxiter, nz, desc,
                             eigenvalues=arr if which != "smallest" else None,
                             smallest=arr if which != "largest" else None)
    mode = {"largest": "LA", "smallest": "SA", "both": "BE"}[which]
    try:
        w, v = eigsh(A, k=nev, which=mode, tol=tol, maxiter=maxiter, v0=v0, ncv=ncv, return_eigenvectors=True)
        val, vec, top, low = split(np.asarray(w), v)
        return TopEigenvalue(val, vec, True, count[0], float(tol), maxiter, nz, desc, eigenvalues=top, smallest=low)
    except ArpackNoConvergence as e:
        ev = e.eigenvalues
        if ev is not None and len(ev):
            val, vec, top, low = split(np.asarray(ev), e.eigenvectors)
            if which != "both" and len(ev) < k:
                pass
        else:
            val, vec, top, low = float("nan"), None, None, None
        warnings.warn(f"hessian_top_eigenvalue: Lanczos did not converge within maxiter={maxiter} (tol={tol}); "
                      f"returning the best estimate {val:.6g}", RuntimeWarning, stacklevel=2)
        return TopEigenvalue(val, vec, False, count[0], float(tol), maxiter, nz, desc, eigenvalues=top, smallest=low)


def loss_increase_gauss_newton(clean_logits: torch.Tensor, logit_cov: torch.Tensor) -> float:
    """Gauss-Newton form ``½ mean_i tr(H_z,i Cov f_i)``, ``H_z = diag(p) − ppᵀ`` with
    ``p = softmax(f_i)`` at the clean logits (docs/THEORY.md §5; derivation
    ``flatness.quadratic``); ``½ tr(Σ_ε H)`` exactly for piecewise-linear networks."""
    return float(gauss_newton_per_input(clean_logits, logit_cov).mean())


def gauss_newton_per_input(clean_logits: torch.Tensor, logit_cov: torch.Tensor) -> torch.Tensor:
    """``½ tr(H_z,i Cov f_i)`` per input (float64 ``[N]``), the terms whose mean is
    :func:`loss_increase_gauss_newton`."""
    p = torch.softmax(clean_logits.double(), dim=1)
    cov = logit_cov.double()
    diag = torch.diagonal(cov, dim1=1, dim2=2)
    return 0.5 * ((p * diag).sum(1) - torch.einsum("na,nab,nb->n", p, cov, p))
