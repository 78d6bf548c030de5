"""Wall time of the main job: ``noiseprop report --quick`` (budget 90 s) and the default
``noiseprop report`` (budget 10 min), each from an empty cache, on this machine.

    .venv/bin/python benchmarks/report_time.py [--skip-default]

One JSON line per run: mode, seconds, budget, within_budget, cells computed.
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


def run(mode: str, budget: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "noiseprop.empirical.cli", "report", "--out", str(Path(d) / "report"),
               "--cache-dir", str(Path(d) / "cache"), "--no-progress"] + (["--quick"] if mode == "quick" else [])
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ))
        seconds = time.perf_counter() - t
        timings = json.loads((Path(d) / "report" / "timings.json").read_text())
    return {"benchmark": "report_time", "mode": mode, "seconds": round(seconds, 1), "budget_s": budget,
            "within_budget": seconds <= budget, "cells_computed": timings.get("cells_computed"),
            "cpus": os.cpu_count()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-default", action="store_true", help="time only --quick")
    args = ap.parse_args()
    print(json.dumps(run("quick", 90.0)), flush=True)
    if not args.skip_default:
        print(json.dumps(run("default", 600.0)), flush=True)


if __name__ == "__main__":
    main()
