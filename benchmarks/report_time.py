"""Wall time of the main job: ``noiseprop report --quick`` (budget 90 s) and the default
``noiseprop report`` (budget 10 min), each from an empty cache, on this machine.

    .venv/bin/python benchmarks/report_time.py [--skip-default] [--skip-quick] [--keep DIR]

One JSON line per run: mode, seconds, budget, within_budget, cells computed, the
machine's load average at the start (a loaded machine inflates the figure), and, from
the report, the verdict counts, the lowest clean accuracy of a compared model and the
share of cells where the predicted accuracy agrees with Monte-Carlo (inside its 95%
interval or within 1 point). ``--keep DIR``: run in ``DIR`` (must not exist) and keep the
report and cache there, instead of a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _facts(report: Path) -> dict:
    import pandas as pd

    out = {}
    f = pd.read_csv(report / "csv" / "findings.csv")
    out["verdicts"] = {k: int(v) for k, v in f["verdict"].value_counts().items()}
    v = pd.read_csv(report / "csv" / "validation.csv")
    acc = v[v["quantity"] == "accuracy"]
    if len(acc):
        out["theory_cells"] = int(acc["cells"].iloc[0])
        out["theory_agreement"] = round(float(acc["agreement"].iloc[0]), 3)
        out["theory_inside_ci"] = round(float(acc["ci_contains_prediction"].iloc[0]), 3)
    t = report / "csv" / "training.csv"
    if t.exists():
        tr = pd.read_csv(t)
        out["models_trained"] = int(tr["trained"].sum())
        out["models_excluded"] = int(tr["excluded"].sum())
        out["lowest_clean_accuracy"] = round(float(tr["lowest clean accuracy"].min()), 4)
    return out


def run(mode: str, budget: float, root: Path) -> dict:
    cmd = [sys.executable, "-m", "noiseprop.empirical.cli", "report", "--out", str(root / "report"),
           "--cache-dir", str(root / "cache"), "--no-progress"] + (["--quick"] if mode == "quick" else [])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ))
    seconds = time.perf_counter() - t
    timings = json.loads((root / "report" / "timings.json").read_text())
    return {"benchmark": "report_time", "mode": mode, "seconds": round(seconds, 1), "budget_s": budget,
            "within_budget": seconds <= budget, "cells_computed": timings.get("cells_computed"),
            "cpus": os.cpu_count(), "load_at_start": round(load, 2), **_facts(root / "report")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-default", action="store_true", help="time only --quick")
    ap.add_argument("--skip-quick", action="store_true", help="time only the default report")
    ap.add_argument("--keep", default=None, help="run in this new folder and keep it (report/ and cache/)")
    args = ap.parse_args()
    for mode, budget, skip in (("quick", 90.0, args.skip_quick), ("default", 600.0, args.skip_default)):
        if skip:
            continue
        if args.keep:
            root = Path(args.keep) / mode
            if root.exists():
                raise SystemExit(f"--keep {args.keep}: {root} exists; the cache must start empty")
            root.mkdir(parents=True)
            print(json.dumps(run(mode, budget, root)), flush=True)
        else:
            with tempfile.TemporaryDirectory() as d:
                print(json.dumps(run(mode, budget, Path(d))), flush=True)


if __name__ == "__main__":
    main()
