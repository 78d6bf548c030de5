"""Accuracy against time since programming under PCM drift (issue 12): the prediction
(``predict_drift``) against Monte-Carlo (``drift_sweep``, common random numbers across
times), with and without global drift compensation, on networks trained on digits.

One JSON line per (model, scales, compensation, time): predicted and simulated accuracy,
the Monte-Carlo 95% CI, whether the prediction is within 1 point or inside the CI, and the
first order's validity diagnostic there (``preact_frac``, ``warned``);
then one line per curve with the wall times and the speed-up against Monte-Carlo at 100
draws per time (Monte-Carlo time is linear in the draws: measured at ``--draws`` and
scaled to 100 when fewer). Both sides are timed in the same run, after one warm-up call
of each on 8 inputs (the process's first call of either pays one-time costs, such as
the model's first convolutions, that the other side would then skip; the warm-up also
fills the per-model caches, the trace and the diagnostic's directions, so these are a
warmed model's figures, and a user's first call on a model pays those once), alternating
``--reps`` times: ``predict_s``/``mc_s`` are the fastest of the repetitions and
``speedup_vs_mc100`` their ratio, ``*_median`` the medians; ``predict_first_s`` is the
first timed prediction. Last, one
``diagnostic`` line: over every first-order point, the misses, how many of them the
validity warning flagged, and its false alarms (warned where the first order was right).

    .venv/bin/python benchmarks/drift.py [--models mlp,vgg,resnet20] [--scales 1,2]
        [--draws 50] [--times 1,3600,86400,2.6e6,3.15e7,3.15e8] [--linearize-at earliest|mean|programmed]
        [--methods linear,moments] [--compensation both|on|off] [--classes 3] [--reps 3]

``--classes K`` adds ``predict_drift(classes=K)`` (method ``linear_classesK``): its curve
lines also give its difference from the every-class prediction (``minus_full``) and the
truncation error it measured on its check inputs. Every prediction is timed cold (the
process-wide PCM device tables cleared first); the accuracy lines are from the first
repetition (the others give the same prediction; Monte-Carlo reruns with its seed).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

import torch

MODELS = {"mlp": "mlp", "vgg": {"name": "vgg", "norm": "bn"}, "resnet20": {"name": "resnet20", "norm": "bn"}}


def emit(row):
    print(json.dumps(row), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mlp,vgg,resnet20")
    ap.add_argument("--scales", default="1,2")
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--times", default="1,3600,86400,2.6e6,3.15e7,3.15e8")
    ap.add_argument("--linearize-at", default="earliest")
    ap.add_argument("--methods", default="linear", help="prediction methods, e.g. linear,moments")
    ap.add_argument("--compensation", default="both", choices=("both", "on", "off"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each side, alternating")
    ap.add_argument("--classes", default="", help="also predict with classes=K (comma-separated K), timed alike")
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error("--reps must be >= 1")
    torch.set_num_threads(a.threads)
    a.classes = [int(k) for k in a.classes.split(",") if k]
    warnings.simplefilter("ignore")
    from noiseprop.empirical import drift_sweep, load_dataset, train
    from noiseprop.theory import PCMLike, predict_drift
    from noiseprop.theory import hardware as hw

    times = [float(t) for t in a.times.split(",")]
    calib = []  # (within, warned, ...) of every first-order point: the validity diagnostic's calibration
    data = load_dataset("digits")
    x, y = data.x_test, data.y_test
    for name in a.models.split(","):
        model = train(MODELS[name], data, seed=0).model
        for scale in [float(s) for s in a.scales.split(",")]:
            for comp in {"both": (True, False), "on": (True,), "off": (False,)}[a.compensation]:
                noise = PCMLike(compensation=comp, prog_noise_scale=scale, drift_scale=scale, read_noise_scale=scale)
                preds, tps = {}, {}
                runs = [(m, m, None) for m in a.methods.split(",")]
                runs += [(f"linear_classes{k}", "linear", k) for k in a.classes]

                def run_pred(method, k, xs, ys):
                    return predict_drift(model, xs, ys, noise, times, method=method, linearize_at=a.linearize_at,
                                         accuracy_draws=0, classes=k)

                for label, method, k in runs:  # warm-up (one-time costs of the process), not timed
                    run_pred(method, k, x[:8], y[:8])
                drift_sweep(model, x[:8], y[:8], noise, times, draws=2, seed=0, progress=False)
                tms = []
                for rep in range(a.reps):
                    for label, method, k in runs:
                        hw._TABLES.clear()  # every prediction timed cold: its device tables computed in its own time
                        t0 = time.perf_counter()
                        pred = run_pred(method, k, x, y)
                        tps.setdefault(label, []).append(time.perf_counter() - t0)
                        preds.setdefault(label, pred)
                    t0 = time.perf_counter()
                    res = drift_sweep(model, x, y, noise, times, draws=a.draws, seed=0, progress=False)
                    tms.append(time.perf_counter() - t0)
                    if rep == 0:
                        mc = res
                tm, tm_med = min(tms), float(np.median(tms))
                df = mc.to_frame()
                for method, pred in preds.items():
                    ok_all = True
                    for i, t in enumerate(times):
                        p, m = float(pred.accuracy[i]), float(df.accuracy[i])
                        lo, hi = float(df.accuracy_ci_low[i]), float(df.accuracy_ci_high[i])
                        ok = abs(p - m) <= 0.01 or lo <= p <= hi
                        ok_all &= ok
                        frac = None if np.isnan(pred.preact_frac[i]) else float(pred.preact_frac[i])
                        warned = bool(pred.outside_range[i])
                        row = dict(part="curve", model=name, scale=scale, compensation=comp, method=method, time_s=t,
                                   predicted=round(p, 4), mc=round(m, 4), mc_ci=[round(lo, 4), round(hi, 4)],
                                   diff=round(p - m, 4), within=ok,
                                   preact_frac=None if frac is None else round(float(frac), 3), warned=warned)
                        if method.startswith("linear_classes"):
                            err = float(pred.truncation_error[i])  # NaN: every class was a competitor
                            row.update(minus_full=round(p - float(preds["linear"].accuracy[i]), 5)
                                       if "linear" in preds else None,
                                       truncation_error_measured=round(0.0 if np.isnan(err) else err, 5))
                        emit(row)
                        if method == "linear":
                            calib.append((ok, warned, name, scale, comp, t, frac))
                    tp, tp_med = min(tps[method]), float(np.median(tps[method]))
                    emit(dict(part="speed", model=name, scale=scale, compensation=comp, method=method,
                              linearize_at=a.linearize_at, clean=round(mc.clean_accuracy, 4), reps=a.reps,
                              predict_s=round(tp, 3), predict_s_median=round(tp_med, 3),
                              predict_first_s=round(tps[method][0], 3), mc_s=round(tm, 2),
                              mc_s_median=round(tm_med, 2), draws=a.draws, mc_s_100_draws=round(tm * 100 / a.draws, 2),
                              speedup_vs_mc100=round(tm * 100 / a.draws / tp, 2),
                              speedup_vs_mc100_median=round(tm_med * 100 / a.draws / tp_med, 2), all_within=ok_all))
    if calib:
        miss = [c for c in calib if not c[0]]
        emit(dict(part="diagnostic", points=len(calib), misses=len(miss), misses_warned=sum(c[1] for c in miss),
                  false_alarms=sum(c[1] for c in calib if c[0]),
                  unflagged_misses=[dict(model=c[2], scale=c[3], compensation=c[4], time_s=c[5],
                                         preact_frac=None if c[6] is None else round(float(c[6]), 3))
                                    for c in miss if not c[1]],
                  false_alarm_points=[dict(model=c[2], scale=c[3], compensation=c[4], time_s=c[5],
                                           preact_frac=None if c[6] is None else round(float(c[6]), 3))
                                      for c in calib if c[0] and c[1]]))

if __name__ == "__main__":
    main()
