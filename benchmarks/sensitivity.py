"""Per-layer sensitivity, noise budget and layers to keep digital against Monte-Carlo,
and their cost against one ``predict`` call (issue 13). Models: the zoo's MLP, VGG with
BatchNorm and ResNet-20 with BatchNorm trained on digits (``train(..., seed=0)``,
cached), all test inputs.

1. ``alone``: at the level where the whole network loses ``--drop`` by Monte-Carlo
   (default 7.5 points; a Monte-Carlo curve below the first-order estimate, then
   interpolation), for every noisy layer: the
   predicted accuracy with only that layer noisy against Monte-Carlo with
   ``Targets(layers=[layer])`` (``--draws``); also the whole network at that level.
   Target: within 1 point or inside the 95% CI.
2. ``budget``: ``noise_budget(max_drop=0.01)`` (default ``refine="auto"``) and
   Monte-Carlo at the returned level (``--budget-draws``), and at the first-order level
   when the level was refined. Target: the Monte-Carlo drop's 95% CI contains 1 point.
   With ``--calibrate D`` (default 300; 0: off) also ``noise_budget(calibrate=D,
   calibrate_seed=1)`` (the level calibrated by Monte-Carlo) checked by independent
   Monte-Carlo at the returned level with seeds 0, 2 and 3 (``--budget-draws`` each):
   one ``budget_calibrated`` line per model.
   ``budget_diag``: why the levels miss: at the first-order and at the refined level,
   Monte-Carlo logits (``--diag-draws``) against the Gaussian model term by term (each
   combination of the Monte-Carlo, first-order and moment-method means and covariances;
   the live margins' variance ratios, mean shifts, skewness and kurtosis; per input,
   Gaussian-with-Monte-Carlo-moments minus sampled P(correct), summed over the inputs
   the clean network gets right and wrong).
   ``budget_refit``: the budget with the mean and the covariance refitted to the moment
   method (an alternative to the shipped mean-only refinement), checked like ``budget``.
3. ``keep``: ``keep_digital(k=3)`` at the level of part 1, first order,
   ``method="moments"`` and ``method="refined"``; Monte-Carlo with every layer noisy
   and after each step (target: within 1 point of the prediction) and, for k=1,
   Monte-Carlo of every single
   layer kept digital (target: none better than the chosen one by more than the CI of
   the difference).
4. ``cost``: wall time of ``sensitivity`` and ``noise_budget`` (default, and
   ``refine=None``) against ``predict`` with its defaults (same inputs, alternated,
   median of ``--reps``). Targets: ≤ 2× and ≤ 3×.

One JSON line per result. Figures come from a shared machine (other jobs running).

    .venv/bin/python benchmarks/sensitivity.py [--parts alone,budget,budget_diag,budget_refit,keep,cost]
        [--models resnet20,vgg] [--budget-models mlp,vgg,resnet20] [--draws 100] [--calibrate 300]
        [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import numpy as np

import torch

MODELS = {
    "mlp": {"name": "mlp", "norm": "none"},
    "vgg": {"name": "vgg", "norm": "bn"},
    "resnet20": {"name": "resnet20", "norm": "bn"},
}


def emit(row):
    print(json.dumps(row), flush=True)


def _load(name, seed=0):
    from noiseprop.empirical.data import load_dataset
    from noiseprop.empirical.train import train

    data = load_dataset("digits")
    return train(MODELS[name], data, seed=seed).model.eval(), data.x_test, data.y_test


def _mc(model, x, y, noise, draws, seed, targets=None):
    from noiseprop.empirical import monte_carlo

    mc = monte_carlo(model, x, y, noise, draws=draws, seed=seed, targets=targets, progress=False)
    se = float(mc.accuracies.std(ddof=1) / math.sqrt(draws))
    return float(mc.accuracy), (float(mc.accuracy_ci[0]), float(mc.accuracy_ci[1])), se, mc.accuracies


def _level(model, x, y, drop, draws=30, steps=5):
    """The level where Monte-Carlo says the whole network loses ``drop``: a Monte-Carlo
    curve (common random numbers) over levels up to the first-order estimate, then
    regula falsi on ``log drop`` against ``log level`` inside the bracket the curve gives
    (the drop is steep and convex in the level there: interpolating the curve alone
    landed the VGG at a 4.6-point drop for 7.5), each step one Monte-Carlo with the same
    draws, until the drop is within 10% of ``drop`` (the first order underestimates the
    whole network's damage at such levels, so its own estimate is only the upper end of
    the search)."""
    from noiseprop.empirical import monte_carlo, sweep
    from noiseprop.theory import RelativeGaussian, noise_budget

    hi = noise_budget(model, x, y, "relative", max_drop=drop, refine=None).level
    levels = list(np.geomspace(hi / 16, hi, 9))
    sw = sweep(model, x, y, "relative", levels, draws=draws, seed=7, progress=False)
    acc = sw.to_frame()["accuracy"].to_numpy()
    clean = float(sw.clean_accuracy)
    d = clean - acc
    i = int(np.searchsorted(d, drop))
    if i == 0:
        return float(levels[0])
    if i >= len(levels):
        return float(levels[-1])
    (a, da), (b, db) = (levels[i - 1], d[i - 1]), (levels[i], d[i])
    s = a
    for _ in range(steps):
        if da > 0:
            t = (math.log(drop) - math.log(da)) / (math.log(db) - math.log(da))
        else:
            t = (drop - da) / (db - da)
        s = math.exp(math.log(a) + min(max(t, 0.05), 0.95) * (math.log(b) - math.log(a)))
        ds = clean - float(monte_carlo(model, x, y, RelativeGaussian(s), draws=draws, seed=7, progress=False).accuracy)
        if abs(ds - drop) <= 0.1 * drop:
            break
        if ds < drop:
            a, da = s, ds
        else:
            b, db = s, ds
    return float(s)


def alone(models, drop, draws):
    from noiseprop.theory import RelativeGaussian, Targets, sensitivity

    for name in models:
        model, x, y = _load(name)
        level = _level(model, x, y, drop)
        s = sensitivity(model, x, y, RelativeGaussian(level))
        acc, ci, se, _ = _mc(model, x, y, RelativeGaussian(level), draws, 0)
        emit({"part": "alone", "model": name, "layer": "(all)", "level": level, "clean": s.clean_accuracy,
              "predicted": s.accuracy, "mc": acc, "mc_ci": ci, "mc_drop": s.clean_accuracy - acc,
              "diff": s.accuracy - acc, "draws": draws})
        ok = 0
        for layer, pa, sv, sl in zip(s.layers, s.accuracy_alone, s.share_logit_var, s.share_loss):
            acc, ci, se, _ = _mc(model, x, y, RelativeGaussian(level), draws, 1, Targets(layers=[layer]))
            within = abs(pa - acc) <= 0.01 or ci[0] <= pa <= ci[1]
            ok += within
            emit({"part": "alone", "model": name, "layer": layer, "level": level, "predicted": pa, "mc": acc,
                  "mc_ci": ci, "diff": pa - acc, "within_1pt_or_ci": bool(within), "share_logit_var": sv,
                  "share_loss": sl, "draws": draws})
        emit({"part": "alone_summary", "model": name, "level": level, "layers": len(s.layers), "met": ok})


def budget_calibrated(name, model, x, y, draws, calibrate, seeds=(0, 2, 3)):
    """The budget calibrated by Monte-Carlo (``calibrate`` draws per step, seed 1) and
    independent Monte-Carlo checks at the returned level (other seeds)."""
    from noiseprop.theory import noise_budget

    b = noise_budget(model, x, y, "relative", max_drop=0.01, calibrate=calibrate, calibrate_seed=1)
    checks = []
    for sd in seeds:
        acc, ci, se, _ = _mc(model, x, y, b.noise_model, draws, sd)
        lo, hi = b.clean_accuracy - ci[1], b.clean_accuracy - ci[0]
        checks.append({"seed": sd, "mc_drop": b.clean_accuracy - acc, "mc_drop_ci": [lo, hi],
                       "ci_contains_budget": bool(lo <= 0.01 <= hi)})
    emit({"part": "budget_calibrated", "model": name, "max_drop": 0.01, "refine": b.refine, "level": b.level,
          "analytic_level": b.analytic_level, "predicted_drop_at_level": b.predicted_drop,
          "calibrate_draws": calibrate,
          "steps": [{"level": lv, "mc_drop": d, "mc_drop_ci": [lo, hi]} for lv, d, lo, hi in b.calibration],
          "calibrate_note": b.calibrate_note, "checks": checks, "draws": draws,
          "checks_containing_budget": sum(c["ci_contains_budget"] for c in checks), "seconds": b.seconds})


def budget(models, draws, calibrate=0, seeds=(0,)):
    """The budget with its default (``refine="auto"``: moment refinement where the model
    allows it) checked by Monte-Carlo at the returned level, and Monte-Carlo at the
    first-order level (``refine=None``) in the same run for comparison; per training
    seed of the models (``--seeds``)."""
    from noiseprop.theory import noise_budget

    for seed, name in ((sd, m) for sd in seeds for m in models):
        model, x, y = _load(name, seed)
        b = noise_budget(model, x, y, "relative", max_drop=0.01, mc_draws=draws, mc_seed=0)
        lo, hi = b.mc_drop_ci
        row = {"part": "budget", "model": name, "train_seed": seed, "max_drop": 0.01, "refine": b.refine,
               "level": b.level, "predicted_drop": b.predicted_drop,
               "mc_drop": b.mc_drop, "mc_drop_ci": [lo, hi], "ci_contains_budget": bool(lo <= 0.01 <= hi),
               "within_1pt": bool(abs(b.mc_drop - 0.01) <= 0.01), "draws": draws,
               "allocation_bits_saved": b.bits_saved, "allocation_predicted_drop": b.layer_drop,
               "evaluations": b.evaluations, "seconds": b.seconds}
        if b.refine == "moments":
            acc, ci, se, _ = _mc(model, x, y, f"relative:{b.first_order_level}", draws, 0)
            row.update(first_order_level=b.first_order_level, first_order_mc_drop=b.clean_accuracy - acc,
                       first_order_mc_drop_ci=[b.clean_accuracy - ci[1], b.clean_accuracy - ci[0]],
                       first_order_ci_contains_budget=bool(b.clean_accuracy - ci[1] <= 0.01 <= b.clean_accuracy - ci[0]),
                       refine_inputs=b.refine_inputs, refine_neglected=b.refine_neglected,
                       refine_seconds=b.refine_seconds)
        emit(row)
        if calibrate:
            budget_calibrated(name, model, x, y, draws, calibrate)


def keep(models, drop, draws, k=3, seeds=(0,)):
    from noiseprop.theory import RelativeGaussian, keep_digital

    for seed, name in ((sd, m) for sd in seeds for m in models):
        model, x, y = _load(name, seed)
        level = _level(model, x, y, drop)
        noise = RelativeGaussian(level)
        kd = keep_digital(model, x, y, noise, k=k, exhaustive=False, method="linear")
        km = keep_digital(model, x, y, noise, k=k, exhaustive=False, method="moments")
        kr = keep_digital(model, x, y, noise, k=k, exhaustive=False, method="refined")
        acc, ci, se, _ = _mc(model, x, y, noise, draws, 2)
        row = {"part": "keep", "model": name, "train_seed": seed, "level": level, "k": 0, "layers": [],
               "predicted": kd.accuracy_all_noisy, "mc": acc, "mc_ci": ci, "diff": kd.accuracy_all_noisy - acc,
               "within_1pt": bool(abs(kd.accuracy_all_noisy - acc) <= 0.01), "draws": draws,
               "predicted_moments": km.accuracy_all_noisy, "diff_moments": km.accuracy_all_noisy - acc,
               "within_1pt_moments": bool(abs(km.accuracy_all_noisy - acc) <= 0.01),
               "predicted_refined": kr.accuracy_all_noisy, "diff_refined": kr.accuracy_all_noisy - acc,
               "within_1pt_refined": bool(abs(kr.accuracy_all_noisy - acc) <= 0.01)}
        emit(row)
        for step in range(1, k + 1):
            acc, ci, se, _ = _mc(model, x, y, noise, draws, 2, kd.targets_after(step))
            row = {"part": "keep", "model": name, "train_seed": seed, "level": level, "k": step,
                   "layers": list(kd.layers[:step]),
                   "predicted": kd.accuracy[step - 1], "mc": acc, "mc_ci": ci, "diff": kd.accuracy[step - 1] - acc,
                   "within_1pt": bool(abs(kd.accuracy[step - 1] - acc) <= 0.01),
                   "interaction": kd.interaction[step - 1], "draws": draws, "seconds_linear": kd.seconds}
            a = km.accuracy[step - 1]
            row.update(predicted_moments=a, diff_moments=a - acc, within_1pt_moments=bool(abs(a - acc) <= 0.01),
                       seconds_moments=km.seconds, moment_inputs=km.moment_inputs)
            a = kr.accuracy[step - 1]
            row.update(predicted_refined=a, diff_refined=a - acc, within_1pt_refined=bool(abs(a - acc) <= 0.01),
                       seconds_refined=kr.seconds)
            emit(row)
        # exhaustive k = 1 by Monte-Carlo: every single layer kept digital
        from noiseprop.theory import Targets

        layers = list(kd.gain_alone)
        res = {}
        for layer in layers:
            rest = tuple(m for m in layers if m != layer)
            acc, ci, se, accs = _mc(model, x, y, noise, draws, 2, Targets(layers=rest))
            res[layer] = (acc, se)
        chosen = kd.layers[0]
        best = max(res, key=lambda m: res[m][0])
        diff = res[best][0] - res[chosen][0]
        half = 1.96 * math.sqrt(res[best][1] ** 2 + res[chosen][1] ** 2)
        emit({"part": "keep_exhaustive_k1", "model": name, "train_seed": seed, "level": level, "chosen": chosen,
              "chosen_mc": res[chosen][0], "best_by_mc": best, "best_mc": res[best][0], "diff": diff,
              "diff_ci_half": half, "chosen_within_ci_of_best": bool(diff <= half), "draws": draws,
              "mc_rank_of_chosen": 1 + sum(res[m][0] > res[chosen][0] for m in layers), "layers": len(layers)})


def _mc_logits(model, x, noise, draws, seed, targets=None):
    """Per-draw logits ``[draws, N, C]`` (the Monte-Carlo of noiseprop.empirical, its
    noisy evaluator, kept whole for the moment diagnostics)."""
    from noiseprop.empirical.montecarlo import NoisyEvaluator
    from noiseprop.theory.noise import parse_noise
    from noiseprop.theory.targets import resolve_targets

    noise = parse_noise(noise)
    ev = NoisyEvaluator(resolve_targets(model, targets), noise)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        ev.set(noise.level, ev.draw(gen))
        out.append(ev.logits(x).double())
    return torch.stack(out)


def live_margin_variance(clean, ref_cov, y, min_error):
    """The live margins of Gaussian logits ``N(clean, ref_cov)`` (label minus each other
    class, error probability above ``min_error``) and a function giving, for another
    logit covariance, their summed margin variance over ``ref_cov``'s; also ``(margin
    means, sds, live mask)`` under ``ref_cov``. Shared with moments_diagnose.py."""
    from noiseprop.theory.accuracy import margin_moments

    m0, s0 = margin_moments(clean, ref_cov, y)
    sd0 = torch.diagonal(s0, dim1=1, dim2=2).clamp_min(1e-30).sqrt()
    live = torch.special.ndtr(-m0 / sd0) > min_error

    def ratio(cov):
        _, s = margin_moments(clean, cov, y)
        return float(torch.diagonal(s, dim1=1, dim2=2)[live].sum() / (sd0[live] ** 2).sum())

    return ratio, (m0, sd0, live)


def budget_diag(models, draws):
    """Why the budget's levels miss: at the first-order level and at the refined one,
    Monte-Carlo logits against the Gaussian model term by term. Drops (points) of
    Gaussian logits with: Monte-Carlo's mean and covariance (``gauss_mc_mean_cov``: the
    Gaussian-logit limit), the first order (clean mean, first-order covariance), the
    moment method's mean and covariance (``gauss_moments``), the moment mean with the
    first-order covariance (the refinement's curve), the clean mean with Monte-Carlo's
    covariance, Monte-Carlo's mean with the first-order or the moment covariance, the
    moment mean with Monte-Carlo's covariance; on the live margins (first-order error
    probability > 1e-4): the margin variance of Monte-Carlo and of the moment method over
    the first order's, the mean shift of each in first-order sd, the kurtosis."""
    from noiseprop.theory import RelativeGaussian, noise_budget, predict
    from noiseprop.theory.accuracy import _other_classes, correct_probability, margin_moments

    for name in models:
        model, x, y = _load(name)
        br = noise_budget(model, x, y, "relative", max_drop=0.01)  # carries the first-order root too
        clean_acc = br.clean_accuracy
        for which, level in (("first_order", br.first_order_level), ("refined", br.level)):
            noise = RelativeGaussian(level)
            lg = _mc_logits(model, x, noise, draws, 11)  # [D, N, C]
            acc_d = (lg.argmax(2) == y[None]).double().mean(1).numpy()
            mc_acc, se = float(acc_d.mean()), float(acc_d.std(ddof=1) / math.sqrt(draws))
            mu = lg.mean(0)
            dev = lg - mu
            cov = torch.einsum("dni,dnj->nij", dev, dev) / (draws - 1)
            fo = predict(model, x, y, noise, cov=True)
            t = time.perf_counter()
            pm = predict(model, x, y, noise, method="moments", cov=True)
            mom_s = time.perf_counter() - t
            cl, foc = fo.clean_logits.double(), fo.logit_cov.double()
            mm, mcv = pm.logit_mean.double(), pm.logit_cov.double()

            def p_correct(mean, c):
                return correct_probability(mean, c, y, n_points=1024, seed=0)[0]

            def drop(mean, c, p=None):
                return 100 * (clean_acc - float((p_correct(mean, c) if p is None else p).mean()))

            pg = p_correct(mu, cov)  # Gaussian logits with Monte-Carlo's own mean and covariance, per input

            var_ratio, (m0, sd0, live) = live_margin_variance(cl, foc, y, 1e-4)

            def shift(mean):
                m, _ = margin_moments(mean, foc, y)
                return float(((m - m0)[live] / sd0[live]).mean())

            idx = _other_classes(y, cl.shape[1])
            ly = lg.gather(2, y[None, :, None].expand(draws, -1, 1))
            marg = ly - lg.gather(2, idx[None].expand(draws, -1, -1))  # [D, N, C-1]
            zs = (marg - marg.mean(0)) / marg.std(0).clamp_min(1e-30)
            kurt = float((zs ** 4).mean(0)[live].mean())
            skew = float((zs ** 3).mean(0)[live].mean())
            # per-margin tails: summed error probabilities of the live margins, sampled
            # against Gaussian margins with the same mean and sd
            emp = float((marg < 0).double().mean(0)[live].sum())
            # per input: P(correct) of Gaussian logits with Monte-Carlo's own mean and
            # covariance minus the sampled one, summed over the inputs the clean network
            # gets right and over those it gets wrong (points of accuracy once / N)
            pe = (lg.argmax(2) == y[None]).double().mean(0)
            ok = cl.argmax(1) == y
            gap_ok, gap_wrong = float((pg - pe)[ok].sum()), float((pg - pe)[~ok].sum())
            gap_var = float((pe * (1 - pe) / draws).sum())
            gau = float(torch.special.ndtr(-marg.mean(0) / marg.std(0).clamp_min(1e-30))[live].sum())
            emit({"part": "budget_diag", "model": name, "at": which, "level": level, "clean": clean_acc,
                  "mc_drop": 100 * (clean_acc - mc_acc), "mc_se": 100 * se,
                  "gauss_mc_mean_cov": drop(mu, cov, pg), "gauss_first_order": drop(cl, foc),
                  "gauss_moments": drop(mm, mcv), "gauss_moment_mean_fo_cov": drop(mm, foc),
                  "gauss_clean_mean_mc_cov": drop(cl, cov), "gauss_mc_mean_fo_cov": drop(mu, foc),
                  "gauss_mc_mean_moment_cov": drop(mu, mcv), "gauss_moment_mean_mc_cov": drop(mm, cov),
                  "live_pairs": int(live.sum()), "margin_var_mc_over_fo": var_ratio(cov),
                  "margin_var_moments_over_fo": var_ratio(mcv), "margin_shift_mc_in_fo_sd": shift(mu),
                  "margin_shift_moments_in_fo_sd": shift(mm), "live_margin_kurtosis": kurt,
                  "live_margin_skewness": skew, "live_err_sum_mc": emp, "live_err_sum_gauss_mc_moments": gau,
                  "gauss_minus_mc_p_correct_sum_clean_right": gap_ok, "gauss_minus_mc_p_correct_sum_clean_wrong": gap_wrong,
                  "mc_p_correct_sum_var": gap_var, "n_inputs": int(y.numel()),
                  "moments_s": mom_s, "draws": draws})


def budget_refit(models, draws):
    """An alternative refinement, measured against the shipped one: the logit mean *and*
    covariance refitted to the moment method at the first-order root (``noise_budget``'s
    own ``_moment_curve(..., refit_cov=True)``, not an option of it), solved again, and
    Monte-Carlo at that level."""
    import functools
    import sys

    from noiseprop.theory import noise_budget

    ts = sys.modules["noiseprop.theory.sensitivity"]  # the module (noiseprop.theory.sensitivity is the function)
    shipped = ts._moment_curve
    for name in models:
        model, x, y = _load(name)
        ts._moment_curve = functools.partial(shipped, refit_cov=True)
        try:
            b = noise_budget(model, x, y, "relative", max_drop=0.01, mc_draws=draws, mc_seed=0)
        finally:
            ts._moment_curve = shipped
        lo, hi = b.mc_drop_ci
        emit({"part": "budget_refit", "model": name, "level": b.level, "first_order_level": b.first_order_level,
              "mc_drop": b.mc_drop, "mc_drop_ci": [lo, hi], "ci_contains_budget": bool(lo <= 0.01 <= hi),
              "draws": draws})


def cost(models, reps):
    from noiseprop.theory import noise_budget, predict, sensitivity

    for name in models:
        model, x, y = _load(name)
        noise = "relative:0.1"
        # warm-up (first-call costs)
        predict(model, x[:8], y[:8], noise)
        sensitivity(model, x[:8], y[:8], noise)
        tp, ts, tb, tf = [], [], [], []
        for _ in range(reps):
            t = time.perf_counter()
            predict(model, x, y, noise, cache=False)  # a fresh derivative pass, as a first call pays
            tp.append(time.perf_counter() - t)
            t = time.perf_counter()
            sensitivity(model, x, y, noise)
            ts.append(time.perf_counter() - t)
            t = time.perf_counter()
            noise_budget(model, x, y, "relative", 0.01)
            tb.append(time.perf_counter() - t)
            t = time.perf_counter()
            noise_budget(model, x, y, "relative", 0.01, refine=None)
            tf.append(time.perf_counter() - t)
        p, s, b, f = (statistics.median(v) for v in (tp, ts, tb, tf))
        row = {"part": "cost", "model": name, "n_inputs": int(x.shape[0]), "predict_s": p, "sensitivity_s": s,
               "noise_budget_s": b, "sensitivity_ratio": s / p, "noise_budget_ratio": b / p,
               "target_sensitivity": 2.0, "target_budget": 3.0, "reps": reps,
               "noise_budget_first_order_s": f, "noise_budget_first_order_ratio": f / p}
        emit(row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="alone,budget,keep,cost")
    ap.add_argument("--models", default="resnet20,vgg")
    ap.add_argument("--budget-models", default="mlp,vgg,resnet20")
    ap.add_argument("--drop", type=float, default=0.075)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--budget-draws", type=int, default=300)
    ap.add_argument("--calibrate", type=int, default=300)
    ap.add_argument("--diag-draws", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", default="0", help="training seeds of the models (budget and keep parts)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    parts = a.parts.split(",")
    models = a.models.split(",")
    seeds = [int(v) for v in a.seeds.split(",")]
    if "cost" in parts:
        cost(a.budget_models.split(","), a.reps)
    if "budget" in parts:
        budget(a.budget_models.split(","), a.budget_draws, a.calibrate, seeds)
    if "budget_diag" in parts:
        budget_diag(a.budget_models.split(","), a.diag_draws)
    if "budget_refit" in parts:
        budget_refit(a.budget_models.split(","), a.budget_draws)
    if "alone" in parts:
        alone(models, a.drop, a.draws)
    if "keep" in parts:
        keep(models, a.drop, a.draws, seeds=seeds)


if __name__ == "__main__":
    main()
