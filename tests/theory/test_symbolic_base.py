"""The Derivation object, the moment-expansion engine, numeric evaluation and the
Monte-Carlo helpers of noiseprop.theory.symbolic."""
import ast
import dataclasses
import pathlib

import numpy as np
import pytest
import sympy as sp

from noiseprop.theory.symbolic import DERIVATION_NAMES, DERIVATIONS, TOPICS, Derivation, derive, get_derivation
from noiseprop.theory.symbolic.base import plain_text
from noiseprop.theory.symbolic.checking import covariance_se, mean_se, ratio_se, variance_se, z_score
from noiseprop.theory.symbolic.functions import (
    SqNorm,
    Std,
    assert_zero,
    gaussian_covariance,
    gaussian_expectation,
    rademacher_expectation,
)


def _toy():
    x, s = sp.symbols("x s", positive=True)
    n = sp.Symbol("n", integer=True, positive=True)
    W = sp.MatrixSymbol("W", 2, n)
    v = sp.MatrixSymbol("v", n, 1)
    return Derivation(
        name="linear.toy",
        topic="linear",
        title="A toy",
        statement=r"States $y=x^2$.",
        assumptions=[r"$x>0$."],
        expressions={"square": x**2 * s, "norm": s**2 * SqNorm(W * v), "spread": Std(W) ** 2},
        symbols={"x": x, "s": s, "W": W, "v": v, "n": n},
        lhs={"square": r"y"},
        descriptions={"square": "the square."},
        where={"x": "is the input"},
        checks=["nothing"],
        source=r"docs/THEORY.md \S 2",
    )


def test_derivation_is_frozen_and_read_only():
    d = _toy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.name = "other"
    with pytest.raises(TypeError):
        d.expressions["square"] = sp.Integer(1)
    assert isinstance(d.assumptions, tuple) and d.assumptions == ("$x>0$.",)
    with pytest.raises(KeyError, match="has no expression 'cube'; it has square, norm, spread"):
        d["cube"]


def test_derivation_validates_its_fields():
    x = sp.Symbol("x")
    with pytest.raises(ValueError, match="topic.short_name"):
        Derivation(name="toy", topic="linear", title="t", statement="s", expressions={"a": x}, symbols={"x": x})
    with pytest.raises(ValueError, match="not listed in `symbols`"):
        Derivation(name="linear.t", topic="linear", title="t", statement="s", expressions={"a": x}, symbols={})
    with pytest.raises(ValueError, match="does not belong to topic"):
        Derivation(name="conv.t", topic="linear", title="t", statement="s", expressions={"a": x}, symbols={"x": x})
    lam = sp.Symbol("lambda")
    with pytest.raises(ValueError, match="Python identifiers"):
        Derivation(name="linear.t", topic="linear", title="t", statement="s", expressions={"a": lam}, symbols={"lambda": lam})
    with pytest.raises(ValueError, match="unknown entries"):
        Derivation(name="linear.t", topic="linear", title="t", statement="s", expressions={"a": x}, symbols={"x": x}, lhs={"b": "B"})


def test_numeric_scalar_and_matrix_expressions():
    d = _toy()
    f = d.numeric("square")
    assert f.args == ("x", "s")
    np.testing.assert_allclose(f(np.array([1.0, 2.0]), 3.0), [3.0, 12.0])
    assert f(s=2.0, x=3.0) == pytest.approx(18.0)
    with pytest.raises(TypeError, match="missing a required argument: 's'"):
        f(1.0)
    g = d.numeric("norm")
    assert g.args == ("s", "W", "v")  # the dimension n is bound from the shapes
    W = np.arange(6.0).reshape(2, 3)
    v = np.array([1.0, -1.0, 2.0])
    assert g(s=2.0, W=W, v=v) == pytest.approx(4 * np.sum((W @ v) ** 2))
    with pytest.raises(ValueError, match="must have shape"):
        g(s=1.0, W=np.ones((3, 3)), v=np.ones(3))
    with pytest.raises(ValueError, match="inconsistent size n"):
        g(s=1.0, W=np.ones((2, 3)), v=np.ones(4))
    assert d.numeric("spread")(W=W) == pytest.approx(W.std() ** 2)


def test_latex_and_summary():
    d = _toy()
    tex = d.latex()
    assert tex.isascii()
    assert r"\begin{align}" in tex and r"\end{align}" in tex
    assert r"\label{eq:linear.toy:square}" in tex and r"y &= s x^{2}" in tex
    assert r"\item $x>0$." in tex and r"\S 2" in tex
    text = d.summary()
    assert text.startswith("linear.toy: A toy") and "[square] y = s*x^2" in text
    assert "Checked symbolically: nothing" in text
    frame = d.to_frame()
    assert list(frame["key"]) == ["square", "norm", "spread"]


def test_plain_text_rendering():
    assert plain_text(r"$W\in\mathbb{R}^{m\times n}$") == "W∈R^m× n"
    assert plain_text(r"$\frac{\mathbb{E}\lVert x\rVert^2}{2}$") == "(E‖ x‖²)/(2)"
    assert plain_text(r"$\mathbb{1}\{h>0\}$, $\sqrt{\pi/2}$") == "1{h>0}, √(π/2)"


def test_moment_engine():
    z, w, v = sp.symbols("z w v", real=True)
    a = sp.Symbol("a")
    assert gaussian_expectation(z**4 + a * z**3 + z**2 * w**2, [z, w]) == 4
    assert gaussian_expectation(z**6, [z]) == 15
    assert gaussian_covariance(a * z + w, z, [z, w]) == a
    assert rademacher_expectation(v**4 + v**3 + a * v**2, [v]) == 1 + a
    with pytest.raises(ValueError, match="polynomial"):
        gaussian_expectation(1 / z, [z])
    assert assert_zero((z + 1) ** 2 - z**2 - 2 * z - 1, "ok") == "ok"
    with pytest.raises(AssertionError, match="symbolic check failed: wrong"):
        assert_zero(z, "wrong")


def test_monte_carlo_helpers_against_known_distributions():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(40000, 3))
    m, se = mean_se(x)
    assert np.all(np.abs(m - 2.0) < 4 * se) and np.allclose(se, 3 / 200, rtol=0.05)
    v, vse = variance_se(x)
    assert np.all(np.abs(v - 9.0) < 4 * vse)
    np.testing.assert_allclose(vse, 9.0 * np.sqrt(2 / 39999), rtol=0.05)  # normal data: Var(s²) = 2σ⁴/(n−1)
    y = x[:, 0] + rng.normal(size=40000)
    c, cse = covariance_se(x[:, 0], y)
    assert abs(c - 9.0) < 4 * cse
    r, rse = ratio_se(x[:, 0] * 3.0 + rng.normal(size=40000), x[:, 0])
    assert abs(r - 3.0) < 4 * rse
    assert z_score(1.0, 0.5, 0.25) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_se([1.0])


def test_registry_and_topics():
    assert TOPICS == ("linear", "conv", "batchnorm", "depth", "flatness", "learning_rate", "hardware")
    assert set(DERIVATIONS) == set(TOPICS)
    assert len(DERIVATION_NAMES) == sum(len(v) for v in DERIVATIONS.values())
    with pytest.raises(ValueError, match="accepted: linear, conv, batchnorm, depth, flatness, learning_rate"):
        derive("optics")
    with pytest.raises(ValueError, match="unknown derivation 'linear.nothing'"):
        get_derivation("linear.nothing")
    d = get_derivation("linear.width")
    assert d is derive("linear")[2]  # cached: one object per process


def test_theory_symbolic_does_not_import_empirical():
    """No module of theory/symbolic imports empirical (statically, every import statement)."""
    import noiseprop.theory.symbolic as pkg

    folder = pathlib.Path(pkg.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                assert "empirical" not in name, f"{path.name} imports {name}"
