"""The :class:`Derivation` result object shared by every symbolic derivation.

A derivation is a frozen record of one result: its assumptions (LaTeX text), the sympy
expressions it derived (each with a LaTeX left-hand side and a one-line meaning), the
symbols they use (with their meaning), the symbolic checks that were run while deriving
it, and the source it follows (a THEORY.md section and/or a paper).

- :meth:`Derivation.latex` returns LaTeX for direct inclusion in a paper (a paragraph,
  the assumptions as an ``enumerate`` list, the results in an ``align`` environment with
  labels ``eq:<name>:<key>``, a "where" clause and the source). Pure ASCII.
- :meth:`Derivation.numeric` returns a numpy function of one expression
  (:class:`~noiseprop.theory.symbolic.numeric.NumericFunction`, via ``sympy.lambdify``).
- :meth:`Derivation.summary` is the plain-text form printed by ``noiseprop derive``.
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import pandas as pd
import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from .numeric import NumericFunction, make_numeric

__all__ = ["Derivation", "plain_text", "latex_expr", "text_expr"]


def _frozen_map(m) -> Mapping:
    return MappingProxyType(dict(m or {}))


@dataclass(frozen=True, eq=False)
class Derivation:
    """One derived result (see the module docstring).

    Fields
    ------
    name: ``"<topic>.<short name>"``, e.g. ``"depth.relu_critical"``.
    topic: one of the topics of :data:`noiseprop.theory.symbolic.TOPICS`.
    title: a short title (LaTeX inline math allowed).
    statement: one or two sentences stating the result (LaTeX text).
    assumptions: the assumptions the result holds under (LaTeX text, one per item).
    expressions: ``key -> sympy expression`` (ordered), the derived results.
    symbols: ``name -> sympy symbol`` (ordered) used by the expressions; the order is
        the positional order of :meth:`numeric`'s arguments.
    source: the THEORY.md section and/or paper the derivation follows.
    lhs: ``key -> LaTeX left-hand side`` of each expression (default: the key).
    descriptions: ``key -> one-line meaning`` of each expression (LaTeX text).
    where: ``symbol name -> meaning`` (LaTeX text), printed as a "where" clause.
    checks: the symbolic verifications run while deriving (plain sentences).
    notes: remarks (LaTeX text): limits, caveats, what a measurement should show.
    latex_names: ``symbol name -> LaTeX`` for symbols whose default rendering is poor
        (e.g. ``lr`` as ``\\mathrm{lr}``).
    implemented_by: dotted names of the library code that computes this result on real
        models (``"noiseprop.theory.linearize.tap_covariance"``); a derivation whose
        numbers are used only through :meth:`numeric` names its own function.
    tested_by: ``"tests/<path>.py::<test>"`` of the tests that check it against
        Monte-Carlo or an exact reference. Both are resolved by ``tests/test_doc_links.py``.
    """

    name: str
    topic: str
    title: str
    statement: str
    assumptions: tuple = ()
    expressions: Mapping[str, sp.Basic] = field(default_factory=dict)
    symbols: Mapping[str, sp.Basic] = field(default_factory=dict)
    source: str = ""
    lhs: Mapping[str, str] = field(default_factory=dict)
    descriptions: Mapping[str, str] = field(default_factory=dict)
    where: Mapping[str, str] = field(default_factory=dict)
    checks: tuple = ()
    notes: tuple = ()
    latex_names: Mapping[str, str] = field(default_factory=dict)
    implemented_by: tuple = ()
    tested_by: tuple = ()

    def __post_init__(self):
        if not re.fullmatch(r"[a-z_]+\.[a-z0-9_]+", self.name or ""):
            raise ValueError(f"derivation name must look like 'topic.short_name', got {self.name!r}")
        if not self.name.startswith(self.topic + "."):
            raise ValueError(f"derivation {self.name!r} does not belong to topic {self.topic!r}")
        for f in ("assumptions", "checks", "notes", "implemented_by", "tested_by"):
            v = getattr(self, f)
            if isinstance(v, str):
                v = (v,)
            object.__setattr__(self, f, tuple(v))
        exprs = {k: sp.sympify(v) for k, v in dict(self.expressions).items()}
        if not exprs:
            raise ValueError(f"derivation {self.name!r} has no expressions")
        for k in exprs:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", k):
                raise ValueError(f"expression key {k!r} of {self.name!r} is not an identifier")
        object.__setattr__(self, "expressions", _frozen_map(exprs))
        object.__setattr__(self, "symbols", _frozen_map(self.symbols))
        for k, v in self.symbols.items():
            if not k.isidentifier() or keyword.iskeyword(k) or str(v) != k:
                raise ValueError(
                    f"symbol {k!r} of {self.name!r}: names must be Python identifiers (not keywords) equal to the "
                    f"symbol's own name, got {v!s}"
                )
        for f in ("lhs", "descriptions", "where", "latex_names"):
            m = dict(getattr(self, f))
            unknown = set(m) - (set(exprs) if f in ("lhs", "descriptions") else set(self.symbols))
            if unknown:
                raise ValueError(f"{f} of {self.name!r} names unknown entries {sorted(unknown)}")
            object.__setattr__(self, f, _frozen_map(m))
        used = set()
        for e in exprs.values():
            used |= {str(s) for s in e.free_symbols if not isinstance(s, sp.Indexed)}
        missing = sorted(used - {str(s) for s in self.symbols.values()})
        if missing:
            raise ValueError(f"derivation {self.name!r} uses symbols not listed in `symbols`: {missing}")

    # ------------------------------------------------------------------ access
    def __getitem__(self, key: str) -> sp.Basic:
        try:
            return self.expressions[key]
        except KeyError:
            raise KeyError(
                f"derivation {self.name!r} has no expression {key!r}; it has {', '.join(self.expressions)}"
            ) from None

    def numeric(self, name: str) -> NumericFunction:
        """A numpy function of the expression ``name`` (``sympy.lambdify`` for scalar
        expressions; a tree evaluator for matrix expressions, sums and integrals).
        Arguments: the expression's symbols, in the order of :attr:`symbols`
        (``f.args`` lists them); call positionally or by keyword."""
        expr = self[name]
        return make_numeric(
            expr,
            list(self.symbols.values()),
            name=f"{self.name}:{name}",
            doc=f"{self.name}:{name} = {sp.sstr(expr)}\n{plain_text(self.descriptions.get(name, ''))}",
        )

    # ------------------------------------------------------------------ output
    def _latex_expr(self, expr) -> str:
        names = {self.symbols[k]: v for k, v in self.latex_names.items()}
        return latex_expr(expr, names)

    def latex(self) -> str:
        """LaTeX for direct inclusion in a paper (needs ``amsmath``): a paragraph with
        the statement, the assumptions as a list, the results in an ``align``
        environment (labels ``eq:<name>:<key>``), a "where" clause and the source."""
        lines = [f"% noiseprop derivation {self.name} (noiseprop derive {self.topic} --latex)"]
        lines.append(rf"\paragraph{{{self.title}.}}")
        lines.append(self.statement)
        if self.assumptions:
            lines.append(r"\emph{Assumptions.}")
            lines.append(r"\begin{enumerate}")
            lines += [rf"  \item {a}" for a in self.assumptions]
            lines.append(r"\end{enumerate}")
        lines.append(r"\begin{align}")
        keys = list(self.expressions)
        for i, k in enumerate(keys):
            lhs = self.lhs.get(k) or r"\mathrm{%s}" % k.replace("_", r"\_")
            end = r" \\" if i < len(keys) - 1 else ""
            lines.append(f"  {lhs} &= {self._latex_expr(self.expressions[k])} \\label{{eq:{self.name}:{k}}}{end}")
        lines.append(r"\end{align}")
        described = [(n, d) for n, d in self.where.items() if n in self.symbols]
        if described:
            parts = [f"${self._latex_expr(self.symbols[n])}$ {d}" for n, d in described]
            lines.append("where " + "; ".join(parts) + ".")
        if self.descriptions:
            lines.append(r"\begin{itemize}")
            for k in keys:
                if k in self.descriptions:
                    lines.append(rf"  \item (\ref{{eq:{self.name}:{k}}}) {self.descriptions[k]}")
            lines.append(r"\end{itemize}")
        for n in self.notes:
            lines.append(rf"\emph{{Remark.}} {n}")
        if self.source:
            lines.append(rf"\emph{{Source:}} {self.source}")
        text = "\n".join(lines) + "\n"
        return ascii_text(text)

    def summary(self) -> str:
        """Plain-text summary: title, statement, assumptions, results, checks, source."""
        out = [f"{self.name}: {plain_text(self.title)}", "  " + plain_text(self.statement)]
        if self.assumptions:
            out.append("  Assumptions:")
            out += [f"    - {plain_text(a)}" for a in self.assumptions]
        out.append("  Results:")
        for k, e in self.expressions.items():
            lhs = plain_text("$" + self.lhs[k] + "$") if k in self.lhs else k
            out.append(f"    [{k}] {lhs} = {_one_line(e)}")
            if k in self.descriptions:
                out.append(f"        {plain_text(self.descriptions[k])}")
        if self.where:
            out.append("  Symbols: " + "; ".join(f"{n}: {plain_text(d)}" for n, d in self.where.items()))
        if self.checks:
            out.append("  Checked symbolically: " + "; ".join(self.checks))
        for n in self.notes:
            out.append("  Note: " + plain_text(n))
        if self.source:
            out.append("  Source: " + plain_text(self.source))
        if self.implemented_by:
            out.append("  Implemented by: " + ", ".join(self.implemented_by))
        if self.tested_by:
            out.append("  Tested by: " + ", ".join(self.tested_by))
        return "\n".join(out)

    def to_frame(self):
        """One row per expression: key, lhs (LaTeX), expression (text), latex, meaning."""
        rows = [
            {
                "derivation": self.name,
                "key": k,
                "lhs": self.lhs.get(k, k),
                "expression": text_expr(e),
                "latex": self._latex_expr(e),
                "description": plain_text(self.descriptions.get(k, "")),
            }
            for k, e in self.expressions.items()
        ]
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"Derivation({self.name!r}, expressions=[{', '.join(self.expressions)}])"


class _Latex(LatexPrinter):
    """sympy's LaTeX printer with paper notation: diag(v), dg(M), I, X^T as X^\\top."""

    def _print_DiagMatrix(self, expr):
        return r"\operatorname{diag}\left(%s\right)" % self._print(expr.args[0])

    def _print_DiagonalOf(self, expr):
        return r"\operatorname{dg}\left(%s\right)" % self._print(expr.args[0])

    def _print_Identity(self, expr):
        return "I"

    def _print_OneMatrix(self, expr):
        return r"\mathbb{1}"

    def _print_Indexed(self, expr):
        # convention: an IndexedBase named "x_l" is the sequence x_1, x_2, ...: print x_{index}
        label = str(expr.base.label)
        base = label[:-2] if label.endswith("_l") else label
        idx = ",".join(self._print(i) for i in expr.indices)
        return "%s_{%s}" % (self._print(sp.Symbol(base)), idx)

    def _print_Transpose(self, expr):
        arg = expr.arg
        s = self._print(arg)
        if not isinstance(arg, sp.MatrixSymbol):
            s = r"\left(%s\right)" % s
        return s + r"^{\top}"


class _Str(StrPrinter):
    """One-line text with paper notation: diag, dg, tr, x^T, x∘2, |x|^2."""

    def _print_DiagMatrix(self, expr):
        return "diag(%s)" % self._print(expr.args[0])

    def _print_DiagonalOf(self, expr):
        return "dg(%s)" % self._print(expr.args[0])

    def _print_Trace(self, expr):
        return "tr(%s)" % self._print(expr.arg)

    def _print_Transpose(self, expr):
        arg = expr.arg
        s = self._print(arg)
        return (s if isinstance(arg, sp.MatrixSymbol) else "(%s)" % s) + "^T"

    def _print_HadamardPower(self, expr):
        return "%s^∘%s" % (self.parenthesize(expr.base, 1000), self._print(expr.exp))


def latex_expr(expr, symbol_names=None) -> str:
    """LaTeX of a derived expression in the paper's notation."""
    return _Latex({"mul_symbol": None, "symbol_names": dict(symbol_names or {})}).doprint(expr)


def text_expr(expr) -> str:
    """One-line text of a derived expression (``^`` for powers)."""
    return _Str().doprint(expr).replace("**", "^")


def _one_line(expr) -> str:
    return text_expr(expr)


_GREEK = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "varepsilon": "ε",
    "eta": "η", "theta": "θ", "kappa": "κ", "lambda": "λ", "mu": "μ", "nu": "ν", "pi": "π",
    "rho": "ρ", "sigma": "σ", "tau": "τ", "phi": "φ", "varphi": "φ", "chi": "χ", "psi": "ψ",
    "omega": "ω", "xi": "ξ", "zeta": "ζ", "Gamma": "Γ", "Delta": "Δ", "Sigma": "Σ", "Lambda": "Λ",
    "Phi": "Φ", "Omega": "Ω", "ell": "ℓ",
}
_SYMBOLS = {
    "lVert": "‖", "rVert": "‖", "Vert": "‖", "|": "‖", "langle": "⟨", "rangle": "⟩", "le": "≤", "leq": "≤",
    "ge": "≥", "geq": "≥", "ll": "≪", "gg": "≫", "approx": "≈", "sim": "∼", "to": "→", "infty": "∞",
    "cdot": "·", "circ": "∘", "odot": "⊙", "otimes": "⊗", "top": "ᵀ", "in": "∈", "neq": "≠", "ne": "≠",
    "sqrt": "√", "sum": "Σ", "prod": "Π", "partial": "∂", "nabla": "∇", "times": "×", "pm": "±",
    "propto": "∝", "mid": "|", "quad": "  ", "qquad": "    ", "ldots": "...", "dots": "...", "cdots": "...",
    "S": "§", "iff": "⇔", "Rightarrow": "⇒", "rightarrow": "→", "mapsto": "↦", "forall": "∀",
    "ln": "ln", "log": "log", "exp": "exp", "min": "min", "max": "max", "lim": "lim",
    "left": "", "right": "", "bigl": "", "bigr": "", "Bigl": "", "Bigr": "", ",": " ", ";": " ", "!": "",
}


def plain_text(text: str) -> str:
    """A readable plain-text (Unicode) rendering of LaTeX text with inline math."""
    if not text:
        return ""
    s = text.replace("$", "").replace(r"\_", "_").replace("\\ ", " ").replace(r"\%", "%").replace(r"\&", "&")
    s = s.replace("^\\top", "ᵀ").replace("^{\\top}", "ᵀ")
    wrappers = "|".join(sorted(_WRAPPERS))
    s = re.sub(r"\\(?:%s)\{([^{}]*)\}" % wrappers, r"{\1}", s)
    arg = r"\{((?:[^{}]|\{[^{}]*\})*)\}"
    for _ in range(3):
        s = re.sub(r"\\[dt]?frac" + arg + arg, r"(\1)/(\2)", s)
    s = re.sub(r"\\sqrt" + arg, r"√(\1)", s)
    s = re.sub(r"\\(?:label|eqref)\{[^{}]*\}", "", s)
    s = re.sub(r"\\ref\{([^{}]*)\}", r"\1", s)

    def repl(m):
        name = m.group(1)
        if name in _WRAPPERS:
            return ""
        if name in _GREEK:
            return _GREEK[name]
        if name in _SYMBOLS:
            return _SYMBOLS[name]
        return name

    s = s.replace("\\{", "\x01").replace("\\}", "\x02")
    s = re.sub(r"\\([A-Za-z]+|[|,;!])", repl, s)
    s = s.replace("^{2}", "²").replace("^2", "²").replace("^{T}", "ᵀ").replace("^T", "ᵀ")
    s = s.replace("{", "").replace("}", "").replace("~", " ").replace("\x01", "{").replace("\x02", "}")
    return re.sub(r"[ \t]+", " ", s).strip()


_WRAPPERS = {
    "mathbb", "mathrm", "mathcal", "mathbf", "operatorname", "text", "textrm", "emph", "textit", "texttt",
    "textbf", "big", "Big", "bigg", "Bigg", "displaystyle", "overline", "bar", "hat", "tilde", "boldsymbol",
}


_ASCII = {"§": r"\S{}", "–": "--", "—": "---", "’": "'", "‘": "`", "“": "``", "”": "''", "…": r"\ldots{}", "×": r"$\times$"}


def ascii_text(text: str) -> str:
    """Replace the few non-ASCII characters allowed in source strings by LaTeX."""
    for k, v in _ASCII.items():
        text = text.replace(k, v)
    return text
