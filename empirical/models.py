"""Model zoo: MLP, VGG-style and CIFAR ResNets, with switchable normalisation.

``build_model(name, in_shape, num_classes, norm=..., norm_layers=..., width=..., depth=...)``
builds a network from plain JSON-able arguments; :func:`model_spec` returns the
canonical dict of those arguments, and ``build_model(**spec)`` rebuilds the same
architecture (this is how checkpoints store models, see :mod:`.checkpoint`).

Families (``width`` is the number of hidden units of the MLP, and the number of
channels of the first stage of the convolutional nets):

* ``mlp``: ``Flatten → [Linear → norm → ReLU] × depth → Linear``.
* ``vgg`` (also ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``): the VGG convolution
  configurations (Simonyan & Zisserman 2015) with 5 stages of 3×3 convs of
  ``width·(1, 2, 4, 8, 8)`` channels (conv counts per stage: 11 → 1,1,2,2,2;
  13 → 2,2,2,2,2; 16 → 2,2,3,3,3; 19 → 2,2,4,4,4), each conv followed by norm and ReLU,
  and a one-layer classifier (the CIFAR variant of VGG). Scaled to the input: with
  ``P = min(5, ⌊log2 min(H, W)⌋)`` 2×2 max-pools placed after the *last* P stages, so no
  3×3 conv ever runs on a 1×1 map (8×8 input: stages at 8, 8, 8→4, 4→2, 2→1; 32×32: a
  pool after every stage); an adaptive average pool is added when the last map is
  larger than 1×1. ``depth`` is VGG's name (11, 13, 16, 19: convs plus VGG's three
  fully connected layers); the classifier here is one linear layer, so a ``depth``-d
  VGG has d − 3 convs and d − 2 weight layers.
* ``resnet20/32/44/56`` (or ``resnet`` with ``depth = 6n + 2``): the CIFAR ResNets of
  He et al. (2016): a 3×3 stem conv, three stages of n :class:`BasicBlock` with
  ``width·(1, 2, 4)`` channels (stride 2 at the start of stages 2 and 3; projection
  shortcuts 1×1 conv + norm there, identity elsewhere), global average pool, linear.

Normalisation (``norm``): ``"none"``, ``"bn"`` (L2 BatchNorm), ``"l1"``, ``"topk"``
(:mod:`.norms`). Each norm layer directly follows the Conv/Linear it normalises (which
then has no bias) and is the only consumer of its output, so BN folding
(:func:`noiseprop.theory.targets.fold_bn`) applies. The *eligible places* are, in forward
order: every hidden Linear (mlp); every conv (vgg); the stem conv, then per block conv1,
conv2 and the shortcut's 1×1 conv (resnet). ``norm_layers=k`` normalises only the first
k places (``None``: all), so the number of BatchNorm layers can be swept; see
:func:`norm_places`.

Initialisation (seeded by ``seed=`` inside ``torch.random.fork_rng``, the global RNG is
untouched): He-normal for convs (fan_out, as torchvision) and hidden Linear layers
(fan_in); PyTorch's default for the classifier; zero biases; norm γ = 1, β = 0. In a
residual block whose branch ends without a norm layer, conv2's initial weights are
scaled by ``(number of blocks)^(-1/2)`` so the un-normalised residual stream does not
grow exponentially with depth (the remedy of Fixup, Zhang et al. 2019, in its simplest
form).
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
from torch import nn

from .norms import DEFAULT_TOPK, NORM_LAYERS

__all__ = [
    "build_model",
    "model_spec",
    "norm_places",
    "count_norm_layers",
    "BasicBlock",
    "MLP",
    "VGG",
    "ResNet",
    "FAMILIES",
    "NORMS",
    "MODEL_DEFAULTS",
]

#: Model families (names accepted also: vgg11/13/16/19, resnet with depth 6n+2).
FAMILIES = ("mlp", "vgg", "resnet20", "resnet32", "resnet44", "resnet56")
NORMS = ("none", "bn", "l1", "topk")

#: Default width / depth per family when not given (the standard architectures).
MODEL_DEFAULTS = {
    "mlp": {"width": 256, "depth": 2},
    "vgg": {"width": 64, "depth": 11},
    "resnet": {"width": 16},
}

VGG_STAGES = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_VGG_MULT = (1, 2, 4, 8, 8)


# ----------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """The CIFAR ResNet residual block (He et al. 2016), with fixed attribute names:

    ``conv1`` (3×3, stride s), ``bn1`` (norm layer or ``nn.Identity``), ``relu1``,
    ``conv2`` (3×3, stride 1), ``bn2`` (norm or ``nn.Identity``), ``shortcut``
    (``nn.Identity``, or ``nn.Sequential(1×1 conv stride s[, norm])`` when the shape
    changes), ``relu2``; and forward exactly::

        relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))

    The analytic engine relies on this structure and these names.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm1=None, norm2=None,
                 norm_shortcut=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=norm1 is None)
        self.bn1 = norm1(out_channels) if norm1 is not None else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=norm2 is None)
        self.bn2 = norm2(out_channels) if norm2 is not None else nn.Identity()
        if stride != 1 or in_channels != out_channels:
            layers = [nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=norm_shortcut is None)]
            if norm_shortcut is not None:
                layers.append(norm_shortcut(out_channels))
            self.shortcut = nn.Sequential(*layers)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class MLP(nn.Sequential):
    """``Flatten → [fc_i → bn_i → relu_i] × depth → fc`` (bn_i absent where not normalised)."""


class VGG(nn.Sequential):
    """VGG-style stack: ``[conv_i → bn_i → relu_i (→ pool_j)] … → (avgpool) → flatten → fc``."""


class ResNet(nn.Sequential):
    """CIFAR ResNet: ``conv1 → bn1 → relu1 → layer1 → layer2 → layer3 → pool → flatten → fc``;
    the layers are ``nn.Sequential`` of :class:`BasicBlock`."""


# ----------------------------------------------------------------------------
# spec
# ----------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _family(name: str, depth):
    """(family, depth) from a name and an optional depth; raises ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}")
    key = name.lower()
    m = re.fullmatch(r"vgg(\d+)", key)
    if m:
        d = int(m.group(1))
        if d not in VGG_STAGES:
            raise ValueError(f"unknown VGG depth in {name!r}; accepted: {['vgg%d' % k for k in VGG_STAGES]}")
        if depth is not None and depth != d:
            raise ValueError(f"model {name!r} has depth {d}, but depth={depth!r} was given")
        return "vgg", d
    m = re.fullmatch(r"resnet(\d+)", key)
    if m:
        d = int(m.group(1))
        if depth is not None and depth != d:
            raise ValueError(f"model {name!r} has depth {d}, but depth={depth!r} was given")
        key, depth = "resnet", d
    if key == "resnet":
        if depth is None:
            raise ValueError("model 'resnet' needs depth=6n+2 (e.g. 20, 32, 44, 56), or use a name like 'resnet20'")
        if not _is_int(depth) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, ...), got {depth!r}")
        return "resnet", depth
    if key == "vgg":
        d = MODEL_DEFAULTS["vgg"]["depth"] if depth is None else depth
        if d not in VGG_STAGES:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_STAGES)}, got {depth!r}")
        return "vgg", d
    if key == "mlp":
        d = MODEL_DEFAULTS["mlp"]["depth"] if depth is None else depth
        if not _is_int(d) or d < 0:
            raise ValueError(f"MLP depth (number of hidden layers) must be an int >= 0, got {depth!r}")
        return "mlp", d
    raise ValueError(f"unknown model {name!r}; accepted: {list(FAMILIES)} (also vgg11/13/16/19, resnet<6n+2>)")


def _places(family: str, depth: int, in_shape) -> int:
    if family == "mlp":
        return depth
    if family == "vgg":
        return sum(VGG_STAGES[depth])
    n = (depth - 2) // 6
    return 1 + 2 * 3 * n + 2  # stem, two per block, two projection shortcuts


def model_spec(name: str, in_shape, num_classes: int, norm: str = "none", norm_layers=None, width=None,
               depth=None, topk_k=None) -> dict:
    """The canonical, JSON-able spec of a model (validated; defaults filled in).

    ``build_model(**model_spec(...))`` builds it. Canonical forms: ``vggNN`` →
    ``name="vgg", depth=NN``; ``resnet`` + depth → ``"resnet<depth>"``; ``norm_layers``
    equal to the number of eligible places → ``None``; ``norm_layers=0`` → ``norm="none"``.

    >>> spec = model_spec("vgg11", (1, 8, 8), 10, norm="bn")
    >>> spec["name"], spec["depth"], spec["norm"]
    ('vgg', 11, 'bn')
    """
    family, depth = _family(name, depth)
    if isinstance(in_shape, int) or in_shape is None:
        raise ValueError(f"in_shape must be (C, H, W), got {in_shape!r}")
    in_shape = list(in_shape)
    if len(in_shape) != 3 or not all(_is_int(s) and s >= 1 for s in in_shape):
        raise ValueError(f"in_shape must be (C, H, W) with positive ints, got {in_shape!r}")
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; accepted: {list(NORMS)}")
    norm = norm.lower()
    defaults = MODEL_DEFAULTS[family]
    width = defaults["width"] if width is None else width
    if not _is_int(width) or width < 1:
        raise ValueError(f"width must be a positive int ({'hidden units' if family == 'mlp' else 'channels of the first stage'}), got {width!r}")
    total = _places(family, depth, in_shape)
    if norm_layers is not None:
        if not _is_int(norm_layers) or not 0 <= norm_layers <= total:
            raise ValueError(
                f"norm_layers must be None or an int in [0, {total}] (the number of places a norm layer can go "
                f"in {family} depth {depth}), got {norm_layers!r}"
            )
        if norm == "none" and norm_layers > 0:
            raise ValueError(f"norm_layers={norm_layers} needs a norm ('bn', 'l1', 'topk'), got norm='none'")
        if norm_layers == total:
            norm_layers = None
        elif norm_layers == 0:
            norm, norm_layers = "none", None
    if topk_k is not None and norm != "topk":
        raise ValueError(f"topk_k is only used with norm='topk', got norm={norm!r}")
    spec = {"name": "vgg" if family == "vgg" else (f"resnet{depth}" if family == "resnet" else family),
            "in_shape": in_shape, "num_classes": int(num_classes), "norm": norm, "norm_layers": norm_layers,
            "width": int(width), "depth": int(depth)}
    if norm == "topk":
        k = DEFAULT_TOPK if topk_k is None else topk_k
        if not _is_int(k) or k < 1:
            raise ValueError(f"topk_k must be a positive int, got {k!r}")
        spec["topk_k"] = k
    return spec


def norm_places(name: str, depth=None, **_ignored) -> int:
    """Number of places a norm layer can go (the maximum of ``norm_layers``)."""
    family, depth = _family(name, depth)
    return _places(family, depth, None)


def count_norm_layers(model: nn.Module) -> int:
    """Number of normalisation modules in ``model`` (L2/L1/TopK BatchNorm)."""
    kinds = tuple(c for pair in NORM_LAYERS.values() for c in pair)
    return sum(isinstance(m, kinds) for m in model.modules())


# ----------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------
class _NormFactory:
    """Hands out norm constructors for the first ``limit`` eligible places."""

    def __init__(self, norm: str, limit, topk_k):
        self.norm = norm
        self.limit = limit
        self.used = 0
        self.topk_k = topk_k

    def next(self, dim: int):
        if self.norm == "none":
            return None
        if self.limit is not None and self.used >= self.limit:
            self.used += 1
            return None
        self.used += 1
        cls = NORM_LAYERS[self.norm][0 if dim == 1 else 1]
        if self.norm == "topk":
            k = self.topk_k
            return lambda c: cls(c, k=k)
        return cls


def _build_mlp(spec, nf: _NormFactory) -> nn.Module:
    c, h, w = spec["in_shape"]
    layers = OrderedDict(flatten=nn.Flatten())
    d_in = c * h * w
    for i in range(1, spec["depth"] + 1):
        norm = nf.next(1)
        layers[f"fc{i}"] = nn.Linear(d_in, spec["width"], bias=norm is None)
        if norm is not None:
            layers[f"bn{i}"] = norm(spec["width"])
        layers[f"relu{i}"] = nn.ReLU()
        d_in = spec["width"]
    layers["fc"] = nn.Linear(d_in, spec["num_classes"])
    return MLP(layers)


def _build_vgg(spec, nf: _NormFactory) -> nn.Module:
    c, h, w = spec["in_shape"]
    stages = VGG_STAGES[spec["depth"]]
    n_pool = min(len(stages), int(math.floor(math.log2(min(h, w))))) if min(h, w) >= 2 else 0
    layers = OrderedDict()
    ch_in, i, p = c, 0, 0
    for s, (n_conv, mult) in enumerate(zip(stages, _VGG_MULT)):
        ch = spec["width"] * mult
        for _ in range(n_conv):
            i += 1
            norm = nf.next(2)
            layers[f"conv{i}"] = nn.Conv2d(ch_in, ch, 3, padding=1, bias=norm is None)
            if norm is not None:
                layers[f"bn{i}"] = norm(ch)
            layers[f"relu{i}"] = nn.ReLU()
            ch_in = ch
        if s >= len(stages) - n_pool:
            p += 1
            layers[f"pool{p}"] = nn.MaxPool2d(2)
            h, w = h // 2, w // 2
    if h > 1 or w > 1:
        layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(ch_in, spec["num_classes"])
    return VGG(layers)


def _build_resnet(spec, nf: _NormFactory) -> nn.Module:
    c = spec["in_shape"][0]
    n = (spec["depth"] - 2) // 6
    width = spec["width"]
    layers = OrderedDict()
    norm = nf.next(2)
    layers["conv1"] = nn.Conv2d(c, width, 3, padding=1, bias=norm is None)
    if norm is not None:
        layers["bn1"] = norm(width)
    layers["relu1"] = nn.ReLU()
    ch_in = width
    for stage, mult in enumerate((1, 2, 4), start=1):
        ch = width * mult
        blocks = []
        for b in range(n):
            stride = 2 if (stage > 1 and b == 0) else 1
            n1, n2 = nf.next(2), nf.next(2)
            ns = nf.next(2) if (stride != 1 or ch_in != ch) else None
            blocks.append(BasicBlock(ch_in, ch, stride, n1, n2, ns))
            ch_in = ch
        layers[f"layer{stage}"] = nn.Sequential(*blocks)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(ch_in, spec["num_classes"])
    return ResNet(layers)


@torch.no_grad()
def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in linears[:-1]:  # hidden layers; the classifier keeps PyTorch's default init
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    for b in blocks:
        if isinstance(b.bn2, nn.Identity):
            b.conv2.weight.mul_(len(blocks) ** -0.5)


def build_model(name: str, in_shape, num_classes: int, norm: str = "none", norm_layers=None, width=None,
                depth=None, topk_k=None, seed: int = 0) -> nn.Module:
    """Build a model of the zoo (see the module docstring), initialised from ``seed``
    without touching the global RNG. The canonical spec is attached as ``model.spec``.

    >>> net = build_model("resnet20", (3, 32, 32), 10, norm="bn", width=16)
    >>> net.spec["name"], net.spec["norm"], net(torch.zeros(2, 3, 32, 32)).shape
    ('resnet20', 'bn', torch.Size([2, 10]))
    """
    spec = model_spec(name, in_shape, num_classes, norm=norm, norm_layers=norm_layers, width=width, depth=depth,
                      topk_k=topk_k)
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    family, _ = _family(spec["name"], spec["depth"])
    nf = _NormFactory(spec["norm"], spec["norm_layers"], spec.get("topk_k"))
    builder = {"mlp": _build_mlp, "vgg": _build_vgg, "resnet": _build_resnet}[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(spec, nf)
        _init(model)
    model.spec = spec
    return model
