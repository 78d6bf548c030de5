"""Flatness of the loss at the trained weights and the loss increase under noise
(THEORY.md §5).

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
* :func:`loss_increase`: ``E[ΔL] ≈ ½ tr(Σ_ε H)`` (second-order Taylor expansion; the
  first-order term has mean zero), and :func:`loss_increase_gauss_newton`, the
  Gauss-Newton form ``½ mean_i tr(H_z,i Cov f_i)`` with ``H_z = diag(p) − ppᵀ`` at the
  clean logits and the first-order logit covariance (THEORY.md §3). For networks that
  are piecewise linear in each weight (ReLU, max-pool, BatchNorm in eval) the
  Hessian's diagonal equals the Gauss-Newton diagonal almost everywhere, so the two
  forms estimate the same number: a consistency check.

Hessian-vector products are ``torch.func.jvp`` of ``torch.func.grad`` (forward over
reverse), accumulated over chunks of inputs so memory is bounded.

Library choice: curvlinops (``HessianLinearOperator`` + its Hutchinson/Hutch++
estimators) would give the same estimates; it is not a dependency here because the
noise-scaled probe ``σ ⊙ v`` and the input chunking are a few lines on top of
``torch.func``, and ``scipy.sparse.linalg.eigsh`` already provides Lanczos.
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
from torch.func import grad, jvp

from .linearize import LinearizedNetwork
from .noise import WeightNoise, parse_noise

__all__ = [
    "HessianTrace",
    "TopEigenvalue",
    "hessian_trace",
    "hessian_top_eigenvalue",
    "loss_increase",
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
            _, hv = jvp(g, (self.lin.target_params,), (tang,))
            for k in out:
                out[k] += hv[k].detach()
        return out

    def gradient(self) -> dict[str, torch.Tensor]:
        out = {k: torch.zeros_like(p) for k, p in self.lin.target_params.items()}
        for i in range(0, self.n, self.batch_size):
            xb = self.x[i:i + self.batch_size].to(self.lin.device)
            yb = self.y[i:i + self.batch_size].to(self.lin.device)
            g = grad(lambda tp: self._loss(tp, xb, yb))(self.lin.target_params)
            for k in out:
                out[k] += g[k].detach()
        return out

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


def _check_xy(lin: LinearizedNetwork, x, y):
    from .predict import _check_inputs  # shared boundary checks

    return _check_inputs(lin.net, x, y)


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

    def ci(self, confidence: float = 0.95) -> tuple[float, float]:
        from scipy import stats

        h = float(stats.t.ppf(0.5 + confidence / 2, max(self.probes - 1, 1))) * self.se
        return (self.estimate - h, self.estimate + h)

    def to_frame(self) -> pd.DataFrame:
        lo, hi = self.ci()
        what = "tr(Σ_ε H)" if self.noise else "tr(H)"
        return pd.DataFrame([dict(quantity=what, estimate=self.estimate, se=self.se, ci_low=lo, ci_high=hi,
                                  probes=self.probes, noise=self.noise, targets=self.targets, n_inputs=self.n_inputs)])

    def summary(self) -> str:
        lo, hi = self.ci()
        what = f"tr(Σ_ε H) under {self.noise}" if self.noise else "tr(H)"
        return (f"Hutchinson {what} on {self.targets} ({self.n_inputs} inputs, {self.probes} Rademacher probes): "
                f"{self.estimate:.6g} ± {self.se:.2g} (s.e.), 95% CI [{lo:.6g}, {hi:.6g}]")

    def __str__(self):
        return self.summary()


def _rademacher(shapes: Mapping[str, torch.Size], gen: torch.Generator, dtype, device) -> dict[str, torch.Tensor]:
    return {k: (torch.randint(0, 2, tuple(s), generator=gen, device=device).to(dtype) * 2 - 1) for k, s in shapes.items()}


def _check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _trace_probes(op: HessianOperator, scale: Mapping[str, torch.Tensor] | None, probes: int, seed: int) -> np.ndarray:
    gen = torch.Generator(device=op.lin.device).manual_seed(int(seed))
    vals = np.empty(probes)
    for j in range(probes):
        v = _rademacher(op.shapes, gen, op.lin.dtype, op.lin.device)
        if scale is not None:
            v = {k: v[k] * scale[k] for k in v}
        hv = op.hvp(v)
        vals[j] = float(sum((v[k].double() * hv[k].double()).sum() for k in v))
    return vals


def hessian_trace(model, x, y, noise=None, targets=None, probes: int = 100, seed: int = 0,
                  batch_size: int = 512) -> HessianTrace:
    """Hutchinson estimate of ``tr(H)`` or, with ``noise``, of ``tr(Σ_ε H)``.

    ``H`` is the Hessian of the mean cross-entropy over ``(x, y)`` with respect to the
    parameters selected by ``targets``. Probes are Rademacher vectors (scaled by the
    noise scale ``σ_θ`` when ``noise`` is given) drawn from a private generator seeded
    by ``seed``. See the module docstring (THEORY.md §5).
    """
    lin = LinearizedNetwork(model, targets)
    x, y = _check_xy(lin, x, y)
    probes = _check_int("probes", probes, 2)
    seed = _check_int("seed", seed, 0)
    op = HessianOperator(lin, x, y, batch_size=_check_int("batch_size", batch_size, 1))
    _check_labels_against(lin, x, y)
    scale = None
    nz = None
    if noise is not None:
        noise = parse_noise(noise)
        scale = lin.scales(noise)
        nz = noise.to_string()
    vals = _trace_probes(op, scale, probes, seed)
    return HessianTrace(estimate=float(vals.mean()), se=float(vals.std(ddof=1) / math.sqrt(probes)), probes=probes,
                        values=vals, noise=nz, targets=lin.plan.targets.describe(), n_inputs=int(x.shape[0]))


def _check_labels_against(lin, x, y):
    with torch.no_grad():
        c = lin.forward(x[:1].to(lin.device)).shape[-1]
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

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([dict(quantity="lambda_max", estimate=self.eigenvalue, converged=self.converged,
                                  matvecs=self.matvecs, tol=self.tol, noise=self.noise, targets=self.targets)])

    def summary(self) -> str:
        state = "converged" if self.converged else f"NOT converged within maxiter={self.maxiter}"
        what = f"of Σ^½HΣ^½ under {self.noise}" if self.noise else "of H"
        return f"top eigenvalue {what} on {self.targets}: {self.eigenvalue:.6g} ({state}, {self.matvecs} Hessian-vector products, tol {self.tol:g})"

    def __str__(self):
        return self.summary()


def hessian_top_eigenvalue(model, x, y, targets=None, noise=None, tol: float = 1e-3, maxiter: int = 200, seed: int = 0,
                           batch_size: int = 512, return_vector: bool = False, ncv: int = 20) -> TopEigenvalue:
    """Largest eigenvalue of the loss Hessian by Lanczos (``scipy.sparse.linalg.eigsh``,
    ``which="LA"``) on Hessian-vector products (``torch.func``), with relative
    tolerance ``tol`` and at most ``maxiter`` Lanczos restarts. ``seed`` fixes the start
    vector; ``ncv`` Lanczos vectors are kept between restarts. With ``noise``, the
    operator is ``Σ^½ H Σ^½`` (curvature in units of the noise). Non-convergence is reported (``converged=False``, with a warning), never
    silently returned as converged.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    lin = LinearizedNetwork(model, targets)
    x, y = _check_xy(lin, x, y)
    _check_labels_against(lin, x, y)
    maxiter = _check_int("maxiter", maxiter, 1)
    seed = _check_int("seed", seed, 0)
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    op = HessianOperator(lin, x, y, batch_size=_check_int("batch_size", batch_size, 1))
    scale = None
    nz = None
    if noise is not None:
        noise = parse_noise(noise)
        scale = lin.scales(noise)
        nz = noise.to_string()
    count = [0]

    def matvec(v):
        count[0] += 1
        d = op._unflatten(np.asarray(v).ravel())
        if scale is not None:
            d = {k: d[k] * scale[k].double().cpu() for k in d}
        hv = op.hvp(d)
        if scale is not None:
            hv = {k: hv[k] * scale[k] for k in hv}
        return op._flatten(hv)

    A = LinearOperator((op.numel, op.numel), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(op.numel)
    ncv = min(op.numel, _check_int("ncv", ncv, 3))
    try:
        if op.numel == 1:
            val = float(matvec(np.ones(1))[0])
            return TopEigenvalue(val, np.ones(1) if return_vector else None, True, count[0], float(tol), maxiter, nz,
                                 lin.plan.targets.describe())
        w, v = eigsh(A, k=1, which="LA", tol=tol, maxiter=maxiter, v0=v0, ncv=ncv)
        return TopEigenvalue(float(w[0]), v[:, 0] if return_vector else None, True, count[0], float(tol), maxiter, nz,
                             lin.plan.targets.describe())
    except ArpackNoConvergence as e:
        ev = e.eigenvalues
        val = float(ev.max()) if ev is not None and len(ev) else float("nan")
        warnings.warn(f"hessian_top_eigenvalue: Lanczos did not converge within maxiter={maxiter} (tol={tol}); "
                      f"returning the best estimate {val:.6g}", RuntimeWarning, stacklevel=2)
        vec = e.eigenvectors[:, int(np.argmax(ev))] if (return_vector and ev is not None and len(ev)) else None
        return TopEigenvalue(val, vec, False, count[0], float(tol), maxiter, nz, lin.plan.targets.describe())


def loss_increase(trace_sigma_h: float) -> float:
    """``E[ΔL] ≈ ½ tr(Σ_ε H)`` (THEORY.md §5)."""
    return 0.5 * float(trace_sigma_h)


def loss_increase_gauss_newton(clean_logits: torch.Tensor, logit_cov: torch.Tensor) -> float:
    """Gauss-Newton form ``½ mean_i tr(H_z,i Cov f_i)``, ``H_z = diag(p) − ppᵀ`` with
    ``p = softmax(f_i)`` at the clean logits (THEORY.md §5)."""
    p = torch.softmax(clean_logits.double(), dim=1)
    cov = logit_cov.double()
    diag = torch.diagonal(cov, dim1=1, dim2=2)
    tr = (p * diag).sum(1) - torch.einsum("na,nab,nb->n", p, cov, p)
    return 0.5 * float(tr.mean())
