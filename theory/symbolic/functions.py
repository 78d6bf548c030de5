"""Small symbolic building blocks shared by the derivations.

- :class:`SqNorm` ``‖v‖²`` (squared Euclidean / Frobenius norm) and :class:`Std`
  ``std(W)`` (population standard deviation over all entries): scalar functions of a
  vector or matrix, printed as ``\\lVert v\\rVert^{2}`` and ``\\operatorname{std}(W)``.
- :class:`Diag`: the diagonal matrix of a column vector, printed ``\\operatorname{diag}``.
- :func:`gaussian_expectation` / :func:`rademacher_expectation`: the expectation of a
  polynomial in independent standard normal (resp. Rademacher ±1) variables, computed by
  expanding it into monomials and replacing each ``z^k`` by its moment
  (``E z^k = (k − 1)!!`` for even k, 0 for odd k; Rademacher: 1 for even k). This is the
  "expanding moments" route used to derive every Gaussian quadratic-form result.
- :func:`assert_zero`: a symbolic identity check run at derivation time.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import sympy as sp
from sympy.matrices.expressions.diagonal import DiagMatrix, DiagonalOf

__all__ = [
    "SqNorm",
    "Std",
    "Diag",
    "QuadForm",
    "DiagOf",
    "gaussian_expectation",
    "rademacher_expectation",
    "gaussian_covariance",
    "assert_zero",
    "matrix_symbols",
]


class _NonNegativeOfOne(sp.Function):
    """A real, non-negative function of one argument (base of :class:`SqNorm`, :class:`Std`)."""

    nargs = 1
    is_commutative = True
    is_real = True

    def _eval_is_nonnegative(self):
        return True


class SqNorm(_NonNegativeOfOne):
    """``‖v‖²``: squared Euclidean norm of a vector (Frobenius norm² of a matrix)."""

    def _latex(self, printer, exp=None):
        s = r"\lVert %s\rVert^{2}" % printer._print(self.args[0])
        return s if exp is None else r"\left(%s\right)^{%s}" % (s, exp)

    def _sympystr(self, printer):
        return "|%s|^2" % printer._print(self.args[0])

    def _numpy_eval(self, value):
        return np.sum(np.asarray(value, dtype=float) ** 2)


class Std(_NonNegativeOfOne):
    """``std(W)``: population standard deviation over all entries of ``W`` (the
    convention of :class:`noiseprop.theory.noise.RelativeGaussian`)."""

    def _latex(self, printer, exp=None):
        s = r"\operatorname{std}\left(%s\right)" % printer._print(self.args[0])
        return s if exp is None else "%s^{%s}" % (s, exp)

    def _sympystr(self, printer):
        return "std(%s)" % printer._print(self.args[0])

    def _numpy_eval(self, value):
        return np.std(np.asarray(value, dtype=float))


class QuadForm(sp.Function):
    """``vᵀ M v``: the quadratic form of the column vector ``v`` with the matrix ``M``."""

    nargs = 2
    is_commutative = True
    is_real = True

    def _latex(self, printer, exp=None):
        v, M = self.args
        s = r"%s^{\top} %s %s" % (printer._print(v), printer._print(M), printer._print(v))
        return s if exp is None else r"\left(%s\right)^{%s}" % (s, exp)

    def _sympystr(self, printer):
        v, M = self.args
        return "%s^T %s %s" % (printer._print(v), printer._print(M), printer._print(v))

    def _numpy_eval(self, v, M):
        v = np.asarray(v, dtype=float).reshape(-1)
        return float(v @ np.asarray(M, dtype=float) @ v)


class Diag(DiagMatrix):
    """``diag(v)``: the diagonal matrix with the entries of the column vector ``v``."""

    def _latex(self, printer):
        return r"\operatorname{diag}\left(%s\right)" % printer._print(self.args[0])

    def _sympystr(self, printer):
        return "diag(%s)" % printer._print(self.args[0])


class DiagOf(DiagonalOf):
    """``dg(M)``: the column vector of the diagonal entries of the square matrix ``M``."""

    def _latex(self, printer):
        return r"\operatorname{dg}\left(%s\right)" % printer._print(self.args[0])

    def _sympystr(self, printer):
        return "dg(%s)" % printer._print(self.args[0])


def matrix_symbols(prefix: str, rows: int, cols: int, **assumptions) -> sp.Matrix:
    """An explicit ``rows × cols`` matrix of scalar symbols ``prefix_ij`` (a generic
    instance used to verify a matrix identity entry by entry)."""
    return sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{prefix}_{i}{j}", **assumptions))


def _double_factorial_moment(k: int) -> int:
    """``E z^k`` for ``z ~ N(0, 1)``: ``(k − 1)!!`` for even k, 0 for odd k."""
    if k % 2:
        return 0
    return int(sp.factorial2(k - 1)) if k else 1


def _expectation(expr, variables: Iterable[sp.Symbol], moment) -> sp.Expr:
    varset = set(variables)
    expr = sp.expand(sp.sympify(expr))
    if not varset:
        return expr
    out = []
    for term in sp.Add.make_args(expr):
        factor = sp.Integer(1)
        rest = []
        for base, ex in term.as_powers_dict().items():
            if base in varset:
                if not (ex.is_Integer and ex >= 0):
                    raise ValueError(f"expectation needs a polynomial in {sorted(map(str, varset))}, got {base}**{ex}")
                mk = moment(int(ex))
                if mk == 0:
                    factor = sp.Integer(0)
                    break
                factor *= mk
            else:
                rest.append(base**ex)
        if factor != 0:
            out.append(factor * sp.Mul(*rest))
    return sp.expand(sp.Add(*out))


def gaussian_expectation(expr, normals: Iterable[sp.Symbol]) -> sp.Expr:
    """``E[expr]`` for a polynomial ``expr`` in independent standard normals ``normals``
    (all other symbols are constants): monomials are replaced by their moments
    ``E z^k = (k − 1)!!`` (even k), 0 (odd k)."""
    return _expectation(expr, normals, _double_factorial_moment)


def rademacher_expectation(expr, signs: Iterable[sp.Symbol]) -> sp.Expr:
    """``E[expr]`` for a polynomial in independent Rademacher variables (±1 with
    probability ½): ``E v^k = 1`` for even k, 0 for odd k."""
    return _expectation(expr, signs, lambda k: 0 if k % 2 else 1)


def gaussian_covariance(a, b, normals) -> sp.Expr:
    """``Cov(a, b) = E[ab] − E[a]E[b]`` over independent standard normals."""
    normals = list(normals)
    return sp.expand(
        gaussian_expectation(a * b, normals) - gaussian_expectation(a, normals) * gaussian_expectation(b, normals)
    )


def _is_zero(e) -> bool:
    e = sp.expand(sp.sympify(e))
    if e == 0:
        return True
    if sp.cancel(sp.together(e)) == 0:
        return True
    return sp.simplify(e) == 0


def assert_zero(expr, what: str) -> str:
    """Check symbolically that ``expr`` simplifies to 0 (a scalar or an explicit
    matrix); raise ``AssertionError`` naming ``what`` otherwise. Returns ``what`` so the
    caller can record the check."""
    items = list(expr) if isinstance(expr, sp.MatrixBase) else [expr]
    ok = all(_is_zero(e) for e in items)
    if not ok:
        raise AssertionError(f"symbolic check failed: {what}")
    return what
