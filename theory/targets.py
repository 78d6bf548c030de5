"""What gets noise: target selection and BatchNorm folding (DESIGN.md, docs/THEORY.md §4).

Default targets are the weights of Conv/Linear layers, with normalisation layers kept
digital and noiseless (aihwkit's convention). Options add the Conv/Linear biases, the
affine parameters (γ, β) of normalisation layers, or fold every BatchNorm-like layer
into the Conv/Linear that feeds it before injecting (how a crossbar stores it).

Folding (PyTorch's ``torch.nn.utils.fusion``; docs/THEORY.md §4): a BatchNorm-like layer in
eval mode is the per-channel affine map ``y ↦ a ⊙ y + c``; with ``a = γ/√(var + eps)``
and ``c = β − mean · a`` for L2 BatchNorm. The folded layer is ``W' = diag(a) W``,
``b' = a ⊙ b + c``. Any module exposing ``folding_affine() -> (a, c)`` is folded the same
way (the L1 / TopK BatchNorm of :mod:`noiseprop.empirical.norms`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Iterable

import torch
from torch import nn

from ._graph import WEIGHT_LAYERS, trace  # the one fx tracer (WEIGHT_LAYERS: re-exported)
from .validation import _user_stacklevel, copy_model

__all__ = [
    "Targets",
    "TargetPlan",
    "resolve_targets",
    "fold_bn",
    "find_fold_pairs",
    "folding_affine",
    "fuse_weights",
    "is_norm_layer",
    "WEIGHT_LAYERS",
]

_L2_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_OTHER_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def is_norm_layer(module: nn.Module) -> bool:
    """True for normalisation layers: L2 BatchNorm, Group/Layer/Instance norm, and any
    module with a ``folding_affine`` method (L1/TopK BatchNorm)."""
    return isinstance(module, _L2_BN + _OTHER_NORMS) or callable(getattr(module, "folding_affine", None))


def _is_foldable(module: nn.Module) -> bool:
    return isinstance(module, _L2_BN) or callable(getattr(module, "folding_affine", None))


def folding_affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(a, c)`` with ``module(y) == a ⊙ y + c`` in eval mode.

    L2 BatchNorm: ``a = γ/√(running_var + eps)``, ``c = β − running_mean · a``.
    Other layers provide ``folding_affine()`` themselves. Derivation
    ``batchnorm.folding`` (docs/THEORY.md §4); with :func:`fuse_weights`, tested against
    ``torch.nn.utils.fusion`` in ``tests/theory/test_targets.py``.
    """
    if callable(getattr(module, "folding_affine", None)):
        return module.folding_affine()
    if isinstance(module, _L2_BN):
        if module.running_var is None or module.running_mean is None:
            raise ValueError(
                f"{type(module).__name__} has track_running_stats=False: it has no fixed "
                "inference statistics and cannot be folded"
            )
        var = module.running_var.detach()
        if (var < 0).any():
            raise ValueError(f"{type(module).__name__} has {int((var < 0).sum())} negative running_var value(s) "
                             f"(min {float(var.min()):.4g}); a variance must be >= 0, so it cannot be folded")
        a = torch.rsqrt(var + module.eps)
        if module.weight is not None:
            a = a * module.weight.detach()
        c = -module.running_mean.detach() * a
        if module.bias is not None:
            c = c + module.bias.detach()
        return a, c
    raise TypeError(f"{type(module).__name__} is not a foldable BatchNorm-like layer")


@dataclass(frozen=True)
class Targets:
    """Which parameters get noise.

    weights: Conv/Linear weights (default True).
    biases: Conv/Linear biases.
    norm: affine parameters (γ, β) of normalisation layers.
    fold_bn: fold every BatchNorm-like layer into the preceding Conv/Linear first, then
        inject into the folded weights (and biases, when ``biases``).
    layers: restrict to modules whose qualified name equals, or starts with, one of
        these names (``None``: all); each name must select at least one parameter
        (a name the model lacks, or a layer without such parameters, is an error).

    >>> Targets(biases=True).describe()
    'weights+biases'
    >>> Targets.parse({"layers": ["0"]}).layers
    ('0',)
    """

    weights: bool = True
    biases: bool = False
    norm: bool = False
    fold_bn: bool = False
    layers: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.fold_bn and self.norm:
            raise ValueError("targets: fold_bn=True removes the norm layers, so norm=True cannot be combined with it")
        if not (self.weights or self.biases or self.norm):
            raise ValueError("targets: at least one of weights, biases, norm must be True")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else self.layers
            try:
                layers = tuple(layers)
            except TypeError:
                layers = None
            if layers is None or not layers or not all(isinstance(n, str) for n in layers):
                raise TypeError("targets: layers must be a module name or a non-empty list of module names "
                                f"(as in model.named_modules()), got {self.layers!r}")
            object.__setattr__(self, "layers", layers)

    @classmethod
    def parse(cls, spec) -> "Targets":
        """``None`` → default; a :class:`Targets` passes through; a string of
        comma/plus-separated words from ``weights, biases, norm, fold_bn`` (``"fold_bn"``
        alone: the default weights, BatchNorm folded)."""
        if spec is None:
            return cls()
        if isinstance(spec, Targets):
            return spec
        if isinstance(spec, dict):
            allowed = [f.name for f in fields(cls)]
            bad = sorted(str(k) for k in spec if k not in allowed)
            if bad:
                raise ValueError(f"targets: unknown option(s) {bad}; accepted keys: {allowed}")
            for k in ("weights", "biases", "norm", "fold_bn"):
                if k in spec and not isinstance(spec[k], bool):
                    raise TypeError(f"targets: {k!r} must be True or False, got {spec[k]!r}")
            return cls(**spec)
        if isinstance(spec, str):
            words = [w for w in spec.replace("+", ",").split(",") if w.strip()]
            allowed = {"weights", "biases", "norm", "fold_bn"}
            bad = [w for w in words if w.strip() not in allowed]
            if bad or not words:
                raise ValueError(f"unknown targets {spec!r}; accepted words: {sorted(allowed)} joined by ',' or '+'")
            words = {w.strip() for w in words}
            return cls(weights="weights" in words or not words & {"biases", "norm"}, biases="biases" in words,
                       norm="norm" in words, fold_bn="fold_bn" in words)
        raise TypeError(f"targets must be None, a Targets, a dict or a string, got {type(spec).__name__}")

    def describe(self) -> str:
        parts = [p for p, on in (("weights", self.weights), ("biases", self.biases), ("norm", self.norm)) if on]
        s = "+".join(parts)
        if self.fold_bn:
            s += " (BN folded)"
        if self.layers:
            s += f" in {list(self.layers)}"
        return s


@dataclass(frozen=True)
class TargetPlan:
    """The network to evaluate and the names of its parameters that get noise.

    ``model`` is the user's model itself when nothing is folded (callers must not
    mutate it) or a folded deep copy; ``names`` are parameter names of ``model``, in
    ``named_parameters`` order, which fixes the order noise is drawn in.
    """

    model: nn.Module
    names: tuple[str, ...]
    targets: Targets
    folded: tuple[tuple[str, str], ...] = ()


def _layer_of(name: str) -> str:
    return name.rpartition(".")[0]


def qualified_name(module: str, param: str) -> str:
    """A parameter's name in ``named_parameters()``: ``"module.param"``, or ``"param"`` for
    the root module (a model that is one bare layer, ``nn.Linear(5, 3)``)."""
    return f"{module}.{param}" if module else param


def _in_layers(name: str, layers) -> bool:
    if layers is None:
        return True
    return any(name == l or name.startswith(l + ".") for l in layers)


def resolve_targets(model: nn.Module, targets=None) -> TargetPlan:
    """Select the parameters that get noise (and fold BN first when asked).

    Raises ``ValueError`` naming the model when nothing is left to perturb.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    >>> resolve_targets(net).names
    ('0.weight', '3.weight')
    >>> resolve_targets(net, Targets(fold_bn=True, biases=True)).names
    ('0.weight', '0.bias', '3.weight', '3.bias')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    t = Targets.parse(targets)
    folded: tuple = ()
    net = model
    if t.fold_bn:
        pairs = find_fold_pairs(model)
        if not pairs:
            unfoldable = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if is_norm_layer(m)]
            warnings.warn(f"targets fold_bn=True: the model has no BatchNorm layer fed by a Conv/Linear layer to fold"
                          f"{' (' + ', '.join(unfoldable[:4]) + ' normalise per input or stand alone)' if unfoldable else ''};"
                          " the noise goes on the unfolded weights", UserWarning, stacklevel=_user_stacklevel())
        net = _fold(model, pairs)
        folded = tuple(pairs)
    names = []
    for mname, module in net.named_modules():
        if not _in_layers(mname, t.layers):
            continue
        if isinstance(module, WEIGHT_LAYERS):
            if t.weights and module.weight is not None:
                names.append(qualified_name(mname, "weight"))
            if t.biases and module.bias is not None:
                names.append(qualified_name(mname, "bias"))
        elif is_norm_layer(module) and t.norm:
            for pname in ("weight", "bias"):
                p = getattr(module, pname, None)
                if isinstance(p, nn.Parameter):
                    names.append(qualified_name(mname, pname))
    if t.layers is not None:  # every name must select something: a typo must not narrow the noise silently
        modules = dict(net.named_modules())
        for layer in t.layers:
            if any(_in_layers(_layer_of(n), (layer,)) for n in names):
                continue
            with_weights = [m for m, mod in modules.items() if isinstance(mod, WEIGHT_LAYERS)]
            canon = {n: next(k for k, v in modules.items() if v is m)
                     for n, m in net.named_modules(remove_duplicate=False) if n not in modules}
            what = (f"{layer!r} is the module {canon[layer]!r} held under a second name (one layer called twice: "
                    f"one device array); name it {canon[layer]!r}" if layer in canon else
                    "the model has no module of that name" if layer not in modules else
                    f"its {type(modules[layer]).__name__} has no {Targets(**{**t.__dict__, 'layers': None}).describe()} "
                    "to perturb")
            raise ValueError(f"targets: layers names {layer!r}, but {what}; the model's Conv/Linear layers are "
                             f"{with_weights[:12]}{' ...' if len(with_weights) > 12 else ''}")
    if not names:
        layers = [type(m).__name__ for m in net.modules()][:8]
        raise ValueError(
            f"model {type(model).__name__} has no parameters to perturb for targets={t.describe()!r}: "
            f"noise goes on the weights of {', '.join(c.__name__ for c in WEIGHT_LAYERS)} layers "
            f"(found modules: {layers}); pass targets= to choose others"
        )
    order = {n: i for i, (n, _) in enumerate(net.named_parameters())}
    aliases: dict = {}
    for n, p in net.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    for n, b in net.named_buffers(remove_duplicate=False):  # a weight registered as another module's buffer
        if id(b) in aliases:
            aliases[id(b)].append(n)
    # one module object under several names (a Sequential holding the same layer twice)
    # is a layer called more than once, as in a forward calling it twice: one device
    # array, its noise drawn once and its calls' derivatives summed; tied weights are one
    # tensor in distinct modules (an encoder's weight in a decoder)
    owners = dict(net.named_modules(remove_duplicate=False))

    def distinct_layers(a):
        return len({(id(owners.get(n.rpartition(".")[0])), n.rpartition(".")[2]) for n in a}) > 1

    tied = [a for a in aliases.values() if len(a) > 1 and any(n in names for n in a) and distinct_layers(a)]
    if tied:
        raise ValueError(f"tied weights: {' / '.join(' = '.join(a) for a in tied)} are one tensor used by several "
                         "layers, and noise on a shared weight is not supported; untie them (a copy per layer) to "
                         "model one device array per layer")
    missing = [n for n in names if n not in order]
    if missing:  # shared or unregistered parameters
        from torch.nn.utils import parametrize

        mods = dict(net.named_modules())

        def parametrized(n):
            mod = mods.get(n.rpartition(".")[0])
            return mod is not None and parametrize.is_parametrized(mod, n.rpartition(".")[2])

        para = [n for n in missing if parametrized(n)]
        if para:
            raise ValueError(f"parameters {para} are parametrized (torch.nn.utils.parametrize, e.g. weight_norm or "
                             "spectral_norm): the tensor a layer uses is computed from others, which noise cannot be "
                             "put on as one device array; remove the parametrization first "
                             "(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')), or name the "
                             "underlying parameters (…parametrizations.weight.original…) in targets=")
        raise ValueError(f"parameters {missing} are not registered parameters of the model")
    names = sorted(dict.fromkeys(names), key=order.__getitem__)
    return TargetPlan(model=net, names=tuple(names), targets=t, folded=folded)


# ----------------------------------------------------------------------------
# BatchNorm folding
# ----------------------------------------------------------------------------
def find_fold_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``[(conv_or_linear_name, norm_name), ...]``: each foldable norm layer and the
    Conv/Linear whose output feeds it and nothing else, found by tracing the forward
    pass with ``torch.fx``. Raises ``ValueError`` naming a norm layer that cannot be
    folded (fed by something else, or its producer's output is also used elsewhere).
    """
    graph = trace(model, context="fold_bn: ", hint="; fold the model by hand or use fold_bn=False")
    modules = dict(model.named_modules())
    pairs = []
    seen = set()
    for node in graph.nodes:
        if node.op != "call_module" or not _is_foldable(modules[node.target]):
            continue
        src = node.args[0] if node.args else None
        ok = (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules[src.target], WEIGHT_LAYERS)
            and len(src.users) == 1
        )
        if not ok:
            raise ValueError(
                f"fold_bn: normalisation layer {node.target!r} is not fed directly and solely by a Conv/Linear "
                "layer, so it cannot be folded; use fold_bn=False (BatchNorm kept digital)"
            )
        if node.target in seen or src.target in {p[0] for p in pairs}:
            raise ValueError(f"fold_bn: layer {node.target!r} or {src.target!r} is used more than once in forward")
        seen.add(node.target)
        pairs.append((src.target, node.target))
    # Norm layers that were never called (or traced through) cannot be folded silently.
    for name, m in model.named_modules():
        if _is_foldable(m) and name not in seen:
            raise ValueError(f"fold_bn: normalisation layer {name!r} is not used in forward, or not as a module call")
    return pairs


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def fuse_weights(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, c: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a per-output-channel affine map ``y ↦ a ⊙ y + c`` into the layer before it:
    ``W' = diag(a) W`` (``a`` broadcast over every weight dimension but the first) and
    ``b' = a ⊙ b + c`` (``b = 0`` when ``bias`` is ``None``). A pure function on tensors,
    the one place this arithmetic lives (derivation ``batchnorm.folding``, docs/THEORY.md
    §4); equal to ``torch.nn.utils.fusion.fuse_conv_bn_weights`` for L2 BatchNorm.

    >>> w, b = fuse_weights(torch.ones(2, 3), None, torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0]))
    >>> w.tolist(), b.tolist()
    ([[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]], [1.0, 0.0])
    """
    if a.dim() != 1 or a.shape != c.shape or a.shape[0] != weight.shape[0]:
        raise ValueError(f"fuse_weights: a and c must be vectors with one entry per output channel "
                         f"({weight.shape[0]}), got shapes {tuple(a.shape)} and {tuple(c.shape)}")
    a = a.to(weight.dtype)
    c = c.to(weight.dtype)
    w = weight.detach() * a.reshape((-1,) + (1,) * (weight.dim() - 1))
    b = c.clone() if bias is None else a * bias.detach() + c
    return w, b


def fold_bn(model: nn.Module, pairs: Iterable[tuple[str, str]] | None = None) -> nn.Module:
    """A deep copy of ``model`` with every BatchNorm-like layer folded into the
    Conv/Linear that feeds it and replaced by ``nn.Identity`` (eval mode).

    ``W' = diag(a) W``, ``b' = a ⊙ b + c`` (:func:`fuse_weights`) with ``(a, c)`` from
    :func:`folding_affine` (derivation ``batchnorm.folding``). The folded network's clean
    outputs equal the original's (eval mode) up to float rounding. The user's model is
    not modified.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    >>> folded = fold_bn(net)
    >>> folded[1]
    Identity()
    >>> x = torch.randn(4, 3)
    >>> torch.allclose(folded(x), net(x), atol=1e-6)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn: model must be a torch.nn.Module, got {type(model).__name__} {model!r:.60}")
    found = find_fold_pairs(model)
    if pairs is None:
        pairs = found
    else:  # only what the graph shows: a norm layer fed by that Conv/Linear alone
        items = None if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__") else list(pairs)
        if items is None or not all(isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(s, str) for s in p)
                                    for p in items):
            raise TypeError("fold_bn: pairs must be a list of (conv_or_linear_name, norm_name) name pairs, "
                            f"such as find_fold_pairs(model) gives: {found}")
        pairs = [tuple(p) for p in items]
        wrong = [p for p in pairs if p not in found]
        if wrong:
            raise ValueError(f"fold_bn: pairs {wrong} are not a norm layer fed by that Conv/Linear layer alone; the "
                             f"model's foldable pairs are {found}")
    return _fold(model, pairs)


@torch.no_grad()
def _fold(model: nn.Module, pairs) -> nn.Module:
    """:func:`fold_bn` of pairs that :func:`find_fold_pairs` gave (not checked again:
    the callers that just traced the model fold without a second trace)."""
    net = copy_model(model, "folding BatchNorm (fold_bn)")
    net.eval()
    for conv_name, norm_name in pairs:
        conv = net.get_submodule(conv_name)
        norm = net.get_submodule(norm_name)
        try:
            a, c = folding_affine(norm)
        except ValueError as e:
            raise ValueError(f"fold_bn: layer {norm_name!r}: {e}") from None
        a = a.to(conv.weight.dtype)
        c = c.to(conv.weight.dtype)
        if a.shape[0] != conv.weight.shape[0]:
            raise ValueError(
                f"fold_bn: {norm_name!r} has {a.shape[0]} channels but {conv_name!r} has {conv.weight.shape[0]} outputs"
            )
        w, b = fuse_weights(conv.weight, conv.bias, a, c)
        conv.weight.copy_(w)
        if conv.bias is None:
            conv.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(b)
        _set_submodule(net, norm_name, nn.Identity())
    return net
