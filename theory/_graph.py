"""The one ``torch.fx`` tracer of the project, shared by BatchNorm folding
(:func:`~noiseprop.theory.targets.find_fold_pairs`), the moment propagation, the
piecewise-linearity check and the first-order diagnostics.

Conv/Linear layers, BatchNorm-like layers (anything with ``folding_affine``) and the
standard ``torch.nn`` modules stay leaves (``call_module`` nodes); containers and user
modules are traced through.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["LeafTracer", "trace", "is_relu", "relu_input_graph", "WEIGHT_LAYERS"]

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
    try:
        return LeafTracer().trace(net)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise ValueError(
            f"{context}could not trace {type(net).__name__}.forward with torch.fx ({type(e).__name__}: {e}){hint}"
        ) from e


def is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, F.relu_, torch.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def relu_input_graph(net: nn.Module) -> tuple[fx.GraphModule, int]:
    """A GraphModule computing ``(logits, (pre-activation_1, ...))``: the inputs of
    every ReLU, in forward order. Returns it and the number of ReLUs. Each input is
    copied before its ReLU: an in-place ReLU (``nn.ReLU(inplace=True)``, torchvision's
    default, or ``torch.relu_``) would otherwise overwrite it with its output."""
    graph = trace(net)
    modules = dict(net.named_modules())
    pre = []
    for node in list(graph.nodes):
        if is_relu(node, modules) and node.args and isinstance(node.args[0], fx.Node):
            with graph.inserting_before(node):
                pre.append(graph.call_method("clone", (node.args[0],)))
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    graph.erase_node(out)
    graph.output((result, tuple(pre)))
    gm = fx.GraphModule(net, graph)
    return gm, len(pre)
