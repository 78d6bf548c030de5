"""The one ``torch.fx`` tracer of the project, shared by BatchNorm folding
(:func:`~noiseprop.theory.targets.find_fold_pairs`), the moment propagation, the
piecewise-linearity check and the first-order diagnostics.

Conv/Linear layers, BatchNorm-like layers (anything with ``folding_affine``) and the
standard ``torch.nn`` modules stay leaves (``call_module`` nodes); containers and user
modules are traced through.
"""
from __future__ import annotations

import copy
import threading
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["LeafTracer", "trace", "graph_constants", "graph_module", "is_relu", "is_rectifier", "RECTIFIER_MODULES", "RECTIFIER_FUNCTIONS",
           "relu_input_graph", "WEIGHT_LAYERS", "conv_padding", "unfold_input", "differentiable_attention"]

#: Layers whose weights are stored on the crossbar (get noise by default; leaves of the trace).
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LeafTracer(fx.Tracer):
    """Keeps Conv/Linear, BatchNorm-like modules (``folding_affine``) and torch's own
    modules as leaves."""

    def is_leaf_module(self, m, qualname):
        if isinstance(m, WEIGHT_LAYERS) or callable(getattr(m, "folding_affine", None)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(net: nn.Module, context: str = "", hint: str = "") -> fx.Graph:
    """Trace ``net.forward`` with :class:`LeafTracer`; raises ``ValueError`` naming the
    model when fx cannot (``context`` prefixes the message, ``hint`` ends it)."""
    # the trace runs the user's forward on the user's modules: an attribute it assigns
    # (``self.feat = h``) would be left holding an fx Proxy; every module's instance
    # attributes are put back as they were
    # (tensor constants fx stores on the root, ``_tensor_constant0`` for a ``torch.tensor(2.0)``
    # or ``1 + self.buffer`` in the forward, included): those the graph reads are kept on
    # the graph instead (:func:`graph_constants`)
    saved = [(m, dict(m.__dict__)) for m in net.modules()]
    try:
        graph = LeafTracer().trace(net)
        wanted = {n.target for n in graph.nodes if n.op == "get_attr"}
        graph.noiseprop_constants = {k: v for k, v in net.__dict__.items()
                                     if k in wanted and k not in saved[0][1] and isinstance(v, torch.Tensor)}
        return graph
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise ValueError(
            f"{context}could not trace {type(net).__name__}.forward with torch.fx ({type(e).__name__}: {e}){hint}"
        ) from e
    finally:
        for m, d in saved:
            if m.__dict__.keys() != d.keys() or any(m.__dict__[k] is not v for k, v in d.items()):
                m.__dict__.clear()
                m.__dict__.update(d)


def graph_constants(graph: fx.Graph) -> dict:
    """The tensor constants of a :func:`trace` graph (``get_attr`` targets fx created
    while tracing, kept off the user's model), by name."""
    return getattr(graph, "noiseprop_constants", {})


def graph_module(net: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``fx.GraphModule`` of a :func:`trace` graph over ``net``'s modules and parameters
    (the same objects, under the same names), with the graph's tensor constants. Built
    from a shallow copy of ``net`` with its own registries (``_modules``, ``_parameters``,
    ``_buffers``) and the constants as attributes: ``fx.GraphModule(net, graph)`` cannot
    find the constants (they are kept off the user's model), and a dict root installs
    every target by assignment, registering a leaf's tensor attribute (``self.fc.mask``)
    as a buffer on the user's layer (an error for a plain attribute, a non-persistent
    buffer made persistent)."""
    shell = copy.copy(net)
    for reg in ("_modules", "_parameters", "_buffers"):
        shell.__dict__[reg] = dict(net.__dict__[reg])
    shell.__dict__.update(graph_constants(graph))
    return fx.GraphModule(shell, graph, class_name=type(net).__name__)


def is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, F.relu_, torch.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


#: Activations that are linear (or nearly) away from 0 and bend within about a unit of it:
#: LeakyReLU's and ELU's kinks, GELU's, SiLU's and softplus' smooth bends. Their inputs are
#: what the validity diagnostics count beside ReLU's (:func:`is_rectifier`); tanh and
#: sigmoid saturate instead, where a noise sd against the mean's magnitude says nothing.
RECTIFIER_MODULES = (nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus)
RECTIFIER_FUNCTIONS = (F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.gelu, F.silu, F.softplus)


def is_rectifier(node: fx.Node, modules: dict) -> bool:
    """A ReLU or one of its leaky, exponential or smooth variants (module or function,
    :data:`RECTIFIER_MODULES`, :data:`RECTIFIER_FUNCTIONS`): where a pre-activation's
    noise sd exceeds its magnitude, the noise crosses the bend at 0 and the first order's
    slope is wrong for it."""
    if is_relu(node, modules):
        return True
    if node.op == "call_module":
        return isinstance(modules.get(node.target), RECTIFIER_MODULES)
    return node.op == "call_function" and node.target in RECTIFIER_FUNCTIONS


def relu_input_graph(net: nn.Module) -> tuple[fx.GraphModule, int]:
    """A GraphModule computing ``(logits, (pre-activation_1, ...))``: the inputs of
    every ReLU and its variants (:func:`is_rectifier`), in forward order. Returns it and their
    number. Each input is copied before its activation: an in-place ReLU
    (``nn.ReLU(inplace=True)``, torchvision's default, or ``torch.relu_``) would
    otherwise overwrite it with its output."""
    graph = trace(net)
    modules = dict(net.named_modules())
    pre = []
    for node in list(graph.nodes):
        if is_rectifier(node, modules) and node.args and isinstance(node.args[0], fx.Node):
            with graph.inserting_before(node):
                pre.append(graph.call_method("clone", (node.args[0],)))
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    graph.erase_node(out)
    graph.output((result, tuple(pre)))
    return graph_module(net, graph), len(pre)


_ATTENTION = {"lock": threading.Lock(), "depth": 0, "restore": None}


@contextmanager
def differentiable_attention():
    """A context in which attention (``nn.MultiheadAttention``, ``nn.Transformer*``)
    runs ops that every autodiff mode supports: ``F.scaled_dot_product_attention`` by its
    math kernel and no fused "fast path" of the Transformer layers. The fused CPU kernels
    have no forward-mode derivative (forward-over-reverse Hessian products, the
    diagnostic's and the drift curve's ``jvp``) and no double backward. Same values up to
    rounding. Both switches are process-wide: the first context in (of any thread) sets
    them and the last one out restores them, so threads that overlap neither undo each
    other's setting nor leave it behind."""
    with _ATTENTION["lock"]:
        if _ATTENTION["depth"] == 0:
            stack = ExitStack()
            fast = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            stack.callback(torch.backends.mha.set_fastpath_enabled, fast)
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            _ATTENTION["restore"] = stack
        _ATTENTION["depth"] += 1
    try:
        yield
    finally:
        with _ATTENTION["lock"]:
            _ATTENTION["depth"] -= 1
            if _ATTENTION["depth"] == 0:
                _ATTENTION["restore"].close()
                _ATTENTION["restore"] = None


def conv_padding(m: nn.Conv2d) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]]:
    """A Conv2d's padding as numbers, for the ops that take no ``'same'``/``'valid'``
    (``F.unfold``): ``(pre, padding)``, ``pre`` a zero padding ``(left, right, top,
    bottom)`` to put on the input first (``None`` where none is needed) and ``padding``
    the symmetric rest. ``'same'`` pads ``dilation·(kernel − 1)`` in all, the odd one at
    the right and bottom, as torch does."""
    p = m.padding
    if p == "valid":
        return None, (0, 0)
    if p == "same":
        tot = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        lo = [t // 2 for t in tot]
        if all(t % 2 == 0 for t in tot):
            return None, (lo[0], lo[1])
        return (lo[1], tot[1] - lo[1], lo[0], tot[0] - lo[0]), (0, 0)
    return None, tuple(p)


def unfold_input(x: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    """``F.unfold`` of a Conv2d's input ``x`` into its patches ``[B, C·kh·kw, L]``, for
    any padding the layer accepts (:func:`conv_padding`)."""
    pre, pad = conv_padding(m)
    if pre is not None:
        x = F.pad(x, pre)
    return F.unfold(x, kernel_size=m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
