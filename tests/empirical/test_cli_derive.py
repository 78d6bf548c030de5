"""`noiseprop derive [TOPIC] [--latex] [--list]` (empirical/cli_derive.py), and the
paper-ready LaTeX of every derivation."""
import re

import pytest

from noiseprop.empirical.cli import main
from noiseprop.theory.symbolic import DERIVATION_NAMES, TOPICS, derive


def _run(capsys, *argv):
    rc = main(["derive", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_derive_without_topic_prints_every_summary(capsys):
    rc, out, _ = _run(capsys)
    assert rc == 0
    for name in DERIVATION_NAMES:
        assert f"\n{name}: " in "\n" + out, name
    assert out.count("  Assumptions:") == len(DERIVATION_NAMES)


def test_derive_topic_latex(capsys):
    rc, out, _ = _run(capsys, "depth", "--latex")
    assert rc == 0
    assert out.startswith("% noiseprop derivations")
    assert out.count(r"\begin{align}") == 3
    assert r"\label{eq:depth.relu_critical:relative_error}" in out
    assert "conv." not in out


def test_derive_one_derivation_and_list(capsys):
    rc, out, _ = _run(capsys, "learning_rate.sweet_spot")
    assert rc == 0 and out.startswith("learning_rate.sweet_spot: ")
    rc, out, _ = _run(capsys, "conv", "--list")
    assert rc == 0
    assert out.splitlines() == [
        "conv.spatial_covariance: Spatial covariance of the output perturbation of a convolution",
        "conv.pooling: Average pooling of correlated convolution errors",
    ]


def test_unknown_topic_lists_the_accepted_ones(capsys):
    rc, out, err = _run(capsys, "optics")
    assert rc == 2 and out == ""
    assert "unknown derivation topic 'optics'" in err
    for t in TOPICS:
        assert t in err


def _balanced(tex):
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            return False
    return depth == 0


def test_every_derivation_is_complete_and_its_latex_well_formed():
    ds = derive()
    assert [d.name for d in ds] == list(DERIVATION_NAMES)
    for d in ds:
        tex = d.latex()
        assert tex.isascii(), d.name
        assert _balanced(tex), d.name
        envs = re.findall(r"\\(begin|end)\{(\w+)\}", tex)
        stack = []
        for kind, env in envs:
            if kind == "begin":
                stack.append(env)
            else:
                assert stack and stack.pop() == env, d.name
        assert not stack, d.name
        assert tex.count(r"\label{") == len(d.expressions)
        assert "$" not in re.sub(r"\$[^$]*\$", "", tex), d.name  # inline math delimiters pair up
        assert d.assumptions and d.checks and d.source, d.name
        assert d.topic in TOPICS
        for key in d.expressions:  # every closed form has a numeric function
            f = d.numeric(key)
            assert set(f.args) <= set(d.symbols), (d.name, key)


@pytest.mark.parametrize("topic", TOPICS)
def test_latex_per_topic_via_cli(capsys, topic):
    rc, out, _ = _run(capsys, topic, "--latex")
    assert rc == 0 and out.count(r"\paragraph{") == len(derive(topic))
