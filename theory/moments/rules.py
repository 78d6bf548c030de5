"""The moment pass: per-layer rules over the traced graph (module docstring of
:mod:`noiseprop.theory.moments`).

:class:`MomentPropagator` holds what does not change between batches (the traced graph,
the weights, the folded BatchNorm affines, the noise variances) and runs one
:class:`_MomentPass` per batch; every result of a pass (per-node records for the
surrogate, statistics) is returned in a :class:`PassResult`, nothing is left on the
propagator.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._graph import conv_padding, is_rectifier, is_relu, trace
from ..linearize import LinearizedNetwork, Tap
from ..noise import WeightNoise
from ..targets import folding_affine, is_norm_layer
from .gaussian import (activation_function, clark_max, elu_moments, leaky_relu_moments, rectified_cross_cumulants,
                       relu_k3, relu_k4, relu_moments, relu_moments_skew, safe_sqrt, skewness, smooth_moments)
from .interpreter import GraphInterpreter, flatten_args
from .lowrank import (Dist, block_diag, canonical_signs, generator, map_batched, pair, patch_gram, renormalise,
                      top_eigh)

__all__ = ["MomentPropagator", "PassResult", "DEFAULT_RANK", "DEFAULT_SPATIAL_RANK", "DEFAULT_H2_RANK",
           "DEFAULT_D_RANK", "UNIT_SPACE_MAX", "activation_kind", "LINEAR_HINT"]

#: columns of ``F`` kept per input (``predict``'s default too)
DEFAULT_RANK = 32
#: new columns per output channel of a noisy convolution (``predict``'s default too)
DEFAULT_SPATIAL_RANK = 4
#: random-feature columns for the second Hermite component of each ReLU / max
DEFAULT_H2_RANK = 16
#: sketched columns that carry a layer input's independent part through the layer.
#: Off by default: on the digits ResNet-20 (η = 0.3), VGG (η = 0.3) and MLP (η = 0.5, 1.0)
#: 16 columns changed the predicted accuracy by < 0.1 point and the logit variance by
#: < 1%, and doubled the moment pass's time on the ResNet.
DEFAULT_D_RANK = 0
#: re-factorise in unit space up to this many units (else through the columns, with the
#: variance-preserving sketch): 32, the default ``rank``, so that at the default rank the
#: unit-space path runs where it is exact (a Cholesky factor; with a smaller ``rank``, up
#: to 32 units keep their top eigenvectors, the best truncation). Above, the sketch costs less for the
#: same accuracy. Measured at the default settings against unit space up to 1024 units
#: (180 digits test inputs, six levels η = 0.1 … 1.0, one thread): VGG width 8 14.7 s
#: against 21.9 s, MLP width 128 0.80 s against 1.17 s, predicted accuracy within
#: 0.13 point at every level (``benchmarks/moment_settings.py``).
UNIT_SPACE_MAX = 32
#: ... with an exact eigendecomposition up to this many (measured faster than the
#: randomised solver for an MLP's 128–256 units; VGG's 512 are 5× faster randomised)
UNIT_EIGH_MAX = 256
# independent random streams of one pass (lowrank.generator)
_STREAM_D, _STREAM_H2, _STREAM_SKETCH = 0, 1, 2

LINEAR_HINT = "use method='linear' (first order, any differentiable module)"

_SELECTION_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                      "__getitem__"}
_SELECTION_FUNCTIONS = {torch.flatten, torch.reshape, operator.getitem, torch.permute, torch.transpose,
                        torch.squeeze, torch.unsqueeze}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_SMOOTH_MODULES = {nn.GELU: None, nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_SMOOTH_FUNCTIONS = {F.gelu: "gelu", F.silu: "silu", torch.tanh: "tanh", torch.sigmoid: "sigmoid",
                     F.tanh: "tanh", F.sigmoid: "sigmoid", F.softplus: "softplus"}
_SMOOTH_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid"}
_ADD_OPS = {operator.add: operator.add, torch.add: operator.add, operator.iadd: operator.add,
            operator.sub: operator.sub, torch.sub: operator.sub, operator.mul: operator.mul, torch.mul: operator.mul,
            operator.truediv: operator.truediv, torch.div: operator.truediv}
_ARITH_METHODS = {"add": operator.add, "__add__": operator.add, "sub": operator.sub, "__sub__": operator.sub,
                  "mul": operator.mul, "__mul__": operator.mul, "div": operator.truediv, "__truediv__": operator.truediv}


def third_cumulant(x: Dist):
    """Each unit's third cumulant of ``x`` (``None``: Gaussian): its own ``k3``, or, for
    a ReLU output, the rectified pre-activation's (:func:`~.gaussian.relu_k3`)."""
    if x.k3 is not None:
        return x.k3
    if x.src is not None:
        return relu_k3(*x.src).to(x.mu.dtype)
    return None


def fourth_cumulant(x: Dist):
    """Each unit's fourth cumulant of ``x`` where the pass knows it (``None`` elsewhere):
    its own ``k4`` (an affine map of a ReLU output), or, for a ReLU output, the rectified
    Gaussian pre-activation's (:func:`~.gaussian.relu_k4`; a skewed pre-activation is
    taken as Gaussian here). Formed by an affine map of a ReLU output, for the tail
    diagnostic only (:meth:`_MomentPass._record_tail`)."""
    if x.k4 is not None:
        return x.k4
    if x.src is not None:
        return relu_k4(x.src[0].detach(), x.src[1].detach()).to(x.mu.dtype)
    return None


def activation_kind(node: fx.Node, modules: dict):
    """``"relu"``, the name of a smooth activation of :data:`SMOOTH_ACTIVATIONS`,
    ``("leaky_relu", negative_slope)``, ``("elu", alpha)`` or ``None``."""
    if is_relu(node, modules):
        return "relu"
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, nn.LeakyReLU):
            return ("leaky_relu", float(m.negative_slope))
        if isinstance(m, nn.ELU):
            return ("elu", float(m.alpha))
        if isinstance(m, nn.GELU):
            return "gelu_tanh" if m.approximate == "tanh" else "gelu"
        if isinstance(m, nn.Softplus):
            return "softplus" if m.beta == 1 else None
        for cls, name in _SMOOTH_MODULES.items():
            if name is not None and isinstance(m, cls):
                return name
        return None
    if node.op == "call_function" and node.target in (F.leaky_relu, F.elu):
        name, key, default = (("leaky_relu", "negative_slope", 0.01) if node.target is F.leaky_relu
                              else ("elu", "alpha", 1.0))
        a = node.args[1] if len(node.args) > 1 else node.kwargs.get(key, default)
        return (name, float(a)) if isinstance(a, (int, float)) and not isinstance(a, bool) else None
    if node.op == "call_function" and node.target in _SMOOTH_FUNCTIONS:
        if node.target is F.gelu and node.kwargs.get("approximate", "none") == "tanh":
            return "gelu_tanh"
        if node.target is F.softplus and (node.kwargs.get("beta", 1) != 1 or len(node.args) > 1):
            return None
        return _SMOOTH_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _SMOOTH_METHODS:
        return _SMOOTH_METHODS[node.target]
    return None


def is_maxpool(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.MaxPool2d)
    return node.op == "call_function" and node.target in _MAX_POOL_FUNCTIONS


def _is_sum(node: fx.Node) -> bool:
    """A sum or difference the moment pass evaluates (:data:`_ADD_OPS`, :data:`_ARITH_METHODS`)."""
    if node.op == "call_function":
        return _ADD_OPS.get(node.target) in (operator.add, operator.sub)
    return node.op == "call_method" and _ARITH_METHODS.get(node.target) in (operator.add, operator.sub)


def moment_risks(graph: fx.Graph, modules: dict, noisy) -> tuple[str, ...]:
    """Where a network has the structures on which the moment method is measured to lose
    accuracy at large noise (docs/THEORY.md §9; ``MOMENTS_WARN_FRACTION`` in
    :mod:`noiseprop.theory.predict`): ``"residual"`` (a sum of two different tensors that
    both carry weight noise: a skip connection) and ``"max_pool"`` after a noisy layer,
    sorted. ``noisy``: the noisy parameters' qualified names. Static, from the traced
    graph; input preprocessing, a bias or constant added to an activation and ``h + h``
    are not residual sums."""
    noisy = set(noisy)
    carry: set = set()  # nodes downstream of a noisy parameter
    risks = set()
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in noisy:
            carry.add(node)
            continue
        if node.op == "call_module":
            m = modules.get(node.target)
            if m is not None and any(f"{node.target}.{n}" in noisy for n, _ in m.named_parameters(recurse=False)):
                carry.add(node)
                continue
        if not any(a in carry for a in node.all_input_nodes):
            continue
        carry.add(node)
        if is_maxpool(node, modules):
            risks.add("max_pool")
        elif _is_sum(node):
            a = [v for v in list(node.args[:2]) + list(node.kwargs.values()) if isinstance(v, fx.Node)]
            if len(a) == 2 and a[0] is not a[1] and all(v in carry for v in a):
                risks.add("residual")
    return tuple(sorted(risks))


def maxpool_args(node: fx.Node, m, args, kwargs):
    """``(kernel, stride, padding, dilation, ceil_mode)`` of a max-pool node."""
    if m is not None:
        return m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation, m.ceil_mode
    names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
    defaults = [None, None, 0, 1, False]
    vals = [kwargs.get(n, args[i + 1] if len(args) > i + 1 else defaults[i]) for i, n in enumerate(names)]
    vals[1] = vals[1] or vals[0]
    return tuple(vals)


def window_slices(H, W, kernel, stride):
    """The ``k_h·k_w`` strided slices of a (padding-free) pooling window, in order."""
    k, s = pair(kernel), pair(stride)
    Ho = (H - k[0]) // s[0] + 1
    Wo = (W - k[1]) // s[1] + 1
    return [(..., slice(i, i + s[0] * (Ho - 1) + 1, s[0]), slice(j, j + s[1] * (Wo - 1) + 1, s[1]))
            for i in range(k[0]) for j in range(k[1])]


def _adaptive_len(i, size, out):
    start = (i * size) // out
    end = -((-(i + 1) * size) // out)
    return end - start


def _pool_functions(name: str) -> tuple:
    """``F.<name>`` and the builtins it may trace to. ``torch.avg_pool2d`` and
    ``torch.adaptive_avg_pool2d`` are absent from some torch releases, 2.13 among them:
    naming them raised AttributeError for every function node that reached the check,
    instead of the clear unsupported-function error."""
    return tuple(f for f in (getattr(F, name), getattr(torch, name, None), getattr(torch._C._nn, name, None))
                 if f is not None)


_MAX_POOL_FUNCTIONS = _pool_functions("max_pool2d")
_AVG_POOL_FUNCTIONS = _pool_functions("avg_pool2d")
_ADAPTIVE_AVG_POOL_FUNCTIONS = _pool_functions("adaptive_avg_pool2d")


@dataclass(frozen=True)
class PassResult:
    """One moment pass over a batch: logit mean ``[B, C]`` and covariance ``[B, C, C]``
    of the pass itself, ``rec`` (per graph node: what the surrogate needs) and ``stats``
    (ReLU pre-activation counts, variance moved to the diagonal by compression)."""

    mean: torch.Tensor
    cov: torch.Tensor
    rec: dict
    stats: dict

    def __iter__(self):  # (mean, cov, stats), the former tuple
        return iter((self.mean, self.cov, self.stats))


class MomentPropagator:
    """Moment propagation through a traced network (see the package docstring).

    ``rank``: columns of ``F`` kept (per input); ``spatial_rank``: new columns per output
    channel of a noisy convolution; ``h2_rank``/``d_rank``: random-feature columns for
    the second Hermite component of a nonlinearity / for a layer input's independent
    part; ``compression``: ``"sketch"`` (variance-preserving random sketch) or
    ``"eigh"`` (top eigenvectors); ``first_order``: the delta-method rules (a check);
    ``seed``: seeds the sketches.
    """

    def __init__(self, lin: LinearizedNetwork, noise: WeightNoise, rank: int = DEFAULT_RANK,
                 spatial_rank: int = DEFAULT_SPATIAL_RANK, first_order: bool = False,
                 unit_space_max: int = UNIT_SPACE_MAX, compression: str = "sketch", seed: int = 0,
                 h2_rank: int = DEFAULT_H2_RANK, d_rank: int = DEFAULT_D_RANK, dtype: torch.dtype = torch.float32):
        if compression not in ("sketch", "eigh"):
            raise ValueError(f"compression must be 'sketch' or 'eigh', got {compression!r}")
        for name, v, lo in (("rank", rank, 1), ("spatial_rank", spatial_rank, 1), ("h2_rank", h2_rank, 0),
                            ("d_rank", d_rank, 0), ("seed", seed, 0), ("unit_space_max", unit_space_max, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self.lin = lin
        self.rank, self.spatial_rank, self.h2_rank, self.d_rank = rank, spatial_rank, h2_rank, d_rank
        self.compression, self.seed, self.unit_space_max = compression, seed, unit_space_max
        self.first_order = bool(first_order)
        self.dtype = dtype
        try:
            self.graph = trace(lin.net)
        except ValueError as e:
            raise ValueError(f"method='moments' needs a torch.fx-traceable model: {e}; use method='linear'") from e
        self.modules = dict(lin.net.named_modules())
        self._swap_relu_maxpool()
        self._check_supported()
        self.weights = {}
        self.affines = {}
        for node in self.graph.nodes:
            if node.op != "call_module":
                continue
            m = self.modules[node.target]
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if node.target + ".weight" not in lin.params:  # computed from others (parametrize, weight_norm)
                    raise ValueError(f"method='moments' cannot follow layer {node.target!r}: its weight is computed "
                                     "from other tensors (torch.nn.utils.parametrize, e.g. weight_norm), which its "
                                     "per-layer rules do not read; use method='linear', or remove the parametrization "
                                     f"(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight'))")
                W = lin.params[node.target + ".weight"].to(dtype)
                b = lin.params[node.target + ".bias"].to(dtype) if m.bias is not None else None
                self.weights[node.target] = (W, b)
            elif is_norm_layer(m) and not isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                a, c = folding_affine(m)  # lin.params are the module's own tensors, detached
                self.affines[node.target] = (a.to(dtype), c.to(dtype))
        self.noise_var: dict[str, torch.Tensor] = {}
        self._set_noise(noise)
        self.head, self.head_target = self._find_head()

    def _find_head(self) -> tuple:
        """``(graph node, module path)`` of the output layer when the logits are a Linear
        layer's output (for :mod:`.head`'s scale mixture), else ``(None, None)``."""
        out = next((n for n in self.graph.nodes if n.op == "output"), None)
        node = out.args[0] if out is not None and out.args else None
        if (isinstance(node, fx.Node) and node.op == "call_module"
                and isinstance(self.modules.get(node.target), nn.Linear)):
            return node.name, node.target
        return None, None

    def _swap_relu_maxpool(self):
        """Rewrite ``maxpool(relu(z))`` as ``relu(maxpool(z))`` (equal: the max commutes
        with any non-decreasing function), so Clark's max acts on Gaussian
        pre-activations instead of rectified, zero-inflated ones."""
        for pool in list(self.graph.nodes):
            if not is_maxpool(pool, self.modules) or not pool.args or not isinstance(pool.args[0], fx.Node):
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

    def _check_supported(self):
        for node in self.graph.nodes:
            if node.op != "call_module":
                continue
            m = self.modules[node.target]
            ok = (isinstance(m, (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                                 nn.Flatten, nn.ConstantPad2d) + _PASS_MODULES)
                  or (is_norm_layer(m) and not isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
                                                              nn.InstanceNorm2d, nn.InstanceNorm3d)))
                  or activation_kind(node, self.modules) is not None)
            if not ok:
                raise ValueError(f"method='moments' does not support layer {node.target!r} ({type(m).__name__}) "
                                 f"(graph node {node.name!r}); {LINEAR_HINT}")
            if is_norm_layer(m) and m.training:
                raise ValueError(f"method='moments': normalisation layer {node.target!r} is in training mode; "
                                 "evaluate the model in eval mode")

    def _set_noise(self, noise: WeightNoise):
        for n in self.lin.names:
            mod_name, _, pname = n.rpartition(".")
            mod = self.modules.get(mod_name)
            if not isinstance(mod, (nn.Linear, nn.Conv2d)) or pname not in ("weight", "bias"):
                raise ValueError(
                    f"method='moments' supports noise on Linear/Conv2d weights and biases only; target {n!r} "
                    f"({type(mod).__name__}) is not one; use method='linear'"
                )
        self.noise_var = {n: noise.variance(self.lin.target_params[n]).to(self.dtype) for n in self.lin.names}

    def with_noise(self, noise: WeightNoise) -> "MomentPropagator":
        """The same propagator at another noise model/level (graph and weights reused)."""
        new = object.__new__(MomentPropagator)
        new.__dict__.update(self.__dict__)
        new._set_noise(noise)
        return new

    def run(self, x: torch.Tensor) -> PassResult:
        """One moment pass over the batch ``x``."""
        return _MomentPass(self).result(x)


def _eigen_factor(S: torch.Tensor, w: torch.Tensor, V: torch.Tensor, val: torch.Tensor | None = None) -> torch.Tensor:
    """Columns ``F`` (``[..., D, R]``, ``F Fᵀ ≈ S``) of the symmetric matrix ``S``,
    differentiable in ``S``: ``val`` (default ``V Λ^½`` from the top eigenpairs ``(w,
    V)`` found without gradient), with the derivative of ``½ S P⁺ F`` (``P⁺ = V Λ⁻¹ Vᵀ``
    fixed), so ``d(F Fᵀ) = ½(dS P + P dS)`` (``P = V Vᵀ``; ``= dS`` at full rank) and no
    derivative of an eigenvector (unbounded where eigenvalues are close) is taken.
    Eigenvalues below 1e-12 of the largest get no column derivative."""
    top = w.amax(-1, keepdim=True).clamp_min(0)
    ok = w > top * 1e-12
    inv = torch.where(ok, 1.0 / torch.where(ok, w, torch.ones_like(w)), torch.zeros_like(w))
    if val is None:
        val = V * safe_sqrt(w.clamp_min(0)).unsqueeze(-2)
    SV = 0.5 * S @ (V @ (inv.unsqueeze(-1) * (V.mT @ val)))
    return val + (SV - SV.detach())


# ----------------------------------------------------------------------------
class _MomentPass(GraphInterpreter):
    """The per-layer rules, for one batch. Configuration is read from the propagator
    ``p``; what the pass produces (``rec``, ``stats``) lives here only."""

    def __init__(self, p: MomentPropagator, tap: bool = False):
        super().__init__(p.graph, p.lin.net, p.lin.params, p.lin.buffers)
        self.p = p
        self.dtype = p.dtype
        self.rec: dict = {}
        self.stats = {"pre_count": [], "pre_exceed": [], "lost": 0.0, "total": 0.0, "tail": {}}
        self.calls = [0, 0, 0]  # per random stream
        self.cur = None
        # tap: a zero tensor requiring grad added to the mean after every noisy layer, to
        # differentiate the propagated mean (the Gaussian closure's E[f]) with respect to
        # each layer's output mean; (node name, Tap with the layer's mean input) per call
        self.noisy = set(p.lin.params_by_module) if tap else set()
        self.taps: list = []

    def _gen(self, stream):
        g = generator(self.p.seed, stream, self.calls[stream])
        self.calls[stream] += 1
        return g

    def _unsupported(self, node, what):
        return ValueError(f"method='moments' does not support {what} (graph node {node.name!r}); {LINEAR_HINT}")

    def result(self, x) -> PassResult:
        out = self.run(x)
        if not isinstance(out, Dist):
            raise ValueError("method='moments': the model output is not a tensor of logits computed from the input")
        if out.mu.dim() != 2:
            raise ValueError(f"the model must map a batch of inputs to logits [N, C]; got shape {tuple(out.mu.shape)}")
        cov = torch.diag_embed(out.d)
        if out.K:
            cov = cov + torch.einsum("kbi,kbj->bij", out.F, out.F)
        return PassResult(out.mu, cov, self.rec, self.stats)

    def placeholder(self, node, x):
        xd = x.to(self.dtype)
        return Dist(xd, None, torch.zeros_like(xd))

    def call(self, node, args, kwargs, env, i):
        self.cur = node.name
        if not any(isinstance(v, Dist) for v in flatten_args(args) + flatten_args(list(kwargs.values()))):
            return self.plain(node, args, kwargs)  # sizes / constants
        live = None
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                live = self.live(env, i)
        kind = activation_kind(node, self.modules)
        if kind is not None:  # the validity diagnostic counts ReLU and its variants (not tanh, sigmoid)
            return self._nonlin(args[0], kind, counted=is_rectifier(node, self.modules))
        if node.op == "call_module":
            return self._module(node, self.modules[node.target], args, kwargs, live)
        if node.op == "call_method":
            return self._method(node, args, kwargs)
        return self._function(node, args, kwargs)

    # ------------------------------------------------------------------ modules
    def _module(self, node, m, args, kwargs, live):
        x = args[0]
        if not isinstance(x, Dist):
            raise self._unsupported(node, f"layer {node.target!r} with a noisy argument other than its input")
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            y = self._linear(node.target, x, live) if isinstance(m, nn.Linear) else self._conv(node.target, m, x, live)
            if node.target in self.noisy:  # (the rules change the input's columns in place, never its mean)
                e = torch.zeros_like(y.mu, requires_grad=True)
                self.taps.append((node.name, Tap(node.target, m, x.mu.detach(), e)))
                y = Dist(y.mu + e, y.F, y.d, y.k3, y.src)
            return y
        if node.target in self.p.affines:
            a, c = self.p.affines[node.target]
            shape = (1, -1) + (1,) * (x.mu.dim() - 2)
            a, c = a.reshape(shape), c.reshape(shape)
            k3, k4 = third_cumulant(x), fourth_cumulant(x)
            return Dist(a * x.mu + c, None if x.F is None else a.unsqueeze(0) * x.F, a * a * x.d,
                        None if k3 is None else a * a * a * k3, None, None if k4 is None else a ** 4 * k4)
        if isinstance(m, _PASS_MODULES):
            return x  # eval mode: identity
        if isinstance(m, nn.Flatten):
            return x.map(m)
        if isinstance(m, nn.ConstantPad2d):  # nn.ZeroPad2d too
            return self._pad(x, m.padding, m.value)
        if isinstance(m, nn.MaxPool2d):
            return self._maxpool(node, x, *maxpool_args(node, m, args, kwargs))
        if isinstance(m, nn.AvgPool2d):
            return self._avgpool(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                 m.divisor_override)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self._adaptive_avgpool(x, m.output_size)
        raise self._unsupported(node, f"layer {node.target!r} ({type(m).__name__})")

    # ------------------------------------------------------------------ linear layers
    def _linear(self, name, x: Dist, live):
        if x.mu.dim() != 2:
            raise ValueError(f"method='moments': Linear layer {name!r} on an input of shape {tuple(x.mu.shape)} "
                             "(only [N, features] is supported); use method='linear'")
        W, b = self.p.weights[name]
        k4_in = x.k4  # the tail diagnostic where an affine map follows a ReLU (_record_tail)

        def w4map(t):
            return t @ W.pow(4).T
        mu = x.mu @ W.T
        if b is not None:
            mu = mu + b
        d_in, M = self._d_to_columns(x, live)
        Fy = None if x.F is None else x.F @ W.T
        W2 = W * W
        d = x.d @ W2.T
        if M:
            Fy[-M:] = renormalise(Fy[-M:], d_in @ W2.T)
        wv = self.p.noise_var.get(name + ".weight")
        bv = self.p.noise_var.get(name + ".bias")
        if wv is None and bv is None:
            return self._record_tail(name, k4_in, w4map, Dist(mu, Fy, d))
        if self.cur == self.p.head and not self.p.first_order:  # its input, for the scale mixture
            src = None if x.src is None or x.src[0].shape != x.mu.shape else (x.src[0].clone(), x.src[1].clone())
            self.rec.setdefault(self.cur, {})["head"] = (x.mu.clone(), None if x.F is None else x.F.clone(),
                                                          x.d.clone(), src)
        # new noise: Var(δy_i) = Σ_j σ_ij² E[x_j²] (+ σ_b,i²)
        v = torch.zeros_like(mu)
        if wv is not None:
            xv = torch.zeros_like(x.mu) if self.p.first_order else x.var()
            vpert = xv @ wv.T  # the noise acting on the input's perturbation: Σ_j σ_ij² Var(x_j)
            self.rec.setdefault(self.cur, {})["vpert"] = vpert
            v = v + (x.mu * x.mu) @ wv.T + vpert
        if bv is not None:
            v = v + bv
        B, C = mu.shape
        u = torch.ones(B, 1, 1, 1, dtype=self.dtype, device=mu.device)  # one source per unit: [B, g=1, r=1, L=1]
        a = safe_sqrt(v.clamp_min(0)).unsqueeze(-1)
        y = Dist(mu.unsqueeze(-1), None if Fy is None else Fy.unsqueeze(-1), d.unsqueeze(-1))
        y = self._inject(y, u, a, v.unsqueeze(-1), live, groups=1)
        return self._record_tail(name, k4_in, w4map,
                                 Dist(y.mu.squeeze(-1), None if y.F is None else y.F.squeeze(-1), y.d.squeeze(-1)))

    def _conv(self, name, m: nn.Conv2d, x: Dist, live):
        if x.mu.dim() != 4:
            raise ValueError(f"method='moments': Conv2d {name!r} needs a 4-D input, got {tuple(x.mu.shape)}")
        if m.padding_mode != "zeros":
            raise ValueError(f"method='moments': Conv2d {name!r} with padding_mode={m.padding_mode!r} is not "
                             "supported; use method='linear'")
        W, b = self.p.weights[name]
        pre, padding = conv_padding(m)  # padding='same' / 'valid' as numbers (unfold takes no strings)
        k4_in = x.k4  # the tail diagnostic where an affine map follows a ReLU (_record_tail)
        if pre is not None:
            x = self._pad(x, pre)
            k4_in = None if k4_in is None else F.pad(k4_in, pre)
        kw = dict(stride=m.stride, padding=padding, dilation=m.dilation, groups=m.groups)

        def w4map(t):
            return F.conv2d(t, W.pow(4), None, **kw)
        mu = F.conv2d(x.mu, W, b, **kw)
        d_in, M = self._d_to_columns(x, live)
        Fy = map_batched(lambda t: F.conv2d(t, W, None, **kw), x.F)
        W2 = W * W
        if M:
            Fy[-M:] = renormalise(Fy[-M:], F.conv2d(d_in, W2, None, **kw))
        d = F.conv2d(x.d, W2, None, **kw)
        wv = self.p.noise_var.get(name + ".weight")
        bv = self.p.noise_var.get(name + ".bias")
        if wv is None and bv is None:
            return self._record_tail(name, k4_in, w4map, Dist(mu, Fy, d))
        B, Cout, Ho, Wo = mu.shape
        L = Ho * Wo
        g = m.groups
        cin_g = x.mu.shape[1] // g
        cout_g = Cout // g
        profiles, coeffs = [], []  # [B, g, r, L] and [B, Cout, r] per source family
        vdiag = torch.zeros_like(mu)
        if wv is not None:
            first = self.p.first_order
            xv = torch.zeros_like(x.mu) if first else x.var()
            vpert = F.conv2d(xv, wv, None, **kw)  # Σ_j σ_cj² Var(x̃_pj): noise on the perturbation
            vdiag = vdiag + F.conv2d(x.mu * x.mu, wv, None, **kw) + vpert  # exact per-unit variance
            # patch Gram per group: G = Σ_j E[x̃_pj x̃_qj] = (mean patches) + (perturbation patches)
            unf = dict(kernel_size=m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            Pm = F.unfold(x.mu, **unf).reshape(B, g, cin_g * m.kernel_size[0] * m.kernel_size[1], L)
            G = torch.zeros(B, g, L, L, dtype=self.dtype, device=mu.device)
            if x.K and not first:
                G = G + patch_gram(x.F, g, m.kernel_size, m.stride, padding, m.dilation, (Ho, Wo))
            if not first:
                G = G + torch.diag_embed(F.unfold(x.d, **unf).reshape(B, g, -1, L).sum(2))
            sbar2 = wv.reshape(Cout, -1).mean(1)  # mean noise variance of channel c's kernel
            self.rec[self.cur] = {"vpert": vpert, "gpert": G.clone(), "sbar2": sbar2}
            G = G + torch.einsum("bgjp,bgjq->bgpq", Pm, Pm)
            r = min(self.p.spatial_rank, L)
            with torch.no_grad():  # differentiated pass: no eigenvector derivative (see _eigen_factor)
                lam, U = top_eigh(G, r, self.p.seed)
            if torch.is_grad_enabled() and G.requires_grad:
                U = _eigen_factor(G, lam, U, U)  # value U; d(a·u) = ½ √(σ̄²) dG U Λ^(-½)
            lam_c = lam.repeat_interleave(cout_g, dim=1)  # [B, Cout, r]
            profiles.append(U.mT)
            coeffs.append(safe_sqrt(sbar2[None, :, None] * lam_c.clamp_min(0)))
        if bv is not None:
            vdiag = vdiag + bv.reshape(1, -1, 1, 1)
            profiles.append(torch.full((B, g, 1, L), 1.0 / math.sqrt(L), dtype=self.dtype, device=mu.device))
            coeffs.append(safe_sqrt(bv * L).reshape(1, Cout, 1).expand(B, -1, -1))
        u = torch.cat(profiles, dim=2)
        a = torch.cat(coeffs, dim=2)
        y = Dist(mu.reshape(B, Cout, L), None if Fy is None else Fy.reshape(Fy.shape[0], B, Cout, L),
                 d.reshape(B, Cout, L))
        y = self._inject(y, u, a, vdiag.reshape(B, Cout, L), live, groups=g)
        shp = (B, Cout, Ho, Wo)
        return self._record_tail(name, k4_in, w4map, Dist(y.mu.reshape(shp), None if y.F is None else
                                                          y.F.reshape((y.F.shape[0],) + shp), y.d.reshape(shp)))

    def _record_tail(self, name: str, k4_in, w4map, y: Dist) -> Dist:
        """The tail diagnostic at a Linear/Conv layer whose input is an affine map of a ReLU
        output (an eval-mode BatchNorm after the ReLU; ``k4_in`` from
        :func:`fourth_cumulant`, carried as ``Dist.k4``): its output's fourth cumulant ``κ₄(y_i) = Σ_j W_ij⁴ κ₄(x_j)``
        (inputs taken as independent; the weight noise's own part, Gaussian given the
        input, left out) and the pass's variance of ``y_i``, summed over the batch and
        units into ``stats["tail"][name] = [Σ κ₄, Σ Var²]``: their ratio is the layer's
        excess kurtosis (weighted by ``Var²``), about 0 for the sum of many comparable
        inputs, large where a few rarely firing inputs of large gain carry its variance
        (BatchNorm after a ReLU with units that never fire on the training data: the
        Gaussian closure downstream then fails, docs/THEORY.md §3). Only there: the
        same sum over a plain ReLU output (no affine map between) was at most 0.016 on the
        zoo's MLP, VGG and ResNet-20, with and without BatchNorm, and cost 8% of the moment
        pass. Returns ``y``."""
        if k4_in is None or self.p.first_order:
            return y
        with torch.no_grad():
            k4 = float(w4map(k4_in.detach()).double().sum())
            v2 = float(y.var().detach().double().pow(2).sum())
        acc = self.stats["tail"].setdefault(name, [0.0, 0.0])
        acc[0] += k4
        acc[1] += v2
        return y

    def _d_to_columns(self, x: Dist, live):
        """Turn the independent part ``d`` of a layer's input into ``d_rank`` sketched
        columns ``√d ⊙ r_m/√M`` (Rademacher ``r``: each unit's variance exact), in place
        — the input is shared with any skip path, which then shares the columns — so the
        layer maps ``diag(d)`` with its off-diagonal part (sketched) instead of dropping
        it. Returns ``(old d, M)``; the caller rescales the mapped columns to the exact
        diagonal ``(W∘W) d``."""
        M = self.p.d_rank
        # whether to add the columns is decided by the structure, not by the values of this
        # batch (otherwise an input's column count, and the sketches drawn to that count,
        # would depend on its chunk): only a layer input without columns and with no
        # independent part (the network's own input) is skipped
        if M == 0 or self.p.first_order or (x.K == 0 and not bool((x.d > 0).any())):
            return None, 0
        K = max([x.K] + [t.K for t in live if isinstance(t, Dist)])
        # the same signs for every input of the batch (broadcast): an input's result must
        # not depend on which inputs share its chunk
        r = torch.randint(0, 2, (M, 1) + tuple(x.d.shape[1:]), generator=self._gen(_STREAM_D))
        r = r.to(dtype=self.dtype, device=x.d.device) * 2 - 1
        d_in = x.d
        x.F = torch.cat([x.padded(K), r * (safe_sqrt(d_in.clamp_min(0)) / math.sqrt(M)).unsqueeze(0)])
        x.d = torch.zeros_like(d_in)
        return d_in, M

    def _inject(self, y: Dist, u, a, vdiag, live, groups):
        """Add new independent sources to ``y`` (``[B, C, L]``) and re-compress the basis.

        Source ``(c, k)``: ``a[b, c, k] · u[b, g(c), k, :]`` on channel ``c`` (zero
        elsewhere). ``vdiag`` is the exact per-unit variance of the new noise; what the
        sources do not carry goes to ``d``. The joint covariance of the live activations
        and ``y`` is then re-factorised with at most ``rank`` columns: in unit space when
        the live activations have no more units than there are columns (exact when they
        have at most ``rank`` units), otherwise through the Gram matrix of the columns."""
        p = self.p
        B, C, L = y.mu.shape
        r = u.shape[2]
        ug = u.repeat_interleave(C // groups, dim=1)  # [B, C, r, L]
        carried = torch.einsum("bcr,bcrl->bcl", a * a, ug * ug)
        d = y.d + (vdiag - carried).clamp_min(0)
        live = [t for t in live if isinstance(t, Dist)]
        K = max([y.K] + [t.K for t in live])
        Fy = y.padded(K)  # [K, B, C, L]
        others = [(t, t.padded(K)) for t in live if t.K > 0]
        n_new = C * r
        Mtot = K + n_new
        Dtot = C * L + sum(int(t.mu[0].numel()) for t, _ in others)
        dev = y.mu.device
        if Mtot <= p.rank:  # room for every new source: append them, nothing dropped
            newF = torch.einsum("bcrl,bcr->crbl", ug, a)
            newF = torch.einsum("crbl,ce->crbel", newF, torch.eye(C, dtype=self.dtype, device=dev))
            newF = newF.reshape(n_new, B, C, L)
            return Dist(y.mu, torch.cat([Fy, newF]) if K else newF, d)
        if Dtot <= Mtot and Dtot <= p.unit_space_max:
            return self._compress_units(y, Fy, others, ug, a, d, K)
        # ---- Gram path: M = [[Σ_t F_tᵀF_t, F_yᵀN], [NᵀF_y, NᵀN]]
        R = min(p.rank, Mtot)
        if p.compression == "sketch":
            V = (torch.randn(Mtot, R, generator=self._gen(_STREAM_SKETCH), dtype=torch.float64) / math.sqrt(R)).to(
                dtype=self.dtype, device=dev).expand(B, -1, -1)
        else:
            Mg = torch.zeros(B, Mtot, Mtot, dtype=self.dtype, device=dev)
            if K:
                A = torch.einsum("kbn,jbn->bkj", Fy.reshape(K, B, -1), Fy.reshape(K, B, -1))
                for _, Ft in others:
                    flat = Ft.reshape(K, B, -1)
                    A = A + torch.einsum("kbn,jbn->bkj", flat, flat)
                Bm = (torch.einsum("kbcl,bcrl->bkcr", Fy, ug) * a.unsqueeze(1)).reshape(B, K, n_new)
                Mg[:, :K, :K] = A
                Mg[:, :K, K:] = Bm
                Mg[:, K:, :K] = Bm.mT
            UG = torch.einsum("bcrl,bcsl->bcrs", ug, ug)
            Mg[:, K:, K:] = block_diag(a.unsqueeze(-1) * a.unsqueeze(-2) * UG)
            _, V = torch.linalg.eigh(Mg)  # ascending
            V = canonical_signs(V[:, :, -R:].flip(-1))  # [B, Mtot, R]
        shared = p.compression == "sketch"  # one sketch for the whole batch: plain GEMMs
        if shared:
            V1, V2 = V[0, :K, :], V[0, K:, :].reshape(C, r, R)
            newF = torch.einsum("bcrl,crR->Rbcl", ug * a.unsqueeze(-1), V2)
            if K:
                newF = newF + (V1.T @ Fy.reshape(K, -1)).reshape(R, B, C, L)
        else:
            V1, V2 = V[:, :K, :], V[:, K:, :].reshape(B, C, r, R)
            newF = torch.einsum("bcrl,bcr,bcrR->Rbcl", ug, a, V2)
            if K:
                newF = newF + torch.einsum("kbcl,bkR->Rbcl", Fy, V1)
        before = (Fy.pow(2).sum(0) + carried) if K else carried
        if p.compression == "sketch":
            newF, lost_y = renormalise(newF, before, with_lost=True)
        else:
            lost_y = (before - newF.pow(2).sum(0)).clamp_min(0)
        self.stats["lost"] += float(lost_y.detach().sum())
        self.stats["total"] += float(before.detach().sum())
        for t, Ft in others:
            if shared:
                Fn = (V1.T @ Ft.reshape(K, -1)).reshape((R,) + tuple(t.mu.shape))
            else:
                Fn = torch.einsum("kbn,bkR->Rbn", Ft.reshape(K, B, -1), V1).reshape((R,) + tuple(t.mu.shape))
            fsq = Ft.pow(2).sum(0)
            if p.compression == "sketch":
                Fn, lost = renormalise(Fn, fsq, with_lost=True)
            else:
                lost = (fsq - Fn.pow(2).sum(0)).clamp_min(0)
            self.stats["lost"] += float(lost.detach().sum())
            self.stats["total"] += float(fsq.detach().sum())
            t.F = Fn
            t.d = t.d + lost
        return Dist(y.mu, newF, d + lost_y)

    def _factor(self, Sig, R, Dtot):
        """``(F [R, B, D], w, V)``: ``R`` columns with ``F Fᵀ ≈ Σ``, ``V_R Λ_R^½`` from the top
        ``R`` eigenpairs ``(w, V)`` (eigenvector signs fixed by
        :func:`~.lowrank.canonical_signs`), exact up to ``UNIT_EIGH_MAX`` units (so exact
        when ``R = D``), randomised above. (A Cholesky factor, used before for ``R = D``,
        failed on rank-deficient ``Σ`` and then sent the whole batch to this path: an
        input's columns, and through the sketches downstream its result, depended on its
        chunk.)"""
        if Dtot <= UNIT_EIGH_MAX or R == Dtot:
            w, V = torch.linalg.eigh(Sig)
            w, V = w[:, -R:], canonical_signs(V[:, :, -R:])
        else:
            w, V = top_eigh(Sig, R, self.p.seed)
        return (V * safe_sqrt(w.clamp_min(0)).unsqueeze(1)).permute(2, 0, 1), w, V

    def _compress_units(self, y: Dist, Fy, others, ug, a, d, K):
        """Unit-space re-factorisation: the joint covariance ``Σ`` of ``y`` and the live
        activations (all their units stacked), ``Σ = V Λ Vᵀ``, ``F = V_R Λ_R^½``."""
        B, C, L = y.mu.shape
        parts = [Fy.reshape(K, B, C * L)] + [Ft.reshape(K, B, int(t.mu[0].numel())) for t, Ft in others]
        sizes = [q.shape[2] for q in parts]
        Dtot = sum(sizes)
        Sig = torch.zeros(B, Dtot, Dtot, dtype=self.dtype, device=y.mu.device)
        if K:
            Fall = torch.cat(parts, dim=2).permute(1, 2, 0)  # [B, D, K]
            Sig += Fall @ Fall.mT
        blocks = torch.einsum("bcr,bcrl,bcrm->bclm", a * a, ug, ug)  # new sources, block-diagonal by channel
        Sig[:, :C * L, :C * L] += block_diag(blocks)
        R = min(self.p.rank, Dtot)
        with torch.no_grad():
            Fnew, w, V = self._factor(Sig, R, Dtot)
        if torch.is_grad_enabled() and Sig.requires_grad:  # differentiated pass: the same columns (_eigen_factor)
            Fnew = _eigen_factor(Sig, w, V, Fnew.permute(1, 2, 0)).permute(2, 0, 1)
        diag = torch.diagonal(Sig, dim1=1, dim2=2)
        lost = (diag - Fnew.pow(2).sum(0)).clamp_min(0)
        self.stats["lost"] += float(lost.detach().sum())
        self.stats["total"] += float(diag.detach().sum())
        chunks = torch.split(Fnew, sizes, dim=2)
        lchunks = torch.split(lost, sizes, dim=1)
        for (t, _), Fc, lc in zip(others, chunks[1:], lchunks[1:]):
            t.F = Fc.reshape((R,) + tuple(t.mu.shape))
            t.d = t.d + lc.reshape(t.mu.shape)
        return Dist(y.mu, chunks[0].reshape(R, B, C, L), d + lchunks[0].reshape(B, C, L))

    # ------------------------------------------------------------------ nonlinearities
    def _nonlin(self, x: Dist, kind: str, counted: bool = False) -> Dist:
        """An elementwise nonlinearity of a Gaussian: mean and variance exactly
        (:func:`~.gaussian.relu_moments` or Gauss–Hermite), ``Cov(f(h), ·) =
        E f'(h) · Cov(h, ·)`` (Stein/Price), the second Hermite component as
        ``h2_rank`` correlated columns and the rest of the excess in ``d``. ``counted``:
        the unit's pre-activations enter the validity diagnostic (ReLU and its variants,
        :func:`~noiseprop.theory._graph.is_rectifier`)."""
        dt = self.dtype
        if self.p.first_order:  # the delta method: the slope at the mean
            if kind == "relu":
                slope = (x.mu > 0).to(dt)
                val = torch.relu(x.mu)
            else:
                mu = x.mu.detach().double().requires_grad_(True)
                with torch.enable_grad():
                    fz = activation_function(kind)(mu)
                    (slope,) = torch.autograd.grad(fz.sum(), mu)
                val, slope = fz.detach().to(dt), slope.to(dt)
            self.rec[self.cur] = {"s": torch.zeros_like(x.mu), "excess": [torch.zeros_like(x.mu)], "kind": kind}
            return Dist(val, None if x.F is None else slope * x.F, slope * slope * x.d)
        fsq_in = x.fsq()
        var = x.d + fsq_in
        k3_in = src = None
        if kind == "relu":
            # beyond the Gaussian (package docstring): the input's third cumulant, if any,
            # enters the Gram–Charlier closure; the output keeps its pre-activation (its
            # own third cumulant is formed only where a residual sum needs it)
            k3_in = third_cumulant(x)
            if k3_in is None:
                mean, v_out, slope, c2, s = relu_moments(x.mu, var)
            else:
                mean, v_out, slope, c2, s, _ = relu_moments_skew(x.mu, var, k3_in, with_k3=False)
            src = (x.mu, var, k3_in)
        elif isinstance(kind, tuple):  # LeakyReLU, ELU: closed forms
            rule = leaky_relu_moments if kind[0] == "leaky_relu" else elu_moments
            mean, v_out, slope, c2, s = rule(x.mu, var, kind[1])
        else:  # smooth, by Gauss–Hermite quadrature
            mean, v_out, slope, c2, s = smooth_moments(activation_function(kind), x.mu, var)
        if counted:  # the validity diagnostic (preact_frac)
            self.stats["pre_count"].append(int(x.mu.numel()))
            self.stats["pre_exceed"].append(int((s.to(x.mu.dtype) > x.mu.abs()).sum()))
        excess = (v_out - slope * slope * var.double()).clamp_min(0)
        slope, s, c2, mean, v_out, excess = (t.to(dt) for t in (slope, s, c2, mean, v_out, excess))
        cols, rest, carried = self._hermite2(x.F, fsq_in, s, c2, excess)
        self.rec[self.cur] = {"s": s, "excess": [rest], "cols": [cols], "kind": kind}
        if k3_in is not None:  # the surrogate's smoothed ReLU takes the same skewness
            self.rec[self.cur]["g1"] = skewness(k3_in, s)
        # the new columns [slope·F; cols], written once; their row norms are known:
        # slope²‖F‖² + what the Hermite columns carry (no pass over the columns)
        Fn = None
        if x.F is not None and x.K:
            K = x.K
            M = 0 if cols is None else cols.shape[0]
            if torch.is_grad_enabled() and (x.F.requires_grad or slope.requires_grad):  # differentiated pass
                Fn = torch.cat([x.F * slope.unsqueeze(0)] + ([cols] if M else []))
            else:
                Fn = torch.empty((K + M,) + tuple(x.F.shape[1:]), dtype=x.F.dtype, device=x.F.device)
                torch.mul(x.F, slope.unsqueeze(0), out=Fn[:K])
                if M:
                    Fn[K:] = cols
        elif cols is not None:
            Fn = cols
        fsq = slope * slope * fsq_in + carried
        return Dist(mean, Fn, (v_out - fsq).clamp_min(0), None, src)

    def _hermite2(self, Fw, fsq, sd, c2, excess):
        """The second Hermite component ``c₂ He₂(Z)`` of a nonlinearity of a Gaussian
        ``w = μ + sd·Z``: for two units ``Cov = 2 c₂ᵢ c₂ⱼ ρᵢⱼ²`` (ρ from the correlated part
        ``F``), carried by ``h2_rank`` new columns (random features
        ``((F̂·ω)² − ‖F̂‖²)/√2``, ``F̂ = F/sd``, rows rescaled so each unit carries exactly
        ``2c₂²‖F̂‖⁴``); ``fsq = ‖F‖²`` per unit. Returns ``(columns or None, remaining
        excess variance, variance the columns carry)``."""
        M = self.p.h2_rank
        if M == 0 or Fw is None or Fw.shape[0] == 0:
            return None, excess, torch.zeros_like(excess)
        K = Fw.shape[0]
        pos = sd > 0
        inv = torch.where(pos, 1.0 / torch.where(pos, sd, torch.ones_like(sd)), torch.zeros_like(sd))
        om = torch.randn(M, K, generator=self._gen(_STREAM_H2), dtype=torch.float64).to(dtype=self.dtype,
                                                                                          device=Fw.device)
        n2 = fsq * inv * inv  # ‖F̂‖²
        proj = (om @ Fw.reshape(K, -1)).reshape((M,) + tuple(Fw.shape[1:])) * inv.unsqueeze(0)  # ω·F̂
        g = (proj * proj - n2.unsqueeze(0)) / math.sqrt(2.0)
        target = (2 * c2 * c2 * n2 * n2).clamp_max(excess).clamp_min(0)
        cols, uncarried = renormalise(g, target, with_lost=True)
        carried = target - uncarried
        return cols, (excess - carried).clamp_min(0), carried

    def _max2(self, a: Dist, b: Dist, K: int) -> Dist:
        """Clark's max of two window elements (:func:`~.gaussian.clark_max`), with
        ``Cov(max, ·) = Φ Cov(a, ·) + (1 − Φ) Cov(b, ·)``. The row norms of the new
        columns ``Φ F_a + (1 − Φ) F_b`` follow from ``‖F_a‖², ‖F_b‖², F_a·F_b`` (one pass over
        the columns for the three, none for the result)."""
        dt = self.dtype
        Fa, Fb = a.padded(K), b.padded(K)
        if K and not self.p.first_order:
            fa, fb, cab = (Fa * Fa).sum(0), (Fb * Fb).sum(0), (Fa * Fb).sum(0)
        else:  # no columns, or the first order (the max of the means: no variance enters)
            fa = fb = cab = torch.zeros_like(a.mu)
        va, vb = (a.d + fa, b.d + fb) if not self.p.first_order else (fa, fb)
        # beyond the Gaussian: the running maximum of a window is skewed; its third
        # cumulant enters the next pairwise step and the ReLU after the pool
        k3_a, k3_b = (None, None) if self.p.first_order else (third_cumulant(a), third_cumulant(b))
        mean, v, pa, th, c2, excess, g1, k3 = clark_max(a.mu, b.mu, va, vb, cab, k3_a, k3_b,
                                                       with_k3=not self.p.first_order)
        pa, th, c2, mean, v, excess = (t.to(dt) for t in (pa, th, c2, mean, v, excess))
        pb = 1 - pa
        if self.p.first_order or not K or self.p.h2_rank == 0:
            cols, rest = None, excess
        else:
            Fd = Fa - Fb
            cols, rest, _ = self._hermite2(Fd, (fa + fb - 2 * cab).clamp_min(0), th, c2, excess)
        rec = self.rec.setdefault(self.cur, {"theta": [], "excess": [], "cols": [], "g1": []})
        rec["theta"].append(th)
        rec["g1"].append(None if g1 is None else g1.to(dt))
        rec["excess"].append(rest)
        rec["cols"].append(cols)
        Fn = pa.unsqueeze(0) * Fa + pb.unsqueeze(0) * Fb if K else None
        if self.p.first_order:
            return Dist(mean, Fn, pa * pa * a.d + pb * pb * b.d)
        fsq = (pa * pa * fa + pb * pb * fb + 2 * pa * pb * cab).clamp_min(0)  # ‖Φ F_a + (1 − Φ) F_b‖²
        if cols is not None:
            Fn = cols if Fn is None else torch.cat([Fn, cols])
            fsq = fsq + (cols * cols).sum(0)
        return Dist(mean, Fn, (v - fsq).clamp_min(0), None if k3 is None else k3.to(dt))

    def _maxpool(self, node, x: Dist, kernel, stride, padding, dilation, ceil_mode):
        if pair(padding) != (0, 0) or pair(dilation) != (1, 1) or ceil_mode:
            raise self._unsupported(node, "max pooling with padding, dilation or ceil_mode")
        cur = None
        k3 = third_cumulant(x)
        for sl in window_slices(*x.mu.shape[-2:], kernel, stride):
            e = Dist(x.mu[sl], None if x.F is None else x.F[sl], x.d[sl], None if k3 is None else k3[sl])
            cur = e if cur is None else self._max2(cur, e, max(cur.K, e.K))
        return cur

    # ------------------------------------------------------------------ linear, parameter-free ops
    def _avgpool(self, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
        kw = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode,
                  count_include_pad=count_include_pad, divisor_override=divisor_override)
        mu = F.avg_pool2d(x.mu, **kw)
        Fn = map_batched(lambda t: F.avg_pool2d(t, **kw), x.F)
        # Var of an average of independent units: Σ_j d_j / n², with n the divisor
        k = pair(kernel)
        if divisor_override:
            div = torch.full_like(mu[:1, :1], float(divisor_override))
        elif count_include_pad:
            div = torch.full_like(mu[:1, :1], float(k[0] * k[1]))
        else:
            div = F.avg_pool2d(torch.ones_like(x.d[:1, :1]), **{**kw, "count_include_pad": True}) * (k[0] * k[1])
        return Dist(mu, Fn, F.avg_pool2d(x.d, **kw) / div)

    def _adaptive_avgpool(self, x: Dist, output_size):
        mu = F.adaptive_avg_pool2d(x.mu, output_size)
        Fn = map_batched(lambda t: F.adaptive_avg_pool2d(t, output_size), x.F)
        H, W = x.mu.shape[-2:]
        oh, ow = mu.shape[-2:]
        nh = torch.tensor([_adaptive_len(i, H, oh) for i in range(oh)], dtype=self.dtype)
        nw = torch.tensor([_adaptive_len(j, W, ow) for j in range(ow)], dtype=self.dtype)
        n = (nh[:, None] * nw[None, :]).to(x.mu.device)
        return Dist(mu, Fn, F.adaptive_avg_pool2d(x.d, output_size) / n)

    def _method(self, node, args, kwargs):
        name = node.target
        x, rest = args[0], args[1:]
        if not isinstance(x, Dist):
            raise self._unsupported(node, f"method {name!r} with a noisy argument")
        if name == "view_as":
            shape = rest[0].mu.shape if isinstance(rest[0], Dist) else rest[0].shape
            return x.map(lambda t: t.reshape(shape))
        if name in _SELECTION_METHODS:
            return x.map(lambda t: getattr(t, name)(*rest, **kwargs))
        if name in ("mean", "sum"):
            return self._reduce(node, x, name, rest, kwargs)
        if name in ("size", "dim"):
            return getattr(x.mu, name)(*rest, **kwargs)
        if name in _ARITH_METHODS:
            return self._binary(node, _ARITH_METHODS[name], args, kwargs)
        raise self._unsupported(node, f"tensor method {name!r}")

    def _binary(self, node, op, args, kwargs):
        """``a op b`` of a function or method call, its operands by position or by keyword
        (``torch.add(input=a, other=b)``, ``h.add(other=b)``); ``alpha`` scales ``b`` as
        torch does (``torch.sub(a, b, alpha=2)`` is ``a − 2b``); a ``rounding_mode`` or any
        other keyword is refused by name."""
        kwargs = dict(kwargs)
        a = args[0] if args else kwargs.pop("input", None)
        b = args[1] if len(args) > 1 else kwargs.pop("other", None)
        alpha = args[2] if len(args) > 2 else kwargs.pop("alpha", 1)
        extra = sorted(k for k, v in kwargs.items() if v is not None)
        if a is None or b is None or extra:
            raise self._unsupported(node, f"{op.__name__} with the keyword(s) {extra}" if extra
                                    else f"{op.__name__} without two operands")
        if alpha != 1:
            if op not in (operator.add, operator.sub):
                raise self._unsupported(node, f"{op.__name__} with alpha")
            b = self._arith(node, operator.mul, b, alpha) if isinstance(b, Dist) else b * alpha
        if not isinstance(a, Dist):
            if op in (operator.add, operator.mul):
                a, b = b, a
            elif op is operator.sub:
                return self._arith(node, operator.add, self._arith(node, operator.mul, b, -1.0), a)
            else:
                raise self._unsupported(node, "division by a noisy tensor")
        return self._arith(node, op, a, b)

    def _function(self, node, args, kwargs):
        fn = node.target
        if fn is getattr and isinstance(args[0], Dist) and args[1] in ("shape", "ndim", "device"):
            return getattr(args[0].mu, args[1])  # x.reshape(x.shape[0], -1)
        if not args and ("input" in kwargs or "tensors" in kwargs):  # torch.flatten(input=h, ...)
            kwargs = dict(kwargs)
            args = (kwargs.pop("input") if "input" in kwargs else kwargs.pop("tensors"),)
        if fn in _SELECTION_FUNCTIONS:
            x, *rest = args
            if not isinstance(x, Dist) or any(isinstance(v, Dist) for v in rest):
                raise self._unsupported(node, f"{getattr(fn, '__name__', fn)} with these arguments")
            return x.map(lambda t: fn(t, *rest, **kwargs))
        if fn in _ADD_OPS:
            return self._binary(node, _ADD_OPS[fn], args, kwargs)
        if fn is F.pad:
            x, pad = args[0], (args[1] if len(args) > 1 else kwargs["pad"])
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            value = kwargs.get("value", args[3] if len(args) > 3 else None) or 0.0
            if mode != "constant":
                raise self._unsupported(node, f"padding mode {mode!r}")
            return self._pad(x, pad, value)
        if fn is torch.cat:
            ts = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if not all(isinstance(t, Dist) for t in ts):
                raise self._unsupported(node, "torch.cat of noisy and constant tensors")
            K = max(t.K for t in ts)
            dim = dim % ts[0].mu.dim()
            Fm = torch.cat([t.padded(K) for t in ts], dim + 1) if K else None
            return Dist(torch.cat([t.mu for t in ts], dim), Fm, torch.cat([t.d for t in ts], dim))
        if fn in _MAX_POOL_FUNCTIONS:
            return self._maxpool(node, args[0], *maxpool_args(node, None, args, kwargs))
        if fn in _AVG_POOL_FUNCTIONS:
            names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
            defaults = [None, None, 0, False, True, None]
            vals = [kwargs.get(n, args[i + 1] if len(args) > i + 1 else defaults[i]) for i, n in enumerate(names)]
            vals[1] = vals[1] or vals[0]
            return self._avgpool(args[0], *vals)
        if fn in _ADAPTIVE_AVG_POOL_FUNCTIONS:
            return self._adaptive_avgpool(args[0], kwargs.get("output_size", args[1] if len(args) > 1 else None))
        if fn in (torch.mean, torch.sum):
            return self._reduce(node, args[0], fn.__name__, args[1:], kwargs)
        raise self._unsupported(node, f"function {getattr(fn, '__name__', fn)!r}")

    @staticmethod
    def _pad(x: Dist, pad, value=0.0) -> Dist:
        """``x`` padded with the constant ``value`` (no noise: zero columns, zero variance)."""
        return Dist(F.pad(x.mu, pad, value=value), x.map(lambda t: F.pad(t, pad)).F, F.pad(x.d, pad))

    def _reduce(self, node, x: Dist, name, rest, kwargs):
        dim = kwargs.get("dim", rest[0] if rest else None)
        keepdim = kwargs.get("keepdim", rest[1] if len(rest) > 1 else False)
        if dim is None:
            raise self._unsupported(node, f"{name} over all dimensions (including the batch)")
        nd = x.mu.dim()
        dims = tuple(dd % nd for dd in ((dim,) if isinstance(dim, int) else tuple(dim)))
        if 0 in dims:
            raise self._unsupported(node, f"{name} over the batch dimension")
        n = math.prod(x.mu.shape[dd] for dd in dims)
        fdims = tuple(dd + 1 for dd in dims)
        if name == "mean":
            Fm = None if x.F is None else x.F.mean(dim=fdims, keepdim=keepdim)
            return Dist(x.mu.mean(dim=dims, keepdim=keepdim), Fm, x.d.sum(dim=dims, keepdim=keepdim) / (n * n))
        Fm = None if x.F is None else x.F.sum(dim=fdims, keepdim=keepdim)
        return Dist(x.mu.sum(dim=dims, keepdim=keepdim), Fm, x.d.sum(dim=dims, keepdim=keepdim))

    def _arith(self, node, op, a: Dist, b):
        if isinstance(b, Dist):
            if op is operator.add or op is operator.sub:
                K = max(a.K, b.K)
                sign = 1.0 if op is operator.add else -1.0
                Fa, Fb = a.padded(K), b.padded(K)
                Fm = Fa + sign * Fb if K else None
                return Dist(op(a.mu, b.mu), Fm, a.d + b.d, self._sum_k3(a, b, Fa, Fb, sign))
            raise self._unsupported(node, "a product or quotient of two noisy tensors")
        if isinstance(b, torch.Tensor):
            b = b.to(self.dtype)
        k3 = third_cumulant(a)
        if op is operator.add:
            return Dist(a.mu + b, a.F, a.d, k3)
        if op is operator.sub:
            return Dist(a.mu - b, a.F, a.d, k3)
        if op is operator.mul:
            return Dist(a.mu * b, None if a.F is None else a.F * b, a.d * b * b, None if k3 is None else k3 * b ** 3)
        if op is operator.truediv:
            return Dist(a.mu / b, None if a.F is None else a.F / b, a.d / (b * b), None if k3 is None else k3 / b ** 3)
        raise self._unsupported(node, f"operator {op}")

    def _sum_k3(self, a: Dist, b: Dist, Fa, Fb, sign: float):
        """Third cumulant of ``a ± b`` (``None``: both Gaussian). Each part's own, plus,
        where exactly one part is a ReLU output (``src``) and the other is taken as
        jointly Gaussian with its pre-activation, the cross cumulants
        :func:`~.gaussian.rectified_cross_cumulants` (a residual sum of a rectified skip
        and a branch); their covariance is the columns' ``Σ_k F_a F_b``."""
        ka, kb = third_cumulant(a), third_cumulant(b)
        if self.p.first_order or (ka is None and kb is None):
            return None
        k3 = torch.zeros_like(a.mu) if ka is None else ka
        if kb is not None:
            k3 = k3 + sign ** 3 * kb
        if (a.src is None) == (b.src is None):
            return k3
        r, g, Fr, Fg, s_r, s_g = (a, b, Fa, Fb, 1.0, sign) if a.src is not None else (b, a, Fb, Fa, sign, 1.0)
        c = (Fr * Fg).sum(0) if Fr.shape[0] else torch.zeros_like(r.mu)
        rrb, rbb = rectified_cross_cumulants(r.src[0], safe_sqrt(r.src[1].clamp_min(0)), c, g.var())
        return k3 + (3 * s_r * s_r * s_g * rrb + 3 * s_r * s_g * s_g * rbb).to(k3.dtype)
