"""One interpreter over the traced graph, shared by the moment pass and the surrogate.

:class:`GraphInterpreter` walks the nodes of a ``torch.fx`` graph (traced once by
:func:`~noiseprop.theory._graph.trace`), resolves arguments, looks up ``get_attr``
targets among the network's (functional) parameters and buffers, frees every value
after its last use, and hands each ``call_*`` node to :meth:`GraphInterpreter.call`,
which the two passes override. :meth:`GraphInterpreter.plain` evaluates a node on
ordinary tensors (what both passes do for everything that is not a rule of theirs).
"""
from __future__ import annotations

from torch import fx

from .._graph import graph_constants

__all__ = ["GraphInterpreter", "flatten_args"]


def flatten_args(v) -> list:
    """All leaves of nested lists/tuples/dicts."""
    out = []
    if isinstance(v, (list, tuple)):
        for e in v:
            out.extend(flatten_args(e))
    elif isinstance(v, dict):
        for e in v.values():
            out.extend(flatten_args(e))
    else:
        out.append(v)
    return out


class GraphInterpreter:
    """Evaluate ``graph`` node by node (see the module docstring).

    ``net``: the traced module (for attribute look-ups), ``params``/``buffers``: the
    tensors to use for its parameters and buffers (the functional copies of
    :class:`~noiseprop.theory.linearize.LinearizedNetwork`)."""

    def __init__(self, graph: fx.Graph, net, params: dict, buffers: dict):
        self.graph = graph
        self.net = net
        self.params = params
        self.buffers = buffers
        self.modules = dict(net.named_modules())
        self.nodes = list(graph.nodes)
        self.last_use: dict = {}
        for i, node in enumerate(self.nodes):
            for a in node.all_input_nodes:
                self.last_use[a] = i

    # ------------------------------------------------------------------ hooks
    def placeholder(self, node: fx.Node, x):
        return x

    def call(self, node: fx.Node, args, kwargs, env: dict, i: int):
        return self.plain(node, args, kwargs)

    # ------------------------------------------------------------------ helpers
    def get_attr(self, target: str):
        if target in self.params:
            return self.params[target]
        if target in self.buffers:
            return self.buffers[target]
        consts = graph_constants(self.graph)  # a tensor built in the forward (torch.tensor(2.0))
        if target in consts:
            return consts[target]
        obj = self.net
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def load(self, env: dict, a):
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.load(env, v) for v in a)
        if isinstance(a, dict):
            return {k: self.load(env, v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self.load(env, a.start), self.load(env, a.stop), self.load(env, a.step))
        return a

    def plain(self, node: fx.Node, args, kwargs):
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        raise ValueError(f"graph node {node.name!r} of kind {node.op!r} cannot be evaluated")

    def live(self, env: dict, i: int) -> list:
        """Values still needed after node ``i`` (distinct objects)."""
        return list({id(v): v for n, v in env.items() if self.last_use.get(n, -1) > i}.values())

    def run(self, x):
        env: dict = {}
        out = None
        first = True
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                if not first:
                    raise ValueError(f"graph node {node.name!r}: models with more than one input are not supported; "
                                     "use method='linear'")
                first = False
                env[node] = self.placeholder(node, x)
            elif node.op == "output":
                out = self.load(env, node.args[0])
                break
            elif node.op == "get_attr":
                env[node] = self.get_attr(node.target)
            else:
                env[node] = self.call(node, self.load(env, node.args), self.load(env, node.kwargs), env, i)
            for a in node.all_input_nodes:
                if self.last_use.get(a) == i:
                    env.pop(a, None)
        return out
