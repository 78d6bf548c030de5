"""Numeric evaluation of a derivation's sympy expressions.

:func:`make_numeric` turns an expression into a :class:`NumericFunction` that takes
numpy arrays / floats by the names of the expression's symbols (positionally in the
derivation's symbol order, or by keyword):

- scalar expressions built from elementary functions go through ``sympy.lambdify``
  (numpy module) and broadcast like numpy;
- matrix expressions (``MatrixSymbol`` algebra: products, transposes, traces,
  ``Identity``, ``diag``, Hadamard products, ``‖·‖²``, ``std``) and expressions holding
  an ``Integral`` (evaluated with ``scipy.integrate.quad``) or a ``Sum`` go through a small
  tree evaluator; the symbolic dimensions of matrix symbols are bound from the shapes of
  the arrays passed in.
"""
from __future__ import annotations

import inspect
import math
from typing import Mapping, Sequence

import numpy as np
import scipy.special as special
import sympy as sp
from scipy.integrate import quad
from sympy.matrices.expressions.diagonal import DiagMatrix, DiagonalOf
from sympy.matrices.expressions.hadamard import HadamardPower, HadamardProduct

__all__ = ["NumericFunction", "make_numeric", "evaluate"]


def _betainc_regularized(a, b, x1, x2):
    return special.betainc(a, b, x2) - special.betainc(a, b, x1)


_FUNCTIONS = {
    "exp": np.exp,
    "log": np.log,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "tanh": np.tanh,
    "cosh": np.cosh,
    "sinh": np.sinh,
    "atan": np.arctan,
    "acos": np.arccos,
    "Abs": np.abs,
    "sign": np.sign,
    "floor": np.floor,
    "ceiling": np.ceil,
    "erf": special.erf,
    "erfc": special.erfc,
    "gamma": special.gamma,
    "loggamma": special.gammaln,
    "factorial": lambda x: special.gamma(np.asarray(x, dtype=float) + 1.0),
    "binomial": special.comb,
    "betainc_regularized": _betainc_regularized,
    "Max": lambda *a: np.maximum.reduce(np.broadcast_arrays(*a)),
    "Min": lambda *a: np.minimum.reduce(np.broadcast_arrays(*a)),
}


def _is_matrix(expr) -> bool:
    return bool(getattr(expr, "is_Matrix", False))


def evaluate(expr, env: Mapping):
    """Evaluate a sympy expression tree numerically; ``env`` maps symbols (and symbolic
    dimensions) to numbers / numpy arrays."""
    if expr in env:
        return env[expr]
    if isinstance(expr, sp.Indexed):
        base = expr.base
        arr = env.get(base, env.get(base.label))
        if arr is None:
            raise ValueError(f"no value given for {base}")
        idx = tuple(int(evaluate(i, env)) - 1 for i in expr.indices)  # formulas index from 1
        if any(i < 0 for i in idx):
            raise ValueError(f"index {expr} out of range (formulas index from 1)")
        return np.asarray(arr)[idx]
    if isinstance(expr, (sp.MatrixSymbol, sp.Symbol, sp.Dummy, sp.IndexedBase)):
        raise ValueError(f"no value given for {expr}")
    if expr.is_Number:
        return int(expr) if expr.is_Integer else float(expr)
    if isinstance(expr, sp.NumberSymbol) or expr in (sp.pi, sp.E, sp.EulerGamma):
        return float(expr)
    if expr is sp.true:
        return True
    if expr is sp.false:
        return False
    if expr is sp.oo:
        return math.inf
    if expr is -sp.oo:
        return -math.inf
    if hasattr(type(expr), "_numpy_eval"):
        return type(expr)._numpy_eval(expr, *[evaluate(a, env) for a in expr.args])
    if isinstance(expr, sp.Identity):
        return np.eye(int(evaluate(expr.rows, env)))
    if isinstance(expr, sp.ZeroMatrix):
        return np.zeros((int(evaluate(expr.rows, env)), int(evaluate(expr.cols, env))))
    if isinstance(expr, sp.OneMatrix):
        return np.ones((int(evaluate(expr.rows, env)), int(evaluate(expr.cols, env))))
    if isinstance(expr, sp.MatrixBase):
        return np.array([[evaluate(e, env) for e in row] for row in expr.tolist()], dtype=float)
    if isinstance(expr, (sp.Add, sp.MatAdd)):
        vals = [evaluate(a, env) for a in expr.args]
        out = vals[0]
        for v in vals[1:]:
            out = out + v
        return out
    if isinstance(expr, sp.MatMul):
        coeff, mat = 1.0, None
        for a in expr.args:
            v = evaluate(a, env)
            if _is_matrix(a):
                mat = v if mat is None else mat @ v
            else:
                coeff = coeff * v
        return coeff if mat is None else coeff * mat
    if isinstance(expr, sp.Mul):
        out = 1.0
        for a in expr.args:
            out = out * evaluate(a, env)
        return out
    if isinstance(expr, sp.MatPow):
        return np.linalg.matrix_power(evaluate(expr.args[0], env), int(evaluate(expr.args[1], env)))
    if isinstance(expr, sp.Pow):
        base = evaluate(expr.base, env)
        ex = evaluate(expr.exp, env)
        if isinstance(ex, int) and ex < 0:
            return np.asarray(base, dtype=float) ** ex
        return np.power(base, ex) if isinstance(base, np.ndarray) else base**ex
    if isinstance(expr, sp.Transpose):
        return np.asarray(evaluate(expr.arg, env)).T
    if isinstance(expr, sp.Trace):
        return np.trace(evaluate(expr.arg, env))
    if isinstance(expr, DiagonalOf):
        return np.diag(evaluate(expr.args[0], env))[:, None]
    if isinstance(expr, DiagMatrix):
        return np.diagflat(evaluate(expr.args[0], env))
    if isinstance(expr, HadamardProduct):
        out = 1.0
        for a in expr.args:
            out = out * evaluate(a, env)
        return out
    if isinstance(expr, HadamardPower):
        return np.asarray(evaluate(expr.base, env)) ** evaluate(expr.exp, env)
    if isinstance(expr, sp.KroneckerDelta):
        return 1.0 * (evaluate(expr.args[0], env) == evaluate(expr.args[1], env))
    if isinstance(expr, sp.Piecewise):
        for e, cond in expr.args:
            c = evaluate(cond, env)
            if np.all(c):
                return evaluate(e, env)
        raise ValueError(f"no branch of {expr} applies")
    if isinstance(expr, sp.core.relational.Relational):
        lhs, rhs = evaluate(expr.lhs, env), evaluate(expr.rhs, env)
        ops = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}
        return ops[expr.rel_op](lhs, rhs)
    if isinstance(expr, (sp.And, sp.Or, sp.Not)):
        vals = [evaluate(a, env) for a in expr.args]
        if isinstance(expr, sp.And):
            return np.logical_and.reduce(vals)
        if isinstance(expr, sp.Or):
            return np.logical_or.reduce(vals)
        return np.logical_not(vals[0])
    if isinstance(expr, sp.Sum):
        return _evaluate_sum(expr, env)
    if isinstance(expr, sp.Product):
        return _evaluate_product(expr, env)
    if isinstance(expr, sp.Integral):
        return _evaluate_integral(expr, env)
    if isinstance(expr, sp.Function) or isinstance(expr, sp.Max) or isinstance(expr, sp.Min):
        name = type(expr).__name__
        if name not in _FUNCTIONS:
            raise ValueError(f"cannot evaluate the function {name} numerically")
        return _FUNCTIONS[name](*[evaluate(a, env) for a in expr.args])
    raise ValueError(f"cannot evaluate {type(expr).__name__} numerically: {expr}")


def _evaluate_sum(expr: sp.Sum, env):
    term = expr.function
    limits = list(expr.limits)
    (var, lo, hi), rest = limits[0], limits[1:]
    inner = sp.Sum(term, *rest) if rest else term
    lo, hi = int(evaluate(lo, env)), int(evaluate(hi, env))
    total = 0.0
    for i in range(lo, hi + 1):
        total = total + evaluate(inner, {**env, var: i})
    return total


def _evaluate_product(expr: sp.Product, env):
    term = expr.function
    limits = list(expr.limits)
    (var, lo, hi), rest = limits[0], limits[1:]
    inner = sp.Product(term, *rest) if rest else term
    lo, hi = int(evaluate(lo, env)), int(evaluate(hi, env))
    total = 1.0
    for i in range(lo, hi + 1):
        total = total * evaluate(inner, {**env, var: i})
    return total


def _evaluate_integral(expr: sp.Integral, env):
    if len(expr.limits) != 1 or len(expr.limits[0]) != 3:
        raise ValueError(f"only one-dimensional definite integrals are evaluated numerically: {expr}")
    var, lo, hi = expr.limits[0]
    lo, hi = float(evaluate(lo, env)), float(evaluate(hi, env))
    free = [s for s in expr.function.free_symbols if s != var]
    vals = [env[s] for s in free]
    shapes = [np.shape(v) for v in vals]
    if any(shapes):
        bvals = np.broadcast_arrays(*[np.asarray(v, dtype=float) for v in vals])
        out = np.empty(bvals[0].shape)
        for idx in np.ndindex(out.shape):
            sub = {**env, **{s: float(b[idx]) for s, b in zip(free, bvals)}}
            out[idx] = _evaluate_integral(expr, sub)
        return out
    integrand = expr.function
    val, _ = quad(lambda t: float(evaluate(integrand, {**env, var: t})), lo, hi, limit=200, epsabs=1e-11, epsrel=1e-10)
    return val


def _needs_tree(expr) -> bool:
    if _is_matrix(expr) or expr.atoms(sp.MatrixSymbol):
        return True
    if expr.has(sp.Integral, sp.Sum, sp.Product, sp.Piecewise, sp.KroneckerDelta, sp.betainc_regularized, sp.Indexed):
        return True
    return any(hasattr(type(f), "_numpy_eval") for f in expr.atoms(sp.Function))


class NumericFunction:
    """A numpy function of named arguments computed from one sympy expression.

    Call positionally in the order of :attr:`args` or by keyword. Matrix dimensions that
    do not appear in the expression itself are bound from the shapes of the arrays
    passed (a vector given as a 1-d array is taken as a column).
    """

    def __init__(self, expr, args: Sequence[sp.Basic], name: str = "f", doc: str = ""):
        self.expr = expr
        self.name = name
        self.args = tuple(str(a) for a in args)
        self._symbols = tuple(args)
        self._tree = _needs_tree(expr)
        self._lambda = None if self._tree else sp.lambdify(list(args), expr, modules="numpy")
        self.__doc__ = doc or f"{name} = {expr}"
        self.__signature__ = inspect.Signature(
            [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in self.args]
        )

    def __repr__(self) -> str:
        return f"<NumericFunction {self.name}({', '.join(self.args)})>"

    def __call__(self, *args, **kwargs):
        try:
            bound = self.__signature__.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.name}({', '.join(self.args)}): {e}") from None
        values = [bound.arguments[a] for a in self.args]
        if self._lambda is not None:
            return self._lambda(*values)
        env = {}
        for sym, v in zip(self._symbols, values):
            if isinstance(sym, sp.MatrixSymbol):
                v = np.asarray(v, dtype=float)
                if v.ndim == 1:
                    v = v[:, None]
                if v.ndim != 2:
                    raise ValueError(f"{sym} must be a matrix (2-d array), got shape {v.shape}")
                for dim, size in zip(sym.shape, v.shape):
                    if isinstance(dim, sp.Symbol):
                        if dim in env and env[dim] != size:
                            raise ValueError(f"inconsistent size {dim}: {env[dim]} vs {size} (from {sym})")
                        env[dim] = size
                    elif int(dim) != size:
                        raise ValueError(f"{sym} must have shape {sym.shape}, got {v.shape}")
            env[sym] = v
        return evaluate(self.expr, env)


def make_numeric(expr, symbol_order: Sequence[sp.Basic], name: str = "f", doc: str = "") -> NumericFunction:
    """A :class:`NumericFunction` of the free symbols of ``expr`` ordered as in
    ``symbol_order`` (symbols not listed there come after, sorted by name). Symbolic
    matrix dimensions are arguments only if they appear outside matrix shapes."""
    free = {s for s in expr.free_symbols if not isinstance(s, sp.Indexed)}
    dims = set()
    for m in expr.atoms(sp.MatrixSymbol):
        for d in m.shape:
            if isinstance(d, sp.Symbol):
                dims.add(d)
    # a dimension is an argument only if it appears in the expression beyond shapes
    needed = free - dims
    ordered = [s for s in symbol_order if s in needed]
    ordered += sorted(needed - set(ordered), key=str)
    return NumericFunction(expr, ordered, name=name, doc=doc)
