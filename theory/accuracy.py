"""Accuracy under noise from Gaussian logits (docs/THEORY.md §7).

Per input ``i`` with label ``y`` the noisy logits are modelled as ``f ~ N(μ_i, Σ_i)``.
The input stays correctly classified when every margin ``D_k = f_y − f_k`` (``k ≠ y``)
is positive; ``D ~ N(m, S)`` with ``m_k = μ_y − μ_k`` and
``S_kl = Σ_yy − Σ_yl − Σ_ky + Σ_kl``. So

    P_i(correct) = P(D > 0) = Φ_S(m)          (an orthant probability, C − 1 dimensions)

and the expected accuracy is ``mean_i P_i(correct)``, inputs that are wrong when clean
included (their ``m`` has a negative entry). Pairwise (Bonferroni) bounds, with
``p_k = Φ(−m_k/s_k)`` and ``s_k² = S_kk``:

    max_k p_k  ≤  P(error)  ≤  min(1, Σ_k p_k).

The orthant probability is computed by Genz's separation-of-variables transform
(Genz 1992, "Numerical computation of multivariate normal probabilities", J. Comput.
Graph. Stat. 1:141; the algorithm behind ``scipy.stats.multivariate_normal.cdf``), with
the Genz–Bretz reordering (most restrictive margin first) and randomised quasi-Monte
Carlo points (scrambled Sobol, a fixed seed) shared by all inputs, vectorised over
inputs in torch (float64). Inputs whose pairwise bounds already agree to ``1e-9`` skip
the integration. This is thousands of times faster than calling scipy per input and
agrees with it to about ``1e-4`` per input (tests/theory/test_accuracy.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .validation import check_int

__all__ = [
    "margin_moments",
    "orthant_probability",
    "OrthantCurve",
    "CorrectCurve",
    "pairwise_error_bounds",
    "correct_probability",
    "sampled_accuracies",
    "DEFAULT_N_POINTS",
]

_SQRT2 = math.sqrt(2.0)


def _phi_cdf(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:  # erfc is vectorised on the CPU, ndtr is not (same float32 accuracy)
        return torch.erfc(x * (-1.0 / _SQRT2)).mul_(0.5)
    return torch.special.ndtr(x)


def _other_classes(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[N, C−1]`` indices of the classes other than ``y`` (in increasing order)."""
    ar = torch.arange(num_classes - 1, device=y.device).expand(y.shape[0], -1)
    return ar + (ar >= y[:, None]).long()


def margin_moments(mean: torch.Tensor, cov: torch.Tensor, y: torch.Tensor,
                   ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``m [N, C−1]`` and covariance ``S [N, C−1, C−1]`` of the margins
    ``D_k = f_y − f_k`` (``k ≠ y``, increasing ``k``) for ``f ~ N(mean, cov)``. ``ids``
    (``[N, C]``, optional): the class each column stands for, where the columns are slots
    of a subset of classes (``predict(classes=k)``); exact ties go to the lower class."""
    mean = mean.double()
    cov = cov.double()
    n, c = mean.shape
    if cov.shape != (n, c, c):
        raise ValueError(f"cov must have shape {(n, c, c)}, got {tuple(cov.shape)}")
    y = y.long()
    idx = _other_classes(y, c)  # [N, C-1]
    rows = torch.arange(n, device=mean.device)
    m = mean[rows, y][:, None] - mean.gather(1, idx)
    # an exact tie goes to the lower class index, as argmax breaks it (the clean accuracy,
    # Monte-Carlo): +0 where the label comes first, −0 where class k does; a tie that no
    # noise moves is then decided by that sign (_safe_ratio), one with noise is Φ(0) = ½
    first = idx > y[:, None] if ids is None else ids.to(idx.device).gather(1, idx) > ids.to(idx.device).gather(1, y[:, None])
    m = torch.where(m == 0, torch.where(first, 0.0, -0.0).to(m.dtype), m)
    syy = cov[rows, y, y]  # [N]
    syk = cov[rows, y].gather(1, idx)  # [N, C-1]: Σ_yk
    skk = cov.gather(1, idx[:, :, None].expand(-1, -1, c)).gather(2, idx[:, None, :].expand(-1, c - 1, -1))
    s = syy[:, None, None] + skk - syk[:, None, :] - syk[:, :, None]
    return m, s


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` for a margin's standardised value, with a margin that carries no noise
    (``den = 0``: a zero level, or the factor's jitter lost in float32) read as the limit:
    ``+∞`` if ``num > 0``, ``−∞`` if ``num < 0``, and for a tie (``num = ±0``) the infinity
    of its sign (``margin_moments`` signs a tied margin by argmax's tie-break: the lower
    class index wins), never ``0/0``. Shared by the pairwise bounds and the
    separation-of-variables loop."""
    pos = den > 0
    if bool(pos.all()):  # the usual case: the same values, without the masks (a third of the cost)
        return num / den
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.copysign(torch.full_like(num, math.inf), num))


def pairwise_error_bounds(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, lower, upper)`` for ``P(D > 0)``: ``p_k = Φ(−m_k/s_k)``; the probability of
    staying correct lies in ``[1 − min(1, Σ_k p_k), 1 − max_k p_k]`` (Bonferroni)."""
    return pairwise_bounds_sd(m, torch.diagonal(s, dim1=-2, dim2=-1).clamp_min(0).sqrt())


def pairwise_bounds_sd(m: torch.Tensor, sd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`pairwise_error_bounds` from the margins' standard deviations ``sd [N, d]``
    alone (all the bounds need: no ``[N, d, d]`` covariance to form per level)."""
    with torch.no_grad():
        z = _safe_ratio(-m, sd)
    p = _phi_cdf(z)
    lower = 1.0 - p.sum(dim=1).clamp(max=1.0)
    upper = 1.0 - p.max(dim=1).values
    return p, lower, upper


#: Working precision of the separation-of-variables loop (the QMC error, ~1e-4 at 1024
#: points, dwarfs float32 rounding: the estimates differ from a float64 loop by < 1e-7,
#: at half the cost). Factorisation, bounds and results stay float64.
SOV_DTYPE = torch.float32

#: Quasi-Monte-Carlo points per orthant probability in ``predict``, ``predict_sweep``,
#: ``predict_drift`` and the sensitivity calls. Against 8,192 (zoo MLP, VGG and ResNet-20 on
#: digits, 359 inputs, ten levels η = 0.02 … 1) the expected accuracy moves by at most
#: 2.4e-4 at 256 points (2.5e-5 at 1,024), and by at most 4.8e-4 (per input 4.7e-3) for
#: 100 classes at a level that takes accuracy to 12% (``benchmarks/predict_vs_mc.py
#: --parts qmc``): a fortieth of the 1-point fidelity target, at a third to a quarter of
#: the integration's cost of 1,024 points.
DEFAULT_N_POINTS = 256
#: Most QMC points per orthant probability (64 times the default; the benchmarks' reference
#: is 8192): the points are held for every input at once, so 2**34 exhausted memory.
MAX_N_POINTS = 2**14


def check_n_points(n_points) -> int:
    """``n_points`` of the orthant probabilities: an integer in ``[16, MAX_N_POINTS]``."""
    return check_int("n_points", n_points, 16, MAX_N_POINTS)

_SOBOL_CACHE: dict = {}


def _qmc_points(dim: int, n_points: int, seed: int) -> torch.Tensor:
    key = (dim, n_points, seed)
    if key not in _SOBOL_CACHE:
        from scipy.stats import qmc  # lazy: scipy.stats adds ~0.7 s (measured, -X importtime) to importing theory

        m = int(math.ceil(math.log2(max(n_points, 2))))
        pts = qmc.Sobol(d=max(dim, 1), scramble=True, seed=np.random.default_rng(seed)).random_base2(m)
        if len(_SOBOL_CACHE) > 32:
            _SOBOL_CACHE.clear()
        _SOBOL_CACHE[key] = torch.from_numpy(pts[:n_points]).double()
    return _SOBOL_CACHE[key]


def _factor(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Level-independent part of the orthant integral of ``D ~ N(m, η² S)``: the
    Genz–Bretz order (increasing ``m_k/s_k``: at any level ``η`` this is decreasing
    ``p_k = Φ(−m_k/(η s_k))``, so the margins that matter at a level are always a prefix),
    ``m`` in that order, and the Cholesky factor ``L`` of the reordered ``S`` (with a
    relative jitter of ``1e-10``; eigenvalues clipped at 0 where ``S`` is not positive
    semi-definite within rounding). The factor of ``η² S`` restricted to the first ``k``
    margins is ``η L[:k, :k]``. Returns ``(order, m_ordered, L, sd)``."""
    n, d = m.shape
    sd = torch.diagonal(s, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    order = torch.argsort(m / sd.clamp_min(1e-300), dim=1, stable=True)
    mo = m.gather(1, order)
    so = s.gather(1, order[:, :, None].expand(-1, -1, d)).gather(2, order[:, None, :].expand(-1, d, -1))
    scale = torch.diagonal(so, dim1=-2, dim2=-1).amax(dim=1).clamp_min(1e-300)
    eye = torch.eye(d, dtype=s.dtype, device=s.device)
    L, info = torch.linalg.cholesky_ex(so + 1e-10 * scale[:, None, None] * eye)
    bad = torch.nonzero(info != 0).flatten()
    if bad.numel():  # not positive semi-definite within rounding: clip eigenvalues
        w, v = torch.linalg.eigh(so[bad])
        sb = (v * w.clamp_min(0)[:, None, :]) @ v.mT
        L[bad] = torch.linalg.cholesky(sb + 1e-8 * scale[bad, None, None] * eye)
    return order, mo, L, sd


#: ``Φ⁻¹`` by ``√2 erfinv(2q − 1)`` inside ``[q, 1 − q]`` for this ``q`` (float32 error below
#: 1e-5 there), ``torch.special.ndtri`` in the tails (where ``2q − 1`` loses ``q``'s digits).
_NDTRI_TAIL = 1e-3


def _ndtri(q: torch.Tensor) -> torch.Tensor:
    """``Φ⁻¹(q)``; for float32 the vectorised ``erfinv`` form in the bulk (three times faster
    than ``torch.special.ndtri``, which is not vectorised on the CPU) and ``ndtri`` in the
    tails; float64 exactly ``ndtri``."""
    if q.dtype != torch.float32:
        return torch.special.ndtri(q)
    x = torch.erfinv(q * 2.0 - 1.0).mul_(math.sqrt(2.0))
    tail = torch.nonzero(((q < _NDTRI_TAIL) | (q > 1.0 - _NDTRI_TAIL)).view(-1)).squeeze(1)
    if tail.numel():
        xf = x.view(-1)
        xf[tail] = torch.special.ndtri(q.reshape(-1)[tail])
    return x


def _sov(m: torch.Tensor, L: torch.Tensor, u: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """Genz's separation of variables for ``P(Z < m)``, ``Z ~ N(0, L Lᵀ)`` (``L`` lower
    triangular, the variables already in Genz–Bretz order); ``u`` are ``[M, d−1]`` points
    in the unit cube. Returns ``[n]`` estimates (float64).

    ``live`` (optional, non-increasing over the rows): row ``r`` has only its first
    ``live[r]`` margins, the rest ``m = +∞``. Their factors are ``Φ(∞) = 1`` and their
    ``w`` feed only later margins of the same row, so step ``i`` runs on the rows with
    ``live > i`` alone (a prefix): the same estimates without the padded work."""
    n, d = m.shape
    if live is None:
        rows_at = [n] * d
    else:
        rows_at = [int(k) for k in (live[None, :] > torch.arange(d, device=live.device)[:, None]).sum(1).tolist()]
    M = u.shape[0]
    fi = torch.finfo(m.dtype)
    tiny, top = fi.tiny, 1.0 - fi.eps
    ut = u.T.contiguous()  # [d-1, M]
    # a margin without noise (zero level, or the jitter lost in float32): the safe ratio,
    # only then (it costs half the loop's time)
    ratio = _safe_ratio if bool((torch.diagonal(L, dim1=1, dim2=2) <= 0).any()) else torch.div
    e = _phi_cdf(ratio(m[:, 0], L[:, 0, 0]))[:, None].expand(n, M)  # [n, M]
    f = e.clone()
    ws = torch.empty(n, d, M, dtype=m.dtype, device=m.device)
    for i in range(1, d):
        k = rows_at[i]  # the rows whose margin i is live
        if k == 0:
            break
        ws[:k, i - 1] = _ndtri((ut[None, i - 1] * e[:k]).clamp_(tiny, top))
        # constraint i: Σ_{j<i} L_ij w_j + L_ii w_i < m_i
        acc = torch.bmm(L[:k, i:i + 1, :i], ws[:k, :i]).squeeze(1)  # [k, M]
        e = _phi_cdf(ratio(m[:k, i, None] - acc, L[:k, i, i, None]))
        f[:k] *= e
    return f.mean(dim=1, dtype=torch.float64)


class OrthantCurve:
    """``P(D > 0)`` for ``D ~ N(m, η² S)`` at any level ``η``, per row, with the
    level-independent work (Genz–Bretz order, Cholesky factor, QMC points) done once:
    :meth:`at` costs only the separation-of-variables integration of the rows that are
    uncertain at that level. A zero-mean noise family linear in its level has logit
    covariance ``η² S₁``, so one ``OrthantCurve`` serves a whole accuracy curve;
    :func:`orthant_probability` is ``OrthantCurve(m, s).at(1.0)``.

    Genz's separation of variables with randomised QMC (``n_points`` scrambled Sobol
    points, ``seed``); rows whose pairwise bounds differ by less than ``bound_tol`` use
    the bound (exact to that tolerance); one margin: the exact ``Φ(m/(η s))``.
    Margins that can hardly be violated (``p_k = Φ(−m_k/(η s_k)) ≤ bound_tol / d``) are
    left out of the integral: ``P(D_A > 0) − Σ_{k∉A} p_k ≤ P(D > 0) ≤ P(D_A > 0)`` for the
    kept set ``A``, so the result moves by at most ``bound_tol`` while the integral runs
    in ``|A|`` dimensions (rows grouped by ``|A|``; the first ``|A| − 1`` coordinates of
    the same Sobol points). ``A`` is a prefix of the Genz–Bretz order at every level.

    >>> import torch
    >>> m = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    >>> curve = OrthantCurve(m, torch.eye(2, dtype=torch.float64)[None])
    >>> [round(float(curve.at(lv)[0][0]), 4) for lv in (0.5, 1.0)]  # Φ(1/η)·Φ(2/η)
    [0.9772, 0.8222]
    """

    def __init__(self, m: torch.Tensor, s: torch.Tensor, n_points: int = 2048, seed: int = 0,
                 bound_tol: float = 1e-9, max_elements: int = 2**23, lazy: bool = False):
        m = m.double()
        s = s.double()
        if m.dim() != 2 or s.shape != (m.shape[0], m.shape[1], m.shape[1]):
            raise ValueError(f"m must be [N, d] and S [N, d, d]; got {tuple(m.shape)} and {tuple(s.shape)}")
        self.m = m  # S is needed only through its factor and its diagonal (kept until factored when lazy)
        self.n_points, self.seed, self.bound_tol, self.max_elements = int(n_points), int(seed), bound_tol, max_elements
        self._s = None
        if m.shape[1] == 1:
            self.order, self.m_ordered, self.L = None, m, None
            self.sd = torch.diagonal(s, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        elif lazy:  # factor a row when a level first needs its integral (one level: only those rows)
            n, d = m.shape
            self._s, self._factored = s, torch.zeros(n, dtype=torch.bool, device=m.device)
            self.order = torch.empty(n, d, dtype=torch.long, device=m.device)
            self.m_ordered, self.L = torch.empty_like(m), torch.empty_like(s)
            self.sd = torch.diagonal(s, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        else:
            self.order, self.m_ordered, self.L, self.sd = _factor(m, s)
        self._u = {}  # QMC points per point count

    def _factor_rows(self, idx: torch.Tensor):
        """Factor the rows ``idx`` not yet factored (``lazy`` curves only)."""
        if self._s is None:
            return
        need = idx[~self._factored[idx]]
        if need.numel():
            o, mo, L, _ = _factor(self.m[need], self._s[need])
            self.order[need], self.m_ordered[need], self.L[need] = o, mo, L
            self._factored[need] = True

    def bounds(self, level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`pairwise_error_bounds` at ``level``: ``(p_k, lower, upper)``."""
        return pairwise_bounds_sd(self.m, self.sd * abs(float(level)))

    def at(self, level: float = 1.0, n_points: int | None = None, bound_tol: float | None = None,
           mean_tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P(D > 0), lower, upper)`` per row at ``level`` (pairwise bounds as in
        :func:`pairwise_error_bounds`); ``n_points`` and ``bound_tol`` override the
        curve's own for this level (the factor is shared).

        ``mean_tol`` > 0 is for callers that use only the mean over the rows: rows are
        left to the middle of their bounds, narrowest first, while the sum of their
        half-widths stays within ``mean_tol`` times the number of rows, so the mean moves
        by at most ``mean_tol`` (a row's own value then only within its bounds)."""
        lv = float(level)
        npnt = self.n_points if n_points is None else int(n_points)
        btol = self.bound_tol if bound_tol is None else float(bound_tol)
        pk, lower, upper = self.bounds(lv)
        out = upper.clone()
        n, d = self.m.shape
        if d == 1:
            return out, lower, upper  # exact: 1 − Φ(−m/s)
        gap = upper - lower
        todo = torch.nonzero(gap > btol).flatten()
        if mean_tol > 0 and todo.numel():
            half = 0.5 * gap[todo]
            by = torch.argsort(half)
            cut = int((torch.cumsum(half[by], 0) <= mean_tol * n).sum())
            if cut:
                mid = todo[by[:cut]]
                out[mid] = lower[mid] + 0.5 * gap[mid]
                todo = todo[by[cut:]].sort().values
        if todo.numel() == 0:
            return out, lower, upper
        if npnt not in self._u:
            self._u[npnt] = _qmc_points(d - 1, npnt, self.seed).to(self.m.device).to(SOV_DTYPE)
        u = self._u[npnt]
        self._factor_rows(todo)
        pko = pk[todo].gather(1, self.order[todo])  # decreasing: live margins first
        live = pko > btol / d
        count = live.sum(1)
        dropped = torch.where(live, torch.zeros_like(pko), pko).sum(1)
        one = count <= 1  # one live margin: exact, Φ(m/s) of that margin
        if bool(one.any()):
            rows = torch.nonzero(one).flatten()
            idx = todo[rows]
            out[idx] = torch.minimum(torch.maximum(1.0 - pk[idx].max(1).values - dropped[rows], lower[idx]), upper[idx])
        multi = torch.nonzero(~one).flatten()
        if multi.numel() == 0:
            return out, lower, upper
        top = int(count[multi].max())
        if multi.numel() * npnt * top <= self.max_elements:
            # few rows: one integration in the largest live dimension, each row's margins
            # beyond its own live count set to +∞ (a factor Φ(∞) = 1: the same estimate as
            # integrating in its own dimension, with the same points), instead of one
            # small loop per dimension; the rows by decreasing live count, so that each
            # step of the loop runs on the prefix of rows still live there
            groups = [(top, multi[torch.argsort(count[multi], descending=True, stable=True)])]
        else:
            groups = [(dk, multi[count[multi] == dk]) for dk in torch.unique(count[multi]).tolist()]
        for dk, rows in groups:
            idx = todo[rows]
            mm = self.m_ordered[idx, :dk].to(SOV_DTYPE)
            pad = torch.arange(dk, device=mm.device)[None, :] >= count[rows][:, None]
            if bool(pad.any()):
                mm = mm.masked_fill(pad, math.inf)
            LL = (self.L[idx, :dk, :dk] * lv).to(SOV_DTYPE)
            step = max(1, self.max_elements // (npnt * dk))
            for i in range(0, idx.numel(), step):
                sl = slice(i, i + step)
                est = _sov(mm[sl], LL[sl], u[:, :dk - 1], live=count[rows[sl]]).double() - dropped[rows[sl]]
                out[idx[sl]] = torch.minimum(torch.maximum(est, lower[idx[sl]]), upper[idx[sl]])
        return out, lower, upper


def orthant_probability(m: torch.Tensor, s: torch.Tensor, n_points: int = 2048, seed: int = 0,
                        bound_tol: float = 1e-9, max_elements: int = 2**23, mean_tol: float = 0.0) -> torch.Tensor:
    """``P(D > 0)`` for ``D ~ N(m, S)``, per row: ``m [N, d]``, ``S [N, d, d]`` (float64).

    Genz's separation of variables with randomised QMC (``n_points`` scrambled Sobol
    points, ``seed``); rows whose pairwise bounds differ by less than ``bound_tol`` use
    the bound (exact to that tolerance). ``d = 1`` is the exact ``Φ(m/s)``.
    Semi-definite ``S`` (some margins without noise) is handled by a relative jitter of
    ``1e-10``. Margins that can hardly be violated are left out of the integral (see
    :class:`OrthantCurve`, which this calls at level 1, factoring only the rows it
    integrates; use it directly for many levels of ``η² S``). ``mean_tol``: see
    :meth:`OrthantCurve.at` (for callers that use only the mean over the rows).
    """
    return OrthantCurve(m, s, n_points=n_points, seed=seed, bound_tol=bound_tol, max_elements=max_elements,
                        lazy=True).at(1.0, mean_tol=mean_tol)[0]


def correct_probability(mean: torch.Tensor, cov: torch.Tensor, y: torch.Tensor, n_points: int = 2048,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per input ``(P(correct), lower, upper)`` under ``f ~ N(mean, cov)``
    (``mean [N, C]``, ``cov [N, C, C]``, labels ``y``)."""
    return CorrectCurve(mean, cov, y, n_points=n_points, seed=seed).at(1.0)


class CorrectCurve:
    """Per-input ``(P(correct), lower, upper)`` under ``f ~ N(mean, η² cov)`` at any level
    ``η`` (:meth:`at`): the margin moments and the :class:`OrthantCurve` factorisation are
    computed once, so a curve over levels costs one integration per level.
    ``CorrectCurve(mean, cov, y).at(1.0)`` equals :func:`correct_probability`.

    >>> import torch
    >>> mean = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    >>> cc = CorrectCurve(mean, torch.eye(3, dtype=torch.float64)[None], torch.tensor([0]), n_points=1024)
    >>> p1, lo, hi = cc.at(1.0)
    >>> bool(lo[0] <= p1[0] <= hi[0]), bool(cc.at(2.0)[0][0] < p1[0])
    (True, True)
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, y: torch.Tensor, n_points: int = 2048, seed: int = 0,
                 lazy: bool = False, ids: torch.Tensor | None = None):
        m, s = margin_moments(mean, cov, y, ids)
        # lazy: an input's margins are ordered and factored when a level first integrates
        # it (the same factor, row by row; 1.83 -> 1.63 ms on the zoo MLP at η = 0.1, 17 of
        # 359 inputs) but the covariance is held beside the factor (+75% memory: 366
        # against 209 MB for 2,000 inputs and 100 classes), so not by default
        self.orthant = OrthantCurve(m, s, n_points=n_points, seed=seed, lazy=lazy)

    def at(self, level: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.orthant.at(level)


def sampled_accuracies(mean: torch.Tensor, noise: torch.Tensor, y: torch.Tensor,
                       ids: torch.Tensor | None = None) -> np.ndarray:
    """Per-draw accuracy ``mean_i 1[argmax(mean_i + noise_ik) = y_i]`` for shared draws
    ``noise [N, C, K]`` (draw ``k`` is one noisy network: all inputs share it).

    Used for the chip-to-chip spread of accuracy (docs/THEORY.md §7): the draws of the
    linearised network are jointly Gaussian across inputs with covariance
    ``Σ_θ σ_θ² ∇f_i ∇f_jᵀ``.
    """
    # classes last and contiguous: argmax over the innermost axis is 3x faster than over
    # dim 1 (1.6 against 0.5 ms for 359 inputs, 10 classes, 32 draws; the same argmax)
    logits = torch.movedim(mean.double()[:, :, None] + noise.double(), 1, 2).contiguous()  # [N, K, C]
    y = y.long()
    if ids is not None:  # slots of a subset of classes (ids [N, S]): argmax in class order
        ids = ids.to(logits.device).long()
        order = ids.argsort(dim=1)
        logits = logits.gather(2, order[:, None, :].expand_as(logits))
        pred = ids.gather(1, order).gather(1, logits.argmax(dim=2))  # [N, K] class ids
        return (pred == ids.gather(1, y[:, None])).double().mean(dim=0).cpu().numpy()
    pred = logits.argmax(dim=2)  # [N, K]
    return (pred == y[:, None]).double().mean(dim=0).cpu().numpy()
