"""The output layer's scale mixture: accuracy beyond Gaussian logits (docs/THEORY.md §7,
"beyond Gaussian logits").

When the logits are the output of a noisy Linear layer, ``L = (W + N) h + b + n``, with
``N``, ``n`` independent zero-mean noise of variances ``s [C, J]``, ``s_b [C]``, then
*given its input* ``h`` the logits are exactly Gaussian,

    L | h  ~  N(m, diag v),     m = W h + b,     v_c = Σ_j s_cj h_j² + s_b,c,

but ``v`` moves with ``h``: the logits are a scale mixture of Gaussians, heavier-tailed
than the Gaussian with the same mean and covariance that ``correct_probability`` assumes
(on the learning-rate study's digits MLP at η = 1 that Gaussian, with Monte-Carlo's own
mean and covariance, misses Monte-Carlo's accuracy by 2.7 points; the mixture with
Monte-Carlo's own moments of ``(m, v)`` by 0.3).

The mixture is integrated along the dominant direction of ``v``'s fluctuation. With
``h ~ N(μ, Σ)`` (the moment pass's ``μ + Fξ + √d ζ`` at the layer's input), by Isserlis'
theorem

    E v_c          = Σ_j s_cj (μ_j² + Σ_jj) + s_b,c,
    Cov(v_c, v_e)  = 2 s_cᵀ (Σ∘Σ) s_e + 4 (s_c∘μ)ᵀ Σ (s_e∘μ),
    Cov(m_a, v_c)  = 2 W_aᵀ Σ (s_c∘μ).

With ``(λ, u)`` the top eigenpair of ``Cov(v)`` (rank one when every weight of the
layer has the same variance, as under ``relative`` noise: then exact), ``t =
uᵀ(v − E v)/√λ`` standardised, ``c_v = Cov(v, t) = √λ u`` and ``c_m = Cov(m, t) =
Cov(m, v) u/√λ``. Taking ``(m, t)`` jointly Gaussian,

    L | t  ~  N(μ_L + c_m t,  Σ_L − c_m c_mᵀ + diag(max(0, E v + c_v t) − E v)),

which keeps the logits' mean ``μ_L`` and covariance ``Σ_L`` (the moment method's) when
averaged over ``t``, and ``P(correct) = Σ_k w_k P(correct | t_k)`` by Gauss–Hermite
quadrature over ``t`` (:data:`MIXTURE_NODES` nodes). Tests
(``tests/theory/test_moments_head.py``): ``test_head_terms_match_monte_carlo`` (the three
moments against sampled Gaussian inputs), ``test_mixture_probability_matches_its_model_sampled``
(the quadrature against sampling ``t`` and the logits from the model above),
``test_head_mixture_on_a_trained_mlp_closes_most_of_the_gaussian_gap`` (end to end
against Monte-Carlo). Rectified inputs are not Gaussian: there Isserlis' moments
underestimate the spread of ``v`` (0.88 of Monte-Carlo's on the digits MLP at η = 1).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..accuracy import correct_probability
from .gaussian import ncdf, npdf

__all__ = ["head_terms", "mixture_correct_probability", "moment_correct_probability", "node_points",
           "rectified_square_variance", "MIXTURE_NODES"]

#: Gauss–Hermite nodes of the mixture over ``t``: on the learning-rate study's MLP
#: (digits, 200 inputs, η = 0.5, 1, 1.5) the accuracy is within 3e-4 of 41 nodes'.
MIXTURE_NODES = 9

#: The largest share of ``Cov(m)`` that ``c_m c_mᵀ`` may take (``c_mᵀ Cov(m)⁻¹ c_m``);
#: the moment pass's ``Σ_h`` and the logit covariance come from different passes, so
#: ``c_m`` is shrunk to this where it would exceed it.
MAX_SHARE = 0.95


def rectified_square_variance(mz: torch.Tensor, vz: torch.Tensor) -> torch.Tensor:
    """``Var(h²)`` for ``h = relu(z)``, ``z ~ N(mz, vz)``, float64: ``E h⁴ − (E h²)²`` with
    ``E h² = (m² + s²)Φ(α) + msφ(α)``, ``E h⁴ = (m⁴ + 6m²s² + 3s⁴)Φ(α) + (m³s + 5ms³)φ(α)``,
    ``α = m/s`` (the truncated-normal moments ``∫_{−α}^∞ xᵏ φ``;
    ``test_rectified_square_variance_against_quadrature``); ``s = 0``: ``h`` is fixed."""
    m, v = mz.double(), vz.double().clamp_min(0)
    sd = v.sqrt()
    pos = sd > 0
    a = torch.where(pos, m / sd.clamp_min(1e-300), torch.zeros_like(m))
    cdf, pdf = ncdf(a), npdf(a)
    e2 = (m * m + v) * cdf + m * sd * pdf
    e4 = (m ** 4 + 6 * m * m * v + 3 * v * v) * cdf + (m ** 3 * sd + 5 * m * v * sd) * pdf
    return torch.where(pos, (e4 - e2 * e2).clamp_min(0), torch.zeros_like(m))


def head_terms(mu: torch.Tensor, F: torch.Tensor | None, d: torch.Tensor, W: torch.Tensor, s: torch.Tensor,
               sb: torch.Tensor | None, src: tuple | None = None) -> tuple:
    """``(E v, c_m, c_v)``, each ``[B, C]`` float64 (module docstring), for inputs of the
    output layer ``h ~ N(mu, FᵀF + diag d)`` (``mu, d [B, J]``, ``F [K, B, J]`` or
    ``None``), its weights ``W [C, J]`` and noise variances ``s [C, J]``, ``sb [C]``.

    ``src = (mz, vz)``: ``h = relu(z)`` with ``z`` of these means and variances per unit
    (a ReLU output feeding the layer). Then each ``Var(h_j²)`` is the rectified one
    (:func:`rectified_square_variance`) instead of Isserlis' ``2Σ_jj² + 4μ_j²Σ_jj``, and
    the off-diagonal ``Cov(h_j², h_k²)`` keep Isserlis' correlation, scaled to those
    variances (on the digits MLP at η = 1, fed Monte-Carlo's own moments of ``h``: the
    spread of ``v`` 0.96 of Monte-Carlo's, against 0.88 with Isserlis' throughout)."""
    mu, d, W, s = mu.double(), d.double().clamp_min(0), W.double(), s.double()
    B, J = mu.shape
    if F is not None and F.shape[0]:
        Fb = F.double().permute(1, 2, 0)  # [B, J, K]
        S = Fb @ Fb.mT
    else:
        S = torch.zeros(B, J, J, dtype=torch.float64, device=mu.device)
    S.diagonal(dim1=1, dim2=2).add_(d)
    ev = (mu * mu + torch.diagonal(S, dim1=1, dim2=2)) @ s.T
    if sb is not None:
        ev = ev + sb.double()
    A = s.unsqueeze(0) * mu.unsqueeze(1)  # [B, C, J]: s_c ∘ μ
    AS = A @ S
    cmv = 2 * torch.einsum("aj,bcj->bac", W, AS)  # Cov(m_a, v_c) = 2 W_aᵀ Σ (s_c ∘ μ)
    # Cov(v_c, v_e) = s_cᵀ G s_e, G = 2 Σ∘Σ + 4 (μμᵀ)∘Σ (Isserlis), or G ∘ rrᵀ with the
    # rectified variances on its diagonal: the same sums with s̃_c = s_c ∘ r
    st = s.unsqueeze(0).expand(B, -1, -1)
    if src is not None:
        sjj = torch.diagonal(S, dim1=1, dim2=2)
        gd = 2 * sjj * sjj + 4 * mu * mu * sjj
        r = torch.where(gd > 0, (rectified_square_variance(*src) / gd.clamp_min(1e-300)).sqrt(), torch.ones_like(gd))
        st = st * r.unsqueeze(1)
        A = st * mu.unsqueeze(1)
        AS = A @ S
    vv = 2 * (st @ (S * S)) @ st.mT + 4 * AS @ A.mT
    lam, U = torch.linalg.eigh((vv + vv.mT) / 2)
    lam, u = lam[:, -1].clamp_min(0), U[:, :, -1]  # [B], [B, C]
    live = lam > 0
    root = lam.sqrt()
    cv = torch.where(live.unsqueeze(1), root.unsqueeze(1) * u, torch.zeros_like(u))
    cm = torch.where(live.unsqueeze(1), (cmv @ u.unsqueeze(-1)).squeeze(-1) / root.clamp_min(1e-300).unsqueeze(1),
                     torch.zeros_like(u))
    return ev, cm, cv


def moment_correct_probability(mean: torch.Tensor, cov: torch.Tensor, terms: tuple | None, y: torch.Tensor,
                               n_points: int, seed: int):
    """``(P(correct), lower, upper)`` per input of the moment method: under the output
    layer's scale mixture when its terms are known (:func:`mixture_correct_probability`),
    else Gaussian logits (:func:`~noiseprop.theory.accuracy.correct_probability`).
    Clipped to ``[0, 1]`` (the mixture's weights sum to 1 only within rounding); logit
    moments that overflowed are refused with a clear error."""
    bad = ~(torch.isfinite(mean).all(-1) & torch.isfinite(cov).flatten(1).all(-1))
    if bool(bad.any()):
        raise ValueError(f"the moment method's logit mean or covariance is not finite on {int(bad.sum())} of "
                         f"{mean.shape[0]} inputs: the noise is so large that the propagated moments overflow; "
                         "use a smaller level (or method='linear', or Monte-Carlo)")
    if terms is None:
        out = correct_probability(mean, cov, y, n_points=n_points, seed=seed)
    else:
        out = mixture_correct_probability(mean, cov, terms, y, n_points=n_points, seed=seed)
    return tuple(t.clamp(0.0, 1.0) for t in out)


def node_points(n_points: int, weight: float) -> int:
    """QMC points for a node of quadrature weight ``weight``: ``n_points`` scaled by
    ``min(1, 4·weight)`` to a power of two, at least 16. A node's QMC error enters the
    average times its weight, and falls like ``1/points``: with 9 nodes the outer six
    take 1/4 to 1/128 of the points, the mixture costs 0.42 of nine full integrations
    (at 256 points) and its QMC error is at most about 1.4 times one integration's."""
    scale = min(1.0, 4.0 * float(weight))
    return int(max(16, 2 ** round(math.log2(max(1.0, n_points * scale)))))


def mixture_correct_probability(mean: torch.Tensor, cov: torch.Tensor, terms: tuple, y: torch.Tensor,
                                n_points: int, seed: int, nodes: int = MIXTURE_NODES):
    """Per-input ``(P(correct), lower, upper)``, each the mixture's average of what
    :func:`~noiseprop.theory.accuracy.correct_probability` returns, for logits with mean
    ``mean [N, C]`` and covariance ``cov [N, C, C]`` under the output layer's scale
    mixture ``terms = (E v, c_m, c_v)`` (:func:`head_terms`)."""
    mean, cov = mean.double(), cov.double()
    ev, cm, cv = (t.double().to(mean.device) for t in terms)
    # c_m may take at most MAX_SHARE of Cov(m) = Σ_L − diag(E v)
    w, V = torch.linalg.eigh(cov - torch.diag_embed(ev))
    proj = (V.mT @ cm.unsqueeze(-1)).squeeze(-1)
    tol = 1e-12 * w.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    # a direction Cov(m) does not have may carry no c_m (beyond rounding)
    off = (proj * proj > 1e-12 * (cm * cm).sum(-1, keepdim=True)) & (w <= tol)
    share = torch.where(w > tol, proj * proj / w.clamp_min(1e-300), torch.zeros_like(w)).sum(-1)
    share = torch.where(off.any(-1), torch.full_like(share, torch.inf), share)
    shrink = torch.where(share > MAX_SHARE, (MAX_SHARE / share).sqrt(), torch.ones_like(share)).nan_to_num(0.0)
    cm = cm * shrink.unsqueeze(1)
    t, wk = np.polynomial.hermite_e.hermegauss(nodes)
    wk = wk / wk.sum()
    base = cov - cm.unsqueeze(2) * cm.unsqueeze(1)
    p = lo = hi = 0
    for tk, w_k in zip(t.tolist(), wk.tolist()):
        dv = (ev + cv * tk).clamp_min(0) - ev
        pk, lk, hk = correct_probability(mean + cm * tk, base + torch.diag_embed(dv), y,
                                         n_points=node_points(n_points, w_k), seed=seed)
        p, lo, hi = p + w_k * pk, lo + w_k * lk, hi + w_k * hk
    return p, lo, hi
