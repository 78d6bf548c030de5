"""Low-rank-plus-diagonal Gaussian activations and their algebra.

An activation ``h`` (per input) is ``μ + F ξ + diag(√d) ζ`` with ``ξ ~ N(0, I_K)`` shared
by every activation of one pass and ``ζ ~ N(0, I)`` independent per unit
(:class:`Dist`). Linear maps act on ``μ``, every column of ``F`` and (through ``W∘W``)
on ``d``; two activations in the same basis add exactly (a residual connection).
The helpers here: apply an op to every column, re-scale rows to a target variance (the
variance-preserving sketch), the patch Gram matrix of a convolution, top eigenpairs,
and a reproducible generator per (seed, stream, call).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .gaussian import safe_sqrt

__all__ = ["Dist", "map_columns", "map_batched", "renormalise", "block_diag", "top_eigh", "canonical_signs",
           "patch_gram", "pair",
           "generator", "EXACT_EIGH_MAX"]

#: symmetric matrices up to this size get an exact eigendecomposition in
#: :func:`top_eigh`; larger ones randomised subspace iteration (batched LAPACK eigh is
#: slow on CPU: measured 20× the randomised solver for 32 matrices of 64×64)
EXACT_EIGH_MAX = 32
#: subspace iterations and oversampling of the randomised eigensolver
SUBSPACE_ITERS = 3
OVERSAMPLE = 10


@dataclass
class Dist:
    """``μ + F ξ + √d ζ``: ``mu [B, *s]``, ``F [K, B, *s]`` or ``None``, ``d [B, *s]``.

    Optionally, beyond the Gaussian: ``k3 [B, *s]``, each unit's third cumulant (``None``:
    zero, unless ``src`` is set), and ``src = (μ_a, var_a, k3_a)``, the pre-activation of
    the ReLU whose output this is (its rectification: the output's third cumulant, formed
    when needed, and the cross cumulants of a residual sum). ``k4 [B, *s]``: each unit's
    fourth cumulant where it is known beyond a ReLU output's (an affine map of one: the
    moment method's tail diagnostic, :func:`~.rules.fourth_cumulant`)."""

    mu: torch.Tensor
    F: torch.Tensor | None
    d: torch.Tensor
    k3: torch.Tensor | None = None
    src: tuple | None = None
    k4: torch.Tensor | None = None

    @property
    def K(self) -> int:
        return 0 if self.F is None else self.F.shape[0]

    def fsq(self) -> torch.Tensor:
        return torch.zeros_like(self.mu) if self.F is None else (self.F * self.F).sum(0)

    def var(self) -> torch.Tensor:
        return self.d + self.fsq()

    def padded(self, K: int) -> torch.Tensor:
        """``F`` with zero columns appended up to ``K`` (a fresh tensor when padded)."""
        shape = tuple(self.mu.shape)
        if self.F is None or K == 0:
            return torch.zeros((K,) + shape, dtype=self.mu.dtype, device=self.mu.device)
        if self.F.shape[0] == K:
            return self.F
        pad = torch.zeros((K - self.F.shape[0],) + shape, dtype=self.mu.dtype, device=self.mu.device)
        return torch.cat([self.F, pad])

    def map(self, fn) -> "Dist":
        """An op that copies elements (view, flatten, slicing, permute, zero padding)."""
        return Dist(fn(self.mu), map_columns(fn, self.F), fn(self.d), None if self.k3 is None else fn(self.k3),
                    None if self.src is None else tuple(None if t is None else fn(t) for t in self.src),
                    None if self.k4 is None else fn(self.k4))


def map_columns(fn, Fm: torch.Tensor | None):
    """Apply a per-sample tensor op (written for ``[B, ...]``) to every column of ``F``."""
    if Fm is None or Fm.shape[0] == 0:
        return None
    return torch.vmap(fn)(Fm)


def map_batched(fn, Fm: torch.Tensor | None):
    """Apply a batch-agnostic op (conv, pool) to ``F`` by merging ``K`` into the batch."""
    if Fm is None or Fm.shape[0] == 0:
        return None
    K, B = Fm.shape[:2]
    out = fn(Fm.reshape((K * B,) + tuple(Fm.shape[2:])))
    return out.reshape((K, B) + tuple(out.shape[1:]))


def renormalise(Fm: torch.Tensor, target: torch.Tensor, with_lost: bool = False):
    """Scale every unit's row of ``F`` so that its squared norm is ``target`` (the
    variance-preserving sketch: marginal variances exact, correlations sketched).
    ``with_lost``: also return the variance the rows cannot carry (``target`` where a
    row is zero, else 0), without another pass over ``F``."""
    cur = Fm.pow(2).sum(0)
    nz = cur > 0
    scale = torch.where(nz, safe_sqrt(target.clamp_min(0) / torch.where(nz, cur, torch.ones_like(cur))),
                        torch.zeros_like(cur))
    out = Fm * scale.unsqueeze(0)
    if with_lost:
        return out, torch.where(nz, torch.zeros_like(target), target.clamp_min(0))
    return out


def block_diag(Cm: torch.Tensor) -> torch.Tensor:
    """``[B, C, r, r]`` → ``[B, C·r, C·r]`` block-diagonal."""
    B, C, r, _ = Cm.shape
    out = torch.zeros(B, C, r, C, r, dtype=Cm.dtype, device=Cm.device)
    idx = torch.arange(C, device=Cm.device)
    out[:, idx, :, idx, :] = Cm.permute(1, 0, 2, 3)
    return out.reshape(B, C * r, C * r)


def generator(seed: int, stream: int, call: int) -> torch.Generator:
    """A CPU generator for random sketch ``stream`` at its ``call``-th use in a pass,
    seeded from ``(seed, stream, call)`` through NumPy's SeedSequence (independent
    streams, no hand-picked constants, no global state)."""
    state = np.random.SeedSequence([int(seed), int(stream), int(call)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``Y [..., L, p]``: ``Y (YᵀY)^(-1/2)`` from the small
    ``p × p`` eigendecomposition (measured 5× faster than batched QR on CPU; directions
    below 1e-12 of the largest are dropped to zero)."""
    w, V = torch.linalg.eigh((Y.mT @ Y).detach())  # a fixed basis rotation when differentiated
    keep = w > w[..., -1:] * 1e-12
    inv = torch.where(keep, torch.where(keep, w.clamp_min(1e-300), torch.ones_like(w)).rsqrt(), torch.zeros_like(w))
    return Y @ (V * inv.unsqueeze(-2))


def canonical_signs(V: torch.Tensor) -> torch.Tensor:
    """Eigenvectors ``V [..., L, r]`` with each column's largest-magnitude entry made
    positive: an eigenvector's sign is arbitrary, and batched and single LAPACK calls
    choose it differently, so without a convention an input's sketched columns (and its
    result) would depend on the batch it is computed in."""
    idx = V.abs().argmax(-2, keepdim=True)
    sign = torch.sign(torch.gather(V, -2, idx))
    return V * torch.where(sign == 0, torch.ones_like(sign), sign)


def top_eigh(G: torch.Tensor, r: int, seed: int = 0):
    """Top ``r`` eigenpairs of symmetric ``G [..., L, L]``: ``(λ [..., r], U [..., L, r])``,
    largest first, in ``G``'s dtype. Exact ``eigh`` for ``L <=`` :data:`EXACT_EIGH_MAX`,
    randomised subspace iteration above; both in float64, the iteration with a second
    orthonormalisation. In float32 the iteration's ``(YᵀY)^(-1/2)`` lost orthonormality
    once ``r + OVERSAMPLE`` approached the rank of ``G`` (patch Gram matrices have
    fast-decaying spectra): columns of norm up to 2.5 at ``r = L = 64``, whose injected
    variance blew a ResNet-20's pre-activation variance up 500-fold
    (``test_top_eigh_orthonormal_in_float32``)."""
    L = G.shape[-1]
    dt = G.dtype
    G = G.double()
    if L <= EXACT_EIGH_MAX:
        w, U = torch.linalg.eigh(G)
        return w[..., -r:].flip(-1).to(dt), canonical_signs(U[..., -r:].flip(-1)).to(dt)
    gen = generator(seed, 99, 0)
    p = min(L, r + OVERSAMPLE)
    # one start for every matrix of the batch: a matrix's result must not depend on the batch
    Q = torch.randn((L, p), generator=gen, dtype=dt).to(G.device, torch.float64).expand(G.shape[:-2] + (L, p))
    for _ in range(SUBSPACE_ITERS):
        Q = _orthonormal(G @ Q)
    Q = _orthonormal(Q)  # a second pass restores what the first lost (as CholeskyQR2)
    T = Q.mT @ G @ Q
    w, V = torch.linalg.eigh(T)
    U = Q @ V
    return w[..., -r:].flip(-1).to(dt), canonical_signs(U[..., -r:].flip(-1)).to(dt)


def pair(v):
    if isinstance(v, int):
        return (v, v)
    return tuple(v)


def patch_gram(Fm: torch.Tensor, groups: int, kernel, stride, padding, dilation, out_hw) -> torch.Tensor:
    """``G_pq = Σ_k Σ_j F_k[patch_p, j] F_k[patch_q, j]`` (``[B, g, L, L]``) for the columns
    ``F [K, B, C, H, W]``: the channel-summed spatial Gram ``S = Σ_k Σ_c F_k[c] F_k[c]ᵀ``
    at input resolution, summed over the kernel offsets (``k²`` shifted copies) — a
    factor ``k²`` cheaper than unfolding every column.

    Differentiated (``Fm`` requires grad, as in
    :func:`~.surrogate.mean_map_first_chaos`), every column is unfolded instead: the
    backward of each of the ``k²`` slices of the shifted sum writes a zero tensor of the
    whole padded ``S`` and adds into it (79% of the profiled time of that pass on a
    digits ResNet-20 at rank 1; 7.2 → 5.3 s on 128 inputs), where the unfolded route's
    backward is one product and one ``col2im``
    (``test_patch_gram_equals_unfolded_reference``: values and gradients)."""
    K, B, C, H, W = Fm.shape
    if torch.is_grad_enabled() and Fm.requires_grad:
        P = F.unfold(Fm.reshape(K * B, C, H, W), kernel, dilation=dilation, padding=padding, stride=stride)
        L = P.shape[-1]
        P = P.reshape(K, B, groups, -1, L).permute(1, 2, 0, 3, 4).reshape(B, groups, -1, L)  # [B, g, K·C/g·k², L]
        return P.mT @ P
    kh, kw = pair(kernel)
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    Ho, Wo = out_hw
    # one batched product over the (column, channel) pairs: [B, g, K·C/g, HW]ᵀ[…]
    # (measured 3× faster than the equivalent einsum, which contracts two separated axes)
    Fg = Fm.reshape(K, B, groups, C // groups, H * W).permute(1, 2, 0, 3, 4).reshape(B, groups, -1, H * W)
    S = (Fg.mT @ Fg).reshape(B, groups, H, W, H, W)
    S = F.pad(S, (pw, pw, ph, ph, pw, pw, ph, ph))
    G = torch.zeros(B, groups, Ho, Wo, Ho, Wo, dtype=Fm.dtype, device=Fm.device)
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dh, j * dw
            ys = slice(y0, y0 + sh * (Ho - 1) + 1, sh)
            xs = slice(x0, x0 + sw * (Wo - 1) + 1, sw)
            G += S[:, :, ys, xs, ys, xs]
    return G.reshape(B, groups, Ho * Wo, Ho * Wo)
