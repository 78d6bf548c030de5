"""Speed and memory of the analytic prediction against Monte-Carlo (issues 4 and 10).

1. ``cases`` (issue 10): per case (the zoo MLP, a VGG-style CNN with BatchNorm and a
   ResNet-20, trained on digits; a ResNet-20 at 3×32×32 with random inputs and weights),
   all timed in the same run, alternating the two sides of each ratio:
   the Jacobian pass alone (``jacobian_pass``, no draws) and a default ``predict``
   (target ≤ 1.5×), ``monte_carlo(draws=100)`` (target ≥ 5× slower than ``predict``),
   a 10-level ``predict_sweep`` against a 10-level ``sweep`` with 100 draws per level
   (≥ 20×) and ten separate ``predict`` calls at those levels (≥ 10×); the number of
   Monte-Carlo draws that reach the prediction's precision (first-order logit variance
   to 5%: ``1 + 2/0.05²`` draws; accuracy to the prediction's measured error against
   Monte-Carlo at η = 0.1) and the speed ratio at that equal precision;
   ``hessian_trace`` with 100 probes against curvlinops' ``hutchinson_trace`` on the
   same Hessian (when curvlinops is importable; the line says so when it is not); and
   ``predict(..., classes=3)`` (label and 3 closest competitors differentiated) with its
   measured truncation error and its Gauss-Newton loss increase against every class's.
2. ``curve``: the older issue-4 curve timing (accuracy curve alone, with the extras,
   and ``method="moments"``).
3. ``cv``: 95% CI half-width of mean accuracy and mean loss with and without the
   linearised-network control variate at equal draws.
4. ``calibrate``: the validity diagnostic (fraction of ReLU-like pre-activations whose
   first-order noise sd exceeds their magnitude) against Monte-Carlo along the accuracy
   curve of each digits model (120 inputs, 50 draws per level), and the warning
   threshold that flags every level where the linear accuracy misses (more than 1 point
   and outside the Monte-Carlo 95% interval) with the fewest false alarms.
5. ``qmc``: the expected accuracy at the default quasi-Monte-Carlo points per orthant
   probability (and at 128–1,024) against 8,192, on each digits model's curve and on
   synthetic logits with 10 and 100 classes.
6. ``chunks``: seconds of the Jacobian pass per chunk size, the default chunk size from
   what one input holds beside the older all-parameter budget.
7. ``memory``: peak resident memory and time of ``predict`` (linear) on a ResNet-20
   (width 16, 3×32×32 inputs, 10 classes) for several numbers of inputs, each in a
   fresh subprocess (``ru_maxrss``). Target: ≤ 2 GiB and independent of N beyond one
   chunk; seconds per 1,000 inputs.

One JSON line per result. Figures are from a shared machine (other jobs running): the
ratios, both sides timed in one run, are what count.

    .venv/bin/python benchmarks/predict_vs_mc.py [--parts cases,curve,cv,qmc,chunks,memory]
        [--models mlp,vgg,resnet20,resnet20_c32] [--c32-n 64] [--memory-n 64,1000,10000]
        [--threads 1] [--reps 1]
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
CASES = ("mlp", "vgg", "resnet20", "resnet20_c32")


def emit(row):
    print(json.dumps(row), flush=True)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _clear_predict_cache():
    """Empty ``predict``'s derivative cache (absent before issue 10), so that a timed
    call pays its own derivative pass."""
    from noiseprop.theory import predict as _p

    mod = sys.modules[_p.__module__]
    if hasattr(mod, "clear_cache"):
        mod.clear_cache()


def _case_model(name, c32_n):
    """``(model, x, y, description)`` for a case."""
    from noiseprop.empirical.data import load_dataset
    from noiseprop.empirical.models import build_model
    from noiseprop.empirical.train import train

    if name == "resnet20_c32":
        model = build_model("resnet20", (3, 32, 32), 10, norm="bn", width=16, seed=0).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(c32_n, 3, 32, 32, generator=g)
        with torch.no_grad():
            y = model(x).argmax(1)  # labels = clean prediction, so accuracy has something to lose
        flip = torch.rand(c32_n, generator=g) < 0.1
        y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
        return model, x, y, "resnet20 (width 16, BN, random weights) on random 3x32x32 inputs"
    data = load_dataset("digits")
    model = train(MODELS[name], data, seed=0).model.eval()
    return model, data.x_test, data.y_test, f"zoo {name} trained on digits (test set)"


def _alternate(fns, reps):
    """Time each callable ``reps`` times, alternating; returns (the outputs of each one's
    fastest call, min times): a share of a call's time read from its output (the
    diagnostic's seconds) is then a share of the call that was timed."""
    best = [math.inf] * len(fns)
    outs = [None] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            out, t = _timed(fn)
            if t < best[i]:
                outs[i], best[i] = out, t
    return outs, best


def _hessian_vs_curvlinops(model, x, y, probes=100):
    from noiseprop.theory import hessian_trace
    from noiseprop.theory.targets import resolve_targets

    row = {}
    try:
        import curvlinops  # noqa: F401
        from curvlinops import HessianLinearOperator, hutchinson_trace
    except Exception as e:  # noqa: BLE001
        curvlinops = None
        row["curvlinops"] = f"not importable ({type(e).__name__}: {e})"
    hessian_trace(model, x[:4], y[:4], probes=2)  # warm-up
    fns = [lambda: hessian_trace(model, x, y, probes=probes, seed=0)]
    if curvlinops is not None:
        plan = resolve_targets(model)
        net = plan.model.eval()
        named = dict(net.named_parameters())
        params = [named[n] for n in plan.names]

        def cl():
            H = HessianLinearOperator(net, torch.nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
            return float(hutchinson_trace(H, probes))

        fns.append(cl)
    outs, ts = _alternate(fns, 1)
    row.update(hessian_trace_probes=probes, hessian_trace_inputs=int(x.shape[0]), seconds_hessian_trace=ts[0],
               hessian_trace=outs[0].estimate, hessian_trace_se=outs[0].se)
    if curvlinops is not None:
        row.update(seconds_curvlinops_hutchinson=ts[1], curvlinops_trace=outs[1],
                   speedup_vs_curvlinops=ts[1] / ts[0], target_vs_curvlinops=1.0, met_vs_curvlinops=bool(ts[0] <= ts[1]))
    return row


def cases(models, c32_n, reps, hessian_n):
    from noiseprop.empirical import monte_carlo, sweep
    from noiseprop.theory import RelativeGaussian, predict, predict_sweep
    from noiseprop.theory.linearize import LinearizedNetwork, jacobian_pass

    eta = 0.1
    for name in models:
        model, x, y, desc = _case_model(name, c32_n)
        noise = RelativeGaussian(eta)

        def jpass():
            lin = LinearizedNetwork(model)
            return jacobian_pass(lin, x, lin.unit_scales(noise))

        def pred():
            _clear_predict_cache()
            return predict(model, x, y, noise)

        import inspect

        has_classes = "classes" in inspect.signature(predict).parameters

        def pred_top():
            _clear_predict_cache()
            return predict(model, x, y, noise, classes=3)

        def ten():
            _clear_predict_cache()
            return [predict(model, x, y, RelativeGaussian(lv)) for lv in LEVELS]

        def psweep():
            _clear_predict_cache()
            return predict_sweep(model, x, y, "relative", LEVELS)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # warm-up (first-call costs: tracing, imports)
            xw, yw = x[:4], y[:4]
            predict(model, xw, yw, noise)
            monte_carlo(model, xw, yw, noise, draws=2, progress=False)
            fns = [jpass, pred, lambda: monte_carlo(model, x, y, noise, draws=100, seed=0, progress=False)]
            outs, ts = _alternate(fns + ([pred_top] if has_classes else []), reps)
            (jp, p, mc), (t_jp, t_pred, t_mc) = outs[:3], ts[:3]
            (sw, curve_p, tenp), (t_sw, t_ps, t_ten) = _alternate(
                [lambda: sweep(model, x, y, "relative", LEVELS, draws=100, seed=0, progress=False), psweep, ten], reps)
            h = _hessian_vs_curvlinops(model, x[:hessian_n], y[:hessian_n])
        # equal precision
        d_var = 1 + 2 / 0.05 ** 2
        acc_sd = float(np.std(mc.accuracies, ddof=1))
        acc_err = abs(p.accuracy - mc.accuracy)
        mc_se = acc_sd / math.sqrt(100)
        d_acc = (acc_sd / max(acc_err, 1e-6)) ** 2
        row = dict(part="cases", case=name, model=desc, n_inputs=int(x.shape[0]), eta=eta,
                   params=sum(q.numel() for q in model.parameters()), threads=torch.get_num_threads(), reps=reps,
                   seconds_jacobian_pass=t_jp, seconds_predict=t_pred, predict_over_pass=t_pred / t_jp,
                   target_predict_over_pass=1.5, met_predict_over_pass=bool(t_pred / t_jp <= 1.5),
                   seconds_mc100=t_mc, speedup_vs_mc100=t_mc / t_pred, target_speedup_vs_mc100=5,
                   met_speedup_vs_mc100=bool(t_mc / t_pred >= 5),
                   levels=len(LEVELS), seconds_sweep_10x100=t_sw, seconds_predict_sweep=t_ps,
                   speedup_sweep=t_sw / t_ps, target_speedup_sweep=20, met_speedup_sweep=bool(t_sw / t_ps >= 20),
                   seconds_ten_predicts=t_ten, speedup_ten_predicts=t_sw / t_ten, target_speedup_ten_predicts=10,
                   met_speedup_ten_predicts=bool(t_sw / t_ten >= 10),
                   predicted_accuracy=p.accuracy, mc_accuracy=mc.accuracy, mc_accuracy_se=mc_se,
                   accuracy_error=acc_err, accuracy_error_resolved=bool(acc_err > 2 * mc_se),
                   equal_precision_draws_variance=d_var, speedup_equal_precision_variance=t_mc * d_var / 100 / t_pred,
                   equal_precision_draws_accuracy=d_acc, speedup_equal_precision_accuracy=t_mc * d_acc / 100 / t_pred,
                   curve_max_abs_error=float(np.max(np.abs(curve_p.accuracy - sw.to_frame().accuracy.to_numpy()))),
                   loss_increase=p.loss_increase, loss_increase_gn=p.loss_increase_gn,
                   loss_increase_method=getattr(p, "loss_increase_method", "hutchinson"),
                   mc_loss_increase=mc.loss - mc.clean_loss)
        d = getattr(p, "diagnostics", {})
        if "seconds_diagnostic" in d:
            row.update(seconds_diagnostic=d["seconds_diagnostic"], diagnostic_share_of_predict=d["seconds_diagnostic"] / t_pred,
                       target_diagnostic_share=0.10, met_diagnostic_share=bool(d["seconds_diagnostic"] / t_pred <= 0.10))
        if has_classes:
            pt, tt = outs[3], ts[3]
            row.update(seconds_predict_classes3=tt, classes3_over_pass=tt / t_jp, classes3_speedup_vs_mc100=t_mc / tt,
                       classes3_accuracy=pt.accuracy, classes3_accuracy_minus_full=pt.accuracy - p.accuracy,
                       classes3_truncation_accuracy_error_measured=pt.diagnostics.get("classes_truncation_accuracy_error"),
                       classes3_truncation_max_abs_measured=pt.diagnostics.get("classes_truncation_max_abs"),
                       classes3_loss_increase_gn_rel_error=pt.loss_increase_gn / p.loss_increase_gn - 1,
                       classes3_loss_estimated_share=pt.diagnostics.get("classes_truncation_loss_estimated_share"))
        row.update(h)
        emit(row)


CAL_LEVELS = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.4, 2.0]


def calibrate(models, n=120, draws=50):
    """The validity diagnostic against Monte-Carlo: per model and level, the predicted
    fraction of ReLU-like pre-activations whose first-order noise sd exceeds their magnitude,
    and whether the linear accuracy is within 1 point of Monte-Carlo or inside its 95%
    interval; then, over all models, the threshold that flags every miss with the fewest
    false alarms."""
    from noiseprop.empirical import sweep
    from noiseprop.empirical.data import load_dataset
    from noiseprop.empirical.train import train
    from noiseprop.theory import predict_sweep

    data = load_dataset("digits")
    x, y = data.x_test[:n], data.y_test[:n]
    rows = []
    for name in models:
        model = train(MODELS[name], data, seed=0).model.eval()
        mc = sweep(model, x, y, "relative", CAL_LEVELS, draws=draws, seed=0, progress=False).to_frame()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pc = predict_sweep(model, x, y, "relative", CAL_LEVELS)
        for i, lv in enumerate(CAL_LEVELS):
            m = float(mc.accuracy[i])
            if m < 0.30:
                break
            p = pc.predictions[i]
            err = p.accuracy - m
            ok = abs(err) <= 0.01 or (mc.accuracy_ci_low[i] <= p.accuracy <= mc.accuracy_ci_high[i])
            r = dict(part="calibrate", model=name, eta=lv, n_inputs=n, mc_draws=draws, mc_accuracy=m,
                     linear_accuracy=p.accuracy, linear_error=err, linear_ok=bool(ok),
                     preact_frac=p.diagnostics.get("preact_frac"), predicted_drop=p.clean_accuracy - p.accuracy,
                     warned=bool(p.warnings))
            rows.append(r)
            emit(r)
    miss = [r["preact_frac"] for r in rows if not r["linear_ok"]]
    fine = [r["preact_frac"] for r in rows if r["linear_ok"]]
    best = None
    for t in sorted(set([0.0] + fine + miss)):
        fn = sum(f <= t for f in miss)  # misses not flagged (frac > t flags)
        fp = sum(f > t for f in fine)
        if best is None or (fn, fp) < (best[1], best[2]):
            best = (t, fn, fp)
    from noiseprop.theory.predict import PREACT_WARN_DROP, PREACT_WARN_FRACTION, PREACT_WARN_LOW

    # the rule in use (predict's own warning: the fraction, or the lower fraction with a large drop)
    cur_fn = sum(not r["warned"] for r in rows if not r["linear_ok"])
    cur_fp = sum(r["warned"] for r in rows if r["linear_ok"])
    emit(dict(part="calibrate", summary=True, levels_checked=len(rows), linear_misses=len(miss),
              threshold_best=best[0], best_missed=best[1], best_false_alarms=best[2],
              threshold_in_use=PREACT_WARN_FRACTION, low_threshold_in_use=PREACT_WARN_LOW,
              drop_in_use=PREACT_WARN_DROP, in_use_missed=cur_fn, in_use_false_alarms=cur_fp,
              min_frac_at_miss=min(miss) if miss else None, max_frac_when_ok=max(fine) if fine else None))


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
        kw = {} if os.environ.get("NP_EXTRAS", "1") == "1" else dict(accuracy_draws=0, loss_probes=0)
        p = predict(model, x, y, "relative:0.05", chunk_size=chunk, **kw)
    secs = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(n=n, maxrss_before_kib=before, maxrss_after_kib=after, seconds=secs,
                          chunk_size=p.diagnostics["chunk_size"], params=sum(q.numel() for q in model.parameters()))))


def memory(ns, chunk, threads, extras=True):
    for n in ns:
        env = dict(os.environ, NP_THREADS=str(threads), NP_EXTRAS="1" if extras else "0")
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
                  seconds_per_1000_inputs=d["seconds"] / n * 1000, default_settings=extras,
                  seconds_total=time.perf_counter() - t, target_gib=2.0, met=bool(gib <= 2.0), threads=threads))


def qmc(models, reference=8192, points=(1024, 512, 256, 128)):
    """The quasi-Monte-Carlo points of the orthant probabilities: expected accuracy (and
    the largest per-input probability change) at ``points`` against ``reference`` points,
    along the ten-level curve of each digits model (first order, every test input) and on
    synthetic Gaussian logits with 10 and 100 classes (400 inputs, low-rank-plus-diagonal
    covariance, levels that take accuracy to 85%, 60%/43% and 30%/12%); with the seconds
    of the integration per level."""
    from noiseprop.theory.accuracy import DEFAULT_N_POINTS, CorrectCurve

    def curves(tag, mean, cov, y, levels):
        ref = CorrectCurve(mean, cov, y, n_points=reference)
        base = {lv: ref.at(lv)[0] for lv in levels}
        for npt in points:
            cc = CorrectCurve(mean, cov, y, n_points=npt)
            t = time.perf_counter()
            ps = {lv: cc.at(lv)[0] for lv in levels}
            dt = (time.perf_counter() - t) / len(levels)
            emit(dict(part="qmc", case=tag, n_points=npt, reference_points=reference, default=npt == DEFAULT_N_POINTS,
                      levels=list(levels), accuracy_reference=[round(float(base[lv].mean()), 5) for lv in levels],
                      max_abs_accuracy_error=max(float((ps[lv].mean() - base[lv].mean()).abs()) for lv in levels),
                      max_abs_per_input_error=max(float((ps[lv] - base[lv]).abs().max()) for lv in levels),
                      seconds_per_level=dt))

    from noiseprop.theory import predict

    for name in models:
        model, x, y, _ = _case_model(name, 64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # η = 1 is outside the first order's range: only its covariance is used
            p = predict(model, x, y, "relative:1", cov=True, cache=False)
        curves(f"zoo {name}, first order", p.logit_mean, p.logit_cov, y, LEVELS)
    g = torch.Generator().manual_seed(0)
    for C in (10, 100):
        mean = torch.randn(400, C, generator=g, dtype=torch.float64) * 2
        A = torch.randn(400, C, 8, generator=g, dtype=torch.float64) / 3
        cov = A @ A.mT + 0.5 * torch.eye(C, dtype=torch.float64)
        curves(f"synthetic, {C} classes", mean, cov, mean.argmax(1), (0.3, 1.0, 3.0))


def chunks(models, sizes=(None, 32, 64, 128, 256, 512), reps=3):
    """Seconds of the Jacobian pass (every test input, relative noise) per chunk size:
    ``None`` is the default (:func:`~noiseprop.theory.linearize.pass_chunk_size`, from
    what one input holds), beside the older budget for every parameter's per-sample
    Jacobian (``auto_chunk_size``); minimum of ``reps`` alternating runs."""
    from noiseprop.theory import RelativeGaussian
    from noiseprop.theory.linearize import LinearizedNetwork, auto_chunk_size, jacobian_pass

    for name in models:
        model, x, y, _ = _case_model(name, 64)
        lin = LinearizedNetwork(model)
        unit = lin.unit_scales(RelativeGaussian(0.1))
        old = auto_chunk_size(10, lin.num_target_elements)
        fns = [(lambda c=c: jacobian_pass(lin, x, unit, chunk_size=c)) for c in sizes + (old,)]
        outs, ts = _alternate(fns, reps)
        for c, o, t in zip(sizes + (old,), outs, ts):
            emit(dict(part="chunks", case=name, n_inputs=int(x.shape[0]), params=lin.num_target_elements,
                      chunk_size=o.chunk_size, default=c is None, old_default=c == old and c is not None,
                      seconds_pass=t))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="cases,memory")
    ap.add_argument("--models", default="mlp,vgg,resnet20,resnet20_c32")
    ap.add_argument("--c32-n", type=int, default=64, help="inputs of the 3x32x32 ResNet-20 case")
    ap.add_argument("--hessian-n", type=int, default=128, help="inputs for the hessian_trace comparison")
    ap.add_argument("--reps", type=int, default=1, help="alternating repetitions (minimum time kept)")
    ap.add_argument("--memory-n", default="64,1000,10000")
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--memory-no-extras", action="store_true", help="memory part with accuracy_draws=0, loss_probes=0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child is not None:
        _memory_child(args.memory_child, args.chunk)
        return 0
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    models = args.models.split(",")
    if "memory" in parts:  # first: a child's ru_maxrss starts at its parent's peak (kept across fork/exec)
        memory([int(v) for v in args.memory_n.split(",")], args.chunk, args.threads, not args.memory_no_extras)
    if "cases" in parts:
        cases(models, args.c32_n, args.reps, args.hessian_n)
    digits = [m for m in models if m in MODELS]
    if "calibrate" in parts:
        calibrate(digits)
    if "curve" in parts:
        curve(digits)
    if "cv" in parts:
        cv(digits)
    if "qmc" in parts:
        qmc(digits)
    if "chunks" in parts:
        chunks(digits)

    return 0


if __name__ == "__main__":
    sys.exit(main())
