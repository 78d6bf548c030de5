"""Analog-hardware noise models with a non-zero mean: PCM programming noise, conductance
drift over time, read (1/f) noise and global drift compensation (:class:`PCMLike`),
weight quantisation (:class:`Quantized`) and stuck-at faults (:class:`StuckAt`).

Each model gives the exact per-element first two moments of the noisy weight
(:meth:`mean`, :meth:`variance`, what the theory uses) and exact samples
(:meth:`draw` + :meth:`apply`, what Monte-Carlo uses). The random numbers of one draw
(:meth:`draw`) do not depend on the time ``t`` since programming, so a curve over
times reuses them (common random numbers): ``noise.with_level(t).apply(w, z)``.

PCM model (Nandakumar et al., ICECS 2019; the fit behind aihwkit's
``PCMLikeNoiseModel``; formulas reimplemented here). Per layer (``per="layer"``) or per
output channel (``per="channel"``) with ``M = max|W|``, a weight goes to a pair of
devices with targets ``g⁺ = g_max·max(w, 0)/M`` and ``g⁻ = g_max·max(−w, 0)/M``
(``g_max = 25 µS``; the idle device has target 0 and is programmed too). Per device,
``r = g_T/g_max``:

* programming ``g_P = max(0, g_T + σ_P z₁)``, ``σ_P = k_P (0.26348 + 1.9650 r − 1.1731 r²) g_max/25``;
* drift ``ν = k_D |μ_ν + σ_ν z₂|``, ``μ_ν = clip(−0.0155 ln r + 0.0244, 0.049, 0.1)``,
  ``σ_ν = clip(−0.0125 ln r − 0.0059, 0.008, 0.045)`` (``r ≥ 1e-7``),
  ``g_D = g_P ((t + t₀)/t₀)^(−ν)``, ``t₀ = 20 s``;
* read ``Q = min(0.2, 0.0088 / max(1e-3, (g_P/g_max)^0.65))``,
  ``σ_R = k_R g_D Q √ln((t + t₀ + t_r)/(2 t_r))``, ``t_r = 250 ns``, ``g = max(0, g_D + σ_R z₃)``;
* read-back weight ``W(t) = (g⁺ − g⁻) M/g_max``; with compensation the layer output is
  multiplied by ``α = mean|W_P| / mean|W(t)|`` (``W_P``: the weight right after
  programming), i.e. the effective weight is ``α W(t)``.

Exact moments of the read-back weight ``W(t)`` (THEORY notes in the docstrings):
the three stages are independent given ``g_P``, so per device

    E[g]  = E[D]  · E[g_P  m₁(c Q(g_P))],      D = e^{−νλ},  λ = ln((t+t₀)/t₀),
    E[g²] = E[D²] · E[g_P² m₂(c Q(g_P))],      c = k_R √ln((t+t₀+t_r)/(2t_r)),

with ``m₁(s) = E max(0, 1 + s z) = Φ(1/s) + s φ(1/s)`` and
``m₂(s) = E max(0, 1 + s z)² = (1 + s²) Φ(1/s) + s φ(1/s)`` (rectified-normal
moments), the drift factor's moments in closed form (the Laplace transform of a folded
normal, :func:`folded_normal_laplace`) and the expectation over the rectified normal
``g_P`` by Gauss–Legendre quadrature split at the kinks of ``Q`` (:func:`rectified_expectation`).
The two devices are independent, so ``E W = (E g⁺ − E g⁻) M/g_max`` and
``Var W = (Var g⁺ + Var g⁻)(M/g_max)²``.

The compensation scalar is random and shared by a layer; :meth:`PCMLike.compensation_moments`
gives its expectation, variance and covariance with each element to first order (delta
method on ``α = A/B``, with ``E|W|`` and the covariances of ``|W|`` from a Gaussian
approximation of each element, stated there).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from .noise import NOISE_STRING_FORMS, NOISE_STRING_OPTIONS, WeightNoise, _check_generator, _check_weight, _fmt
from .validation import check_int, check_number, check_times

__all__ = [
    "HardwareNoise",
    "PCMLike",
    "Quantized",
    "StuckAt",
    "CompensationMoments",
    "folded_normal_laplace",
    "rectified_normal_moments",
    "rectified_expectation",
    "G_MAX",
    "T0",
    "T_READ",
]

#: Maximal conductance (µS), drift reference time t₀ (s), read duration t_r (s).
G_MAX = 25.0
T0 = 20.0
T_READ = 250e-9
_PROG_COEFF = (0.26348, 1.9650, -1.1731)
_R_FLOOR = 1e-7
_PERS = ("layer", "channel")
#: Draws of a layer's devices for the compensation scalar's ``E α``, ``Var α``
#: (:meth:`PCMLike.compensation_moments`); small layers get up to 16× more, so that about
#: :data:`ALPHA_SAMPLE_ELEMENTS` device pairs are drawn; :data:`ALPHA_SEED` seeds them.
ALPHA_DRAWS = 4
ALPHA_SAMPLE_ELEMENTS = 2**14
ALPHA_SEED = 0
#: Largest accepted :class:`Quantized` ``bits``: a float64 significand holds 53 bits, so a
#: finer grid (``Δ = 2M/(2^bits − 1)`` below ``M·2⁻⁵²``) cannot change a float64 (let alone
#: a float32) weight, while ``2**bits`` itself grows without bound (``bits=2000`` overflows
#: a float, ``bits=10**30`` never finishes).
MAX_BITS = 53
#: Most nodes of a PCM device table (:meth:`PCMLike.device_tables_over_times`): 256× the
#: default 4097, whose relative error is already about 1e-5; more only costs time and memory.
MAX_TABLE_POINTS = 2**20 + 1
#: Device tables (:meth:`PCMLike.device_tables_over_times`) kept in the process, least
#: recently used dropped first: each is about 200 kB at the default 4097 nodes.
TABLE_CACHE_SIZE = 64
#: The compensation draws run in float32 unless a device's drift exponent ``k_ν ν λ``
#: exceeds this (``e^{−80}`` is near float32's smallest normal number, ``e^{−87}``).
FLOAT32_DRIFT_EXPONENT = 80.0
#: A device table of at least :data:`TABLE_COARSE_MIN` ``· TABLE_UPSAMPLE`` nodes runs its
#: quadrature on every ``TABLE_UPSAMPLE``-th node and fills the others by cubic
#: interpolation between kinks (:meth:`PCMLike.device_tables_over_times`).
TABLE_UPSAMPLE = 8
TABLE_COARSE_MIN = 257
_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------
def _check_bits(value, integral_float: bool = False) -> int:
    """``bits`` of :class:`Quantized`: an integer in ``[1, MAX_BITS]`` (not a bool); with
    ``integral_float``, a float with an integer value too (a level from a sweep or a
    string form, ``4.0``)."""
    v = value
    if integral_float and isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        v = int(v)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_BITS:
        raise ValueError(f"bits must be an integer >= 1 and <= {MAX_BITS} (a float64 significand holds {MAX_BITS} "
                         f"bits: more cannot change a weight), got {type(value).__name__} {value!r}")
    return int(v)


def _check_models(models, fn: str) -> list:
    """``models`` of a curve over times: a sequence (not one model, not a string)."""
    if isinstance(models, (WeightNoise, str, bytes)) or not hasattr(models, "__iter__"):
        hint = "; wrap one model in a list: [model]" if isinstance(models, WeightNoise) else ""
        raise TypeError(f"{fn}: models must be a sequence of PCMLike models (one model at several times), got "
                        f"{type(models).__name__} {models!r}{hint}")
    return list(models)


def _check_per(per) -> str:
    if per not in _PERS:
        raise ValueError(f"per must be 'layer' or 'channel', got {per!r}")
    return per


def _reference(w: torch.Tensor, per: str) -> torch.Tensor:
    """``max|W|`` per layer or per output channel (dim 0), broadcastable to ``w``."""
    if per == "channel" and w.dim() >= 1:
        m = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1)
        return m.reshape((-1,) + (1,) * (w.dim() - 1))
    return w.detach().abs().max()


def _device_targets(w: torch.Tensor, per: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``[2, *w.shape]`` (positive device, negative device) in µS, and ``M``."""
    m = _reference(w, per)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    r = torch.where(m > 0, w.detach() / safe, torch.zeros_like(w))
    return torch.stack([r.clamp_min(0), (-r).clamp_min(0)]) * G_MAX, m


# ----------------------------------------------------------------------------
# Exact one-dimensional pieces
# ----------------------------------------------------------------------------
def rectified_normal_moments(a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E X, E X²)`` of ``X = max(0, a + s z)``, ``z ~ N(0, 1)``:
    ``E X = a Φ(a/s) + s φ(a/s)``, ``E X² = (a² + s²) Φ(a/s) + a s φ(a/s)``
    (``s = 0``: ``max(0, a)`` and its square). Derivation ``hardware.device_moments``."""
    a = torch.as_tensor(a, dtype=torch.float64)
    s = torch.as_tensor(s, dtype=torch.float64)
    a, s = torch.broadcast_tensors(a, s)
    pos = s > 0
    ss = torch.where(pos, s, torch.ones_like(s))
    u = a / ss
    Phi = torch.special.ndtr(u)
    phi = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    m1 = a * Phi + ss * phi
    m2 = (a * a + ss * ss) * Phi + a * ss * phi
    ap = a.clamp_min(0)
    return torch.where(pos, m1, ap), torch.where(pos, m2, ap * ap)


def folded_normal_laplace(s, mu, sd) -> torch.Tensor:
    """``E[exp(−s |X|)]`` for ``X ~ N(mu, sd²)`` (``sd > 0``), exactly:

        e^{s²sd²/2} [ e^{−s mu} Φ(mu/sd − s sd) + e^{s mu} Φ(−mu/sd − s sd) ],

    from ``E[e^{−sX}; X > 0] = e^{−s mu + s²sd²/2} Φ((mu − s sd²)/sd)`` and its mirror;
    evaluated in log space (``log_ndtr``) so large ``s`` neither overflows nor underflows.
    Derivation ``hardware.device_moments``."""
    s = torch.as_tensor(s, dtype=torch.float64)
    mu = torch.as_tensor(mu, dtype=torch.float64)
    sd = torch.as_tensor(sd, dtype=torch.float64)
    base = 0.5 * (s * sd) ** 2
    l1 = base - s * mu + torch.special.log_ndtr(mu / sd - s * sd)
    l2 = base + s * mu + torch.special.log_ndtr(-mu / sd - s * sd)
    return torch.exp(torch.logaddexp(l1, l2))


_GL_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _gauss_legendre(n: int):
    if n not in _GL_CACHE:
        x, w = np.polynomial.legendre.leggauss(n)
        _GL_CACHE[n] = (torch.from_numpy(x), torch.from_numpy(w))
    return _GL_CACHE[n]


def rectified_expectation(h, a: torch.Tensor, s: torch.Tensor, kinks=(), nodes: int = 32,
                          z_max: float = 9.0, chunk: int = 1 << 15) -> torch.Tensor:
    """``E[h(X)]`` for ``X = max(0, a + s z)``, ``z ~ N(0, 1)``, when ``h(0) = 0``:
    ``∫_{z > −a/s} h(a + s z) φ(z) dz`` by Gauss–Legendre quadrature (``nodes`` per piece)
    on ``[max(−a/s, −z_max), z_max]``, split at the points where ``a + s z`` crosses one
    of ``kinks`` (where ``h`` is not smooth), so each piece has an analytic integrand.
    Elementwise over ``a, s`` (float64); ``s = 0`` gives ``h(max(a, 0))``. ``h`` may
    return several integrands at once along a last axis (``[..., k]``), or as a list of
    ``k`` tensors (no stacked copy of the nodes): the result is then ``[n, k]``, all on
    the same nodes."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
    a, s = torch.broadcast_tensors(a, s)
    xg, wg = _gauss_legendre(nodes)
    parts = []
    vector = None
    for i in range(0, a.numel(), chunk):
        ai, si = a[i:i + chunk], s[i:i + chunk]
        pos = si > 0
        ss = torch.where(pos, si, torch.ones_like(si))
        lo = torch.clamp(-ai / ss, min=-z_max, max=z_max)
        hi = torch.full_like(ai, z_max)
        bps = [torch.clamp((k - ai) / ss, min=lo, max=hi) for k in kinks]
        edges = torch.sort(torch.stack([lo] + bps + [hi]), dim=0).values  # [P+1, B]
        det = h(ai.clamp_min(0)[:, None])  # s = 0: h(max(a, 0)); also tells the integrands' count
        vector = isinstance(det, (list, tuple)) or det.dim() == 3
        det = torch.stack(det, dim=-1)[:, 0] if isinstance(det, (list, tuple)) else det[:, 0]
        total = torch.zeros((ai.numel(), det.shape[-1] if vector else 1), dtype=torch.float64, device=ai.device)
        for j in range(edges.shape[0] - 1):
            # only the elements whose piece has a width (a kink outside the range gives an
            # empty piece, which adds exactly 0): most of a device table's nodes have one
            idx = torch.nonzero(edges[j + 1] > edges[j]).squeeze(1)
            if idx.numel() == 0:
                continue
            l, r, aj, sj = edges[j, idx], edges[j + 1, idx], ai[idx], si[idx]
            half = 0.5 * (r - l)
            z = (0.5 * (r + l))[:, None] + half[:, None] * xg[None, :]
            f = h(aj[:, None] + sj[:, None] * z)
            dw = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * wg[None, :]
            if isinstance(f, (list, tuple)):  # k integrands [B, nodes]
                piece = torch.stack([(fk * dw).sum(1) for fk in f], dim=-1)
            else:
                f = f if f.dim() == 3 else f.unsqueeze(-1)  # [B, nodes, k]
                piece = (f * dw[:, :, None]).sum(1)
            total.index_add_(0, idx, half[:, None] * piece)
        parts.append(torch.where(pos[:, None], total, det if vector else det.unsqueeze(-1)))
    if not parts:
        return torch.empty(0, dtype=torch.float64)
    out = torch.cat(parts)
    return out if vector else out.squeeze(-1)


def _table_kinks() -> list[float]:
    """Conductances (µS) where a device's moments, as functions of its target, have a kink:
    the clip points of ``μ_ν`` and ``σ_ν`` in ``r``, and (without programming noise) the
    branch points of ``Q``."""
    kinks = [G_MAX * math.exp((0.0244 - c) / 0.0155) for c in (0.049, 0.1)]
    kinks += [G_MAX * math.exp((-0.0059 - c) / 0.0125) for c in (0.008, 0.045)]
    return sorted(k for k in kinks + list(_Q_KINKS) if 0 < k < G_MAX)


def _table_grid(points: int) -> torch.Tensor:
    """A device table's nodes: ``points`` quadratically spaced over ``[0, g_max]`` (dense
    near 0) and the kinks (:func:`_table_kinks`)."""
    grid = G_MAX * torch.linspace(0.0, 1.0, points, dtype=torch.float64) ** 2
    return torch.unique(torch.cat([grid, torch.tensor(_table_kinks(), dtype=torch.float64)]))


def _cubic_between_kinks(xc: torch.Tensor, vc: torch.Tensor, xf: torch.Tensor) -> torch.Tensor:
    """``vc`` (values at the sorted nodes ``xc``, which include every kink; ``[..., n]``:
    several rows on the same nodes at once) at ``xf`` by cubic Lagrange interpolation on
    the four nearest nodes of the same kink-free piece (a stencil never crosses a kink,
    where the derivative jumps); linear on a piece of fewer than four nodes. Exact at the
    nodes."""
    n = xc.numel()
    cuts = torch.tensor([int(torch.searchsorted(xc, torch.tensor(k, dtype=xc.dtype))) for k in _table_kinks()],
                        dtype=torch.long)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.full((1,), n - 1, dtype=torch.long)])
    i = torch.searchsorted(xc, xf, right=True).clamp(1, n - 1)  # xf in [xc[i-1], xc[i]]
    seg = (torch.searchsorted(bounds, i - 1, right=True) - 1).clamp(0, bounds.numel() - 2)
    lo, hi = bounds[seg], bounds[seg + 1]
    j0 = torch.maximum(torch.minimum(i - 2, hi - 3), lo)
    idx = (j0[:, None] + torch.arange(4)).clamp(max=n - 1)
    xs = xc[idx]
    w = torch.ones(xf.numel(), 4, dtype=xf.dtype)
    for a in range(4):
        for b in range(4):
            if a != b:
                w[:, a] *= (xf - xs[:, b]) / (xs[:, a] - xs[:, b])
    short = hi - lo < 3  # a piece of two or three nodes: linear between its nodes
    if bool(short.any()):
        f = (xf - xc[i - 1]) / (xc[i] - xc[i - 1])
        idx = torch.where(short[:, None], torch.stack([i - 1, i, i, i], 1), idx)
        w = torch.where(short[:, None], torch.stack([1 - f, f, 0 * f, 0 * f], 1), w)
    return (vc[..., idx] * w).sum(-1)


def _table_position(grid: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index ``i`` (of the node above) and fraction ``f`` of each target ``g`` (µS, clamped
    to ``[0, g_max]``) in a device table's ``grid``: the value is ``v[i−1] + f (v[i] − v[i−1])``."""
    x = g.double().clamp(0, G_MAX).reshape(-1)
    i = torch.searchsorted(grid, x, right=True).clamp(1, grid.numel() - 1)
    x0, x1 = grid[i - 1], grid[i]
    return i, ((x - x0) / (x1 - x0)).clamp(0, 1)


def _raw_from_devices(a: dict, b: dict, k: torch.Tensor, sign: torch.Tensor | None = None,
                      same_prog: dict | None = None) -> dict:
    """The read weight's raw moments (:meth:`PCMLike.raw_moments`) from the per-device
    moments (:meth:`PCMLike.device_moments`) of its positive device ``a`` and negative
    device ``b``, ``k = M/g_max``; with ``sign``, ``a`` is the active device and ``b`` the
    idle one (target 0) and the mean takes the weight's sign. The devices are independent,
    so the variances and covariances add. ``same_prog``: the raw moments of the same
    devices at another time, whose ``prog_mean``, ``prog_var`` (which do not depend on
    ``t``) are taken as they are."""
    def spread(d):
        return d["sq"] - d["mean"] ** 2, d["cross"] - d["prog_mean"] * d["mean"]

    (va, ca), (vb, cb) = spread(a), spread(b)
    mean = a["mean"] - b["mean"]
    if sign is not None:
        mean = sign * mean
    if same_prog is None:
        prog_mean = a["prog_mean"] - b["prog_mean"]
        prog_mean = prog_mean if sign is None else sign * prog_mean
        pa, pb = (d["prog_sq"] - d["prog_mean"] ** 2 for d in (a, b))
        prog = dict(prog_mean=prog_mean * k, prog_var=(pa + pb) * k * k)
    else:
        prog = dict(prog_mean=same_prog["prog_mean"], prog_var=same_prog["prog_var"])
    return dict(mean=mean * k, var=(va + vb) * k * k, **prog, cov=(ca + cb) * k * k)


def _q_read(g: torch.Tensor) -> torch.Tensor:
    """Relative 1/f read-noise amplitude ``Q(g) = min(0.2, 0.0088/max(1e-3, (g/g_max)^0.65))``."""
    return (0.0088 / ((g.clamp_min(0) / G_MAX) ** 0.65).clamp_min(1e-3)).clamp_max(0.2)


#: Conductances (µS) where ``Q`` changes branch: ``(g/g_max)^0.65 = 1e-3`` and ``Q = 0.2``.
_Q_KINKS = (G_MAX * 1e-3 ** (1 / 0.65), G_MAX * (0.0088 / 0.2) ** (1 / 0.65))


# ----------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class HardwareNoise(WeightNoise):
    """A noise model with a non-zero mean and non-Gaussian samples.

    ``draw(w, generator)`` gives the random numbers of one draw (one tensor),
    ``apply(w, z)`` the noisy weight for them: the same ``z`` at another level
    (``with_level``; for :class:`PCMLike` the time ``t``) gives the common-random-number
    draw at that level. ``mean``/``variance`` are the exact per-element moments.
    """

    zero_mean: ClassVar[bool] = False

    def draw(self, w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def apply(self, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def sample(self, w, generator=None):
        _check_weight(w)
        _check_generator(generator)
        return self.apply(w, self.draw(w, generator))

    def perturb(self, w, z):
        return self.apply(w, z)

    def unit_scale(self, w):
        return self.variance(w).sqrt().to(w.dtype)

    def scale(self, w):
        """Per-element standard deviation of the noisy weight (not linear in a level)."""
        _check_weight(w)
        return self.variance(w).sqrt().to(w.dtype)

    def mean(self, w):  # pragma: no cover
        raise NotImplementedError

    def variance(self, w):  # pragma: no cover
        raise NotImplementedError


# ----------------------------------------------------------------------------
# PCM
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CompensationMoments:
    """First-order statistics of one layer's compensation scalar ``α = A/B``
    (``A = mean|W_P|``, ``B = mean|W(t)|``): ``alpha_mean`` (with the second-order bias
    correction of a ratio), ``alpha_var``, and ``cov_w`` ``= Cov(α, W_ij(t))`` per element."""

    alpha_mean: float
    alpha_var: float
    cov_w: torch.Tensor


def _abs_moments(mu: torch.Tensor, var: torch.Tensor):
    """Gaussian approximation ``X ~ N(mu, var)``: ``(E|X|, κ)`` with
    ``κ = Cov(|X|, X)/Var X = 2Φ(mu/σ) − 1`` (Stein's lemma: ``Cov(g(X), X) = σ² E g'(X)``)."""
    sd = var.clamp_min(0).sqrt()
    pos = sd > 0
    ss = torch.where(pos, sd, torch.ones_like(sd))
    u = mu / ss
    e_abs = ss * math.sqrt(2 / math.pi) * torch.exp(-0.5 * u * u) + mu * (1 - 2 * torch.special.ndtr(-u))
    kappa = 2 * torch.special.ndtr(u) - 1
    return torch.where(pos, e_abs, mu.abs()), torch.where(pos, kappa, torch.sign(mu))


def programmed_abs_moments(raw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_abs_moments` of the programmed weight ``W_P`` (``raw["prog_mean"]``,
    ``raw["prog_var"]``): ``(E|W_P|, κ_P)``, the same at every time."""
    return _abs_moments(raw["prog_mean"], raw["prog_var"])


@dataclass(frozen=True)
class PCMLike(HardwareNoise):
    """PCM devices (programming noise, drift, read noise, global drift compensation) at
    time ``t`` (seconds since programming); see the module docstring for the formulas.

    ``prog_noise_scale``, ``drift_scale``, ``read_noise_scale`` multiply ``σ_P``, ``ν`` and
    ``σ_R``; ``per`` sets the conductance mapping ``M = max|W|`` per layer or per output
    channel; ``compensation`` multiplies the read weight by the layer's ``α``.
    The level (``with_level``) is ``t``.

    >>> import torch
    >>> w = torch.linspace(-1, 1, 11).reshape(1, 11)
    >>> pcm = PCMLike(t=3600.0)
    >>> m, v = pcm.mean(w), pcm.variance(w)
    >>> m.shape == w.shape, bool((v > 0).all()), pcm.with_level(86400.0).t
    (True, True, 86400.0)
    """

    t: float = 0.0
    compensation: bool = True
    prog_noise_scale: float = 1.0
    drift_scale: float = 1.0
    read_noise_scale: float = 1.0
    per: str = "layer"
    kind: ClassVar[str] = "pcm"

    def __post_init__(self):
        object.__setattr__(self, "t", check_number("t (seconds since programming)", self.t, 0.0))
        for name in ("prog_noise_scale", "drift_scale", "read_noise_scale"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), 0.0))
        if not isinstance(self.compensation, (bool, np.bool_)):
            raise ValueError(f"compensation must be True or False, got {self.compensation!r}")
        object.__setattr__(self, "compensation", bool(self.compensation))
        _check_per(self.per)

    @property
    def level(self) -> float:
        return self.t

    def with_level(self, level):
        return replace(self, t=level)

    def to_string(self):
        opts = []
        if not self.compensation:
            opts.append("nocomp")
        for name, short in (("prog_noise_scale", "prog"), ("drift_scale", "drift"), ("read_noise_scale", "read")):
            v = getattr(self, name)
            if v != 1.0:
                opts.append(f"{short}={_fmt(v)}")
        if self.per != "layer":
            opts.append("per=channel")
        return f"pcm:{_fmt(self.t)}" + ("," + ",".join(opts) if opts else "")

    # -- the device model ----------------------------------------------------
    @property
    def log_drift_time(self) -> float:
        """``λ = ln((t + t₀)/t₀)``."""
        return math.log((self.t + T0) / T0)

    @property
    def read_factor(self) -> float:
        """``c = k_R √ln((t + t₀ + t_r)/(2 t_r))``: ``σ_R = c · Q(g_P) · g_D``."""
        return self.read_noise_scale * math.sqrt(math.log((self.t + T0 + T_READ) / (2 * T_READ)))

    def _sigma_prog(self, g_t: torch.Tensor) -> torch.Tensor:
        r = g_t / G_MAX
        c0, c1, c2 = _PROG_COEFF
        return self.prog_noise_scale * (c0 + c1 * r + c2 * r * r) * (G_MAX / 25.0)

    @staticmethod
    def _drift_params(g_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lr = torch.log((g_t / G_MAX).clamp_min(_R_FLOOR))
        return (-0.0155 * lr + 0.0244).clamp(0.049, 0.1), (-0.0125 * lr - 0.0059).clamp(0.008, 0.045)

    def draw(self, w, generator=None):
        """Standard normals ``[3, 2, *w.shape]``: (z₁, z₂, z₃) for (positive, negative) device."""
        _check_weight(w)
        _check_generator(generator)
        return torch.randn((3, 2) + tuple(w.shape), generator=generator, dtype=w.dtype, device=w.device)

    def conductances(self, w: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(g_P, g(t), M)``: programmed and read conductances ``[2, *w.shape]`` (µS) for
        the draws ``z`` (:meth:`draw`), and the mapping reference ``M``. ``z`` may carry
        leading batch axes (``[..., 3, 2, *w.shape]``: several draws at once, the
        conductances ``[..., 2, *w.shape]``)."""
        _check_weight(w)
        tail = (3, 2) + tuple(w.shape)
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"PCM draws z must be a tensor of shape {tail} (from draw), got {type(z).__name__}")
        if z.dim() < len(tail) or tuple(z.shape[z.dim() - len(tail):]) != tail:
            raise ValueError(f"PCM draws must have shape {tail} (after any batch axes), got {tuple(z.shape)}")
        z1, z2, z3 = z.unbind(z.dim() - len(tail))
        g_t, m = _device_targets(w, self.per)
        g_p = self._programmed(g_t, z1)
        return g_p, self._read(*self._time_free(g_t, g_p, z2, z3)), m

    def _programmed(self, g_t, z1):
        """``g_P = max(0, g_T + σ_P z₁)``."""
        return (g_t + self._sigma_prog(g_t) * z1).clamp_min(0)

    def _time_free(self, g_t, g_p, z2, z3):
        """What the read conductance needs that does not depend on ``t``: ``(g_P, |μ_ν +
        σ_ν z₂|, Q(g_P)·z₃)``."""
        mu, sd = self._drift_params(g_t)
        return g_p, (mu + sd * z2).abs(), _q_read(g_p) * z3

    def _read(self, g_p, nu0, qz3):
        """``g(t) = max(0, g_D(1 + c·Q(g_P)z₃))``, ``g_D = g_P e^{−k_ν ν₀ λ}`` at this ``t``."""
        g_d = g_p * torch.exp(-(self.drift_scale * self.log_drift_time) * nu0)
        return (g_d + g_d * (qz3 * self.read_factor)).clamp_min(0)

    def apply(self, w, z):
        g_p, g, m = self.conductances(w, z)
        w_t = (g[0] - g[1]) * (m / G_MAX)
        if self.compensation:
            w_p = (g_p[0] - g_p[1]) * (m / G_MAX)
            num, den = w_p.abs().mean(), w_t.abs().mean()
            alpha = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
            w_t = w_t * alpha
        return w_t.to(w.dtype)

    # -- exact moments -----------------------------------------------------------
    def device_moments(self, g_t: torch.Tensor) -> dict:
        """Exact per-device moments (float64) for targets ``g_t`` (µS): ``prog_mean``,
        ``prog_sq`` (``E g_P``, ``E g_P²``), ``mean``, ``sq`` (``E g``, ``E g²`` at ``t``)
        and ``cross`` (``E[g_P g]``). Derivation ``hardware.device_moments``."""
        return self._device_moments_over_times(g_t, (self.t,))[0]

    def _device_moments_over_times(self, g_t: torch.Tensor, times) -> list[dict]:
        """:meth:`device_moments` of this model at each of ``times``, on one set of
        quadrature nodes: the programmed conductance's distribution (the nodes) and
        ``Q(g_P)`` do not depend on ``t``, only the drift and read factors do."""
        g_t = g_t.double()
        s_p = self._sigma_prog(g_t)
        pm, psq = rectified_normal_moments(g_t, s_p)
        mu, sd = self._drift_params(g_t)
        models = [replace(self, t=float(t)) for t in times]
        cs = [q.read_factor for q in models]
        shape = g_t.shape
        a, s = g_t.reshape(-1), s_p.reshape(-1)

        def integrands(g):  # E g_D-free parts of E g, E g², E[g_P g] per time (one set of nodes)
            q = _q_read(g)
            one, g2 = torch.ones_like(g), g * g
            out = []
            for c in cs:
                m1, m2 = rectified_normal_moments(one, c * q)
                out += [g * m1, g2 * m2, g2 * m1]
            return out

        ints = rectified_expectation(integrands, a, s, _Q_KINKS).unbind(-1)
        res = []
        for k, q in enumerate(models):
            lam = q.drift_scale * q.log_drift_time
            d1 = folded_normal_laplace(lam, mu, sd)
            d2 = folded_normal_laplace(2 * lam, mu, sd)
            i1, i2, i3 = (v.reshape(shape) for v in ints[3 * k:3 * k + 3])
            res.append(dict(prog_mean=pm, prog_sq=psq, mean=d1 * i1, sq=d2 * i2, cross=d1 * i3))
        return res

    def device_table(self, points: int = 4097) -> tuple[torch.Tensor, dict]:
        """:meth:`device_moments` on a grid of targets ``[0, g_max]`` (``points`` nodes,
        quadratically spaced so they are dense near 0, plus the kinks of ``μ_ν``, ``σ_ν`` in ``r``): the moments depend on the
        weight only through its device target, so one table serves every layer.
        Cached (:meth:`device_tables_over_times`)."""
        return self.device_tables_over_times([self], points)[0]

    @staticmethod
    def one_model_over_times(models) -> bool:
        """Whether ``models`` are all :class:`PCMLike` and differ at most in ``t`` (one
        model at several times, what a drift curve takes)."""
        models = list(models)
        return all(isinstance(q, PCMLike) and replace(q, t=0.0) == replace(models[0], t=0.0) for q in models)

    @staticmethod
    def device_tables_over_times(models, points: int = 4097) -> list[tuple[torch.Tensor, dict]]:
        """:meth:`device_table` of each of ``models`` (one :class:`PCMLike` at several
        times), the missing ones computed together on one set of quadrature nodes
        (:meth:`_device_moments_over_times`) and kept in a process-wide cache of the
        :data:`TABLE_CACHE_SIZE` most recently used tables (keyed on the scales, ``t`` and
        ``points``: a second curve with the same device model, for another network or
        with compensation toggled, reuses them). ``points``: at least
        2 (the table's end nodes 0 and ``g_max``); the interpolation error falls about as
        ``points⁻²`` (relative error of the variance about 1e-5 at the default 4097, 3e-3 at
        257, over 100% below 9). From 2049 nodes on, the quadrature runs on every
        :data:`TABLE_UPSAMPLE`-th node only and the table's nodes are filled by cubic
        interpolation that never crosses a kink (:func:`_cubic_between_kinks`): within
        3.1e-7 (relative) of quadrature at every node of the default table, at scales 0.5,
        1 and 2, in a third of the time."""
        models = _check_models(models, "device_tables_over_times")
        points = check_int("points", points, 2, MAX_TABLE_POINTS)
        if not PCMLike.one_model_over_times(models):
            raise ValueError("device_tables_over_times needs one PCMLike model at several times")
        keys = [q._table_key(points) for q in models]
        todo = [k for k, key in enumerate(keys) if key not in _TABLES]
        if todo:
            first = models[todo[0]]
            grid = _table_grid(points)
            coarse_points = (points - 1) // TABLE_UPSAMPLE + 1
            ts = [models[k].t for k in todo]
            if coarse_points >= TABLE_COARSE_MIN:  # quadrature on a coarse grid, cubic to the table's nodes
                coarse = _table_grid(coarse_points)
                ds = first._device_moments_over_times(coarse, ts)
                names = list(ds[0])
                fine = _cubic_between_kinks(coarse, torch.stack([d[n] for d in ds for n in names]), grid)
                tabs = [dict(zip(names, fine[k * len(names):(k + 1) * len(names)].unbind(0))) for k in range(len(ds))]
            else:
                tabs = first._device_moments_over_times(grid, ts)
            for k, d in zip(todo, tabs):
                _TABLES[keys[k]] = (grid, d)
        out = []
        for key in keys:
            _TABLES.move_to_end(key)  # the least recently used go first
            out.append(_TABLES[key])
        while len(_TABLES) > TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
        return out

    def _table_key(self, points: int) -> tuple:
        """What a device table depends on: the three scales, ``t`` and the nodes (not the
        mapping ``per`` nor the compensation, which act on the weights)."""
        return (self.prog_noise_scale, self.drift_scale, self.read_noise_scale, self.t, points)

    def table_moments(self, g_t: torch.Tensor, points: int = 4097) -> dict:
        """:meth:`device_moments` at ``g_t`` by linear interpolation in :meth:`device_table`
        (the moments are smooth between the table's nodes; relative error about 1e-5, below 1e-4
        tests/theory/test_hardware.py)."""
        grid, tab = self.device_table(points)
        i, f = _table_position(grid, g_t)
        return {k: (v[i - 1] + f * (v[i] - v[i - 1])).reshape(g_t.shape) for k, v in tab.items()}

    def raw_moments(self, w: torch.Tensor, exact: bool = False) -> dict:
        """Exact per-element moments of the read weight before compensation (float64,
        shaped like ``w``): ``mean``, ``var`` of ``W(t)``, ``prog_mean``, ``prog_var`` of
        ``W_P`` and ``cov`` ``= Cov(W_P, W(t))``. ``exact=True``: quadrature per element
        instead of the interpolated table (:meth:`raw_moments_over_times`)."""
        _check_weight(w, finite=True)
        if not exact:
            return self.raw_moments_over_times(w, [self])[0]
        g_t, m = _device_targets(w.double(), self.per)
        d = self.device_moments(g_t)
        return _raw_from_devices({n: v[0] for n, v in d.items()}, {n: v[1] for n, v in d.items()}, (m / G_MAX).double())

    @staticmethod
    def raw_moments_over_times(w: torch.Tensor, models, points: int = 4097) -> list[dict]:
        """:meth:`raw_moments` of ``w`` under each of ``models`` (one :class:`PCMLike` at
        several times), from their device tables (:meth:`device_tables_over_times`) with
        the interpolation position of each weight found once. Of a weight's two devices one
        has target ``g_max|w|/M`` and the other target 0 (the table's first node), so
        ``E W = sign(w)(m(g) − m(0)) M/g_max`` and the variances add the idle device's
        constant: the same numbers as interpolating both devices."""
        _check_weight(w, finite=True)
        if w.numel() == 0:
            raise ValueError(f"raw_moments_over_times needs a non-empty weight, got an empty weight of shape {tuple(w.shape)}")
        models = _check_models(models, "raw_moments_over_times")
        if not models or not PCMLike.one_model_over_times(models):
            raise ValueError("raw_moments_over_times needs one or more PCMLike models that differ only in t, "
                             f"got {models!r}")
        tables = PCMLike.device_tables_over_times(models, points)
        wd = w.detach().double()
        m = _reference(wd, models[0].per)
        safe = torch.where(m > 0, m, torch.ones_like(m))
        r = torch.where(m > 0, wd / safe, torch.zeros_like(wd))
        sign = torch.sign(r)
        k = (m / G_MAX).double()
        i, f = _table_position(tables[0][0], r.abs() * G_MAX)

        def active(tab, names):  # the active device's moments ``names``, interpolated
            v = torch.stack([tab[n] for n in names])  # [moments, nodes]
            lo = v[:, i - 1]
            return dict(zip(names, (lo + f * (v[:, i] - lo)).reshape((len(names),) + tuple(w.shape)).unbind(0)))

        prog = active(tables[0][1], ["prog_mean", "prog_sq"])  # the programmed moments do not depend on t: once
        out = []
        for grid, tab in tables:
            on = {**active(tab, ["mean", "sq", "cross"]), **prog}
            out.append(_raw_from_devices(on, {n: tab[n][0] for n in tab}, k, sign, out[0] if out else None))
        return out

    def compensation_moments(self, w: torch.Tensor, raw: dict | None = None,
                             draws: int | None = None, sampled: tuple | None = None,
                             prog_abs: tuple | None = None) -> CompensationMoments:
        """Expectation and variance of the layer's ``α = A/B`` and ``Cov(α, W_ij)``
        (derivation ``hardware.compensation``).

        ``draws`` (default :data:`ALPHA_DRAWS`): ``E α`` and ``Var α`` from that many
        (or more, for small layers) draws of the layer's devices, cheap element-wise
        sampling with no network evaluation, because ``E|W(t)|`` of a skewed device
        distribution has no cheap closed form; ``draws=0``: the delta method below.
        ``Cov(α, W_ij)`` (``O(1/n)``) always uses the formula. The delta method's
        Gaussian ``|W|`` biased ``E α`` low by 1.5–7% at twice aihwkit's noise after ten
        years (``benchmarks/drift.py``; ``tests/theory/test_hardware.py::
        test_pcm_compensation_alpha_sampled``).

        Delta method on the ratio of the two layer means ``A = mean|W_P|``,
        ``B = mean|W(t)|`` (independent elements):
        ``E α ≈ (Ā/B̄)(1 + Var B/B̄² − Cov(A,B)/(ĀB̄))``,
        ``Var α ≈ (Ā/B̄)² (Var A/Ā² + Var B/B̄² − 2 Cov(A,B)/(ĀB̄))``,
        ``Cov(α, W_ij) ≈ (Ā/B̄)(Cov(|W_P,ij|, W_ij)/(nĀ) − Cov(|W_ij|, W_ij)/(nB̄))``.
        ``E|W|`` and the covariances of ``|W|`` use a Gaussian approximation of each
        element with its exact mean and variance (``Cov(|X|, Y) = κ_X Cov(X, Y)``,
        :func:`_abs_moments`); the error is confined to elements within a few s.d. of
        zero and enters ``α`` through a layer mean.

        ``sampled``: ``(Ā, B̄, E α, Var α)`` already drawn for this layer and time
        (:meth:`alpha_over_times`), used instead of drawing them again. ``prog_abs``:
        :func:`programmed_abs_moments` of ``raw``, already computed (they do not depend on
        ``t``: a curve forms them once)."""
        draws = ALPHA_DRAWS if draws is None else check_int("draws", draws, 0)
        raw = self.raw_moments(w) if raw is None else raw
        n = raw["mean"].numel()
        ea_p, k_p = programmed_abs_moments(raw) if prog_abs is None else prog_abs
        ea, k = _abs_moments(raw["mean"], raw["var"])
        a_bar, b_bar = float(ea_p.mean()), float(ea.mean())
        if a_bar <= 0 or b_bar <= 0:
            return CompensationMoments(1.0, 0.0, torch.zeros_like(raw["mean"]))
        if sampled is not None or draws:  # the layer's own α from draws of the device model
            a_bar, b_bar, mean, var = sampled if sampled is not None else self._alpha_sampled(w, draws)[0]
            ratio = mean
        else:
            var_abs_p = (raw["prog_var"] + raw["prog_mean"] ** 2 - ea_p ** 2).clamp_min(0)
            var_abs = (raw["var"] + raw["mean"] ** 2 - ea ** 2).clamp_min(0)
            var_a = float(var_abs_p.sum()) / n**2
            var_b = float(var_abs.sum()) / n**2
            cov_ab = float((k_p * k * raw["cov"]).sum()) / n**2
            ratio = a_bar / b_bar
            mean = ratio * (1 + var_b / b_bar**2 - cov_ab / (a_bar * b_bar))
            var = ratio**2 * max(0.0, var_a / a_bar**2 + var_b / b_bar**2 - 2 * cov_ab / (a_bar * b_bar))
        cov_w = ratio * (k_p * raw["cov"] / (n * a_bar) - k * raw["var"] / (n * b_bar))
        return CompensationMoments(float(mean), float(var), cov_w)

    def _alpha_sampled(self, w: torch.Tensor, draws: int, times: tuple = (),
                       dtype: torch.dtype = torch.float32) -> list[tuple[float, float, float, float]]:
        """``[(Ā, B̄, E α, Var α)]`` of one layer from ``K`` draws of its devices (no network
        evaluation; ``K = clip(ALPHA_SAMPLE_ELEMENTS // n, draws, 16·draws)`` for ``n``
        weights, so a small layer, whose ``α`` varies most, gets more), seeded by
        :data:`ALPHA_SEED`: the same draws at every time, so a curve over times is smooth.
        The first entry is at ``self.t``, then one per further time in ``times``, all from
        the same draws (the programmed conductances, ``Ā`` and the time-free parts of the
        read conductance are formed once). The draws and conductances are float32 (half
        the time of float64; each layer mean is a float32 sum over the layer, relative
        error about 1e-7, against the draws' own spread of 1e-3 or more), the statistics
        float64; float64 throughout where a device's drift factor ``e^{−k_ν ν λ}`` falls
        below :data:`FLOAT32_DRIFT_EXPONENT` (float32 would flush it to 0: at
        ``drift_scale=1000`` every read conductance, and ``α`` read as 1 instead of
        overflowing)."""
        n = w.numel()
        k = int(min(16 * draws, max(draws, ALPHA_SAMPLE_ELEMENTS // max(n, 1))))
        g = torch.Generator(device=w.device).manual_seed(ALPHA_SEED)
        wd = w.detach().to(dtype)
        g_t, m = _device_targets(wd, self.per)
        scale = m / G_MAX
        models = [self] + [replace(self, t=float(t)) for t in times]
        lam = max(q.drift_scale * q.log_drift_time for q in models)
        step = max(1, (1 << 21) // max(n, 1))  # draws evaluated together (bounded memory)
        a_s, b_s = [], [[] for _ in models]
        for i in range(0, k, step):
            z = torch.stack([self.draw(wd, g) for _ in range(min(step, k - i))])  # the same numbers as one by one
            z1, z2, z3 = z.unbind(1)
            g_p = self._programmed(g_t, z1)
            a_s.append(((g_p[:, 0] - g_p[:, 1]) * scale).abs().reshape(z.shape[0], -1).mean(1))
            free = self._time_free(g_t, g_p, z2, z3)
            if dtype == torch.float32 and lam * float(free[1].max()) > FLOAT32_DRIFT_EXPONENT:
                return self._alpha_sampled(w, draws, times, torch.float64)
            for bs, q in zip(b_s, models):
                g_r = q._read(*free)
                bs.append(((g_r[:, 0] - g_r[:, 1]) * scale).abs().reshape(z.shape[0], -1).mean(1))
        a = torch.cat(a_s).double()
        out = []
        for bs in b_s:
            b = torch.cat(bs).double()
            alpha = torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.ones_like(b))
            out.append((float(a.mean()), float(b.mean()), float(alpha.mean()), float(alpha.var()) if k > 1 else 0.0))
        return out

    def alpha_over_times(self, w: torch.Tensor, times, draws: int | None = None) -> list[tuple]:
        """The sampled compensation statistics ``(Ā, B̄, E α, Var α)`` of one layer at each
        of ``times`` (this model otherwise), from one set of draws: what
        :meth:`compensation_moments` draws at each time separately, the same numbers.
        Pass each as ``sampled=``."""
        _check_weight(w, finite=True)
        draws = ALPHA_DRAWS if draws is None else check_int("draws", draws, 1)
        if (len(times) == 0 if isinstance(times, (list, tuple, range)) else
                isinstance(times, np.ndarray) and times.size == 0):
            return []
        times = [float(t) for t in check_times(times)]
        return replace(self, t=times[0])._alpha_sampled(w, draws, tuple(times[1:]))

    def effective_moments(self, w: torch.Tensor, sampled: tuple | None = None, raw: dict | None = None,
                          prog_abs: tuple | None = None) -> dict:
        """Per-element moments of the weight the network uses (``α W(t)`` with
        compensation, else ``W(t)``), plus the compensation statistics: ``mean``,
        ``var``, ``raw`` (:meth:`raw_moments`) and ``comp`` (:class:`CompensationMoments`
        or ``None``). With compensation, ``E[αW] = E α E W + Cov(α, W)`` and, to first
        order, ``Var(αW) = (Eα)² Var W + (E W)² Var α + 2 Eα E W Cov(α, W)``. ``sampled``:
        see :meth:`compensation_moments`; ``raw``: :meth:`raw_moments` of ``w`` at this time,
        already computed (:meth:`raw_moments_over_times`); ``prog_abs``: see
        :meth:`compensation_moments`."""
        raw = self.raw_moments(w) if raw is None else raw
        if not self.compensation:
            return dict(mean=raw["mean"], var=raw["var"], raw=raw, comp=None)
        comp = self.compensation_moments(w, raw, sampled=sampled, prog_abs=prog_abs)
        a = comp.alpha_mean
        if not (math.isfinite(a) and math.isfinite(comp.alpha_var)):
            raise ValueError(f"{self.to_string()}: the drift-compensation factor overflows (E α = {a:.3g}, Var α = "
                             f"{comp.alpha_var:.3g}): the weights read at this time are about zero against the "
                             "programmed ones; reduce drift_scale or t, or turn compensation off")
        mean = a * raw["mean"] + comp.cov_w
        var = (a * a * raw["var"] + raw["mean"] ** 2 * comp.alpha_var + 2 * a * raw["mean"] * comp.cov_w).clamp_min(0)
        return dict(mean=mean, var=var, raw=raw, comp=comp)

    def mean(self, w):
        """``E`` of the noisy weight per element (exact without compensation; with it,
        :meth:`effective_moments`)."""
        return self.effective_moments(w)["mean"].to(w.dtype)

    def variance(self, w):
        """Per-element variance of the noisy weight (exact without compensation)."""
        return self.effective_moments(w)["var"].to(w.dtype)


# ----------------------------------------------------------------------------
# Quantisation and stuck-at faults
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Quantized(HardwareNoise):
    """Deterministic rounding to ``2^bits`` uniformly spaced levels spanning
    ``[−M, M]``, ``M = max|W|`` per layer or per output channel:
    ``q(w) = −M + Δ·round((w + M)/Δ)``, ``Δ = 2M/(2^bits − 1)``. Exact moments:
    ``mean = q(w)``, ``variance = 0``. The level is ``bits``. The grid has an even
    number of levels, so 0 is not one of them: a weight exactly halfway between two levels
    (an exact 0, such as a pruned weight) goes to the level of even index (``torch.round``,
    half to even): −M at 1 bit, +M/3 at 2, −M/7 at 3. A layer with many exact zeros
    therefore gets a mean shift of one sign (in a 50%-pruned layer at 1 bit, every zero
    reads −M); Monte-Carlo and the prediction use the same rule.

    >>> import torch
    >>> [round(v, 4) for v in Quantized(bits=2).mean(torch.tensor([0.9, -0.2, 1.0])).tolist()]
    [1.0, -0.3333, 1.0]
    """

    bits: int = 8
    per: str = "layer"
    kind: ClassVar[str] = "quantized"

    def __post_init__(self):
        object.__setattr__(self, "bits", _check_bits(self.bits))
        _check_per(self.per)

    @property
    def level(self):
        return float(self.bits)

    def with_level(self, level):
        return replace(self, bits=_check_bits(level, integral_float=True))

    def to_string(self):
        return f"quantized:{self.bits}" + (",per=channel" if self.per == "channel" else "")

    def draw(self, w, generator=None):
        _check_weight(w)
        _check_generator(generator)
        return torch.empty(0, dtype=w.dtype, device=w.device)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        _check_weight(w)
        m = _reference(w, self.per)
        step = 2 * m / (2**self.bits - 1)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        q = -m + safe * torch.round((w.detach() + m) / safe)
        return torch.where(step > 0, q, w.detach())

    def apply(self, w, z):
        return self.quantize(w).to(w.dtype)

    def mean(self, w):
        _check_weight(w, finite=True)
        return self.quantize(w)

    def variance(self, w):
        _check_weight(w, finite=True)
        return torch.zeros_like(w)


@dataclass(frozen=True)
class StuckAt(HardwareNoise):
    """Stuck-at faults: each device of the pair (targets ``g± = g_max·max(±w, 0)/M``)
    is independently stuck at 0 with probability ``p_zero`` and at ``g_max`` with
    probability ``p_max``; ``W = (g⁺ − g⁻) M/g_max``. Exact moments per device with
    target ``g``: ``E = (1 − p₀ − p₁) g + p₁ g_max``, ``E g² = (1 − p₀ − p₁) g² + p₁ g_max²``;
    the devices are independent. The level is ``p_zero``.

    >>> import torch
    >>> [round(v, 4) for v in StuckAt(p_zero=0.1, p_max=0.0).mean(torch.tensor([0.5, -1.0])).tolist()]
    [0.45, -0.9]
    """

    p_zero: float = 0.01
    p_max: float = 0.0
    per: str = "layer"
    kind: ClassVar[str] = "stuck"

    def __post_init__(self):
        object.__setattr__(self, "p_zero", check_number("p_zero (stuck-at-0 fraction)", self.p_zero, 0.0, 1.0))
        object.__setattr__(self, "p_max", check_number("p_max (stuck-at-g_max fraction)", self.p_max, 0.0, 1.0))
        if self.p_zero + self.p_max > 1:
            raise ValueError(f"p_zero + p_max must be a fraction in [0, 1], got {self.p_zero} + {self.p_max}")
        _check_per(self.per)

    @property
    def level(self):
        return self.p_zero

    def with_level(self, level):
        return replace(self, p_zero=level)

    def to_string(self):
        return f"stuck:{_fmt(self.p_zero)}" + (f",max={_fmt(self.p_max)}" if self.p_max else "") + (
            ",per=channel" if self.per == "channel" else "")

    def draw(self, w, generator=None):
        """Uniforms ``[2, *w.shape]``, one per device."""
        _check_weight(w)
        _check_generator(generator)
        return torch.rand((2,) + tuple(w.shape), generator=generator, dtype=w.dtype, device=w.device)

    def apply(self, w, z):
        _check_weight(w)
        shape = (2,) + tuple(w.shape)
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"stuck-at draws z must be a tensor of shape {shape} (from draw), got {type(z).__name__}")
        if tuple(z.shape) != shape:
            raise ValueError(f"stuck-at draws z must be a tensor of shape {shape} (from draw), got {tuple(z.shape)}")
        g_t, m = _device_targets(w, self.per)
        g = torch.where(z < self.p_zero, torch.zeros_like(g_t),
                        torch.where(z < self.p_zero + self.p_max, torch.full_like(g_t, G_MAX), g_t))
        return ((g[0] - g[1]) * (m / G_MAX)).to(w.dtype)

    def _moments(self, w):
        _check_weight(w, finite=True)
        g_t, m = _device_targets(w.double(), self.per)
        keep = 1 - self.p_zero - self.p_max
        e1 = keep * g_t + self.p_max * G_MAX
        e2 = keep * g_t**2 + self.p_max * G_MAX**2
        k = (m / G_MAX).double()
        return (e1[0] - e1[1]) * k, ((e2 - e1**2)[0] + (e2 - e1**2)[1]) * k * k

    def mean(self, w):
        return self._moments(w)[0].to(w.dtype)

    def variance(self, w):
        return self._moments(w)[1].to(w.dtype)


# ----------------------------------------------------------------------------
# String forms: pcm:T, pcm-nocomp:T, quantized:BITS, stuck:P
# ----------------------------------------------------------------------------
def _bits(v):
    return Quantized(_check_bits(v, integral_float=True))


NOISE_STRING_FORMS.setdefault("pcm", lambda v: PCMLike(t=v))
NOISE_STRING_FORMS.setdefault("pcm-nocomp", lambda v: PCMLike(t=v, compensation=False))
NOISE_STRING_FORMS.setdefault("quantized", _bits)
NOISE_STRING_FORMS.setdefault("stuck", lambda v: StuckAt(p_zero=v))
# the ``,key=value`` settings each ``to_string`` writes after the level (parse_noise reads them back)
_PER_OPTION = {"per": ("per", _PERS)}
_PCM_OPTIONS = {"nocomp": ("compensation", ("flag", False)), "prog": ("prog_noise_scale", float),
                "drift": ("drift_scale", float), "read": ("read_noise_scale", float), **_PER_OPTION}
NOISE_STRING_OPTIONS.setdefault("pcm", _PCM_OPTIONS)
NOISE_STRING_OPTIONS.setdefault("pcm-nocomp", _PCM_OPTIONS)
NOISE_STRING_OPTIONS.setdefault("quantized", _PER_OPTION)
NOISE_STRING_OPTIONS.setdefault("stuck", {"max": ("p_max", float), **_PER_OPTION})
