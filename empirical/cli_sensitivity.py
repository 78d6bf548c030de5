"""``noiseprop sensitivity``: which layers cause the damage, how much noise the network
affords, which layers to keep digital (:mod:`noiseprop.theory.sensitivity`).

    noiseprop sensitivity --model CHECKPOINT --noise relative:0.1 [--budget 0.01]
                          [--keep-digital 2] [--plot out.png] [--json]
"""
from __future__ import annotations

import json
import math

from noiseprop.theory.noise import NOISE_STRING_FORMS
from noiseprop.theory.sensitivity import (KEEP_METHODS, REFINE, _noise_with_level, check_keep_k, keep_digital,
                                          noise_budget, sensitivity)
from noiseprop.theory.validation import SEED_MAX, check_figure_path, check_seed, number

from .cli import CLIError
from .cli_mc import add_model_data_args, check_n_inputs, load_model_and_data


def _num(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def calibrate_seed(seed: int) -> int:
    """The seed of ``--budget-calibrate``'s Monte-Carlo: the next one after ``--seed``
    (which the ``--budget-mc`` check uses), wrapping to 0 after the largest seed, so any
    valid ``--seed`` works and the two never share draws."""
    return 0 if seed >= SEED_MAX else seed + 1


def cmd_sensitivity(args) -> int:
    # every flag is checked here, by its name, before the work (the checkpoint is loaded
    # first only for --keep-digital's upper bound, the number of noisy layers)
    noise = _noise_with_level(args.noise, "--noise")
    if args.budget is not None and not 0 < args.budget < 1:
        raise CLIError(f"--budget is the largest accuracy drop allowed, in (0, 1) (0.01 = one point), got {args.budget}")
    if args.keep_digital is not None and args.keep_digital < 1:
        raise CLIError(f"--keep-digital takes a number of layers >= 1, got {args.keep_digital}")
    if args.budget_mc is not None and (args.budget is None or args.budget_mc < 2):
        raise CLIError("--budget-mc needs --budget and at least 2 draws")
    if args.budget_calibrate is not None and (args.budget is None or args.budget_calibrate < 2):
        raise CLIError("--budget-calibrate needs --budget and at least 2 draws per step")
    check_n_inputs(args.n_inputs)
    check_seed("--seed", args.seed)
    plot = check_figure_path(args.plot, "--plot") if args.plot is not None else None
    model, x, y, _ = load_model_and_data(args)
    if args.keep_digital is not None:
        check_keep_k(model, args.targets, args.keep_digital, "--keep-digital")
    if args.n_inputs is not None:
        x, y = x[:args.n_inputs], y[:args.n_inputs]
    sens = sensitivity(model, x, y, noise, targets=args.targets, seed=args.seed)
    budget = None
    if args.budget is not None:
        budget = noise_budget(model, x, y, noise.with_level(1.0), args.budget, targets=args.targets, seed=args.seed,
                              mc_draws=args.budget_mc or 0, mc_seed=args.seed,
                              calibrate=args.budget_calibrate or 0, calibrate_seed=calibrate_seed(args.seed),
                              refine=None if args.refine == "none" else args.refine)
    keep = None
    if args.keep_digital is not None:
        keep = keep_digital(model, x, y, noise, args.keep_digital, targets=args.targets, seed=args.seed,
                            method=args.keep_method)
    if plot is not None:
        sens.plot(plot)
    if args.json:
        out = {"noise": sens.noise, "targets": sens.targets, "n_inputs": sens.n_inputs,
               "clean_accuracy": sens.clean_accuracy, "accuracy": sens.accuracy,
               "loss_increase": sens.loss_increase_total, "seconds": sens.seconds,
               "layers": sens.to_frame().to_dict(orient="records")}
        if budget is not None:
            out["budget"] = {"max_drop": budget.max_drop, "level": budget.level, "noise": budget.noise,
                             "predicted_drop": budget.predicted_drop, "predicted_accuracy": budget.predicted_accuracy,
                             "layer_levels": {m: _num(v) for m, v in zip(budget.layers, budget.layer_levels)},
                             "layer_drop": budget.layer_drop, "bits_saved": budget.bits_saved,
                             "refine": budget.refine, "first_order_level": budget.first_order_level,
                             "analytic_level": budget.analytic_level, "seconds": budget.seconds}
            if budget.calibrate_draws:
                out["budget"].update(calibrate_draws=budget.calibrate_draws, calibrate_note=budget.calibrate_note,
                                     calibration=[dict(level=lv, mc_drop=d, mc_drop_ci=[lo, hi])
                                                  for lv, d, lo, hi in budget.calibration])
            if budget.mc_draws:
                out["budget"].update(mc_draws=budget.mc_draws, mc_accuracy=budget.mc_accuracy,
                                     mc_drop=budget.mc_drop, mc_drop_ci=list(budget.mc_drop_ci))
        if keep is not None:
            out["keep_digital"] = {"layers": list(keep.layers), "accuracy": list(keep.accuracy),
                                   "accuracy_all_noisy": keep.accuracy_all_noisy, "method": keep.method,
                                   "accuracy_first_order": list(keep.accuracy_first_order),
                                   "interaction": list(keep.interaction),
                                   "exhaustive_layers": None if keep.exhaustive_layers is None
                                   else list(keep.exhaustive_layers),
                                   "exhaustive_accuracy": keep.exhaustive_accuracy, "seconds": keep.seconds}
        if plot is not None:
            out["plot"] = str(plot)
        print(json.dumps(out))
        return 0
    print(sens.summary())
    if budget is not None:
        print(budget.summary())
    if keep is not None:
        print(keep.summary())
    if plot is not None:
        print(f"bar chart written to {plot}")
    return 0


def register(sub) -> None:
    forms = ", ".join(f"{k}:LEVEL" for k in NOISE_STRING_FORMS)
    p = sub.add_parser("sensitivity", help="per-layer sensitivity, noise budget and layers to keep digital",
                       description="Per-layer sensitivity to weight noise from one derivative pass (no sampling); "
                                   f"noise forms: {forms}.")
    add_model_data_args(p)
    p.add_argument("--noise", required=True, help=f"noise model with its level, one of: {forms}")
    p.add_argument("--budget", type=number, default=None, metavar="MAX_DROP",
                   help="also find the largest level of the --noise family whose predicted accuracy drop is at most "
                        "MAX_DROP (e.g. 0.01), with a per-layer allocation")
    p.add_argument("--budget-mc", type=int, default=None, metavar="DRAWS",
                   help="check the budget's level by Monte-Carlo with this many draws")
    p.add_argument("--budget-calibrate", type=int, default=None, metavar="DRAWS",
                   help="calibrate the budget's level by Monte-Carlo (DRAWS per step, two to four steps from the "
                        "predicted level; with --budget-mc the check uses other draws)")
    p.add_argument("--refine", choices=[r or "none" for r in REFINE], default="auto",
                   help="--budget: refine the first-order level by one moment propagation (auto: where the model "
                        "allows it; none: first order only, cheapest)")
    p.add_argument("--keep-digital", type=int, default=None, metavar="K",
                   help="also choose the K layers to keep digital (greedy, with interactions)")
    p.add_argument("--keep-method", choices=KEEP_METHODS, default="linear",
                   help="--keep-digital: predict the accuracy after each step by 'linear' (first order, the default and "
                        "cheapest), 'refined' (the moment method's logit mean with the first-order covariance, "
                        "noise_budget's refinement; one mean-only moment pass per step: within a point of Monte-Carlo "
                        "where the first order is not), 'moments' (moment propagation) or 'auto' (refined where the "
                        "moment method covers the model, else linear)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write a bar chart of the per-layer shares to this file (its extension sets the format: .png, "
                        ".pdf, .svg, ...)")
    p.add_argument("--n-inputs", type=int, default=None, help="use only the first N test inputs")
    p.set_defaults(func=cmd_sensitivity)
