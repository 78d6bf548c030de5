"""The analytical notebooks run top to bottom (reduced size) and are committed without outputs."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_linear_and_conv", "02_depth", "03_batchnorm", "04_flatness_and_learning_rate", "05_your_own_model",
         "06_studies", "07_drift"]


def test_all_notebooks_present_and_generated():
    assert sorted(p.stem for p in NB_DIR.glob("*.ipynb")) == sorted(NAMES)
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("make_notebooks", NB_DIR / "make_notebooks.py")
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in NAMES:  # the committed notebooks are exactly what the generator writes
        built = mod.build(name, mod.NB[name])
        on_disk = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        assert [c.source for c in on_disk.cells] == [c.source for c in built.cells], name


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, name
    for c in code:
        assert c.outputs == [] and c.execution_count is None, f"{name}: cell {c.get('id')} has outputs"
    assert any("NOISEPROP_FULL" in c.source for c in code[:2]), f"{name}: no size parameter cell near the top"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    monkeypatch.setenv("NOISEPROP_NB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if os.environ.get("NOISEPROP_FULL") != "1":
        monkeypatch.delenv("NOISEPROP_FULL", raising=False)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
