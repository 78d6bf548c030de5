"""The examples in the docstrings run, and every public function has one.

Each module of ``noiseprop.theory`` and ``noiseprop.empirical`` is imported by its
installed name and its docstring examples are run with :mod:`doctest` (the same as
``python -m doctest``, under the names users import). Every function and class exported
by the two packages' ``__all__`` must carry at least one example.
"""
from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import warnings

import pytest

import noiseprop.empirical
import noiseprop.theory

PACKAGES = (noiseprop.theory, noiseprop.empirical)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules():
    names = []
    for pkg in PACKAGES:
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            names.append(info.name)
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_module_doctests_pass(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    tests = [t for t in finder.find(module, name) if t.examples]
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in tests:
            runner.run(t, out=out.append)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, "".join(out)


def _public_callables():
    seen = {}
    for pkg in PACKAGES:
        for name in getattr(pkg, "__all__", ()):
            obj = getattr(pkg, name)
            if name in RECORDS:
                continue
            if inspect.isfunction(obj) or (inspect.isclass(obj) and obj.__module__.startswith("noiseprop")):
                seen[f"{pkg.__name__}.{name}"] = obj
    return seen


#: result records and base classes: their examples live in the functions that return them
RECORDS = {"Prediction", "PredictionCurve", "MCResult", "SweepResult", "Comparison", "CellComparison", "Dataset",
           "TrainResult", "WeightNoise", "Derivation", "HardwareNoise", "DriftPrediction", "Sensitivity",
           "NoiseBudget", "KeepDigital"}


@pytest.mark.parametrize("qualname", sorted(_public_callables()))
def test_public_api_has_an_example(qualname):
    obj = _public_callables()[qualname]
    assert ">>>" in (obj.__doc__ or ""), f"{qualname} has no docstring example"
