"""The paper includes only files that paper/generate.py produces, and the generator is deterministic."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "paper"


def _includes(tex: str) -> list[str]:
    tex = "\n".join(line.split("%", 1)[0] if not line.lstrip().startswith("\\%") else line for line in tex.splitlines())
    return re.findall(r"\\(?:input|includegraphics)(?:\[[^\]]*\])?\{([^}]+)\}", tex)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper")
    out = base / "report"
    subprocess.run([sys.executable, "-m", "noiseprop.empirical.cli", "report", "--quick", "--no-progress", "--out",
                    str(out), "--cache-dir", str(base / "cache")], check=True, cwd=base)
    return out


def test_includes_are_parsed():
    found = _includes(r"\input{a.tex} % \input{b.tex}" "\n" r"\includegraphics[width=1cm]{c.pdf}")
    assert found == ["a.tex", "c.pdf"]


@pytest.mark.slow
def test_every_include_is_generated_and_generator_is_deterministic(quick_report, tmp_path):
    sys.path.insert(0, str(PAPER))
    try:
        import generate
    finally:
        sys.path.remove(str(PAPER))
    a, b = tmp_path / "a" / "generated", tmp_path / "b" / "generated"
    generate.generate(quick_report, a)
    generate.generate(quick_report, b)
    assert _digest(a) == _digest(b), "generator output differs between two runs on the same report"
    includes = _includes((PAPER / "main.tex").read_text())
    assert len(includes) >= 20
    for inc in includes:
        assert inc.startswith("generated/"), f"main.tex includes {inc}, which the generator does not produce"
        assert (a / inc.split("/", 1)[1]).is_file(), f"generator did not produce {inc}"
    # generated fragments include nothing that is not generated either
    for frag in a.glob("*.tex"):
        for inc in _includes(frag.read_text()):
            assert (a / Path(inc).name).is_file(), f"{frag.name} includes {inc}"
    # equations are the symbolic module's own .latex()
    from noiseprop.theory.symbolic import derive

    eq = (a / "eq_depth.tex").read_text()
    assert all(d.latex() in eq for d in derive("depth"))
    # the disagreement section is computed from the report, not typed in
    dis = (a / "disagreement.tex").read_text()
    assert r"\begin{itemize}" in dis and re.search(r"\d", dis)
    assert all(ord(ch) < 128 for f in a.glob("*.tex") for ch in f.read_text())


def test_tex_escape():
    sys.path.insert(0, str(PAPER))
    try:
        import generate
    finally:
        sys.path.remove(str(PAPER))
    assert generate.tex("a_b & 50% η²") == r"a\_b \& 50\% $\eta$$^2$"
    # the report's minus signs and momentum β (they printed as "?" before)
    assert generate.tex("−0.83 (β = 0.9)") == r"$-$0.83 ($\beta$ = 0.9)"
    with pytest.raises(ValueError, match="U\\+263A"):
        generate.tex("☺")
    assert generate.num(float("nan")) == "n/a"


def test_disagreements_are_decided_verdicts_the_theory_did_not_match(tmp_path):
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("paper_generate", PAPER / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rows = [("a", "reproduced", "predicted"), ("b", "reproduced", "not predicted"),
            ("c", "contradicted", "predicted the opposite"), ("d", "contradicted", "predicted"),
            ("e", "inconclusive", "predicted"), ("f", "reproduced", "no prediction")]
    (tmp_path / "csv").mkdir()
    pd.DataFrame(rows, columns=["claim", "verdict", "theory"]).to_csv(tmp_path / "csv" / "architecture_findings.csv",
                                                                      index=False)
    items = [i for i in gen._finding_items(tmp_path) if "Disagreement" in i]
    assert [i.split("``")[1].split("''")[0] for i in items] == ["b", "d"]


def test_theory_lines_say_what_the_dashed_lines_are():
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("paper_generate", PAPER / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.theory_lines(pd.DataFrame({"theory_method": ["moments", "moments"]})).startswith(
        "moment propagation on every curve")
    assert "first order for the convolutional" in gen.theory_lines(pd.DataFrame({"theory_method": ["moments",
                                                                                                   "linear"]}))
    assert gen.theory_lines(pd.DataFrame({"theory_method": ["linear"]})).startswith("the first order")
    assert gen.theory_lines(pd.DataFrame()) == "none: the report holds no predictions"
