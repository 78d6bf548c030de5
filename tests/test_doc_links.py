"""The links between formulas, code, derivations and tests cannot rot.

- every ``docs/THEORY.md §N`` cited anywhere in the repository names a section that
  exists, and nothing cites the theory notes by a path outside the repository;
- every ``path::symbol`` named on a **Code** or **Tests** line of docs/THEORY.md is a
  file of the repository that defines that symbol;
- every symbolic derivation's ``implemented_by`` resolves to importable code whose
  docstring names the derivation back, and its ``tested_by`` to an existing test.
"""
from __future__ import annotations

import importlib
import inspect
import re
import subprocess
from pathlib import Path

import pytest

from noiseprop.theory.symbolic import derive

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "THEORY.md"
CITE = re.compile(r"(\S*)THEORY\.md\s*(?:§|\\S\s*)(\d+)")
TOKEN = re.compile(r"`((?:theory|empirical|tests|benchmarks|notebooks|paper|scripts)/[\w/.-]+?\.py)(?:::([\w.]+))?`")


def _sections() -> set[int]:
    return {int(m.group(1)) for m in re.finditer(r"^## (\d+)\.", DOC.read_text(encoding="utf-8"), re.M)}


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in out:
        if rel.endswith((".py", ".md", ".tex", ".ipynb", ".toml", ".txt")) and (ROOT / rel).is_file():
            yield rel, (ROOT / rel).read_text(encoding="utf-8", errors="replace")


def _defines(path: Path, symbol: str) -> bool:
    text = path.read_text(encoding="utf-8")
    name = symbol.split(".")[-1]
    return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*[:=]", text, re.M) is not None


def test_every_theory_citation_names_an_existing_section():
    sections = _sections()
    assert sections, "docs/THEORY.md has no numbered sections"
    bad = []
    for rel, text in _tracked_text_files():
        for m in CITE.finditer(text):
            prefix, n = m.group(1), int(m.group(2))
            if not prefix.endswith("docs/") and rel != "docs/THEORY.md":
                bad.append(f"{rel}: cites {m.group(0)!r}, not docs/THEORY.md")
            elif n not in sections:
                bad.append(f"{rel}: cites §{n}, which docs/THEORY.md does not have")
    assert not bad, "\n".join(bad)


def test_code_and_test_links_of_the_theory_resolve():
    text = DOC.read_text(encoding="utf-8")
    tokens = TOKEN.findall(text)
    assert len(tokens) > 40
    bad = []
    for path, symbol in tokens:
        p = ROOT / path
        if not p.is_file():
            bad.append(f"{path}: no such file")
        elif symbol and not _defines(p, symbol):
            bad.append(f"{path}::{symbol}: not defined there")
    assert not bad, "\n".join(bad)


def test_every_section_names_its_code_and_its_tests():
    text = DOC.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    for part in parts:
        title = part.splitlines()[0]
        assert "**Code:**" in part, f"section {title!r} names no code"
        assert "**Tests:**" in part or title.startswith("9."), f"section {title!r} names no tests"


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("d", derive(), ids=lambda d: d.name)
def test_derivation_links_resolve_both_ways(d):
    assert d.implemented_by, f"{d.name} names no implementing code"
    assert d.tested_by, f"{d.name} names no test"
    for dotted in d.implemented_by:
        obj = _resolve(dotted)
        if callable(obj) and getattr(obj, "__module__", "").startswith("noiseprop.theory.symbolic"):
            continue  # the derivation itself is the implementation (used through .numeric())
        doc = inspect.getdoc(obj) or ""
        assert d.name in doc, f"{dotted} implements {d.name} but its docstring does not name it"
    for ref in d.tested_by:
        path, _, test = ref.partition("::")
        p = ROOT / path
        assert p.is_file(), f"{d.name}: test file {path} does not exist"
        assert re.search(rf"^def {re.escape(test)}\(", p.read_text(encoding="utf-8"), re.M), f"{d.name}: {ref} does not exist"
