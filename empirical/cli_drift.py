"""``noiseprop drift``: accuracy against time since programming under the PCM model
(programming noise, drift, read noise, global drift compensation), predicted and
simulated, on a saved checkpoint.

    noiseprop drift --model CKPT --times 1,3600,86400,2.6e6,3.15e7,3.15e8
                    [--no-compensation | --both] [--prog-scale 1] [--drift-scale 1]
                    [--read-scale 1] [--per layer|channel] [--draws 100]
                    [--plot out.png] [--json]
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from noiseprop.theory.drift import LINEARIZE_AT, predict_drift
from noiseprop.theory.predict import OUTSIDE_RANGE
from noiseprop.theory.hardware import PCMLike
from noiseprop.theory.noise import MAX_LEVEL
from noiseprop.theory.validation import check_figure_path, check_number, number, plain_float, save_figure

from .cli import CLIError
from .cli_mc import (add_model_data_args, check_accuracy_draws, check_batch_size, check_n_inputs, load_model_and_data,
                     split_list)
from .montecarlo import drift_sweep

DEFAULT_TIMES = "1,3600,86400,2.6e6,3.15e7,3.15e8"

_TIME_LABELS = [(1.0, "1 s"), (3600.0, "1 h"), (86400.0, "1 d"), (2.6e6, "1 mo"), (3.15e7, "1 y"), (3.15e8, "10 y")]


def _parse_times(text: str) -> list[float]:
    try:
        items = split_list(text, "--times", DEFAULT_TIMES)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        times = [plain_float(v) for v in items]
    except ValueError:
        raise CLIError(f"--times must be comma-separated seconds since programming, e.g. {DEFAULT_TIMES}; got {text!r}") from None
    if not times or any(not math.isfinite(t) or t < 0 for t in times):
        raise CLIError(f"--times must be finite seconds >= 0, e.g. {DEFAULT_TIMES}; got {text!r}")
    return times


def drift_figure(curves, path, title: str = "") -> Path:
    """Predicted and simulated accuracy against log time (PNG). ``curves`` is a list of
    ``(label, DriftPrediction or None, SweepResult or None)``: the prediction as a line
    with its pairwise bounds shaded (a cross where the method's validity check
    fired), Monte-Carlo as points with 95% CIs. ``path``: a file name whose extension
    is a format matplotlib writes (``.png``, ``.pdf``, ``.svg``, ...), checked before
    drawing (a folder or a name without extension is refused); written whole or not at
    all. Returns the path written."""
    path = check_figure_path(path, "path")
    import matplotlib  # lazy: matplotlib.pyplot adds seconds (measured) to every command's start

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    clean = None
    for (label, pred, mc), col in zip(curves, colours):
        if pred is not None:
            ax.plot(pred.times, pred.accuracy, "-", color=col, label=f"{label}: predicted")
            ax.fill_between(pred.times, pred.accuracy_lower, pred.accuracy_upper, color=col, alpha=0.12, lw=0)
            out = pred.outside_range
            if out.any():
                method = pred.predictions[0].method
                what = OUTSIDE_RANGE[method] + (" (--method moments)" if method == "linear" else "")
                ax.plot(pred.times[out], pred.accuracy[out], "x", color=col, ms=7, mew=1.5, label=f"{label}: {what}")
            clean = pred.clean_accuracy
        if mc is not None:
            df = mc.to_frame()
            err = np.vstack([df.accuracy - df.accuracy_ci_low, df.accuracy_ci_high - df.accuracy])
            ax.errorbar(df.level, df.accuracy, yerr=err, fmt="o", color=col, ms=4, capsize=3,
                        label=f"{label}: Monte-Carlo ({mc.draws} chips, 95% CI)")
            clean = mc.clean_accuracy
    if clean is not None:
        ax.axhline(clean, color="grey", ls=":", lw=1, label="clean (digital)")
    ax.set_xscale("log")
    ticks = [t for t, _ in _TIME_LABELS]
    ax.set_xticks(ticks, [lbl for _, lbl in _TIME_LABELS])
    ax.set_xlabel("time since programming")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "PCM: accuracy vs time since programming", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=130)
    finally:
        plt.close(fig)
    return path


def cmd_drift(args) -> int:
    # every flag is checked here, by its name, before the checkpoint is loaded
    times = _parse_times(args.times)
    if args.draws != 0 and args.draws < 2:
        raise CLIError(f"--draws must be 0 (prediction only) or >= 2, got {args.draws}")
    if args.draws and max(times) > MAX_LEVEL:  # the simulation's largest level (drift_sweep), checked before any work
        raise CLIError(f"--times must be seconds <= {MAX_LEVEL:.3g} (about {MAX_LEVEL / 3.156e7:.2g} years, the largest "
                       f"level a Monte-Carlo simulation takes) with --draws {args.draws}, got {args.times!r}; use "
                       "smaller times, or --draws 0 for the prediction alone")
    if args.no_compensation and args.both:
        raise CLIError("--no-compensation and --both exclude each other")
    if args.classes is not None:
        if args.classes < 1:
            raise CLIError(f"--classes must be >= 1 (competitors per input), got {args.classes}")
        if args.method != "linear" or args.linearize_at == "mean":
            raise CLIError("--classes truncates the first order's one derivative pass: it needs --method linear and "
                           f"--linearize-at earliest or programmed, got --method {args.method} --linearize-at "
                           f"{args.linearize_at}")
    for flag, field, v in (("--prog-scale", "prog_noise_scale", args.prog_scale),
                           ("--drift-scale", "drift_scale", args.drift_scale),
                           ("--read-scale", "read_noise_scale", args.read_scale)):
        check_number(f"{flag} (PCMLike's {field})", v, 0.0)  # PCMLike's own range, >= 0
    check_accuracy_draws(args.accuracy_draws)
    check_batch_size(args.batch_size)
    check_n_inputs(args.n_inputs)
    plot = check_figure_path(args.plot, "--plot") if args.plot is not None else None
    settings = [False] if args.no_compensation else ([True, False] if args.both else [True])
    model, x, y, _ = load_model_and_data(args)
    if args.n_inputs is not None:
        x, y = x[:args.n_inputs], y[:args.n_inputs]
    rows, curves = [], []
    for comp in settings:
        noise = PCMLike(compensation=comp, prog_noise_scale=args.prog_scale, drift_scale=args.drift_scale,
                        read_noise_scale=args.read_scale, per=args.per)
        pred = predict_drift(model, x, y, noise, times, targets=args.targets, seed=args.seed,
                             linearize_at=args.linearize_at, accuracy_draws=args.accuracy_draws, method=args.method,
                             classes=args.classes)
        mc = None
        if args.draws:
            mc = drift_sweep(model, x, y, noise, times, draws=args.draws, seed=args.seed, targets=args.targets,
                             batch_size=args.batch_size, progress=False if args.no_progress else None)
        label = "compensated" if comp else "no compensation"
        curves.append((label, pred, mc))
        mdf = mc.to_frame() if mc is not None else None
        for i, t in enumerate(times):
            r = dict(compensation=comp, time_s=t, predicted_accuracy=float(pred.accuracy[i]),
                     predicted_lower=float(pred.accuracy_lower[i]), predicted_upper=float(pred.accuracy_upper[i]),
                     predicted_chip_sd=float(pred.accuracy_std[i]), method=args.method,
                     preact_frac=None if np.isnan(pred.preact_frac[i]) else float(pred.preact_frac[i]),
                     outside_range=bool(pred.outside_range[i]),
                     first_order_outside_range=bool(pred.outside_range[i]) and args.method == "linear")
            if args.classes is not None and "classes" in pred.predictions[i].diagnostics:
                r["classes_truncation_accuracy_error"] = float(pred.truncation_error[i])
            if mdf is not None:
                r.update(mc_accuracy=float(mdf.accuracy[i]), mc_ci=[float(mdf.accuracy_ci_low[i]),
                                                                    float(mdf.accuracy_ci_high[i])],
                         mc_chip_sd=float(mc.accuracies[i].std(ddof=1)), mc_draws=mc.draws)
            rows.append(r)
        if not args.json:
            print(pred.summary())
            if mc is not None:
                print(mc.summary())
        for r in rows[-len(times):]:
            r.update(predict_seconds=pred.seconds, mc_seconds=mc.seconds if mc is not None else None)
    if plot is not None:
        plot = drift_figure(curves, plot, title=f"{args.model}: PCM (prog ×{args.prog_scale:g}, drift ×{args.drift_scale:g}, "
                                                f"read ×{args.read_scale:g}, per {args.per})")
        if not args.json:
            print(f"figure written to {plot}")
    if args.json:
        out = dict(model=args.model, times=times, noise=curves[0][1].noise, rows=rows)
        if plot is not None:
            out["plot"] = str(plot)
        print(json.dumps(out))
    return 0


def register(sub) -> None:
    p = sub.add_parser("drift", help="accuracy vs time since programming under PCM drift, predicted and simulated",
                       description="PCM programming noise, drift and read noise (Nandakumar et al. 2019, the model "
                                   "of aihwkit's PCMLikeNoiseModel) with global drift compensation: predicted "
                                   "accuracy at each time and Monte-Carlo with the same chips at every time.")
    add_model_data_args(p)
    p.add_argument("--times", default=DEFAULT_TIMES, help=f"seconds since programming, comma-separated (default {DEFAULT_TIMES})")
    p.add_argument("--no-compensation", action="store_true", help="without global drift compensation")
    p.add_argument("--both", action="store_true", help="with and without compensation")
    p.add_argument("--prog-scale", type=number, default=1.0, help="programming-noise scale (default 1)")
    p.add_argument("--drift-scale", type=number, default=1.0, help="drift-exponent scale (default 1)")
    p.add_argument("--read-scale", type=number, default=1.0, help="read-noise scale (default 1)")
    p.add_argument("--per", choices=("layer", "channel"), default="layer", help="conductance mapping max|W| per layer or per output channel")
    p.add_argument("--draws", type=int, default=100, help="Monte-Carlo chips per time (0: prediction only)")
    p.add_argument("--linearize-at", choices=LINEARIZE_AT, default="earliest",
                   help="where the Jacobian is taken: at the expected weights of the earliest time, rescaled per layer "
                        "by the drift since then (default: one pass for the curve), at those of each time (one pass "
                        "per time), or at the programmed weights rescaled by the drift (one pass; less accurate at "
                        "large noise)")
    p.add_argument("--method", choices=("linear", "moments"), default="linear",
                   help="prediction method: first order (default; warns at the times where it is outside its range) or moment "
                        "propagation (warns where it is outside its measured range on networks with residual connections or "
                        "max pooling)")
    p.add_argument("--accuracy-draws", type=int, default=32, help="draws of the linearised network for the chip-to-chip spread")
    p.add_argument("--classes", type=int, default=None, metavar="K",
                   help="differentiate only each input's label and its K closest competitors (faster; the accuracy's "
                        "truncation error is measured on a share of the inputs and reported per time)")
    p.add_argument("--n-inputs", type=int, default=None, help="use only the first N test inputs")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write the figure of accuracy vs log time to this file (its extension sets the format: .png, "
                        ".pdf, .svg, ...)")
    p.set_defaults(func=cmd_drift)
