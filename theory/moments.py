"""Moment propagation: logit means and covariances under weight noise beyond first
order (``predict(..., method="moments")``; THEORY.md §2, §3, §9).

Two passes per chunk of inputs, over the network traced with ``torch.fx``.

1. **Moment pass.** Every activation ``h`` is carried, per input, as a Gaussian with
   mean ``μ`` and a *low-rank-plus-diagonal* covariance

       h = μ + F ξ + diag(√d) ζ,     ξ ~ N(0, I_K) shared by all activations,
                                     ζ ~ N(0, I) independent per unit,

   so a residual connection adds two *correlated* tensors exactly (``F_skip + F_branch``
   in the same basis). Node by node:

   * Linear / Conv (``y = (W + N) x + b``): ``μ_y = Wμ + b``, ``F_y = W F`` (exact),
     ``d_y = (W∘W) d`` (the diagonal of ``W diag(d) Wᵀ``). The weight noise adds new
     independent sources of variance ``Σ_j σ_ij² E[x_j²]``, ``E[x²] = μ² + Var(x)`` — the
     noise also acts on the already perturbed input (THEORY.md §2,
     ``σ²(‖μ‖² + tr Γ)``). A convolution reuses one kernel at every position, so its new
     noise is correlated across the positions of a channel:
     ``Cov(δy_{c,p}, δy_{c,q}) = σ_c² G_pq``, ``G`` the Gram matrix of the noisy input
     patches (mean patches, patches of every column of ``F``, and ``d``); its top
     ``spatial_rank`` eigenvectors give new columns per channel, the rest of each unit's
     (exact) variance goes to ``d``. The basis is then re-compressed to ``rank``
     columns: a variance-preserving random sketch of the joint columns of all live
     activations (``compression="sketch"``: correlations sketched, each unit's variance
     kept exactly) or their top eigenvectors (``"eigh"``); with at most ``rank`` units
     (an MLP no wider than ``rank``) the factorisation is exact.
   * BatchNorm-like layers in eval (any ``folding_affine()``): the affine map.
   * ReLU: with ``s² = Var``, ``α = μ/s``, the exact Gaussian moments
     ``E[relu] = μΦ(α) + sφ(α)``, ``E[relu²] = (μ² + s²)Φ(α) + μsφ(α)`` (the mean shift
     from activation flips that the first order misses) and, exact for Gaussians
     (Price's theorem), ``Cov(relu(h), ·) = Φ(α) Cov(h, ·)``.
   * Max pooling: Clark's (1961) moments of the maximum of two correlated Gaussians,
     pairwise over the window, with ``Cov(max, ·) = Φ(α)Cov(h₁, ·) + Φ(−α)Cov(h₂, ·)``.
   * Average pooling, ``mean``, flatten/view/reshape, slicing, zero padding, concatenation
     and ``+`` (residual): linear, applied to ``μ``, ``F`` and ``d`` alike.

   Before a Linear/Conv layer maps its input, the input's diagonal part ``d`` is turned
   into ``d_rank`` sketched columns (Rademacher, each unit's variance exact), so the
   correlation that the layer creates between units fed by the same independent
   variance is kept (sketched) instead of dropped; the nonlinear excess of each ReLU /
   max beyond its linear part is carried partly as ``h2_rank`` columns: its second
   Hermite component ``2c₂ᵢc₂ⱼρᵢⱼ²``, by random features.

   The pass records, per ReLU / pairwise max, the std ``s`` (or ``θ = sd(h₁ − h₂)``) and
   the variance the expected-slope linearisation misses, ``Var(out) − Var(lin. part)``;
   per noisy layer, the noise acting on the input's perturbation: its exact per-unit
   variance ``Σ_j σ_cj² Var(x̃_pj)`` and, for a convolution, the perturbation patch Gram
   matrix (its spatial correlation).

2. **Surrogate pass.** The network's mean path with every ReLU replaced by its Gaussian
   expectation at the recorded ``s`` (``zΦ(z/s) + sφ(z/s)``, whose derivative is the
   expected slope ``Φ(z/s)``) and every max-pool by Clark's expectation. Its output is
   the propagated logit mean (the mean shift); its Jacobian, computed exactly by one
   batched backward pass per class as in the linear method, maps every noise source to
   the logits:

       Cov(f) = Σ_θ σ_θ² J̃_θ J̃_θᵀ                         (weight noise on the mean input)
              + Σ_layers J̃_e (σ² ⊗ G_pert) J̃_eᵀ            (noise on the perturbation)
              + Σ_nonlin J̃_r diag(excess) J̃_rᵀ              (nonlinear excess variance)

   So the dominant first-order term is exact at every noise level (no truncation), with
   smoothed gates; the low-rank pass only supplies per-unit variances and local
   correlations. At small noise the surrogate is the network itself and the result is
   the linear method's.

Remaining approximations: Gaussian activations (and Gaussian logits for the accuracy:
on the digits ResNet-20 at η = 0.3 the Gaussian model with the *Monte-Carlo* logit mean
and covariance already overestimates accuracy by 0.8 points), the higher Hermite orders
of each ReLU/max excess treated as independent across units, the sketch/truncation in
the moment pass (deep residual nets lose ~10–15% of the per-unit pre-activation variance
by the last block at η = 0.3), and the mean kernel variance ``σ̄_c²`` for the spatial
correlation of non-uniform noise (multiplicative).

A layer the propagation does not support raises ``ValueError`` naming it and pointing
to ``method="linear"`` (which works for any differentiable module).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._graph import is_relu, trace
from .linearize import LinearizedNetwork
from .noise import WeightNoise

__all__ = ["MomentPropagator", "MomentResult", "propagate_moments"]

_INV_SQRT2PI = 1.0 / math.sqrt(2 * math.pi)
_TINY = 1e-30


def _relu_shape(alpha):
    """For ``z ~ N(μ, s²)``, ``α = μ/s`` (float64): ``(Φ, φ, g, e)`` with
    ``Var(relu z) = s²(Φ + g)`` and the part the expected-slope linearisation ``Φ·z``
    misses, ``Var(relu z) − Φ²s² = s² e``; ``g = α²Φ(1−Φ) + αφ(1−2Φ) − φ²``,
    ``e = Φ(1−Φ) + g``, written with ``1 − Φ = Φ(−α)`` to avoid cancellation."""
    cdf = _ncdf(alpha)
    q = _ncdf(-alpha)
    pdf = _npdf(alpha)
    g = alpha * alpha * cdf * q + alpha * pdf * (q - cdf) - pdf * pdf
    return cdf, pdf, g, cdf * q + g


def _npdf(a):
    return torch.exp(-0.5 * a * a) * _INV_SQRT2PI


def _ncdf(a):
    return torch.special.ndtr(a)


@dataclass
class _Dist:
    """``μ + F ξ + √d ζ``: ``mu [B, *s]``, ``F [K, B, *s]`` or ``None``, ``d [B, *s]``."""

    mu: torch.Tensor
    F: torch.Tensor | None
    d: torch.Tensor

    @property
    def K(self) -> int:
        return 0 if self.F is None else self.F.shape[0]

    def fsq(self) -> torch.Tensor:
        return torch.zeros_like(self.mu) if self.F is None else (self.F * self.F).sum(0)

    def var(self) -> torch.Tensor:
        return self.d + self.fsq()

    def padded(self, K: int) -> torch.Tensor:
        if K == 0:
            return torch.zeros((0,) + tuple(self.mu.shape), dtype=self.mu.dtype, device=self.mu.device)
        if self.F is None:
            return torch.zeros((K,) + tuple(self.mu.shape), dtype=self.mu.dtype, device=self.mu.device)
        if self.F.shape[0] == K:
            return self.F
        pad = torch.zeros((K - self.F.shape[0],) + tuple(self.mu.shape), dtype=self.mu.dtype, device=self.mu.device)
        return torch.cat([self.F, pad])


def _map_F(fn, Fm: torch.Tensor | None):
    """Apply a per-sample tensor op (written for ``[B, ...]``) to every column of ``F``."""
    if Fm is None:
        return None
    if Fm.shape[0] == 0:
        return None
    return torch.vmap(fn)(Fm)


def _map_linear_batched(fn, Fm: torch.Tensor | None):
    """Apply a batch-agnostic op (conv, pool) to ``F`` by merging ``K`` into the batch."""
    if Fm is None or Fm.shape[0] == 0:
        return None
    K, B = Fm.shape[:2]
    out = fn(Fm.reshape((K * B,) + tuple(Fm.shape[2:])))
    return out.reshape((K, B) + tuple(out.shape[1:]))


@dataclass(frozen=True)
class MomentResult:
    """Logit mean ``[N, C]`` and covariance ``[N, C, C]`` (float64) from moment
    propagation, and diagnostics: for every ReLU input, the fraction of units whose
    predicted noise std exceeds their mean magnitude (``preact_frac``), and the share
    of variance moved into the diagonal part by compression (``compression_loss``)."""

    mean: torch.Tensor
    cov: torch.Tensor
    preact_frac: float
    preact_frac_per_layer: tuple
    compression_loss: float
    rank: int
    spatial_rank: int


_SELECTION_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                      "__getitem__"}
_SELECTION_FUNCTIONS = {torch.flatten, torch.reshape, operator.getitem, torch.permute, torch.transpose,
                        torch.squeeze, torch.unsqueeze}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class MomentPropagator:
    """Moment propagation through a traced network (see the module docstring).

    ``rank``: columns of ``F`` kept (per input); ``spatial_rank``: new columns per output
    channel of a noisy convolution.
    """

    def __init__(self, lin: LinearizedNetwork, noise: WeightNoise, rank: int = 64, spatial_rank: int = 8,
                 first_order: bool = False, unit_space_max: int = 1024, compression: str = "sketch",
                 seed: int = 0, h2_rank: int = 16, d_rank: int = 16, dtype: torch.dtype = torch.float32):
        if compression not in ("sketch", "eigh"):
            raise ValueError(f"compression must be 'sketch' or 'eigh', got {compression!r}")
        self.compression = compression
        self.seed = int(seed)
        self.h2_rank = int(h2_rank)
        self.d_rank = int(d_rank)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if not isinstance(spatial_rank, int) or spatial_rank < 1:
            raise ValueError(f"spatial_rank must be an int >= 1, got {spatial_rank!r}")
        self.lin = lin
        self.rank = rank
        self.spatial_rank = spatial_rank
        self.first_order = bool(first_order)
        self.unit_space_max = int(unit_space_max)
        self.graph = self._trace(lin.net)
        self.modules = dict(lin.net.named_modules())
        self._swap_relu_maxpool()
        self.dtype = dtype
        self.noise_var: dict[str, torch.Tensor] = {}
        self._set_noise(noise)
        self._check_supported()
        self._cache: dict = {}

    @staticmethod
    def _trace(net):
        try:
            return trace(net)
        except ValueError as e:
            raise ValueError(f"method='moments' needs a torch.fx-traceable model: {e}; use method='linear'") from e

    def _is_maxpool(self, node) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules.get(node.target), nn.MaxPool2d)
        return node.op == "call_function" and node.target in (F.max_pool2d, torch.max_pool2d)

    def _swap_relu_maxpool(self):
        """Rewrite ``maxpool(relu(z))`` as ``relu(maxpool(z))`` (equal: the max commutes
        with any non-decreasing function), so Clark's max acts on Gaussian
        pre-activations instead of rectified, zero-inflated ones."""
        for pool in list(self.graph.nodes):
            if not self._is_maxpool(pool) or not pool.args or not isinstance(pool.args[0], fx.Node):
                continue
            relu = pool.args[0]
            if not is_relu(relu, self.modules) or len(relu.users) != 1 or not isinstance(relu.args[0], fx.Node):
                continue
            z = relu.args[0]
            pool.replace_all_uses_with(relu)
            pool.args = (z,) + tuple(pool.args[1:])
            relu.args = (pool,) + tuple(relu.args[1:])
            pool.append(relu)
        self.graph.lint()

    def _set_noise(self, noise: WeightNoise):
        names = set(self.lin.names)
        for n in names:
            mod_name, _, pname = n.rpartition(".")
            mod = self.modules.get(mod_name)
            if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) or pname not in ("weight", "bias"):
                raise ValueError(
                    f"method='moments' supports noise on Linear/Conv2d weights and biases only; target {n!r} "
                    f"({type(mod).__name__}) is not one; use method='linear'"
                )
        self.noise_var = {n: noise.variance(self.lin.target_params[n]).to(self.dtype) for n in self.lin.names}

    def with_noise(self, noise: WeightNoise) -> "MomentPropagator":
        """The same propagator at another noise model/level (graph and weights reused)."""
        new = object.__new__(MomentPropagator)
        new.__dict__.update(self.__dict__)
        new.noise_var = {}
        new._set_noise(noise)
        return new

    # ------------------------------------------------------------------ checks
    def _unsupported(self, node: fx.Node, what: str):
        return ValueError(
            f"method='moments' does not support {what} (graph node {node.name!r}); "
            "use method='linear' (first order, any differentiable module)"
        )

    def _check_supported(self):
        for node in self.graph.nodes:
            if node.op == "call_module":
                m = self.modules[node.target]
                ok = (isinstance(m, (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                                     nn.Flatten) + _PASS_MODULES)
                      or callable(getattr(m, "folding_affine", None))
                      or isinstance(m, nn.modules.batchnorm._BatchNorm))
                if not ok:
                    raise self._unsupported(node, f"layer {node.target!r} ({type(m).__name__})")

    # ------------------------------------------------------------------ params
    def _weights(self, name: str):
        if name not in self._cache:
            m = self.modules[name]
            W = self.lin.params[name + ".weight"].to(self.dtype)
            b = self.lin.params.get(name + ".bias") if getattr(m, "bias", None) is not None else None
            self._cache[name] = (W, None if b is None else b.to(self.dtype))
        return self._cache[name]

    def _affine(self, name: str):
        key = ("affine", name)
        if key not in self._cache:
            m = self.modules[name]
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not callable(getattr(m, "folding_affine", None)):
                from .targets import folding_affine

                a, c = folding_affine(m)
                # folding_affine reads the module's tensors; use the functional params
                bufs, prm = self.lin.buffers, self.lin.params
                var = bufs.get(name + ".running_var")
                mean = bufs.get(name + ".running_mean")
                if var is not None and mean is not None:
                    a = torch.rsqrt(var.double() + m.eps)
                    if (name + ".weight") in prm:
                        a = a * prm[name + ".weight"].double()
                    c = -mean.double() * a
                    if (name + ".bias") in prm:
                        c = c + prm[name + ".bias"].double()
            else:
                a, c = m.folding_affine()
            self._cache[key] = (a.to(self.dtype), c.to(self.dtype))
        return self._cache[key]

    # ------------------------------------------------------------------ run
    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Propagate a batch ``x``; returns logit mean ``[B, C]``, covariance ``[B, C, C]``
        and per-batch statistics."""
        nodes = list(self.graph.nodes)
        last_use = {}
        for i, node in enumerate(nodes):
            for a in node.all_input_nodes:
                last_use[a] = i
        env: dict = {}
        stats = {"pre_count": [], "pre_exceed": [], "lost": 0.0, "total": 0.0}
        self._stats = stats
        self.rec = {}
        self._ncalls = 0
        out = None
        for i, node in enumerate(nodes):
            if node.op == "placeholder":
                if node.target != next(n for n in nodes if n.op == "placeholder").target:
                    raise self._unsupported(node, "models with more than one input")
                xd = x.to(self.dtype)
                env[node] = _Dist(xd, None, torch.zeros_like(xd))
            elif node.op == "output":
                out = self._load(env, node.args[0])
            else:
                live = list({id(v): v for n, v in env.items()
                             if isinstance(v, _Dist) and last_use.get(n, -1) > i}.values())
                env[node] = self._eval(node, env, live)
            for a in node.all_input_nodes:
                if last_use.get(a) == i and a in env:
                    del env[a]
        if not isinstance(out, _Dist):
            raise ValueError("method='moments': the model output is not a tensor of logits computed from the input")
        if out.mu.dim() != 2:
            raise ValueError(f"the model must map a batch of inputs to logits [N, C]; got shape {tuple(out.mu.shape)}")
        Fm = out.F
        cov = torch.diag_embed(out.d)
        if Fm is not None and Fm.shape[0]:
            cov = cov + torch.einsum("kbi,kbj->bij", Fm, Fm)
        return out.mu, cov, stats

    def _load(self, env, a):
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self._load(env, v) for v in a)
        if isinstance(a, dict):
            return {k: self._load(env, v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self._load(env, a.start), self._load(env, a.stop), self._load(env, a.step))
        return a

    def _eval(self, node: fx.Node, env, live):
        self._cur = node.name
        args = self._load(env, node.args)
        kwargs = self._load(env, node.kwargs)
        has_dist = any(isinstance(v, _Dist) for v in _flat(args) + _flat(list(kwargs.values())))
        if node.op == "get_attr":
            obj = self.lin.net
            for part in node.target.split("."):
                obj = getattr(obj, part)
            full = node.target
            if full in self.lin.params:
                return self.lin.params[full]
            if full in self.lin.buffers:
                return self.lin.buffers[full]
            return obj
        if node.op == "call_module":
            m = self.modules[node.target]
            return self._module(node, m, args, kwargs, live)
        if not has_dist:  # plain computation on sizes/constants
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                obj, *rest = args
                return getattr(obj, node.target)(*rest, **kwargs)
            raise self._unsupported(node, f"node kind {node.op!r}")
        if is_relu(node, self.modules):
            if kwargs.get("inplace") or (len(args) > 1 and args[1] is True):
                pass  # in-place flag is irrelevant for moments
            return self._relu(args[0])
        if node.op == "call_method":
            return self._method(node, args, kwargs)
        return self._function(node, args, kwargs)

    # ------------------------------------------------------------------ modules
    def _module(self, node, m, args, kwargs, live):
        x = args[0]
        if not isinstance(x, _Dist):
            # a module applied to a constant: evaluate plainly
            return m(*args, **kwargs)
        if isinstance(m, nn.Linear):
            return self._linear(node.target, m, x, live)
        if isinstance(m, nn.Conv2d):
            return self._conv(node.target, m, x, live)
        if isinstance(m, nn.ReLU):
            return self._relu(x)
        if callable(getattr(m, "folding_affine", None)) or isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training:
                raise self._unsupported(node, f"normalisation layer {node.target!r} in training mode")
            a, c = self._affine(node.target)
            shape = (1, -1) + (1,) * (x.mu.dim() - 2)
            a, c = a.reshape(shape), c.reshape(shape)
            return _Dist(a * x.mu + c, None if x.F is None else a.unsqueeze(0) * x.F, a * a * x.d)
        if isinstance(m, _PASS_MODULES):
            return x
        if isinstance(m, nn.Flatten):
            return self._select(lambda t: m(t), x)
        if isinstance(m, nn.MaxPool2d):
            return self._maxpool(node, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, nn.AvgPool2d):
            return self._avgpool(node, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                 m.divisor_override)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self._adaptive_avgpool(x, m.output_size)
        raise self._unsupported(node, f"layer {node.target!r} ({type(m).__name__})")

    # ------------------------------------------------------------------ linear layers
    def _linear(self, name, m: nn.Linear, x: _Dist, live):
        if x.mu.dim() != 2:
            raise ValueError(f"method='moments': Linear layer {name!r} on an input of shape {tuple(x.mu.shape)} "
                             "(only [N, features] is supported); use method='linear'")
        W, b = self._weights(name)
        mu = x.mu @ W.T
        if b is not None:
            mu = mu + b
        d_in, M = self._d_to_columns(x, live)
        Fy = None if x.F is None else x.F @ W.T
        d = x.d @ (W * W).T
        if M:
            Fy[-M:] = _renormalise(Fy[-M:], d_in @ (W * W).T)
        # new noise: Var(δy_i) = Σ_j σ_ij² E[x_j²] (+ σ_b,i²)
        wv = self.noise_var.get(name + ".weight")
        bv = self.noise_var.get(name + ".bias")
        if wv is None and bv is None:
            return _Dist(mu, Fy, d)
        v = torch.zeros_like(mu)
        if wv is not None:
            xv = torch.zeros_like(x.mu) if self.first_order else x.var()
            vpert = xv @ wv.T  # the noise acting on the input's perturbation: Σ_j σ_ij² Var(x_j)
            self.rec[self._cur] = {"vpert": vpert}
            v = v + (x.mu * x.mu) @ wv.T + vpert
        if bv is not None:
            v = v + bv
        # one new source per output unit: profile 1 (L = 1), coefficient √v
        B, C = mu.shape
        u = torch.ones(B, 1, 1, 1, dtype=self.dtype, device=mu.device)  # [B, groups=1, r=1, L=1]
        a = v.clamp_min(0).sqrt().unsqueeze(-1)  # [B, C, r=1]
        y = _Dist(mu.unsqueeze(-1), None if Fy is None else Fy.unsqueeze(-1), d.unsqueeze(-1))
        y = self._inject(y, u, a, v.unsqueeze(-1), live, groups=1)
        return _Dist(y.mu.squeeze(-1), None if y.F is None else y.F.squeeze(-1), y.d.squeeze(-1))

    def _conv(self, name, m: nn.Conv2d, x: _Dist, live):
        if x.mu.dim() != 4:
            raise ValueError(f"method='moments': Conv2d {name!r} needs a 4-D input, got {tuple(x.mu.shape)}")
        if m.padding_mode != "zeros":
            raise ValueError(f"method='moments': Conv2d {name!r} with padding_mode={m.padding_mode!r} is not supported; use method='linear'")
        W, b = self._weights(name)
        kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        mu = F.conv2d(x.mu, W, b, **kw)
        d_in, M = self._d_to_columns(x, live)
        Fy = _map_linear_batched(lambda t: F.conv2d(t, W, None, **kw), x.F)
        if M:
            Fy[-M:] = _renormalise(Fy[-M:], F.conv2d(d_in, W * W, None, **kw))
        d = F.conv2d(x.d, W * W, None, **kw)
        wv = self.noise_var.get(name + ".weight")
        bv = self.noise_var.get(name + ".bias")
        if wv is None and bv is None:
            return _Dist(mu, Fy, d)
        B, Cout, Ho, Wo = mu.shape
        L = Ho * Wo
        g = m.groups
        cin_g = x.mu.shape[1] // g
        cout_g = Cout // g
        profiles = []  # [B, g, r, L] per source family
        coeffs = []  # [B, Cout, r]
        vdiag = torch.zeros_like(mu)
        if wv is not None:
            xv = torch.zeros_like(x.mu) if self.first_order else x.var()
            vpert = F.conv2d(xv, wv, None, **kw)  # Σ_j σ_cj² Var(x̃_pj): noise on the perturbation
            vdiag = vdiag + F.conv2d(x.mu * x.mu, wv, None, **kw) + vpert  # exact per-unit variance
            # patch Gram per group: G = Σ_j E[x̃_pj x̃_qj] = (mean patches) + (perturbation patches)
            unf = dict(kernel_size=m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            Pm = F.unfold(x.mu, **unf).reshape(B, g, cin_g * m.kernel_size[0] * m.kernel_size[1], L)
            G = torch.zeros(B, g, L, L, dtype=self.dtype, device=mu.device)
            if x.F is not None and x.F.shape[0] and not self.first_order:
                G = G + _patch_gram(x.F, g, m.kernel_size, m.stride, m.padding, m.dilation, (Ho, Wo))
            if not self.first_order:
                Pd = F.unfold(x.d, **unf).reshape(B, g, -1, L).sum(2)  # [B, g, L]
                G = G + torch.diag_embed(Pd)
            sbar2 = wv.reshape(Cout, -1).mean(1)  # mean noise variance of channel c's kernel
            self.rec[self._cur] = {"vpert": vpert, "gpert": G.clone(), "sbar2": sbar2}
            G = G + torch.einsum("bgjp,bgjq->bgpq", Pm, Pm)
            r = min(self.spatial_rank, L)
            lam, U = _top_eigh(G, r)  # [B, g, r], [B, g, L, r]
            lam_c = lam.repeat_interleave(cout_g, dim=1)  # [B, Cout, r]
            a = (sbar2[None, :, None] * lam_c.clamp_min(0)).sqrt()
            profiles.append(U.mT)  # [B, g, r, L]
            coeffs.append(a)
        if bv is not None:
            vdiag = vdiag + bv.reshape(1, -1, 1, 1)
            ones = torch.full((B, g, 1, L), 1.0 / math.sqrt(L), dtype=self.dtype, device=mu.device)
            profiles.append(ones)
            coeffs.append((bv * L).sqrt().reshape(1, Cout, 1).expand(B, -1, -1))
        u = torch.cat(profiles, dim=2)
        a = torch.cat(coeffs, dim=2)
        y = _Dist(mu.reshape(B, Cout, L), None if Fy is None else Fy.reshape(Fy.shape[0], B, Cout, L),
                  d.reshape(B, Cout, L))
        y = self._inject(y, u, a, vdiag.reshape(B, Cout, L), live, groups=g)
        shp = (B, Cout, Ho, Wo)
        return _Dist(y.mu.reshape(shp), None if y.F is None else y.F.reshape((y.F.shape[0],) + shp), y.d.reshape(shp))

    def _d_to_columns(self, x: _Dist, live):
        """Turn the independent part ``d`` of a layer's input into ``d_rank`` sketched
        columns ``√d ⊙ r_m/√M`` (Rademacher ``r``: each unit's variance exact), in place
        — the input is shared with any skip path, which then shares the columns — so the
        layer maps ``diag(d)`` with its off-diagonal part (sketched) instead of dropping
        it. Returns ``(old d, M)``; the caller rescales the mapped columns to the exact
        diagonal ``(W∘W) d``."""
        M = self.d_rank
        if M == 0 or self.first_order or not bool((x.d > 0).any()):
            return None, 0
        K = max([x.K] + [t.K for t in live])
        gen = torch.Generator().manual_seed(15485863 * self.seed + 32452843 + self._ncalls)
        self._ncalls += 1
        r = torch.randint(0, 2, (M,) + tuple(x.d.shape), generator=gen).to(dtype=self.dtype, device=x.d.device) * 2 - 1
        d_in = x.d
        x.F = torch.cat([x.padded(K), r * (d_in.clamp_min(0).sqrt() / math.sqrt(M)).unsqueeze(0)])
        x.d = torch.zeros_like(d_in)
        return d_in, M

    def _inject(self, y: _Dist, u, a, vdiag, live, groups):
        """Add new independent sources to ``y`` (``[B, C, L]``) and re-compress the basis.

        Source ``(c, k)``: ``a[b, c, k] · u[b, g(c), k, :]`` on channel ``c`` (zero
        elsewhere). ``vdiag`` is the exact per-unit variance of the new noise; what the
        sources do not carry goes to ``d``. The joint covariance of the live activations
        and ``y`` is then re-factorised with at most ``rank`` columns: in unit space when
        the live activations have no more units than there are columns (exact when they
        have at most ``rank`` units), otherwise through the Gram matrix of the columns."""
        B, C, L = y.mu.shape
        r = u.shape[2]
        cout_g = C // groups
        ug = u.repeat_interleave(cout_g, dim=1)  # [B, C, r, L]
        carried = torch.einsum("bcr,bcrl->bcl", a * a, ug * ug)
        d = y.d + (vdiag - carried).clamp_min(0)
        K = max([y.K] + [t.K for t in live])
        Fy = y.padded(K)  # [K, B, C, L]
        others = [(t, t.padded(K)) for t in live if t.K > 0]
        n_new = C * r
        Mtot = K + n_new
        Dy = C * L
        Dtot = Dy + sum(int(t.mu[0].numel()) for t, _ in others)
        if Mtot <= self.rank:  # room for every new source: append them, nothing dropped
            newF = torch.einsum("bcrl,bcr->bcrl", ug, a).permute(1, 2, 0, 3)  # [C, r, B, L]
            newF = torch.einsum("crbl,ce->crbel", newF, torch.eye(C, dtype=self.dtype, device=y.mu.device))
            newF = newF.reshape(n_new, B, C, L)
            Fcat = torch.cat([Fy, newF]) if K else newF
            return _Dist(y.mu, Fcat, d)
        if Dtot <= Mtot and Dtot <= self.unit_space_max:
            return self._compress_units(y, Fy, others, ug, a, d, K)
        # ---- Gram path: M = [[Σ_t F_tᵀF_t, F_yᵀN], [NᵀF_y, NᵀN]]
        M = torch.zeros(B, Mtot, Mtot, dtype=self.dtype, device=y.mu.device)
        if K:
            A = torch.einsum("kbn,jbn->bkj", Fy.reshape(K, B, -1), Fy.reshape(K, B, -1))
            for _, Ft in others:
                flat = Ft.reshape(K, B, -1)
                A = A + torch.einsum("kbn,jbn->bkj", flat, flat)
            Bm = (torch.einsum("kbcl,bcrl->bkcr", Fy, ug) * a.unsqueeze(1)).reshape(B, K, n_new)
            M[:, :K, :K] = A
            M[:, :K, K:] = Bm
            M[:, K:, :K] = Bm.mT
        UG = torch.einsum("bcrl,bcsl->bcrs", ug, ug)
        M[:, K:, K:] = _block_diag(a.unsqueeze(-1) * a.unsqueeze(-2) * UG)
        R = min(self.rank, Mtot)
        if R == Mtot:  # nothing to drop: keep the columns as they are
            V = torch.eye(Mtot, dtype=self.dtype, device=y.mu.device).expand(B, -1, -1)
        elif self.compression == "sketch":
            gen = torch.Generator().manual_seed(1000003 * self.seed + self._ncalls)
            self._ncalls += 1
            V = (torch.randn(Mtot, R, generator=gen, dtype=torch.float64) / math.sqrt(R)).to(
                dtype=self.dtype, device=y.mu.device).expand(B, -1, -1)
        else:
            _, V = torch.linalg.eigh(M)  # ascending
            V = V[:, :, -R:].flip(-1)  # [B, Mtot, R]
        V1, V2 = V[:, :K, :], V[:, K:, :].reshape(B, C, r, R)
        newF = torch.einsum("bcrl,bcr,bcrR->Rbcl", ug, a, V2)
        if K:
            newF = newF + torch.einsum("kbcl,bkR->Rbcl", Fy, V1)
        before = (Fy.pow(2).sum(0) + carried) if K else carried
        if self.compression == "sketch" and R < Mtot:
            newF = _renormalise(newF, before)
        lost_y = (before - newF.pow(2).sum(0)).clamp_min(0)
        self._stats["lost"] += float(lost_y.sum())
        self._stats["total"] += float(before.sum())
        for t, Ft in others:
            if R == Mtot:
                Fn = Ft
                lost = torch.zeros_like(t.d)
            else:
                Fn = torch.einsum("kbn,bkR->Rbn", Ft.reshape(K, B, -1), V1).reshape((R,) + tuple(t.mu.shape))
                if self.compression == "sketch":
                    Fn = _renormalise(Fn, Ft.pow(2).sum(0))
                lost = (Ft.pow(2).sum(0) - Fn.pow(2).sum(0)).clamp_min(0)
            self._stats["lost"] += float(lost.sum())
            self._stats["total"] += float(Ft.pow(2).sum())
            t.F = Fn
            t.d = t.d + lost
        return _Dist(y.mu, newF, d + lost_y)

    def _compress_units(self, y: _Dist, Fy, others, ug, a, d, K):
        """Unit-space re-factorisation: the joint covariance ``Σ`` of ``y`` and the live
        activations (all their units stacked), ``Σ = V Λ Vᵀ``, ``F = V_R Λ_R^½``."""
        B, C, L = y.mu.shape
        parts = [Fy.reshape(K, B, C * L)] + [Ft.reshape(K, B, int(t.mu[0].numel())) for t, Ft in others]
        sizes = [p.shape[2] for p in parts]
        Dtot = sum(sizes)
        Sig = torch.zeros(B, Dtot, Dtot, dtype=self.dtype, device=y.mu.device)
        if K:
            Fall = torch.cat(parts, dim=2)
            Sig += torch.einsum("kbi,kbj->bij", Fall, Fall)
        # new sources: block-diagonal over channels, Σ_r a_cr² u_r u_rᵀ within channel c
        blocks = torch.einsum("bcr,bcrl,bcrm->bclm", a * a, ug, ug)  # [B, C, L, L]
        Dy = C * L
        Sig[:, :Dy, :Dy] += _block_diag(blocks)
        R = min(self.rank, Dtot)
        Fnew = None
        if R == Dtot:  # exact: a Cholesky factor (jittered by 1e-12 of the mean variance)
            jit = 1e-12 * torch.diagonal(Sig, dim1=1, dim2=2).mean(1).clamp_min(1e-300)
            Lc, info = torch.linalg.cholesky_ex(Sig + jit[:, None, None] * torch.eye(Dtot, dtype=self.dtype))
            if not bool(info.any()):
                Fnew = Lc.permute(2, 0, 1)  # [R, B, Dtot]: Σ = L Lᵀ
        if Fnew is None:
            w, V = torch.linalg.eigh(Sig)
            w = w[:, -R:].clamp_min(0)
            Fnew = (V[:, :, -R:] * w.sqrt().unsqueeze(1)).permute(2, 0, 1)  # [R, B, Dtot]
        diag = torch.diagonal(Sig, dim1=1, dim2=2)
        lost = (diag - Fnew.pow(2).sum(0)).clamp_min(0)
        self._stats["lost"] += float(lost.sum())
        self._stats["total"] += float(diag.sum())
        chunks = torch.split(Fnew, sizes, dim=2)
        lchunks = torch.split(lost, sizes, dim=1)
        for (t, _), Fc, lc in zip(others, chunks[1:], lchunks[1:]):
            t.F = Fc.reshape((R,) + tuple(t.mu.shape))
            t.d = t.d + lc.reshape(t.mu.shape)
        return _Dist(y.mu, chunks[0].reshape(R, B, C, L), d + lchunks[0].reshape(B, C, L))

    # ------------------------------------------------------------------ nonlinearities
    def _relu(self, x: _Dist) -> _Dist:
        if self.first_order:  # the delta method: gate by the clean sign
            mask = (x.mu > 0).to(self.dtype)
            self.rec[self._cur] = {"s": torch.zeros_like(x.mu), "excess": [torch.zeros_like(x.mu)]}
            return _Dist(x.mu * mask, None if x.F is None else mask * x.F, mask * x.d)
        # the Gaussian moment formulas in float64 (they cancel badly in float32 when s ≪ |μ|)
        dt = self.dtype
        mu = x.mu.double()
        var = x.var().double().clamp_min(0)
        s = var.sqrt()
        self._stats["pre_count"].append(int(mu.numel()))
        self._stats["pre_exceed"].append(int((s > mu.abs()).sum()))
        pos = s > _TINY
        sa = torch.where(pos, s, torch.ones_like(s))
        alpha = torch.where(pos, mu / sa, torch.zeros_like(s))
        cdf, pdf, g, exc = _relu_shape(alpha)
        cdf = torch.where(pos, cdf, (mu > 0).double())
        pdf = torch.where(pos, pdf, torch.zeros_like(s))
        mean = mu * cdf + s * pdf
        v_out = (var * (cdf + g)).clamp_min(0)
        excess = (var * exc).clamp_min(0)
        v_out = torch.where(pos, v_out, torch.zeros_like(v_out))
        excess = torch.where(pos, excess, torch.zeros_like(excess))
        cdf, s, pdf, mean, v_out, excess = (t.to(dt) for t in (cdf, s, pdf, mean, v_out, excess))
        cols, rest = self._hermite2(x.F, s, s * pdf / 2, excess)
        self.rec[self._cur] = {"s": s, "excess": [rest], "cols": [cols]}
        Fn = None if x.F is None else cdf.unsqueeze(0) * x.F
        if cols is not None:
            Fn = cols if Fn is None else torch.cat([Fn, cols])
        fsq = torch.zeros_like(mean) if Fn is None else (Fn * Fn).sum(0)
        return _Dist(mean, Fn, (v_out - fsq).clamp_min(0))

    def _hermite2(self, Fw, sd, c2, excess):
        """The second Hermite component ``c₂ He₂(Z)`` of a nonlinearity of a Gaussian
        ``w = μ + sd·Z``: for two units ``Cov = 2 c₂ᵢ c₂ⱼ ρᵢⱼ²`` (ρ from the correlated part
        ``F``), carried by ``h2_rank`` new columns (random features
        ``((F̂·ω)² − ‖F̂‖²)/√2``, rows rescaled so each unit carries exactly
        ``2c₂²‖F̂‖⁴``); returns ``(columns or None, remaining excess variance)``."""
        M = self.h2_rank
        if M == 0 or Fw is None or Fw.shape[0] == 0:
            return None, excess
        K = Fw.shape[0]
        pos = sd > _TINY
        Fh = Fw / torch.where(pos, sd, torch.ones_like(sd)).unsqueeze(0) * pos.unsqueeze(0)
        gen = torch.Generator().manual_seed(7919 * self.seed + 104729 + self._ncalls)
        self._ncalls += 1
        om = torch.randn(M, K, generator=gen, dtype=torch.float64).to(dtype=self.dtype, device=Fw.device)
        n2 = (Fh * Fh).sum(0)
        proj = torch.einsum("mk,k...->m...", om, Fh)
        g = (proj * proj - n2.unsqueeze(0)) / math.sqrt(2.0)
        target = (2 * c2 * c2 * n2 * n2).clamp_max(excess)
        cols = _renormalise(g, target)
        return cols, (excess - (cols * cols).sum(0)).clamp_min(0)

    def _max2(self, a: _Dist, b: _Dist, K: int) -> _Dist:
        """Clark (1961): ``max(a, b) = b + relu(a − b)`` with ``a − b ~ N(Δ, θ²)``:
        ``E = μ_b + ΔΦ(α) + θφ(α)``, ``Var = v_b + θ²(Φ + g(α)) + 2Φ(c_ab − v_b)``
        (``α = Δ/θ``; float64, cancellation-free), and ``Cov(max, ·) = Φ Cov(a, ·) +
        (1 − Φ) Cov(b, ·)``."""
        dt = self.dtype
        Fa, Fb = a.padded(K), b.padded(K)
        va, vb = a.var().double(), b.var().double()
        cab = (Fa * Fb).sum(0).double() if K else torch.zeros_like(va)
        th2 = (va + vb - 2 * cab).clamp_min(0)
        if self.first_order:
            th2 = torch.zeros_like(th2)
        th = th2.sqrt()
        pos = th > _TINY
        ts = torch.where(pos, th, torch.ones_like(th))
        delta = a.mu.double() - b.mu.double()
        alpha = torch.where(pos, delta / ts, torch.zeros_like(th))
        cdf, pdf, g, exc = _relu_shape(alpha)
        pa = torch.where(pos, cdf, (delta >= 0).double())
        pdf = torch.where(pos, pdf, torch.zeros_like(th))
        pb = 1 - pa
        mean = b.mu.double() + delta * pa + th * pdf
        v = (vb + th2 * torch.where(pos, cdf + g, torch.zeros_like(th)) + 2 * pa * (cab - vb)).clamp_min(0)
        excess = torch.where(pos, th2 * exc, torch.zeros_like(th)).clamp_min(0)
        pa, pb, pdf, th, mean, v, excess = (t.to(dt) for t in (pa, pb, pdf, th, mean, v, excess))
        cols, rest = (None, excess) if self.first_order else self._hermite2(Fa - Fb if K else None, th, th * pdf / 2,
                                                                            excess)
        rec = self.rec.setdefault(self._cur, {"theta": [], "excess": [], "cols": []})
        rec["theta"].append(th)
        rec["excess"].append(rest)
        rec["cols"].append(cols)
        Fn = pa.unsqueeze(0) * Fa + pb.unsqueeze(0) * Fb if K else None
        if cols is not None:
            Fn = cols if Fn is None else torch.cat([Fn, cols])
        fsq = torch.zeros_like(mean) if Fn is None else (Fn * Fn).sum(0)
        return _Dist(mean, Fn, (v - fsq).clamp_min(0))

    def _maxpool(self, node, x: _Dist, kernel, stride, padding, dilation, ceil_mode):
        k = _pair(kernel)
        s = _pair(stride if stride is not None else kernel)
        p = _pair(padding)
        dl = _pair(dilation)
        if p != (0, 0) or dl != (1, 1) or ceil_mode:
            raise self._unsupported(node, "max pooling with padding, dilation or ceil_mode")
        H, W = x.mu.shape[-2:]
        Ho = (H - k[0]) // s[0] + 1
        Wo = (W - k[1]) // s[1] + 1
        K = x.K
        cur = None
        for i in range(k[0]):
            for j in range(k[1]):
                sl = (..., slice(i, i + s[0] * (Ho - 1) + 1, s[0]), slice(j, j + s[1] * (Wo - 1) + 1, s[1]))
                e = _Dist(x.mu[sl], None if x.F is None else x.F[sl], x.d[sl])
                cur = e if cur is None else self._max2(cur, e, max(cur.K, e.K))
        return cur

    # ------------------------------------------------------------------ linear, parameter-free ops
    def _avgpool(self, node, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
        kw = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode,
                  count_include_pad=count_include_pad, divisor_override=divisor_override)
        mu = F.avg_pool2d(x.mu, **kw)
        Fn = _map_linear_batched(lambda t: F.avg_pool2d(t, **kw), x.F)
        # Var of an average of independent units: Σ_j d_j / n², with n the divisor
        ones = torch.ones_like(x.d[:1, :1])
        k = _pair(kernel)
        if divisor_override:
            div = torch.full_like(mu[:1, :1], float(divisor_override))
        elif count_include_pad:
            div = torch.full_like(mu[:1, :1], float(k[0] * k[1]))
        else:
            div = F.avg_pool2d(ones, **{**kw, "count_include_pad": True}) * (k[0] * k[1])
        d = F.avg_pool2d(x.d, **kw) / div  # avg_pool(d) = Σ d / div
        return _Dist(mu, Fn, d)

    def _adaptive_avgpool(self, x: _Dist, output_size):
        mu = F.adaptive_avg_pool2d(x.mu, output_size)
        Fn = _map_linear_batched(lambda t: F.adaptive_avg_pool2d(t, output_size), x.F)
        H, W = x.mu.shape[-2:]
        oh, ow = mu.shape[-2:]
        nh = torch.tensor([_adaptive_len(i, H, oh) for i in range(oh)], dtype=self.dtype)
        nw = torch.tensor([_adaptive_len(j, W, ow) for j in range(ow)], dtype=self.dtype)
        n = (nh[:, None] * nw[None, :]).to(x.mu.device)
        d = F.adaptive_avg_pool2d(x.d, output_size) / n
        return _Dist(mu, Fn, d)

    def _select(self, fn, x: _Dist) -> _Dist:
        """An op that copies elements (view, flatten, slicing, permute, zero padding)."""
        return _Dist(fn(x.mu), _map_F(fn, x.F), fn(x.d))

    def _method(self, node, args, kwargs):
        name = node.target
        x = args[0]
        rest = args[1:]
        if not isinstance(x, _Dist):
            raise self._unsupported(node, f"method {name!r} with a noisy argument")
        if name in _SELECTION_METHODS or name in ("view_as",):
            if name == "view_as":
                shape = rest[0].mu.shape if isinstance(rest[0], _Dist) else rest[0].shape
                return self._select(lambda t: t.reshape(shape), x)
            return self._select(lambda t: getattr(t, name)(*rest, **kwargs), x)
        if name == "relu":
            return self._relu(x)
        if name in ("mean", "sum"):
            return self._reduce(node, x, name, rest, kwargs)
        if name in ("size", "dim"):
            return getattr(x.mu, name)(*rest, **kwargs)
        if name in ("add", "sub", "mul", "div", "__add__", "__sub__", "__mul__", "__truediv__"):
            op = {"add": operator.add, "__add__": operator.add, "sub": operator.sub, "__sub__": operator.sub,
                  "mul": operator.mul, "__mul__": operator.mul, "div": operator.truediv,
                  "__truediv__": operator.truediv}[name]
            return self._arith(node, op, x, rest[0])
        raise self._unsupported(node, f"tensor method {name!r}")

    def _function(self, node, args, kwargs):
        fn = node.target
        if fn in _SELECTION_FUNCTIONS:
            x, *rest = args
            if not isinstance(x, _Dist) or any(isinstance(v, _Dist) for v in rest):
                raise self._unsupported(node, f"{getattr(fn, '__name__', fn)} with these arguments")
            return self._select(lambda t: fn(t, *rest, **kwargs), x)
        if fn in (operator.add, torch.add, operator.iadd, operator.sub, torch.sub, operator.mul, torch.mul,
                  operator.truediv, torch.div):
            op = {torch.add: operator.add, operator.iadd: operator.add, torch.sub: operator.sub,
                  torch.mul: operator.mul, torch.div: operator.truediv}.get(fn, fn)
            if kwargs.get("alpha", 1) != 1:
                raise self._unsupported(node, "add/sub with alpha")
            a, b = args[0], args[1]
            if not isinstance(a, _Dist):
                if op in (operator.add, operator.mul):
                    a, b = b, a
                elif op is operator.sub:
                    neg = self._arith(node, operator.mul, b, -1.0)
                    return self._arith(node, operator.add, neg, a)
                else:
                    raise self._unsupported(node, "division by a noisy tensor")
            return self._arith(node, op, a, b)
        if fn is F.pad:
            x, pad = args[0], args[1]
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            value = kwargs.get("value", args[3] if len(args) > 3 else None) or 0.0
            if mode != "constant":
                raise self._unsupported(node, f"padding mode {mode!r}")
            return _Dist(F.pad(x.mu, pad, value=value), _map_F(lambda t: F.pad(t, pad), x.F), F.pad(x.d, pad))
        if fn is torch.cat:
            ts = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if not all(isinstance(t, _Dist) for t in ts):
                raise self._unsupported(node, "torch.cat of noisy and constant tensors")
            K = max(t.K for t in ts)
            mu = torch.cat([t.mu for t in ts], dim)
            d = torch.cat([t.d for t in ts], dim)
            Fm = torch.vmap(lambda *fs: torch.cat(fs, dim))(*[t.padded(K) for t in ts]) if K else None
            return _Dist(mu, Fm, d)
        if fn in (F.max_pool2d, torch.max_pool2d):
            x = args[0]
            kernel = kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
            stride = kwargs.get("stride", args[2] if len(args) > 2 else None)
            padding = kwargs.get("padding", args[3] if len(args) > 3 else 0)
            dilation = kwargs.get("dilation", args[4] if len(args) > 4 else 1)
            ceil_mode = kwargs.get("ceil_mode", args[5] if len(args) > 5 else False)
            return self._maxpool(node, x, kernel, stride or kernel, padding, dilation, ceil_mode)
        if fn in (F.avg_pool2d, torch.avg_pool2d):
            x = args[0]
            names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
            defaults = [None, None, 0, False, True, None]
            vals = [kwargs.get(n, args[i + 1] if len(args) > i + 1 else defaults[i]) for i, n in enumerate(names)]
            if vals[1] is None:
                vals[1] = vals[0]
            return self._avgpool(node, x, *vals)
        if fn is F.adaptive_avg_pool2d:
            return self._adaptive_avgpool(args[0], kwargs.get("output_size", args[1] if len(args) > 1 else None))
        if fn in (torch.mean, torch.sum):
            return self._reduce(node, args[0], fn.__name__, args[1:], kwargs)
        raise self._unsupported(node, f"function {getattr(fn, '__name__', fn)!r}")

    def _reduce(self, node, x: _Dist, name, rest, kwargs):
        dim = kwargs.get("dim", rest[0] if rest else None)
        keepdim = kwargs.get("keepdim", rest[1] if len(rest) > 1 else False)
        if dim is None:
            raise self._unsupported(node, f"{name} over all dimensions (including the batch)")
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        nd = x.mu.dim()
        dims = tuple(dd % nd for dd in dims)
        if 0 in dims:
            raise self._unsupported(node, f"{name} over the batch dimension")
        n = 1
        for dd in dims:
            n *= x.mu.shape[dd]
        fn = (lambda t: t.mean(dim=dims, keepdim=keepdim)) if name == "mean" else (lambda t: t.sum(dim=dims, keepdim=keepdim))
        d = x.d.sum(dim=dims, keepdim=keepdim) / (n * n if name == "mean" else 1)
        Fm = None if x.F is None else (x.F.mean(dim=tuple(dd + 1 for dd in dims), keepdim=keepdim) if name == "mean"
                                       else x.F.sum(dim=tuple(dd + 1 for dd in dims), keepdim=keepdim))
        return _Dist(fn(x.mu), Fm, d)

    def _arith(self, node, op, a: _Dist, b):
        if isinstance(b, _Dist):
            if op is operator.add or op is operator.sub:
                K = max(a.K, b.K)
                sign = 1.0 if op is operator.add else -1.0
                Fm = a.padded(K) + sign * b.padded(K) if K else None
                return _Dist(op(a.mu, b.mu), Fm, a.d + b.d)
            raise self._unsupported(node, "a product or quotient of two noisy tensors")
        if isinstance(b, torch.Tensor):
            b = b.to(self.dtype)
        if op is operator.add:
            return _Dist(a.mu + b, a.F, a.d)
        if op is operator.sub:
            return _Dist(a.mu - b, a.F, a.d)
        if op is operator.mul:
            return _Dist(a.mu * b, None if a.F is None else a.F * b, a.d * b * b)
        if op is operator.truediv:
            return _Dist(a.mu / b, None if a.F is None else a.F / b, a.d / (b * b))
        raise self._unsupported(node, f"operator {op}")


# ----------------------------------------------------------------------------
def _flat(v):
    out = []
    if isinstance(v, (list, tuple)):
        for e in v:
            out.extend(_flat(e))
    elif isinstance(v, dict):
        for e in v.values():
            out.extend(_flat(e))
    else:
        out.append(v)
    return out


def _pair(v):
    if isinstance(v, int):
        return (v, v)
    return tuple(v)


def _adaptive_len(i, size, out):
    start = (i * size) // out
    end = -((-(i + 1) * size) // out)
    return end - start


def _patch_gram(Fm: torch.Tensor, groups: int, kernel, stride, padding, dilation, out_hw) -> torch.Tensor:
    """``G_pq = Σ_k Σ_j F_k[patch_p, j] F_k[patch_q, j]`` (``[B, g, L, L]``) for the columns
    ``F [K, B, C, H, W]``: the channel-summed spatial Gram ``S = Σ_k Σ_c F_k[c] F_k[c]ᵀ``
    at input resolution, summed over the kernel offsets (``k²`` shifted copies) — a
    factor ``k²`` cheaper than unfolding every column."""
    K, B, C, H, W = Fm.shape
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    Ho, Wo = out_hw
    Fg = Fm.reshape(K, B, groups, C // groups, H * W)
    S = torch.einsum("kbgcp,kbgcq->bgpq", Fg, Fg).reshape(B, groups, H, W, H, W)
    S = F.pad(S, (pw, pw, ph, ph, pw, pw, ph, ph))
    G = torch.zeros(B, groups, Ho, Wo, Ho, Wo, dtype=Fm.dtype, device=Fm.device)
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dh, j * dw
            ys = slice(y0, y0 + sh * (Ho - 1) + 1, sh)
            xs = slice(x0, x0 + sw * (Wo - 1) + 1, sw)
            G += S[:, :, ys, xs, ys, xs]
    return G.reshape(B, groups, Ho * Wo, Ho * Wo)


def _renormalise(Fm: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scale every unit's row of ``F`` so that its squared norm is ``target`` (the
    variance-preserving sketch: marginal variances exact, correlations sketched)."""
    cur = Fm.pow(2).sum(0)
    scale = torch.where(cur > 0, (target.clamp_min(0) / torch.where(cur > 0, cur, torch.ones_like(cur))).sqrt(),
                        torch.zeros_like(cur))
    return Fm * scale.unsqueeze(0)


def _block_diag(Cm: torch.Tensor) -> torch.Tensor:
    """``[B, C, r, r]`` → ``[B, C·r, C·r]`` block-diagonal."""
    B, C, r, _ = Cm.shape
    out = torch.zeros(B, C, r, C, r, dtype=Cm.dtype, device=Cm.device)
    idx = torch.arange(C, device=Cm.device)
    out[:, idx, :, idx, :] = Cm.permute(1, 0, 2, 3)
    return out.reshape(B, C * r, C * r)


def _top_eigh(G: torch.Tensor, r: int):
    """Top ``r`` eigenpairs of symmetric ``G [..., L, L]``: ``(λ [..., r], U [..., L, r])``,
    largest first. Exact ``eigh`` for ``L <= 256``, randomised subspace iteration above."""
    L = G.shape[-1]
    if L <= 256:
        w, U = torch.linalg.eigh(G)
        return w[..., -r:].flip(-1), U[..., -r:].flip(-1)
    gen = torch.Generator(device=G.device).manual_seed(0)
    p = min(L, r + 10)
    Q = torch.randn(G.shape[:-2] + (L, p), generator=gen, dtype=G.dtype, device=G.device)
    for _ in range(3):
        Q, _ = torch.linalg.qr(G @ Q)
    T = Q.mT @ G @ Q
    w, V = torch.linalg.eigh(T)
    U = Q @ V
    return w[..., -r:].flip(-1), U[..., -r:].flip(-1)


# ----------------------------------------------------------------------------
# The surrogate network: mean path with moment-smoothed nonlinearities
# ----------------------------------------------------------------------------
def _smooth_relu(z, s):
    """``E[relu(z + s ζ)]`` as a function of ``z`` with ``s`` fixed: ``zΦ(z/s) + sφ(z/s)``;
    its derivative is ``Φ(z/s)``, the expected slope."""
    pos = s > _TINY
    ss = torch.where(pos, s, torch.ones_like(s))
    a = z / ss
    return torch.where(pos, z * _ncdf(a) + ss * _npdf(a), torch.relu(z))


def _smooth_max(a, b, th):
    """Clark's ``E[max(A, B)]`` with ``θ = sd(A − B)`` fixed: ``aΦ(α) + bΦ(−α) + θφ(α)``,
    ``α = (a − b)/θ``; its derivatives are ``Φ(α)`` and ``Φ(−α)``."""
    pos = th > _TINY
    ts = torch.where(pos, th, torch.ones_like(th))
    al = (a - b) / ts
    return torch.where(pos, a * _ncdf(al) + b * _ncdf(-al) + ts * _npdf(al), torch.maximum(a, b))


class _Surrogate:
    """The network's mean path with every ReLU replaced by its Gaussian expectation
    (fixed per-unit std ``s`` from the moment pass) and every max-pool by Clark's
    expectation, plus zero-valued injection points: ``e`` after every noisy layer (its
    noise acting on the input's perturbation) and ``r`` after every ReLU / pairwise max
    (the variance the expected-slope linearisation misses). Its output is the propagated
    logit mean; its gradients with respect to the injection points give the covariance."""

    def __init__(self, prop: "MomentPropagator"):
        self.prop = prop
        self.lin = prop.lin
        self.graph = prop.graph
        self.modules = prop.modules
        self.noisy = {n.rpartition(".")[0] for n in prop.lin.names}

    def forward(self, x, rec):
        """Batched surrogate forward. Returns ``(logits, taps, rtaps)``: ``taps`` the noisy
        layers' :class:`~noiseprop.theory.linearize.Tap` (module name, input, ``e``) with
        their node names, ``rtaps`` ``(node name, [r tensors])``."""
        from .linearize import Tap

        env = {}
        out = None
        taps, rtaps = [], []
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
                continue
            if node.op == "output":
                out = self.prop._load(env, node.args[0])
                break
            args = self.prop._load(env, node.args)
            kwargs = self.prop._load(env, node.kwargs)
            name = node.name
            if node.op == "get_attr":
                full = node.target
                if full in self.lin.params:
                    val = self.lin.params[full]
                elif full in self.lin.buffers:
                    val = self.lin.buffers[full]
                else:
                    val = self.lin.net
                    for part in full.split("."):
                        val = getattr(val, part)
                env[node] = val
                continue
            if is_relu(node, self.modules) and name in rec:
                r = torch.zeros_like(args[0], requires_grad=True)
                rtaps.append((name, [r]))
                val = _smooth_relu(args[0], rec[name]["s"]) + r
            elif node.op == "call_module":
                m = self.modules[node.target]
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    W = self.lin.params[node.target + ".weight"]
                    b = self.lin.params[node.target + ".bias"] if m.bias is not None else None
                    if isinstance(m, nn.Linear):
                        val = F.linear(args[0], W, b)
                    else:
                        val = F.conv2d(args[0], W, b, stride=m.stride, padding=m.padding, dilation=m.dilation,
                                       groups=m.groups)
                    if node.target in self.noisy:
                        e = torch.zeros_like(val, requires_grad=True)
                        taps.append((name, Tap(node.target, m, args[0].detach(), e)))
                        val = val + e
                elif isinstance(m, nn.MaxPool2d) and name in rec:
                    val = self._maxpool(name, args[0], m.kernel_size, m.stride, rec[name]["theta"], rtaps)
                else:
                    val = m(*args, **kwargs)
            elif node.op == "call_function":
                if node.target in (F.max_pool2d, torch.max_pool2d) and name in rec:
                    kernel = kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
                    stride = kwargs.get("stride", args[2] if len(args) > 2 else None)
                    val = self._maxpool(name, args[0], kernel, stride or kernel, rec[name]["theta"], rtaps)
                else:
                    val = node.target(*args, **kwargs)
            else:  # call_method
                obj, *rest = args
                val = getattr(obj, node.target)(*rest, **kwargs)
            env[node] = val
        return out, taps, rtaps

    @staticmethod
    def _maxpool(name, x, kernel, stride, thetas, rtaps):
        k = _pair(kernel)
        st = _pair(stride if stride is not None else kernel)
        H, W = x.shape[-2:]
        Ho = (H - k[0]) // st[0] + 1
        Wo = (W - k[1]) // st[1] + 1
        cur = None
        step = 0
        rs = []
        for i in range(k[0]):
            for j in range(k[1]):
                sl = (..., slice(i, i + st[0] * (Ho - 1) + 1, st[0]), slice(j, j + st[1] * (Wo - 1) + 1, st[1]))
                el = x[sl]
                if cur is None:
                    cur = el
                else:
                    r = torch.zeros_like(el, requires_grad=True)
                    rs.append(r)
                    cur = _smooth_max(cur, el, thetas[step]) + r
                    step += 1
        rtaps.append((name, rs))
        return cur


def _injection_covariance(deltas_e: dict, deltas_r: dict, rec: dict, B: int, C: int) -> torch.Tensor:
    """The noise of each layer acting on its input's perturbation (``e``) and the
    variance the expected-slope linearisation misses (``r``), mapped to the logits by
    the surrogate's signals ``δ [C, B, *shape]`` (see the module docstring)."""
    cov = torch.zeros(B, C, C, dtype=torch.float64)
    for name, de in deltas_e.items():
        rc = rec[name]
        de = de.double()
        if "gpert" not in rc:  # Linear: independent per output unit
            Jf = de.reshape(C, B, -1)
            cov += torch.einsum("abi,bi,cbi->bac", Jf, rc["vpert"].double().reshape(B, -1), Jf)
        else:  # Conv: per channel σ̄_c² G_pert off the diagonal + the exact diagonal
            Cout = rc["vpert"].shape[1]
            Jf = de.reshape(C, B, Cout, -1)  # [C, B, Cout, L]
            vp = rc["vpert"].double().reshape(B, Cout, -1)
            G = rc["gpert"].double()  # [B, g, L, L]
            g = G.shape[1]
            Goff = G - torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1))
            Gc = Goff.repeat_interleave(Cout // g, dim=1) * rc["sbar2"].double().reshape(1, -1, 1, 1)  # [B, Cout, L, L]
            A = torch.einsum("abcp,bcpq->abcq", Jf, Gc)
            cov += torch.einsum("abcq,dbcq->bad", A, Jf)
            cov += torch.einsum("abcp,bcp,dbcp->bad", Jf, vp, Jf)
    for name, drs in deltas_r.items():
        cols = rec[name].get("cols") or [None] * len(drs)
        for dr, ex, cl in zip(drs, rec[name]["excess"], cols):
            Jf = dr.double().reshape(C, B, -1)
            cov += torch.einsum("abi,bi,cbi->bac", Jf, ex.double().reshape(B, -1), Jf)
            if cl is not None:  # correlated second-order part: Σ_m (J l_m)(J l_m)ᵀ
                t = torch.einsum("abi,mbi->bam", Jf, cl.double().reshape(cl.shape[0], B, -1))
                cov += torch.einsum("bam,bcm->bac", t, t)
    return cov


def propagate_moments(lin: LinearizedNetwork, x: torch.Tensor, noise: WeightNoise, rank: int = 32,
                      spatial_rank: int = 4, chunk_size: int = 32, propagator: MomentPropagator | None = None
                      ) -> MomentResult:
    """Logit mean and covariance of every input under ``noise`` (module docstring), in
    chunks of ``chunk_size`` inputs: a moment pass (per-unit variances, window
    correlations, perturbation Gram matrices), then one batched backward pass per class
    through the surrogate network for the covariance."""
    from .linearize import backprop_signals, weight_terms

    prop = propagator.with_noise(noise) if propagator is not None else MomentPropagator(lin, noise, rank, spatial_rank)
    sur = _Surrogate(prop)
    scale = {n: noise.scale(p) for n, p in lin.target_params.items()}
    params: dict[str, list] = {}
    for n in lin.names:
        mname, _, pname = n.rpartition(".")
        params.setdefault(mname, []).append(pname)
    means, covs = [], []
    pre_count = None
    pre_exceed = None
    lost = total = 0.0
    for i in range(0, x.shape[0], chunk_size):
        xb = x[i:i + chunk_size].to(lin.device)
        with torch.no_grad():
            mu, _, st = prop.run(xb)
        rec = prop.rec
        B, C = mu.shape
        mdt = lin.dtype
        rec_m = {}
        for name, rc in rec.items():
            if "s" in rc:
                rec_m[name] = {"s": rc["s"].to(mdt)}
            elif "theta" in rc:
                rec_m[name] = {"theta": [t.to(mdt) for t in rc["theta"]]}
        with torch.enable_grad():
            out, taps, rtaps = sur.forward(xb.to(mdt), rec_m)
            leaves = [t.e for _, t in taps] + [r for _, rs in rtaps for r in rs]
            deltas = backprop_signals(out, leaves) if leaves else []
        de = deltas[:len(taps)]
        dr = deltas[len(taps):]
        cov = torch.zeros(B, C, C, dtype=torch.float64)
        by_module: dict[str, list] = {}
        deltas_e = {}
        for (node_name, t), dl in zip(taps, de):
            by_module.setdefault(t.name, []).append((t, dl.detach()))
            if node_name in rec and "vpert" in rec[node_name]:
                deltas_e[node_name] = dl.detach()
        weight_terms(by_module, params, scale, cov)
        deltas_r, k = {}, 0
        for name, rs in rtaps:
            deltas_r[name] = [d.detach() for d in dr[k:k + len(rs)]]
            k += len(rs)
        cov += _injection_covariance(deltas_e, deltas_r, rec, B, C)
        covs.append(cov)
        means.append(mu.double())
        if pre_count is None:
            pre_count = list(st["pre_count"])
            pre_exceed = list(st["pre_exceed"])
        else:
            pre_count = [a + b for a, b in zip(pre_count, st["pre_count"])]
            pre_exceed = [a + b for a, b in zip(pre_exceed, st["pre_exceed"])]
        lost += st["lost"]
        total += st["total"]
    per_layer = tuple(e / c if c else 0.0 for e, c in zip(pre_exceed or [], pre_count or []))
    frac = (sum(pre_exceed) / sum(pre_count)) if pre_count and sum(pre_count) else 0.0
    return MomentResult(mean=torch.cat(means), cov=torch.cat(covs), preact_frac=float(frac),
                        preact_frac_per_layer=per_layer, compression_loss=float(lost / total) if total > 0 else 0.0,
                        rank=prop.rank, spatial_rank=prop.spatial_rank)
