"""The main job: ``noiseprop report --quick`` writes the full report, and a run killed
midway, then rerun, recomputes nothing finished and writes the same files as an
uninterrupted run. Its time budget (90 s quick, 10 min default) is measured by
``benchmarks/report_time.py``, not asserted here: a timed test fails on a loaded machine."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from noiseprop.empirical.report import ReportConfig, make_report


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "timings.json"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    cfg = ReportConfig(out_dir=str(d / "report"), cache_dir=str(d / "cache"), quick=True, workers=2, progress=False)
    make_report(cfg)
    return d / "report"


def test_quick_report_is_complete(uninterrupted):
    out = uninterrupted
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for title in ("Study 1: architecture", "Study 2: BatchNorm", "Study 3: learning rate", "Study 4: L2 vs L1"):
        assert title in md and title in html
    findings = pd.read_csv(out / "csv" / "findings.csv")
    assert set(findings["study"]) == {"architecture", "batchnorm", "learning_rate", "norm_type"}
    assert set(findings["verdict"]) <= {"reproduced", "contradicted", "inconclusive"}
    assert set(findings["theory"]) <= {"predicted", "predicted the opposite", "not predicted", "no prediction"}
    assert findings[["effect", "p", "p_holm"]].notna().any(axis=1).all()
    # every figure is a PNG with the CSV of what it plots, and is linked from the report
    figs = sorted((out / "figures").glob("*.png"))
    assert len(figs) >= 10
    for f in figs:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "csv" / f"figure_{f.stem}.csv").exists()
        assert f"figures/{f.name}" in md
    # every table shown has its CSV
    assert (out / "figures" / "validation_accuracy.png").exists() and (out / "figures" / "validation_logit_var.png").exists()
    for name in ("architecture_summary", "batchnorm_mechanisms", "batchnorm_layers", "learning_rate_summary",
                 "learning_rate_sweet_spot", "norm_type_summary", "validation", "validation_by_eta",
                 "validation_by_model"):
        assert (out / "csv" / f"{name}.csv").exists(), name
    # the per-model agreement counts every accuracy cell of the report once
    by_model = pd.read_csv(out / "csv" / "validation_by_model.csv")
    summary = pd.read_csv(out / "csv" / "validation.csv").set_index("quantity")
    assert by_model["cells"].sum() == summary.loc["accuracy", "cells"]
    assert "csv/validation_by_model.csv" in md
    # the HTML shows links, not the Markdown link syntax (the per-model data line did);
    # every table sits in its own scrolling box
    assert "](" not in html and "<a href='csv/architecture_models.csv'>" in html
    assert "``" not in html and "<code>2/lr</code>" in html
    assert html.count("<table>") == html.count("<div class='tw'><table>")
    t = json.loads((out / "timings.json").read_text())
    assert t["cells_computed"] > 0 and t["cells_loaded"] == 0


def test_killed_then_resumed_report_is_identical(uninterrupted, tmp_path):
    ref = uninterrupted
    out, cache = tmp_path / "report", tmp_path / "cache"
    cells = cache / "cells"
    cmd = [sys.executable, "-m", "noiseprop.empirical.cli", "report", "--quick", "--out", str(out),
           "--cache-dir", str(cache), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(cells.glob("*/*.json"))) < 6 and proc.poll() is None:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-flight
        proc.wait()
    done_after_kill = len(list(cells.glob("*/*.json")))
    assert done_after_kill >= 6
    # a second interruption, by an injected exception after two more cells
    with pytest.raises(KeyboardInterrupt):
        make_report(ReportConfig(out_dir=str(out), cache_dir=str(cache), quick=True, workers=2, progress=False,
                                 stop_after=2))
    make_report(ReportConfig(out_dir=str(out), cache_dir=str(cache), quick=True, workers=2, progress=False))
    t = json.loads((out / "timings.json").read_text())
    assert t["cells_loaded"] >= done_after_kill + 2  # nothing finished was recomputed
    total = json.loads((ref / "timings.json").read_text())["cells_computed"]
    assert t["cells_loaded"] + t["cells_computed"] == total
    a, b = _files(ref), _files(out)
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k] != b[k]]
    assert not different, different
