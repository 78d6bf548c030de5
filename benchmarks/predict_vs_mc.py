"""Speed and memory of the analytic prediction against Monte-Carlo (issue 4).

1. ``curve``: wall time of a 10-level predicted accuracy curve (``predict_sweep``: one
   pass of derivatives, rescaled per level) against a Monte-Carlo curve with 100 draws
   per level (``sweep``, common random numbers) on the same trained model and test set
   (digits). Reported for the accuracy curve alone (``accuracy_draws=0, loss_probes=0``),
   with the default extras (chip-to-chip spread and Hutchinson loss), and for
   ``method="moments"``. One warm-up call of each first (import and first-call costs are
   reported separately). Target: ≥ 20× faster.
2. ``cv``: 95% CI half-width of mean accuracy and mean loss with and without the
   linearised-network control variate at equal draws (``monte_carlo(...,
   control_variate=True)``), and its time overhead.
3. ``memory``: peak resident memory of ``predict`` (linear) on a ResNet-20 (width 16,
   3×32×32 inputs, 10 classes) for several numbers of inputs, each in a fresh
   subprocess (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), beside the same process's
   peak before the call (model + inputs). Target: ≤ 2 GiB and independent of N beyond
   one chunk.

One JSON line per result. Figures are from a shared machine (other jobs running).

    .venv/bin/python benchmarks/predict_vs_mc.py [--parts curve,cv,memory]
        [--models mlp,vgg,resnet20] [--memory-n 64,1000,10000] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

LEVELS = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]
MODELS = {
    "mlp": {"name": "mlp", "norm": "none"},
    "vgg": {"name": "vgg", "norm": "bn"},
    "resnet20": {"name": "resnet20", "norm": "bn"},
}


def emit(row):
    print(json.dumps(row), flush=True)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def curve(models):
    from noiseprop.empirical import sweep
    from noiseprop.empirical.data import load_dataset
    from noiseprop.empirical.train import train
    from noiseprop.theory import predict_sweep

    data = load_dataset("digits")
    x, y = data.x_test, data.y_test
    for name in models:
        model = train(MODELS[name], data, seed=0).model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, warm_p = _timed(lambda: predict_sweep(model, x[:8], y[:8], "relative", [0.1], accuracy_draws=2,
                                                     loss_probes=2))
            _, warm_m = _timed(lambda: predict_sweep(model, x[:8], y[:8], "relative", [0.1], method="moments",
                                                     accuracy_draws=0, loss_probes=0))
            _, warm_mc = _timed(lambda: sweep(model, x[:8], y[:8], "relative", [0.1], draws=2, progress=False))
            mc, t_mc = _timed(lambda: sweep(model, x, y, "relative", LEVELS, draws=100, seed=0, progress=False))
            acc_only, t_acc = _timed(lambda: predict_sweep(model, x, y, "relative", LEVELS, accuracy_draws=0,
                                                           loss_probes=0))
            full, t_full = _timed(lambda: predict_sweep(model, x, y, "relative", LEVELS))
            mom, t_mom = _timed(lambda: predict_sweep(model, x, y, "relative", LEVELS, method="moments",
                                                      accuracy_draws=0, loss_probes=0))
        mc_acc = mc.to_frame().accuracy.to_numpy()
        emit(dict(part="curve", model=name, n_inputs=int(x.shape[0]), levels=len(LEVELS), mc_draws_per_level=100,
                  seconds_mc=t_mc, seconds_linear_accuracy_curve=t_acc, seconds_linear_with_extras=t_full,
                  seconds_moments_curve=t_mom, speedup_linear=t_mc / t_acc, speedup_linear_with_extras=t_mc / t_full,
                  speedup_moments=t_mc / t_mom, target_speedup=20, met=bool(t_mc / t_acc >= 20),
                  warmup_seconds=dict(predict=warm_p, moments=warm_m, mc=warm_mc),
                  max_abs_error_linear=float(np.max(np.abs(acc_only.accuracy - mc_acc))),
                  max_abs_error_moments=float(np.max(np.abs(mom.accuracy - mc_acc))),
                  threads=torch.get_num_threads()))


def cv(models, draws=100):
    from noiseprop.empirical import monte_carlo
    from noiseprop.empirical.data import load_dataset
    from noiseprop.empirical.train import train

    data = load_dataset("digits")
    x, y = data.x_test, data.y_test
    for name in models:
        model = train(MODELS[name], data, seed=0).model.eval()
        for eta in (0.02, 0.1, 0.3):
            plain, t_plain = _timed(lambda: monte_carlo(model, x, y, f"relative:{eta}", draws=draws, seed=0,
                                                        progress=False))
            r, t_cv = _timed(lambda: monte_carlo(model, x, y, f"relative:{eta}", draws=draws, seed=0, progress=False,
                                                 control_variate=True))
            e = r.extras
            row = dict(part="cv", model=name, eta=eta, draws=draws, seconds_plain=t_plain, seconds_with_cv=t_cv)
            for q, est in (("accuracy", plain.accuracy_ci), ("loss", plain.loss_ci)):
                lo, hi = e[f"cv_{q}_ci"]
                row[f"{q}_plain"] = getattr(plain, q)
                row[f"{q}_cv"] = e[f"cv_{q}"]
                row[f"{q}_ci_halfwidth_plain"] = (est[1] - est[0]) / 2
                row[f"{q}_ci_halfwidth_cv"] = (hi - lo) / 2
                row[f"{q}_variance_reduction"] = e[f"cv_{q}_variance_reduction"]
            emit(row)


def _memory_child(n: int, chunk: int | None):
    """Run in a fresh process: peak RSS before and after predict(linear)."""
    from noiseprop.empirical.models import build_model
    from noiseprop.theory import predict

    torch.set_num_threads(int(os.environ.get("NP_THREADS", "1")))
    model = build_model("resnet20", (3, 32, 32), 10, norm="bn", width=16, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    with torch.no_grad():
        model(x[:2])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = predict(model, x, y, "relative:0.05", accuracy_draws=0, loss_probes=0, chunk_size=chunk)
    secs = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(n=n, maxrss_before_kib=before, maxrss_after_kib=after, seconds=secs,
                          chunk_size=p.diagnostics["chunk_size"], params=sum(q.numel() for q in model.parameters()))))


def memory(ns, chunk, threads):
    for n in ns:
        env = dict(os.environ, NP_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--memory-child", str(n)] + (["--chunk", str(chunk)] if chunk else [])
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            emit(dict(part="memory", n=n, error=res.stderr[-2000:]))
            continue
        d = json.loads(res.stdout.strip().splitlines()[-1])
        gib = d["maxrss_after_kib"] / 2**20
        emit(dict(part="memory", model="resnet20 (width 16, 3x32x32)", n_inputs=n, chunk_size=d["chunk_size"],
                  peak_rss_gib=gib, rss_before_predict_gib=d["maxrss_before_kib"] / 2**20,
                  predict_increment_gib=(d["maxrss_after_kib"] - d["maxrss_before_kib"]) / 2**20,
                  inputs_gib=n * 3 * 32 * 32 * 4 / 2**30, seconds_predict=d["seconds"],
                  seconds_total=time.perf_counter() - t, target_gib=2.0, met=bool(gib <= 2.0), threads=threads))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="curve,cv,memory")
    ap.add_argument("--models", default="mlp,vgg,resnet20")
    ap.add_argument("--memory-n", default="64,1000,10000")
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child is not None:
        _memory_child(args.memory_child, args.chunk)
        return 0
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    models = args.models.split(",")
    if "curve" in parts:
        curve(models)
    if "cv" in parts:
        cv(models)
    if "memory" in parts:
        memory([int(v) for v in args.memory_n.split(",")], args.chunk, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
