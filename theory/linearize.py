"""The first-order (linearised) network: per-input Jacobians and Jacobian-vector
products with respect to the noisy parameters (docs/THEORY.md §3, §7, §8).

For weights ``θ`` perturbed by independent noise ``ε`` with per-element variance
``σ_θ²``, the linearised logits are

    f_lin(x; ε) = f(x; θ) + J(x) ε,          J(x) = ∂f(x; θ)/∂θ,

so to first order (the delta method) the logits of input ``i`` have covariance

    Cov(f_i)_ab = Σ_θ σ_θ² ∂f_{i,a}/∂θ · ∂f_{i,b}/∂θ,

and those of inputs ``i`` and ``j`` are correlated (one noise draw is shared by all
inputs, one chip): ``Cov(f_i, f_j) = J_i Σ_ε J_jᵀ``. Exact to first order for any
differentiable module: weight sharing in convolutions, residual connections and
BatchNorm in eval mode are part of ``J``.

Implementation (torch.func): ``vmap(jacrev(f))`` over a chunk of inputs gives the
per-input Jacobians ``[B, C, *θ.shape]`` for every target parameter; they are scaled by
the noise model's unit scale ``u(θ)`` (``σ = level · u``) and contracted to
``[B, C, C]`` in float64, chunk by chunk, so peak memory is one chunk's Jacobians and
does not grow with the number of inputs. The same chunk also gives, at almost no extra
cost, ``K`` draws of the linearised network for all inputs at once,
``z_k = J (u ⊙ ξ_k)`` with shared Gaussian directions ``ξ_k`` (:func:`jacobian_pass`),
which carry the cross-input correlation used for the chip-to-chip spread of accuracy.
:meth:`LinearizedNetwork.linearized_logits` computes ``f + J δθ`` for given weight
perturbations by one forward-mode pass (``torch.func.jvp``): the control variate of
Monte-Carlo (same draws).

The network evaluated, and the parameters that get noise, come from
:func:`noiseprop.theory.targets.resolve_targets`, the same function Monte-Carlo uses.
The user's model is never modified: parameters are passed functionally
(``torch.func.functional_call``) and a model in training mode is evaluated through an
eval-mode deep copy (with a warning).
"""
from __future__ import annotations

import enum
import hashlib
import math
import operator
import types
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from ._graph import differentiable_attention, trace, unfold_input
from .accuracy import correct_probability
from .noise import WeightNoise
from .targets import _L2_BN, TargetPlan, _is_foldable, folding_affine, qualified_name, resolve_targets
from .validation import check_finite_logits, check_labels, check_logits, copy_model, probe_logits

__all__ = [
    "LinearizedNetwork",
    "JacobianPass",
    "jacobian_pass",
    "auto_chunk_size",
    "pass_chunk_size",
    "control_variate_mean",
    "ControlVariateEstimate",
    "LinearControlVariate",
    "first_order_loss_change",
    "piecewise_linear",
    "select_classes",
    "tap_route_problems",
    "layer_rule_problems",
    "split_calls",
    "checkpointing_named",
]

#: Default memory budget (bytes) for one chunk of per-input Jacobians.
DEFAULT_JACOBIAN_BUDGET = 384 * 2**20

#: Most inputs per chunk of :func:`jacobian_pass` when the budget allows more. Measured
#: (one thread, 359 digits inputs, ``benchmarks/predict_vs_mc.py --parts chunks``): the
#: pass of ResNet-20 takes 0.77 s at 49 inputs per chunk, 0.48 s at 128 and 0.50 s at
#: 256–512; the VGG 1.94 s at 5, 1.16–1.22 s at 64–128 and 1.49–1.72 s at 256–512 (the
#: working set leaves the cache); the MLP 8–15 ms at any size.
PASS_CHUNK_CAP = 128

#: Bytes of a whole chunk's working set below which :func:`pass_chunk_size` goes beyond
#: :data:`PASS_CHUNK_CAP` (networks whose one input holds little, such as the digits MLP,
#: about 20 kB: there the pass is per-call overhead, 8.6 ms in chunks of 128 against
#: 6.0 ms in one chunk of 359; one thread, medians of 40 alternating runs). The cap's
#: reason, the working set leaving the cache, does not arise below it.
SMALL_CHUNK_WORKSET = 32 * 2**20


def _any_training(net: nn.Module) -> bool:
    return any(m.training for m in net.modules())


def train_mode_message(model: nn.Module) -> str:
    """The notice for a model in training mode, or with submodules in it (the root in eval
    mode, ``model.bn1.train()``): which, and that it is evaluated in eval mode."""
    if model.training:
        who = f"{type(model).__name__} is in training mode"
    else:
        names = [n for n, m in model.named_modules() if n and m.training]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        who = f"{type(model).__name__} has submodules in training mode ({', '.join(names[:3])}{more})"
    return (f"{who}; noiseprop evaluates it in eval mode (BatchNorm running statistics, no dropout). "
            "The model itself is left unchanged.")


def call_with(net: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
              x: torch.Tensor):
    """``net(x)`` with its parameters and buffers replaced by ``params`` and ``buffers``
    (``torch.func.functional_call``), keyed by ``named_parameters()``' names (one name per
    tensor). ``tie_weights=False``: with its default, a module held under two names (a
    ``Sequential`` with the same layer twice) came back with plain tensors in place of its
    parameters, because the second name's restore put back the first name's substitute
    (the user's model changed, and ``copy.deepcopy`` of it then failed). A name replaces
    the attribute of its module, which every name of the same module shares, so a layer
    called twice uses the substitute in both calls; tensors shared by distinct modules
    (tied weights) are refused as noise targets (:func:`~noiseprop.theory.targets.resolve_targets`)
    and a non-target one keeps its value under every name."""
    with differentiable_attention():
        return functional_call(net, (dict(params), dict(buffers)), (x,), tie_weights=False)


class LinearizedNetwork:
    """A trained network, viewed as a function of its noisy parameters.

    ``model`` is evaluated in eval mode (a deep copy when it is in training mode, with a
    warning); ``targets`` selects the parameters that get noise exactly as Monte-Carlo
    does (:func:`~noiseprop.theory.targets.resolve_targets`).
    """

    def __init__(self, model: nn.Module, targets=None, warn_train_mode: bool = True):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise ValueError(f"model is wrapped in {type(model).__name__}, whose parameters the analytic prediction "
                             "cannot replace per call (torch.func.functional_call); pass the wrapped network, "
                             "model.module")
        plan: TargetPlan = resolve_targets(model, targets)
        net = plan.model
        if _any_training(net):
            if warn_train_mode and _any_training(model):  # (a folded copy's new modules are the plan's, not the user's)
                warnings.warn(train_mode_message(model), stacklevel=3)
            net = copy_model(net, "the analytic prediction (an eval-mode copy of a model in training mode)").eval()
        self.plan = plan
        self.net = net
        self.names: tuple[str, ...] = plan.names
        self.params = {n: p.detach() for n, p in net.named_parameters()}
        self.buffers = {n: b.detach() for n, b in net.named_buffers()}
        self.target_params = {n: self.params[n] for n in self.names}
        for n, p in self.params.items():
            if torch.is_floating_point(p) and not torch.isfinite(p).all():
                raise ValueError(f"model parameter {n!r} contains NaN or infinite values")
        for n, b in self.buffers.items():
            if torch.is_floating_point(b) and not torch.isfinite(b).all():
                raise ValueError(f"model buffer {n!r} contains NaN or infinite values")
        first = self.target_params[self.names[0]]
        self.dtype = first.dtype
        self.device = first.device
        #: remember trace-derived results across objects of the same network
        #: (:func:`structure_memo`); ``predict(..., cache=False)`` turns it off
        self.memo = True
        self._structure = None  # module_structure(net), computed on first use

    # ------------------------------------------------------------------ basics
    def structure(self) -> list:
        """:func:`module_structure` of the evaluated network (computed once per object)."""
        if self._structure is None:
            self._structure = module_structure(self.net)
        return self._structure

    @property
    def params_by_module(self) -> dict[str, list[str]]:
        """Module name → the names of its noisy parameters (``"weight"``, ``"bias"``), in
        target order."""
        out: dict[str, list[str]] = {}
        for n in self.names:
            mname, _, pname = n.rpartition(".")
            out.setdefault(mname, []).append(pname)
        return out

    @property
    def num_target_elements(self) -> int:
        return int(sum(p.numel() for p in self.target_params.values()))

    def forward(self, x: torch.Tensor, tparams: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of a batch with the target parameters replaced by ``tparams``."""
        params = self.params if tparams is None else {**self.params, **tparams}
        return call_with(self.net, params, self.buffers, x)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        outs = [self.forward(x[i:i + batch_size].to(self.device)) for i in range(0, x.shape[0], batch_size)]
        out = torch.cat(outs)
        if out.dim() != 2:
            raise ValueError(f"the model must map a batch of inputs to logits of shape [N, C]; got shape {tuple(out.shape)}")
        return out

    def unit_scales(self, noise: WeightNoise) -> dict[str, torch.Tensor]:
        """``u(θ)``: the noise model's per-element scale at level 1 (``σ = level · u``)."""
        unit = noise.with_level(1.0)
        return {n: unit.scale(p) for n, p in self.target_params.items()}

    def scales(self, noise: WeightNoise) -> dict[str, torch.Tensor]:
        """``σ_θ`` per element at the noise model's own level."""
        return {n: noise.scale(p) for n, p in self.target_params.items()}

    # ------------------------------------------------------------------ jvp
    def linearized_logits(self, x: torch.Tensor, delta, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(x; θ), f(x; θ) + J(x) δθ)`` for weight perturbations ``delta`` (a dict
        name → tensor, or a sequence in target order), by ``torch.func.jvp``.

        With ``δθ = σ ⊙ z`` from the same ``z`` as a Monte-Carlo draw, the second output
        is the linearised network's logits for that draw (the control variate)."""
        if not isinstance(delta, Mapping):
            delta = list(delta)
            if len(delta) != len(self.names):
                raise ValueError(f"delta has {len(delta)} tensors; the targets are {len(self.names)} parameters {self.names}")
            delta = dict(zip(self.names, delta))
        missing = [n for n in self.names if n not in delta]
        if missing:
            raise ValueError(f"delta lacks perturbations for target parameters {missing}")
        tang = {n: delta[n].to(dtype=self.dtype, device=self.device) for n in self.names}
        for n in self.names:
            if tang[n].shape != self.target_params[n].shape:
                raise ValueError(f"delta[{n!r}] has shape {tuple(tang[n].shape)}, the parameter {tuple(self.target_params[n].shape)}")
        f0s, fls = [], []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(self.device)
            f0, df = jvp(lambda tp: self.forward(xb, tp), (self.target_params,), (tang,))
            f0s.append(f0.detach())
            fls.append((f0 + df).detach())
        return torch.cat(f0s), torch.cat(fls)


def auto_chunk_size(num_classes: int, num_elements: int, itemsize: int = 4,
                    budget: int = DEFAULT_JACOBIAN_BUDGET, cap: int = 256) -> int:
    """Inputs per Jacobian chunk so that ``3 · B · C · P · itemsize`` fits ``budget``
    (the Jacobians, their scaled copy and the backward pass's working memory)."""
    per = 3 * max(1, num_classes) * max(1, num_elements) * itemsize
    return int(max(1, min(cap, budget // per)))


def _patch_size(m: nn.Conv2d) -> int:
    """Elements of one input patch of a convolution, per group (``Cin/g · kh · kw``)."""
    return m.in_channels // m.groups * math.prod(m.kernel_size)


def _gram_cheaper(m: nn.Module, L: int, num_slots: int) -> bool:
    """Whether the Gram-matrix route of :func:`tap_covariance` is cheaper than forming the
    per-sample Jacobian for this convolution at ``L`` output positions (the one cost
    comparison, used by :func:`tap_covariance` and :func:`pass_chunk_size`)."""
    J = _patch_size(m)
    ghost = L * L * J * m.groups + num_slots * m.out_channels * L * L + num_slots ** 2 * m.out_channels * L
    return ghost < num_slots * m.out_channels * J * L + num_slots ** 2 * m.out_channels * J


def _per_channel(u: torch.Tensor) -> bool:
    """Whether a weight's noise scale is constant within each output channel (what the
    Gram-matrix route of :func:`weight_terms` needs)."""
    uc = u.reshape(u.shape[0], -1)
    return bool((uc == uc[:, :1]).all())


def pass_chunk_size(taps: Sequence["Tap"], num_slots: int, slow_elements: int, itemsize: int = 4,
                    budget: int = DEFAULT_JACOBIAN_BUDGET, cap: int = PASS_CHUNK_CAP) -> int:
    """Inputs per chunk of :func:`jacobian_pass` from what one input actually holds,
    measured on the taps of a one-input forward pass: the forward graph (each tapped
    layer's input and output, twice for what the layers between them save), the
    backpropagated signals at every tapped output (``num_slots`` of them, twice for the
    batched backward's working gradients), the largest single layer's contraction (its
    unfolded patches, its scaled signal, and either its patch Gram matrices or two
    per-sample Jacobians ``[num_slots, numel]``, whichever :func:`tap_covariance` would
    form), and ``3 · num_slots · slow_elements`` for parameters differentiated by
    ``vmap(jacrev)``. At most ``cap`` (:data:`PASS_CHUNK_CAP`), or as many inputs as
    hold :data:`SMALL_CHUNK_WORKSET` bytes where that is more; never more than the
    budget allows; at least 1.

    The per-sample Jacobians of all parameters (what :func:`auto_chunk_size` budgets
    for) are never formed at once: a layer's is formed, contracted and freed before the
    next, and most convolutions never form theirs. :func:`jacobian_pass` uses this only
    where the Gram route is open to every layer (a scale constant within each output
    channel, no draws, no further scale maps, every noisy layer called once); otherwise
    every layer forms its Jacobian (and a scaled copy), and it keeps
    :func:`auto_chunk_size`."""
    work = 0
    for t in taps:
        m = t.module
        nin, nout = t.x[0].numel(), t.e[0].numel()
        if isinstance(m, nn.Conv2d):
            L = nout // m.out_channels
            J = _patch_size(m)
            w = J * m.groups * L + num_slots * m.out_channels * L
            w += (m.groups * L * L + num_slots * m.out_channels * L * L) if _gram_cheaper(m, L, num_slots) \
                else 2 * num_slots * m.weight.numel()
        else:  # tap_covariance's Gram route, always open to a Linear layer: the Gram
            # matrix of its S positions, the signals times it, and the bias's Jacobian
            S = max(1, nin // max(1, m.in_features))
            w = S * S + 3 * num_slots * nout
        work = max(work, w)
    per = max(1, itemsize * (graph_and_signals(taps, num_slots) + work + 3 * num_slots * slow_elements))
    return int(max(1, min(max(cap, SMALL_CHUNK_WORKSET // per), budget // per)))


def graph_and_signals(taps: Sequence["Tap"], num_slots: int) -> int:
    """Elements one input holds in a derivative pass besides the layers' contractions,
    from the taps of a one-input forward: the forward graph (each tapped layer's input
    and output, twice for what the layers between them save) and the backpropagated
    signals at every tapped output (``num_slots`` of them, twice for the batched
    backward's working gradients). Shared by :func:`pass_chunk_size` and the drift
    pass's chunk (:func:`~noiseprop.theory.drift._fast_chunk_size`)."""
    total = 0
    for t in taps:
        nin, nout = t.x[0].numel(), t.e[0].numel()
        total += 2 * (nin + nout) + 2 * num_slots * nout
    return total


@dataclass(frozen=True)
class JacobianPass:
    """What one pass of per-input Jacobians gives, at noise level 1 (``σ = u``).

    clean_logits: ``[N, C]``; cov_unit: ``[N, C, C]`` float64, ``J diag(u²) Jᵀ`` per
    input; draws_unit: ``[N, C, K]`` (or ``None``), ``J (u ⊙ ξ_k)`` for ``K`` shared
    standard-normal directions ``ξ_k`` (draws of the linearised network at level 1);
    chunk_size: inputs per chunk used.
    """

    clean_logits: torch.Tensor
    cov_unit: torch.Tensor
    draws_unit: torch.Tensor | None
    chunk_size: int
    #: ``per_layer=True``: noisy module name -> its share ``J_l diag(u_l²) J_lᵀ`` ``[N, C, C]``
    #: (the shares add up to ``cov_unit`` exactly: independent noise splits over layers).
    layer_cov_unit: Mapping[str, torch.Tensor] | None = None
    #: ``extra_units=(u_1, ...)``: ``J diag(u_k²) Jᵀ`` ``[N, C, C]`` for each further scale map,
    #: from the same derivatives (noise models whose variance is not one level times ``u²``).
    extra_cov: tuple = ()
    #: ``classes=k``: ``[N, k+1]`` the class of each slot (slot 0 the label, then the ``k``
    #: highest other clean logits); ``cov_unit``, ``draws_unit`` and the per-layer shares are
    #: then over these slots (``[N, k+1, k+1]``), not over all classes.
    classes: torch.Tensor | None = None


def select_classes(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k+1]``: each input's label, then its ``k`` closest competitors (the other
    classes with the highest clean logits, the predicted class first when it is wrong):
    the classes whose margins decide whether it stays correct."""
    masked = logits.detach().clone()
    rows = torch.arange(logits.shape[0], device=logits.device)
    lab = labels.to(logits.device).long()
    masked[rows, lab] = -torch.inf
    # among equal logits the lower class first (a stable sort): the one argmax would pick
    top = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.cat([lab[:, None], top], dim=1)


def _directions(lin: LinearizedNetwork, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=lin.device).manual_seed(int(seed))
    return {n: torch.randn(p.numel(), k, generator=g, dtype=lin.dtype, device=lin.device)
            for n, p in lin.target_params.items()}


# ----------------------------------------------------------------------------
# Batched per-sample Jacobians of Linear/Conv2d parameters from activation gradients
# ----------------------------------------------------------------------------
@dataclass
class Tap:
    """One call of a noisy Linear/Conv2d layer: its module, input and a zero tensor added
    to its output (the gradient with respect to it is the backpropagated signal δ)."""

    name: str
    module: nn.Module
    x: torch.Tensor
    e: torch.Tensor


def _own_forward(module: nn.Module) -> bool:
    """A subclass of Linear/Conv2d whose ``forward`` (or ``_conv_forward``) is its own."""
    if isinstance(module, nn.Linear):
        return type(module).forward is not nn.Linear.forward
    return isinstance(module, nn.Conv2d) and (type(module).forward is not nn.Conv2d.forward
                                              or type(module)._conv_forward is not nn.Conv2d._conv_forward)


def _fast_ok(module: nn.Module) -> bool:
    """A Linear or zero-padded Conv2d layer computing what its class computes (a subclass
    with its own ``forward``, e.g. weight standardisation, is not ``x Wᵀ + b``: the
    generic route differentiates it)."""
    if isinstance(module, nn.Linear):
        return not _own_forward(module)
    return (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"  # padding="same" too (unfold_input)
            and not _own_forward(module))


def affine_backward(mod: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """For an eval-mode BatchNorm-like layer with fixed statistics (``mod(x) = a ⊙ x + c``
    per channel, :func:`~noiseprop.theory.targets.folding_affine`): its own output
    ``out``, value unchanged, carrying the gradient of that affine map,
    ``out + (x − x)·a``, whose backward is one product by ``a``. ``None`` for any other
    layer (training mode, batch statistics, statistics that cannot be folded)."""
    if mod.training or not _is_foldable(mod) or (isinstance(mod, _L2_BN) and not mod.track_running_stats):
        return None
    try:
        a, _ = folding_affine(mod)
    except (ValueError, TypeError):  # no running statistics, or a negative variance: left as it is
        return None
    a = a.detach().to(x.dtype).reshape((1, -1) + (1,) * (x.dim() - 2))
    return out.detach() + (x - x.detach()) * a


class _Taps(list):
    """The taps of a forward pass, and the names of tapped layers called in a way a tap
    cannot record (``untapped``)."""

    def __init__(self):
        super().__init__()
        self.untapped: set = set()


@contextmanager
def tapping(modules: Mapping[int, tuple[str, nn.Module]]):
    """Within the context, every call of a module whose ``id`` is in ``modules`` records a
    :class:`Tap` (input captured, output ``+ e`` with ``e = 0`` requiring grad). Uses a
    global forward hook (removed on exit), so the model object itself is not touched.

    With gradients on, an eval-mode BatchNorm-like layer is differentiated as the
    per-channel affine map it is (:func:`affine_backward`): the same values, the same
    gradient, and a backward that is one product instead of
    ``native_batch_norm_backward``."""
    taps = _Taps()

    def hook(mod, inp, out):
        hit = modules.get(id(mod))
        if hit is None or hit[1] is not mod:
            if torch.is_grad_enabled() and inp and isinstance(inp[0], torch.Tensor) and inp[0].requires_grad \
                    and isinstance(out, torch.Tensor) and out.shape == inp[0].shape:
                return affine_backward(mod, inp[0], out)
            return None
        if not inp or not isinstance(inp[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            taps.untapped.add(hit[0])  # called with a keyword (layer(input=x)): no tap (tap_route_problems)
            return None
        e = torch.zeros_like(out, requires_grad=True)
        taps.append(Tap(hit[0], mod, inp[0].detach(), e))
        return out + e

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield taps
    finally:
        handle.remove()


def check_noise_reaches(lin: "LinearizedNetwork", x1: torch.Tensor) -> None:
    """Refuse a network whose ``forward`` changes its output with a noisy parameter but
    passes it no gradient (a ``.detach()`` or ``torch.no_grad()`` on the parameter's
    path): every derivative of the first order, the moment method and the curvature would
    leave that parameter's noise out and predict too little damage, where Monte-Carlo
    sees it. One backward pass on the input ``x1``; a parameter without a gradient is
    then perturbed (half its mean magnitude, seeded) and refused only if the output moves
    (a layer the output does not use is fine: its noise has no effect). Remembered per
    network structure (:func:`structure_memo`)."""
    def compute():
        tp = {n: lin.target_params[n].detach().clone().requires_grad_(True) for n in lin.names
              if torch.is_floating_point(lin.target_params[n])}
        if not tp:
            return []
        with torch.enable_grad():
            out = lin.forward(x1, tp)
            if not isinstance(out, torch.Tensor):
                return []  # probe_logits gives the clear error for a non-tensor output
            gs = (torch.autograd.grad(out.float().sum(), list(tp.values()), allow_unused=True)
                  if out.requires_grad else [None] * len(tp))
        missing = [n for n, g in zip(tp, gs) if g is None]
        moved = []
        if missing:
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                base = lin.forward(x1)
                # a forward that is not deterministic (noise of its own): moved only beyond
                # ten times its own spread between two plain calls
                floor = 10 * float((lin.forward(x1) - base).abs().max())
                for n in missing:
                    p = lin.target_params[n]
                    step = 0.5 * float(p.abs().float().mean()) or 0.5
                    pert = p + (step * torch.randn(p.shape, generator=gen)).to(p.dtype).to(p.device)
                    if float((lin.forward(x1, {n: pert}) - base).abs().max()) > floor:
                        moved.append(n)
        return moved

    moved = structure_memo(lin, ("noise_reaches", lin.names), compute)
    if moved:
        shown = moved if len(moved) <= 6 else moved[:6] + [f"... {len(moved) - 6} more"]
        raise ValueError(f"noisy parameters {shown} change the model's output but get no gradient through its "
                         "forward (a .detach() or torch.no_grad() on their path): the analytic prediction would "
                         "leave their noise out. Remove the detach/no_grad from the forward, or leave these "
                         "parameters out of the noise with targets=...")


def _checkpointing_error(e: BaseException) -> ValueError:
    """The clear error for a model that uses activation checkpointing
    (``torch.utils.checkpoint``): its recomputation re-runs the forward hooks that record
    each layer during the backward pass (a ``CheckpointError``), and ``torch.func``
    refuses its saved-tensor hooks."""
    return ValueError("the model uses activation checkpointing (torch.utils.checkpoint), whose recomputation the "
                      "derivative pass cannot follow (" + f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" +
                      "); call the model without checkpointing for the prediction (it saves memory in training "
                      "only), or use Monte-Carlo")


@contextmanager
def checkpointing_named():
    """Within the context, torch's errors for activation checkpointing (a
    ``CheckpointError``, torch.func's refusal of saved-tensor hooks) become
    :func:`_checkpointing_error`; any other error passes unchanged."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, torch.utils.checkpoint.CheckpointError) or "saved tensor hooks" in str(e):
            raise _checkpointing_error(e) from e
        raise


def split_calls(taps, b: int) -> set:
    """Names of the tapped layers whose calls in a forward over ``b`` inputs do not map
    the batch's rows one to one (an input without the batch as its first dimension, or a
    keyword call the tap could not record)."""
    return {t.name for t in taps if t.x.dim() == 0 or t.x.shape[0] != b or t.e.dim() == 0
            or t.e.shape[0] != b} | taps.untapped


def check_no_recompute(taps, n_forward: int) -> None:
    """Refuse a backward pass that re-ran tapped layers (activation checkpointing
    recomputes its segment's forward, hooks included, and the signals then reach the
    recomputed taps instead of those of the forward: silently wrong)."""
    if len(taps) > n_forward:
        raise _checkpointing_error(RuntimeError(f"{len(taps) - n_forward} layer calls re-run during the backward pass"))


def tap_route_problems(lin: "LinearizedNetwork", x: torch.Tensor, fast: Mapping[str, Sequence[str]]) -> set:
    """The layers among ``fast`` (module name -> its target parameter names) whose weight
    derivatives the tapped route would get wrong; their parameters take the generic
    route. The tapped route reads each call's input ``x`` and output signal ``δ`` and
    forms ``δ ⊗ x`` per input, which holds only when every call maps the batch's rows
    one to one and the weight enters the logits through these calls alone. Checked on
    the first two inputs of ``x``:

    - each call's input has the batch as its first dimension, and the layer is called as
      often for one input as for two (not: a learned token ``[1, F]``, sequence-first
      ``[S, N, F]``, prototypes, a per-input loop, a keyword call ``layer(input=x)``);
    - the weight's gradient of a seeded random projection of the logits equals the sum
      of the taps' ``δ ⊗ x`` (not: a weight also read outside its layer's call, a tied
      decoder ``F.linear(h, enc.weight.t())``).

    One forward for one input and one forward and backward for two; remembered with the
    network's structure (:func:`structure_memo`). The pass itself checks that each call
    has the chunk's batch size (a batch split or concatenated inside the forward)."""
    def compute():
        modules = dict(lin.net.named_modules())
        watch = {id(modules[m]): (m, modules[m]) for m in fast}
        xs = x[:2].to(lin.device)
        bad: set = set()
        calls = []
        for xb in ((xs[:1], xs) if xs.shape[0] > 1 else (xs,)):
            with torch.no_grad(), tapping(watch) as taps:
                lin.forward(xb)
            bad |= split_calls(taps, xb.shape[0])
            per: dict = {}
            for t in taps:
                per[t.name] = per.get(t.name, 0) + 1
            calls.append(per)
        if len(calls) == 2:
            bad |= {m for m in set(calls[0]) | set(calls[1]) if calls[0].get(m) != calls[1].get(m)}
        names = {m: qualified_name(m, "weight") for m in fast if m not in bad and "weight" in fast[m]}
        if not names:
            return sorted(bad)
        tp = {n: lin.target_params[n].detach().clone().requires_grad_(True) for n in names.values()}
        watch = {id(modules[m]): (m, modules[m]) for m in names}
        with torch.enable_grad(), tapping(watch) as taps:
            out = lin.forward(xs, tp)
            r = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype).to(out.device)
            n_fwd = len(taps)
            with checkpointing_named():
                grads = torch.autograd.grad((out * r).sum(), list(tp.values()) + [t.e for t in taps], allow_unused=True)
            check_no_recompute(taps, n_fwd)
        exact = dict(zip(tp, grads[:len(tp)]))
        via_taps: dict = {}
        for t, g in zip(taps, grads[len(tp):]):
            if g is not None:
                gw = tap_jacobian(t, g.unsqueeze(0), "weight").sum(0)[0]
                via_taps[t.name] = via_taps[t.name] + gw if t.name in via_taps else gw
        for m, n in names.items():
            ge, gt = exact[n], via_taps.get(m)
            if ge is None and gt is None:
                continue
            ge = torch.zeros(tp[n].numel(), dtype=tp[n].dtype, device=tp[n].device) if ge is None else ge.reshape(-1)
            gt = torch.zeros_like(ge) if gt is None else gt.reshape(-1).to(ge.dtype)
            scale = float(ge.abs().max().clamp_min(gt.abs().max()))
            # rounding: 1e-3 of the largest entry in float32/64; a 16-bit network's sums of
            # products are good to a few hundredths (its eps 1e-3 to 8e-3): 0.1 there (what
            # the check finds is off by 0.3 or more)
            tol = 1e-3 if torch.finfo(ge.dtype).bits >= 32 else 0.1
            if scale > 0 and float((gt - ge).abs().max()) > tol * scale:
                bad.add(m)
        return sorted(bad)

    return set(structure_memo(lin, ("tap_route_problems", tuple((m, tuple(p)) for m, p in fast.items())), compute))


def layer_rule_problems(lin: "LinearizedNetwork", x: torch.Tensor) -> list[str]:
    """The noisy Linear/Conv2d layers whose per-layer rule (``x Wᵀ + b`` or a zero-padded
    convolution, per input row) does not describe what the network does with their
    weights: a subclass with its own ``forward`` (:func:`_fast_ok`), or what
    :func:`tap_route_problems` finds (a weight also used outside its layer, input rows
    that are not the batch's). The moment method, which has no generic route, refuses
    them."""
    modules = dict(lin.net.named_modules())
    mods: dict = {}
    for name in lin.names:
        mname, _, pname = name.rpartition(".")
        mod = modules.get(mname)
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and pname in ("weight", "bias"):
            mods.setdefault(mname, []).append(pname)
    own = {m for m in mods if _own_forward(modules[m])}
    rest = {m: p for m, p in mods.items() if _fast_ok(modules[m])}  # (_fast_ok excludes an own forward)
    return sorted(own | tap_route_problems(lin, x, rest))


def backprop_signals(out: torch.Tensor, leaves: Sequence[torch.Tensor],
                     index: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``δ_a = ∂ out[:, a] / ∂ leaf`` for every class ``a`` (inputs are independent, so
    the gradient of ``Σ_i out[i, a]`` with respect to a per-input tensor is per-input);
    with ``index [B, S]``, for the ``S`` classes ``index[i, s]`` of each input instead
    (slot ``s``). All in one vectorised backward pass (``torch.autograd.grad`` with
    ``is_grads_batched=True``: ``vmap`` over the one-hot output gradients); one backward
    pass per class where an operation has no batching rule. Returns ``[C or S,
    *leaf.shape]`` per leaf."""
    C = out.shape[1]
    B = out.shape[0]
    leaves = list(leaves)
    if index is None:
        go = torch.eye(C, dtype=out.dtype, device=out.device)[:, None, :].expand(C, B, C).contiguous()
    else:
        S = index.shape[1]
        go = torch.zeros(S, B, C, dtype=out.dtype, device=out.device)
        go.scatter_(2, index.T.unsqueeze(-1).to(out.device), 1.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's performance-fallback notices
            gs = torch.autograd.grad(out, leaves, grad_outputs=go, retain_graph=True, is_grads_batched=True,
                                     allow_unused=True)
        return [torch.zeros((C,) + tuple(lf.shape), dtype=lf.dtype, device=lf.device) if g is None else g
                for g, lf in zip(gs, leaves)]
    except RuntimeError:
        pass
    per = [[] for _ in leaves]
    for a in range(go.shape[0]):
        with checkpointing_named():
            gs = torch.autograd.grad((out * go[a]).sum(), leaves, retain_graph=a < go.shape[0] - 1, allow_unused=True)
        for lst, g, lf in zip(per, gs, leaves):
            lst.append(torch.zeros_like(lf) if g is None else g)
    return [torch.stack(lst) for lst in per]


def scratch_view(scratch: dict | None, key: str, shape, like: torch.Tensor) -> torch.Tensor | None:
    """A tensor of ``shape`` (``like``'s dtype and device) backed by one flat buffer kept
    in ``scratch[key]`` and reused by every layer and chunk of a pass (grown when a
    larger one is asked for); ``None`` without ``scratch``. A fresh tensor of a
    per-sample Jacobian's size (tens to hundreds of MB) costs more to allocate and fault
    in than filling it: measured 78 against 31 ms for ``[20, 10, 147456]`` floats
    (``J * u``), against 19 ms for the batched product that reads it."""
    if scratch is None:
        return None
    n = math.prod(shape)
    buf = scratch.get(key)
    if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
        buf = scratch[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def scaled_jacobian(J: torch.Tensor, scale: torch.Tensor, scratch: dict | None = None) -> torch.Tensor:
    """``J * scale`` over the parameter axis (``J [B, C, P]``, ``scale`` with ``P``
    elements), written into ``scratch``'s ``"scaled"`` buffer when given
    (:func:`scratch_view`)."""
    return torch.mul(J, scale.reshape(1, 1, -1).to(J.dtype), out=scratch_view(scratch, "scaled", J.shape, J))


def tap_jacobian(tap: Tap, delta: torch.Tensor, pname: str, scratch: dict | None = None) -> torch.Tensor:
    """Per-sample Jacobian ``[B, C, numel]`` of the logits with respect to parameter
    ``pname`` ("weight"/"bias") of the tapped layer, from its input and the signal
    ``delta [C, B, *out]`` at its output: ``∂f_a/∂W = Σ_p δ_{a,p} ⊗ x_p`` (patches ``x_p``
    for a convolution, by ``F.unfold``), formed by batched matrix products. With
    ``scratch`` (a dict kept by the caller) the weight's Jacobian is written into a reused
    buffer (:func:`scratch_view`): valid until the next call with the same ``scratch``."""
    m = tap.module
    C, B = delta.shape[:2]
    if isinstance(m, nn.Linear):
        if pname == "bias":
            return delta.reshape(C, B, -1, m.out_features).sum(2).permute(1, 0, 2)
        x = tap.x.reshape(B, -1, m.in_features)  # [B, S, in]
        d = delta.reshape(C, B, -1, m.out_features).permute(1, 0, 3, 2).reshape(B, C * m.out_features, -1)  # [B, C·out, S]
        out = scratch_view(scratch, "jacobian", (B, C * m.out_features, m.in_features), d)
        return torch.bmm(d, x, out=out).reshape(B, C, -1)
    # Conv2d
    Cout = m.out_channels
    if pname == "bias":
        return delta.reshape(C, B, Cout, -1).sum(3).permute(1, 0, 2)
    g = m.groups
    X = unfold_input(tap.x, m)
    L = X.shape[-1]
    X = X.reshape(B, g, -1, L)  # [B, g, J, L]
    d = delta.reshape(C, B, g, Cout // g, L).permute(1, 2, 0, 3, 4).reshape(B * g, C * (Cout // g), L)
    Xt = X.reshape(B * g, -1, L).mT
    out = scratch_view(scratch, "jacobian", (B * g, C * (Cout // g), Xt.shape[-1]), d) if g == 1 else None
    Jg = torch.bmm(d, Xt, out=out)  # [B·g, C·Cout/g, J]
    Jg = Jg.reshape(B, g, C, Cout // g, -1).permute(0, 2, 1, 3, 4)  # [B, C, g, Cout/g, J]
    return Jg.reshape(B, C, -1)


def tap_covariance(tap: Tap, delta: torch.Tensor) -> torch.Tensor | None:
    """``Σ_W J_a J_b`` ``[B, C, C]`` for the weight of a tapped layer whose noise scale
    is already folded into ``delta`` (constant within each output channel; or left out,
    one scale for the whole tensor, by the caller, who multiplies the result), without
    forming the per-sample Jacobian (the Gram-matrix trick of per-sample gradient norms,
    Goodfellow 2015; Li et al. 2022): ``Σ_o Σ_{p,q} δ_{a,o,p} δ_{b,o,q} ⟨x_p, x_q⟩``.
    Returns ``None`` when forming the Jacobian is cheaper (large feature maps).
    Derivations ``linear.fixed_input`` (one linear layer, ``σ²‖x‖²`` per output) and
    ``conv.spatial_covariance`` (the shared kernel's ``σ²⟨patch_p, patch_q⟩``).
    """
    m = tap.module
    C, B = delta.shape[:2]
    if isinstance(m, nn.Linear):
        x = tap.x.reshape(B, -1, m.in_features)  # [B, S, in]
        S = x.shape[1]
        d = delta.reshape(C, B, S, m.out_features)
        if S == 1:
            return torch.einsum("abo,cbo->bac", d[:, :, 0], d[:, :, 0]).double() * (x[:, 0] ** 2).sum(-1).double()[:, None, None]
        G = torch.bmm(x, x.mT)  # [B, S, S]
        T = torch.einsum("absO,bst->abtO", d, G)
        return torch.einsum("abtO,cbtO->bac", T, d).double()
    g = m.groups
    Cout = m.out_channels
    L = delta[0, 0].numel() // Cout  # output positions (the patches)
    if not _gram_cheaper(m, L, C):
        return None
    X = unfold_input(tap.x, m)
    if g == 1:  # batched products in the layout bmm wants (the einsums below copied and
        # dispatched less well: 7% of a digits VGG's predict, the same values)
        G = torch.bmm(X.mT, X)  # [B, L, L]
        d = delta.reshape(C, B, Cout * L).transpose(0, 1).contiguous()  # [B, C, O·L]
        T = torch.bmm(d.view(B, C * Cout, L), G)  # [B, C·O, L]
        return torch.bmm(T.view(B, C, Cout * L), d.mT).double()
    J = _patch_size(m)
    Xg = X.reshape(B, g, J, L)
    G = torch.einsum("bgjp,bgjq->bgpq", Xg, Xg)  # [B, g, L, L]
    d = delta.reshape(C, B, g, Cout // g, L)
    T = torch.einsum("abgop,bgpq->abgoq", d, G)
    return torch.einsum("abgoq,cbgoq->bac", T, d).double()


def _scale_delta(dl: torch.Tensor, module: nn.Module, uvec: torch.Tensor) -> torch.Tensor:
    """Multiply the signal ``[C, B, *out]`` by a per-output-channel scale."""
    if isinstance(module, nn.Linear):
        return dl * uvec.to(dl.dtype)
    return dl * uvec.reshape((1, 1, -1) + (1,) * (dl.dim() - 3)).to(dl.dtype)


def _layer_of(name: str) -> str:
    return name.rpartition(".")[0]


def read_without_call(lin: LinearizedNetwork, names: Sequence[str], x1: torch.Tensor) -> list[str]:
    """Those of the target parameters ``names``, of layers that a forward pass on
    ``x1`` never called, that the forward reads all the same: ``nn.MultiheadAttention``
    hands ``out_proj.weight`` to ``F.multi_head_attention_forward`` without calling
    ``out_proj``. A tap sees no such layer, so its weights need the generic route
    (their gradient exists); a layer the forward does not use at all is left out (its
    weights have no gradient and no effect)."""
    if not names:
        return []
    tp = {n: lin.target_params[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad():
        out = lin.forward(x1, tp)
        if not out.requires_grad:  # none of them is read
            return []
        gs = torch.autograd.grad(out.sum(), list(tp.values()), allow_unused=True)
    return [n for n, g in zip(names, gs) if g is not None]


def weight_terms(by_module: Mapping[str, list], params: Mapping[str, list], scale: Mapping[str, torch.Tensor],
                 cov: torch.Tensor, z: torch.Tensor | None = None, dirs: Mapping[str, torch.Tensor] | None = None,
                 layer_cov: dict | None = None, extra: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]] = (),
                 scratch: dict | None = None) -> None:
    """Add ``Σ_θ σ_θ² J_a J_b`` (and ``J (σ ⊙ ξ_k)`` to ``z``) for the parameters
    ``params[module] = ["weight", "bias"]`` of tapped Linear/Conv2d layers, in place.

    ``by_module[module]`` lists ``(tap, δ [C, B, *out])`` for every call of the layer (a
    layer called several times has the sum of the calls' Jacobians). A scale constant
    within each output channel is folded into ``δ`` (one scale for the whole tensor, in
    float32/float64, multiplies the contraction instead); then, when cheaper and no draws are
    asked for, the Gram-matrix trick (:func:`tap_covariance`) avoids forming ``J``.
    ``layer_cov`` (a dict) also receives each module's own term under its name;
    ``extra`` is a sequence of ``(scale map, cov)`` pairs, each cov receiving the same
    sum for that scale map from the same Jacobians. ``scratch`` (a dict the caller keeps
    for the pass): the per-sample Jacobians and their scaled copies go into reused
    buffers (:func:`scratch_view`)."""
    for mname, pnames in params.items():
        calls = by_module.get(mname, [])
        if not calls:  # a layer that is not used: zero Jacobian
            continue
        if layer_cov is not None:
            target = torch.zeros_like(cov)
        else:
            target = cov
        for pname in pnames:
            full = qualified_name(mname, pname)
            u = scale[full]
            uc = u.reshape(u.shape[0], -1)
            per_channel = _per_channel(u)
            # one scale for the whole tensor (relative noise per layer, additive noise): it
            # multiplies the contraction afterwards instead of a scaled copy of the signals;
            # in float32/float64 only (unscaled, a half-precision Gram term can overflow)
            s_uni = (float(uc[0, 0]) if per_channel and not extra and bool((uc[:, 0] == uc[0, 0]).all())
                     and all(dl.dtype in (torch.float32, torch.float64) for _, dl in calls) else None)
            post = 1.0 if s_uni is None else s_uni  # the scale still to apply after the contraction
            if per_channel and z is None and not extra and pname == "weight" and len(calls) == 1:
                t, dl = calls[0]
                cg = tap_covariance(t, dl if s_uni is not None else _scale_delta(dl, t.module, uc[:, 0]))
                if cg is not None:
                    target += (cg * post**2).to(cov.device)
                    continue
            buf = scratch if len(calls) == 1 else None  # a layer called once: its Jacobian in the buffer
            if extra:  # one unscaled Jacobian serves every scale map
                J = None
                for t, dl in calls:
                    Jt = tap_jacobian(t, dl, pname, scratch=buf)
                    J = Jt if J is None else J + Jt
                for smap, ecov in extra:
                    Js = scaled_jacobian(J, smap[full], scratch)
                    ecov += torch.bmm(Js, Js.mT).double()
                J = scaled_jacobian(J, u, scratch)
            else:
                J = None
                for t, dl in calls:
                    if per_channel and s_uni is None:
                        dl = _scale_delta(dl, t.module, uc[:, 0])
                    Jt = tap_jacobian(t, dl, pname, scratch=buf)
                    J = Jt if J is None else J + Jt
                if not per_channel:
                    J = scaled_jacobian(J, u, scratch)
            target += torch.bmm(J, J.mT).double() * post**2
            if z is not None:
                z += (J @ dirs[full]) * post
            del J
        if layer_cov is not None:
            cov += target
            layer_cov[mname] = layer_cov[mname] + target if mname in layer_cov else target


# ----------------------------------------------------------------------------
# Work that depends only on the network's structure, done once per structure
# ----------------------------------------------------------------------------
_PLAIN = (bool, int, float, str, bytes, tuple, frozenset, type(None))


#: Attributes compared by value (their repr), not identity: a forward that assigns
#: ``self.device = x.device`` on every call must not change the key.
_VALUE_TYPES = (torch.device, torch.dtype, torch.Size, enum.Enum, np.generic)
#: Objects named by their own qualified name (functions, methods, classes).
_NAMED = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)


def _attr_key(v, depth: int = 0):
    """What an instance attribute that is not a number or string contributes to
    :func:`module_structure`: a tensor by its contents, a function or other object by its
    identity (and name), a list or dict by its items (two levels deep)."""
    if isinstance(v, _PLAIN + _VALUE_TYPES):
        return repr(v)
    if isinstance(v, torch.Tensor):
        try:
            t = v.detach().cpu().resolve_conj().resolve_neg()
            t = t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
            digest = hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
        except Exception:  # noqa: BLE001 - meta, sparse, quantized, float8, nested: by identity
            digest = f"id {id(v)}"
        return ["tensor", str(v.dtype), list(v.shape), digest]
    if isinstance(v, (list, dict)) and depth < 2:
        items = v.items() if isinstance(v, dict) else enumerate(v)
        return [type(v).__name__] + [[repr(k), _attr_key(x, depth + 1)] for k, x in items]
    name = v.__qualname__ if isinstance(v, _NAMED) else type(v).__qualname__
    mod = v.__module__ if isinstance(v, _NAMED) else type(v).__module__
    return ["object", f"{mod}.{name}", id(v)]


def _user_hooks(hooks) -> list:
    """``(key, function identity)`` of the hooks in an ordered hook dict, leaving out
    noiseprop's own (its taps, registered only while a pass runs)."""
    out = []
    for k, fn in hooks.items():
        mod = getattr(fn, "__module__", None) or ""
        if not mod.startswith("noiseprop."):
            out.append([k, id(fn), getattr(fn, "__qualname__", type(fn).__qualname__)])
    return out


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def module_structure(net: nn.Module) -> list:
    """What the parameters do not show: every module's class (by identity, so two classes
    of the same name differ), a ``forward`` replaced on an instance, its instance
    attributes (numbers, strings and tuples by value, tensors by their contents,
    functions and other objects by identity: a ``forward`` may branch on them or call
    them), its forward and backward hooks and the global module hooks (by identity), and
    the module tree's printed form (activations, strides, paddings, ...). A ``forward``
    that reads global state, or an object attribute changed in place, is not seen: pass
    ``cache=False`` to ``predict`` after changing it."""
    parts = [repr(net)]
    for name, m in net.named_modules():
        fwd = m.__dict__.get("forward")
        attrs = sorted((k, _attr_key(v)) for k, v in m.__dict__.items()
                       if not k.startswith("_") and k != "forward")
        hooks = [[h, _user_hooks(getattr(m, h))] for h in _HOOK_DICTS if getattr(m, h, None)]
        parts.append([name, f"{type(m).__module__}.{type(m).__qualname__}", id(type(m)),
                      id(fwd) if fwd is not None else None, attrs, hooks])
    mm = torch.nn.modules.module
    parts.append([[h, _user_hooks(getattr(mm, h))] for h in _GLOBAL_HOOKS if getattr(mm, h, None)])
    return parts


#: net -> (its structure when last seen, {what: result}); results computed from a trace of
#: the module tree (the piecewise-linearity check, the ReLU-input graph) are reused while
#: the structure (:func:`module_structure`) is unchanged. Weak keys: nothing is kept alive.
_STRUCTURE_MEMO: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def structure_memo(lin: "LinearizedNetwork", what, compute):
    """``compute()`` for ``lin.net``, remembered per network object while its structure is
    unchanged (a replaced layer, a patched ``forward``, a new activation or a changed plain
    attribute retraces); never remembered when ``lin.memo`` is False (``cache=False``)."""
    if not lin.memo:
        return compute()
    struct = lin.structure()
    try:
        entry = _STRUCTURE_MEMO.get(lin.net)
    except TypeError:  # an unhashable module: no memo
        return compute()
    if entry is None or entry[0] != struct:
        entry = (struct, {})
        try:
            _STRUCTURE_MEMO[lin.net] = entry
        except TypeError:
            return compute()
    if what not in entry[1]:
        entry[1][what] = compute()
    return entry[1][what]


# ----------------------------------------------------------------------------
# Piecewise linearity in the noisy parameters (exact Gauss-Newton loss increase)
# ----------------------------------------------------------------------------
_PL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh,
               nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
               nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout2d,
               nn.ZeroPad2d, nn.ConstantPad2d, nn.modules.batchnorm._BatchNorm)


def _pl_functions():
    return {operator.add, operator.sub, operator.neg, operator.getitem, getattr, torch.add, torch.sub, torch.flatten,
            torch.cat, torch.relu, F.relu, torch.relu_, F.relu_, F.relu6, F.leaky_relu, F.hardtanh, F.max_pool1d, F.max_pool2d,
            F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
            F.pad, torch.mean, torch.sum, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
            torch.transpose}


_PL_METHODS = {"view", "reshape", "flatten", "size", "relu", "relu_", "add", "sub", "mean", "sum", "permute", "transpose",
               "contiguous", "squeeze", "unsqueeze", "clone", "neg", "__getitem__", "dim"}


def _is_shape(a) -> bool:
    """An fx node holding a shape or size (a constant for the weights)."""
    return (a.op == "call_method" and a.target in ("size", "dim")) or (a.op == "call_function" and a.target is getattr)


def piecewise_linear(lin: "LinearizedNetwork") -> tuple[bool, str]:
    """Whether the logits are piecewise linear in every noisy parameter (each one enters
    linearly, almost everywhere), and why not.

    Then ``∂²f/∂θ² = 0`` almost everywhere for every noisy ``θ``, so the Hessian of the
    cross-entropy and its Gauss-Newton matrix have the same diagonal and
    ``tr(Σ_ε H) = mean_i tr(H_z,i J_i Σ_ε J_iᵀ)`` exactly (docs/THEORY.md §5): the
    first-order logit covariance gives the loss increase with no Hessian estimator.

    Checked on the ``torch.fx`` graph (Conv/Linear and BatchNorm-like layers as leaves):
    every module is linear, affine in eval mode (BatchNorm, anything with
    ``folding_affine``) or piecewise linear (ReLU family, max/average pooling, dropout in
    eval), every function and method is one of a fixed list of (piecewise) linear ones
    (add, sub, flatten, cat, relu, pooling, views), a product or quotient only by a
    constant, no parameter is read directly (``get_attr``), and no noisy layer is called
    twice (weight sharing across calls makes the logits quadratic in the weight). Any
    other construct, or a graph ``torch.fx`` cannot trace, answers ``False``."""
    return structure_memo(lin, ("piecewise_linear", tuple(lin.names)), lambda: _piecewise_linear(lin))


def _piecewise_linear(lin: "LinearizedNetwork") -> tuple[bool, str]:
    try:
        graph = trace(lin.net)
    except ValueError as e:
        return False, f"not traceable ({e})"
    modules = dict(lin.net.named_modules())
    funcs = _pl_functions()
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            m = modules.get(node.target)
            if m is None:
                return False, f"unknown module {node.target!r}"
            if isinstance(m, nn.Dropout) and m.training:
                return False, f"{node.target} is a dropout layer in training mode"
            if not (isinstance(m, _PL_MODULES) or callable(getattr(m, "folding_affine", None))):
                return False, f"{node.target} ({type(m).__name__}) is not piecewise linear"
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "call_function":
            if node.target in (operator.mul, operator.truediv, torch.mul, torch.div):
                acts = [a for a in node.args if isinstance(a, torch.fx.Node) and not _is_shape(a)]
                div = node.target in (operator.truediv, torch.div)
                if len(acts) > 1 or (div and len(node.args) > 1 and node.args[1] in acts):
                    return False, f"{node.name}: a product or quotient of two activations"
                continue
            if node.target not in funcs:
                return False, f"{node.name}: function {getattr(node.target, '__name__', node.target)} is not in the piecewise-linear list"
        elif node.op == "call_method":
            if node.target in ("mul", "div", "__mul__", "__truediv__"):
                if any(isinstance(a, torch.fx.Node) and not _is_shape(a) for a in node.args[1:]):
                    return False, f"{node.name}: a product or quotient of two activations"
                continue
            if node.target not in _PL_METHODS:
                return False, f"{node.name}: method {node.target} is not in the piecewise-linear list"
        elif node.op == "get_attr":
            return False, f"{node.target}: a parameter or buffer read directly"
    noisy = {_layer_of(n) for n in lin.names}
    for mname in noisy:
        if calls.get(mname, 0) > 1:
            return False, f"{mname} is called {calls[mname]} times (shared weights)"
        if mname not in calls and mname in modules and any(True for _ in modules[mname].children()):
            return False, f"{mname} is traced through, not a leaf"
    return True, "piecewise linear (" + ", ".join(sorted({type(modules[n.target]).__name__ for n in graph.nodes
                                                         if n.op == "call_module"})) + ")"


def jacobian_pass(lin: LinearizedNetwork, x: torch.Tensor, unit: Mapping[str, torch.Tensor],
                  chunk_size: int | None = None, draws: int = 0, seed: int = 0,
                  progress=None, per_layer: bool = False,
                  extra_units: Sequence[Mapping[str, torch.Tensor]] = (), classes: int | None = None,
                  labels: torch.Tensor | None = None, index: torch.Tensor | None = None,
                  _slow_modules: frozenset = frozenset()) -> JacobianPass:
    """Per-input Jacobians over ``x`` in chunks, contracted to the level-1 logit
    covariance ``J diag(u²) Jᵀ`` and (``draws > 0``) to ``draws`` shared draws of the
    linearised network ``J (u ⊙ ξ_k)``.

    Weights and biases of Linear/Conv2d layers: one batched forward pass recording every
    noisy layer's input, one batched backward pass per class for the signals at their
    outputs, and per-sample Jacobians from batched matrix products (:func:`tap_jacobian`);
    any other target parameter: ``vmap(jacrev(f))`` over the inputs of the chunk.

    ``per_layer=True`` also returns each noisy module's share of the covariance
    (``layer_cov_unit``); ``extra_units`` are further scale maps whose covariances
    ``J diag(u_k²) Jᵀ`` come from the same derivatives (``extra_cov``).

    ``classes=k`` (with ``labels``) differentiates only each input's label and its ``k``
    closest competitors (:func:`select_classes`): ``k + 1`` backward passes instead of
    ``C``, and every contraction over ``k + 1`` slots (``JacobianPass.classes``).
    ``index`` (``[N, k+1]``, each input's label then its competitors): those slots instead
    of selecting them from the logits here (``classes`` and ``labels`` are then not needed).

    The per-input covariance is the delta method of docs/THEORY.md §3; for one linear layer
    it reduces to derivation ``linear.fixed_input``.
    """
    n = x.shape[0]
    chunk_arg = chunk_size  # the caller's (None: sized here, per route)
    if index is not None:
        if index.dim() != 2 or index.shape[0] != n:
            raise ValueError(f"index must be [N, k+1] slots, one row per input, got shape {tuple(index.shape)}")
        classes, labels = index.shape[1] - 1, index[:, 0]
    if classes is not None:
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
            raise ValueError(f"classes must be an integer >= 1 (competitors per input) or None, got {classes!r}")
        if labels is None or labels.shape[0] != n:
            raise ValueError("classes=k needs labels, one per input")
    extra_units = tuple(extra_units)
    modules = dict(lin.net.named_modules())
    fast: dict[str, list[str]] = {}  # module name -> its target parameter names
    slow: list[str] = []
    for name in lin.names:
        mname, _, pname = name.rpartition(".")
        mod = modules.get(mname)
        if mod is not None and pname in ("weight", "bias") and _fast_ok(mod):
            fast.setdefault(mname, []).append(pname)
        else:
            slow.append(name)
    watch = {id(modules[m]): (m, modules[m]) for m in fast}
    with torch.no_grad(), tapping(watch) as probe:  # one input: the number of classes, and what one input holds
        c0 = probe_logits(lin.forward, x[:1].to(lin.device), x.shape).shape[-1]  # logits [1, C], or a clear error
    check_noise_reaches(lin, x[:1].to(lin.device))
    uncalled = [m for m in fast if m not in {t.name for t in probe}]
    if uncalled:  # weights read without calling their layer take the generic route; unused ones none
        slow += read_without_call(lin, [qualified_name(m, p) for m in uncalled for p in fast[m]], x[:1].to(lin.device))
        for m in uncalled:
            del fast[m], watch[id(modules[m])]
    for m in (tap_route_problems(lin, x, fast) | set(_slow_modules)) & set(fast):  # rows not one to one, or a
        slow += [qualified_name(m, p) for p in fast.pop(m)]                         # weight used elsewhere
        del watch[id(modules[m])]
    probe = [t for t in probe if t.name in fast]
    if labels is not None:
        check_labels(labels, c0)
    if classes is not None and classes >= c0 - 1 and index is None:
        classes = None  # every class is a competitor: the full pass
    cs = c0 if classes is None else classes + 1
    if chunk_size is None:
        itemsize = torch.tensor([], dtype=lin.dtype).element_size()
        calls = [t.name for t in probe]
        gram_route = bool(fast) and draws == 0 and not extra_units and len(set(calls)) == len(calls) and all(
            _per_channel(unit[qualified_name(m, "weight")]) for m, pn in fast.items() if "weight" in pn)
        if gram_route:  # every layer can take the Gram route (each called once, scales per channel)
            chunk_size = pass_chunk_size(probe, cs, sum(lin.target_params[k].numel() for k in slow), itemsize)
        else:  # draws, further scale maps, per-element scales or a shared layer: every layer
            # forms its per-sample Jacobian (weight_terms), budgeted for all of them at once
            chunk_size = auto_chunk_size(cs, lin.num_target_elements, itemsize)
    del probe
    dirs = _directions(lin, draws, seed) if draws > 0 else None
    slow_fn = None
    if slow:
        sub = {k: lin.target_params[k] for k in slow}

        def single(tp, xi):
            return lin.forward(xi.unsqueeze(0), tp).squeeze(0)

        slow_fn = lambda xb: vmap(jacrev(single), in_dims=(None, 0))(sub, xb)  # noqa: E731
    def slots(f0, i):  # the chunk's differentiated classes (None: every class)
        if classes is None:
            return None
        if index is not None:
            return index[i:i + chunk_size].to(f0.device)
        return select_classes(f0, labels[i:i + chunk_size], classes)

    covs, f0s, zs, sels = [], [], [], []
    scratch: dict = {}  # per-sample Jacobians and their scaled copies, buffers reused (scratch_view)
    layer_covs: dict[str, list] = {}
    extra_covs: list[list] = [[] for _ in extra_units]
    for i in range(0, n, chunk_size):
        xb = x[i:i + chunk_size].to(lin.device)
        b = xb.shape[0]
        cov = torch.zeros(b, cs, cs, dtype=torch.float64, device=lin.device)
        z = torch.zeros(b, cs, draws, dtype=lin.dtype, device=lin.device) if dirs is not None else None
        lcov: dict | None = {} if per_layer else None
        extra = [(eu, torch.zeros_like(cov)) for eu in extra_units]

        def add(name, J):
            nonlocal cov, z
            js = J * unit[name].reshape(1, 1, -1).to(J.dtype)
            term = torch.bmm(js, js.mT).double()
            cov += term
            if lcov is not None:
                m = _layer_of(name)
                lcov[m] = lcov[m] + term if m in lcov else term
            for smap, ecov in extra:
                je = J * smap[name].reshape(1, 1, -1).to(J.dtype)
                ecov += torch.bmm(je, je.mT).double()
            if z is not None:
                z += js @ dirs[name]

        if fast:
            with torch.enable_grad(), tapping(watch) as taps:
                out = lin.forward(xb)
            check_logits(out, b)  # [N, C], one row per input (the probe saw one input)
            split = split_calls(taps, b)
            if split:  # a layer called on part of the chunk (a batch split inside the forward): generic route
                return jacobian_pass(lin, x, unit, chunk_size=chunk_arg, draws=draws, seed=seed, progress=progress,
                                     per_layer=per_layer, extra_units=extra_units, classes=classes, labels=labels,
                                     index=index, _slow_modules=frozenset(_slow_modules | split))
            f0 = out.detach()
            sel = slots(f0, i)
            n_fwd = len(taps)
            deltas = backprop_signals(out, [t.e for t in taps], index=sel)
            check_no_recompute(taps, n_fwd)
            by_module: dict[str, list] = {}
            for t, dl in zip(taps, deltas):
                by_module.setdefault(t.name, []).append((t, dl.detach()))
            weight_terms(by_module, fast, unit, cov, z, dirs, layer_cov=lcov, extra=extra, scratch=scratch)
            del deltas, taps, out, by_module
        else:
            with torch.no_grad():
                f0 = check_logits(lin.forward(xb), b)
            sel = slots(f0, i)
        if slow_fn is not None:
            with checkpointing_named():
                jac = slow_fn(xb)
            for name in slow:
                J = jac.pop(name).detach().reshape(b, c0, -1)
                if sel is not None:
                    J = J.gather(1, sel[:, :, None].expand(-1, -1, J.shape[2]))
                add(name, J)
        check_finite_logits(f0, i)
        if not bool(torch.isfinite(cov).all()):
            big = float(f0.abs().max())
            raise ValueError(f"the first-order logit covariance is not finite (inputs {i} to {i + b - 1}): the "
                             f"model's derivatives are NaN or overflow {lin.dtype} (largest clean logit magnitude "
                             f"{big:.3g}); rescale the model's output or evaluate it in float64")
        if sel is not None:
            sels.append(sel)
        covs.append(cov)
        f0s.append(f0.detach())
        if z is not None:
            zs.append(z)
        if lcov is not None:
            for m in dict.fromkeys(_layer_of(nm) for nm in lin.names):  # target (network) order, not a set's
                layer_covs.setdefault(m, []).append(lcov.get(m, torch.zeros_like(cov)))
        for lst, (_, ecov) in zip(extra_covs, extra):
            lst.append(ecov)
        if progress is not None:
            progress(min(i + chunk_size, n), n)
    return JacobianPass(
        clean_logits=torch.cat(f0s),
        cov_unit=torch.cat(covs),
        draws_unit=torch.cat(zs) if zs else None,
        chunk_size=int(chunk_size),
        layer_cov_unit={m: torch.cat(v) for m, v in layer_covs.items()} if per_layer else None,
        extra_cov=tuple(torch.cat(v) for v in extra_covs),
        classes=torch.cat(sels) if sels else None,
    )


# ----------------------------------------------------------------------------
# Control variates (docs/THEORY.md §8)
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlVariateEstimate:
    """``Ŷ = Ȳ − β (X̄ − E X)`` with ``β = Cov(Y, X)/Var(X)`` estimated from the draws.

    ``se`` is the standard error of ``Ŷ`` (residual standard deviation with ``n − 2``
    degrees of freedom over ``√n``); ``variance_reduction`` is ``Var(Y)/Var(Y − βX)``
    (the factor by which the control variate cuts the variance: the plain mean needs that many times more draws for the same precision), ``rho`` the
    correlation of ``Y`` and ``X``; ``ci`` a Student-t interval with ``n − 2`` d.o.f.
    """

    estimate: float
    se: float
    ci: tuple[float, float]
    beta: float
    rho: float
    variance_reduction: float
    plain_mean: float
    plain_se: float


def control_variate_mean(y, x, x_mean: float, confidence: float = 0.95) -> ControlVariateEstimate:
    """Control-variate estimate of ``E[Y]`` from paired draws ``(Y_d, X_d)`` where
    ``E[X] = x_mean`` is known (Glasserman 2004, §4.1). With ``X`` the linearised
    network's accuracy (``E X`` from the orthant probabilities) or its first-order loss
    change ``gᵀδθ`` (``E X = 0``)."""
    from scipy import stats  # lazy: scipy.stats adds ~0.7 s (measured, -X importtime) to importing theory

    yv = np.asarray(y, dtype=np.float64).ravel()
    xv = np.asarray(x, dtype=np.float64).ravel()
    n = yv.size
    if xv.size != n or n < 3:
        raise ValueError(f"control variate needs >= 3 paired draws, got {n} and {xv.size}")
    ym, xm = yv.mean(), xv.mean()
    vy = yv.var(ddof=1)
    vx = xv.var(ddof=1)
    cxy = ((yv - ym) * (xv - xm)).sum() / (n - 1)
    beta = cxy / vx if vx > 0 else 0.0
    resid = (yv - ym) - beta * (xv - xm)
    est = ym - beta * (xm - float(x_mean))
    s2 = (resid ** 2).sum() / max(n - 2, 1)
    se = math.sqrt(s2 / n)
    t = float(stats.t.ppf(0.5 + confidence / 2, max(n - 2, 1)))
    rho = cxy / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.0
    vr = vy / s2 if s2 > 0 else math.inf
    return ControlVariateEstimate(
        estimate=float(est), se=float(se), ci=(float(est - t * se), float(est + t * se)), beta=float(beta),
        rho=float(rho), variance_reduction=float(vr), plain_mean=float(ym), plain_se=float(math.sqrt(vy / n)),
    )


class LinearControlVariate:
    """The linearised network as a control variate for Monte-Carlo (docs/THEORY.md §8).

    For one noise draw (standard-normal ``z`` per target parameter, in target order; the
    weights ``w + level·u(w)⊙z``) :meth:`values` gives the linearised network's
    accuracy ``X_acc = mean_i 1[argmax(f_i + J_i δθ) = y_i]`` and its first-order loss
    change ``X_loss = gᵀδθ``. Their expectations are known: ``E[X_loss] = 0`` and
    ``E[X_acc] = mean_i P_i`` with ``P_i`` the orthant probability under the exact
    first-order covariance (:meth:`expected_accuracy`; the linearised logits are exactly
    Gaussian). Use with :func:`control_variate_mean`.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: WeightNoise, targets=None,
                 n_points: int = 4096, batch_size: int = 1024, chunk_size: int | None = None):
        self.lin = LinearizedNetwork(model, targets, warn_train_mode=False)
        self.x = x
        self.y = y.long()
        unit = self.lin.unit_scales(noise)
        self.unit = [unit[n] for n in self.lin.names]
        jp = jacobian_pass(self.lin, x, unit, chunk_size=chunk_size)
        self.clean = jp.clean_logits.double().cpu()
        self.cov_unit = jp.cov_unit.cpu()
        self.n_points = int(n_points)
        self.batch_size = int(batch_size)

    def expected_accuracy(self, level: float) -> float:
        p, _, _ = correct_probability(self.clean, self.cov_unit * float(level) ** 2, self.y.cpu(),
                                      n_points=self.n_points)
        return float(p.mean())

    def values(self, zs: Sequence[torch.Tensor], level: float) -> tuple[float, float]:
        """``(X_acc, X_loss)`` for one draw ``zs`` at ``level``."""
        delta = {n: float(level) * u * z for n, u, z in zip(self.lin.names, self.unit, zs)}
        _, fl = self.lin.linearized_logits(self.x, delta, batch_size=self.batch_size)
        fl = fl.double().cpu()
        acc = float((fl.argmax(1) == self.y.cpu()).double().mean())
        return acc, first_order_loss_change(self.clean, fl, self.y.cpu())


def first_order_loss_change(clean_logits: torch.Tensor, lin_logits: torch.Tensor, y: torch.Tensor) -> float:
    """``gᵀδθ`` for the mean cross-entropy, from the linearised logits of one draw:
    ``mean_i (softmax(f_i) − e_{y_i})ᵀ (f_lin,i − f_i)`` (its mean over draws is 0)."""
    f0 = clean_logits.double()
    p = torch.softmax(f0, dim=1)
    p[torch.arange(f0.shape[0]), y.long()] -= 1.0
    return float((p * (lin_logits.double() - f0)).sum(dim=1).mean())
