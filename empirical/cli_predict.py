"""``noiseprop predict``: the analytic prediction on a saved checkpoint, optionally
with Monte-Carlo beside it.

    noiseprop predict --model CHECKPOINT --noise relative:0.05 [--method moments]
                      [--compare-mc 200] [--json]
"""
from __future__ import annotations

import math

from noiseprop.theory.noise import NOISE_STRING_FORMS, parse_noise
from noiseprop.theory.predict import predict
from noiseprop.theory.validation import check_int

from .cli import CLIError, dumps
from .cli_mc import add_model_data_args, check_accuracy_draws, check_n_inputs, load_model_and_data
from .montecarlo import monte_carlo


LOSS_PROBES_ACCEPTED = "0 (skip the Hutchinson estimate) or an integer >= 2"


def _num(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _loss_probes(args, noise):
    """What ``--loss-probes`` passes to predict: nothing when not given (the library's
    default: the exact Gauss-Newton form where the network is piecewise linear, Hutchinson
    otherwise), else the flag's value for zero-mean (Gaussian) noise; for non-zero-mean
    hardware noise (no Hessian estimator) a number of probes is refused by the flag's name
    (0, "skip", is what it does anyway)."""
    probes = args.loss_probes
    if probes is not None:
        check_int("--loss-probes", probes, 0, what=LOSS_PROBES_ACCEPTED)
        if probes == 1:
            raise ValueError(f"--loss-probes must be {LOSS_PROBES_ACCEPTED}, got 1")
    if probes and getattr(args, "method", "linear") == "moments":
        raise CLIError(f"--loss-probes {probes}: --method moments gives the loss of its own Gaussian logits, not a "
                       "Hutchinson estimate; leave --loss-probes out (or 0), or use --method linear")
    if noise.zero_mean or probes is None:
        return probes
    if probes:
        raise CLIError(f"--loss-probes {probes}: not available for hardware noise {noise.to_string()!r} (non-zero "
                       "mean): its prediction has no Hutchinson loss estimate; leave --loss-probes out (or 0)")
    return None


def cmd_predict(args) -> int:
    # every flag is checked here, by its name, before the checkpoint is loaded
    noise = parse_noise(args.noise)
    if args.compare_mc is not None and args.compare_mc < 2:
        raise CLIError(f"--compare-mc needs at least 2 draws, got {args.compare_mc}")
    check_n_inputs(args.n_inputs)
    check_accuracy_draws(args.accuracy_draws)
    loss_probes = _loss_probes(args, noise)
    model, x, y, _ = load_model_and_data(args)
    if args.n_inputs is not None:
        x, y = x[:args.n_inputs], y[:args.n_inputs]
    knobs = {} if loss_probes is None else {"loss_probes": loss_probes}
    pred = predict(model, x, y, noise, targets=args.targets, method=args.method, seed=args.seed,
                   accuracy_draws=args.accuracy_draws, **knobs)
    mc = None
    if args.compare_mc is not None:
        mc = monte_carlo(model, x, y, noise, draws=args.compare_mc, seed=args.seed, targets=args.targets,
                         batch_size=args.batch_size, progress=False if args.no_progress else None)
    if args.json:
        out = {k: (_num(v) if isinstance(v, float) else v) for k, v in pred.scalars().items()}
        if mc is not None:
            out["mc"] = {
                "draws": mc.draws, "accuracy": mc.accuracy, "accuracy_ci": list(mc.accuracy_ci),
                "accuracy_sd": float(mc.accuracies.std(ddof=1)), "loss": mc.loss, "loss_ci": list(mc.loss_ci),
                "loss_increase": mc.loss - mc.clean_loss, "mean_logit_var": float(mc.logit_var.mean()),
                "seconds": mc.seconds,
            }
        print(dumps(out))
        return 0
    print(pred.summary())
    if mc is not None:
        lo, hi = mc.accuracy_ci
        llo, lhi = mc.loss_ci
        print(f"Monte-Carlo ({mc.draws} draws, seed {mc.seed}, {mc.seconds:.2f} s) beside the prediction:")
        print(f"  {'':<22}{'predicted':>12}{'Monte-Carlo':>13}   95% CI")
        print(f"  {'accuracy':<22}{pred.accuracy:>12.4f}{mc.accuracy:>13.4f}   [{lo:.4f}, {hi:.4f}]")
        print(f"  {'accuracy sd (chips)':<22}{pred.accuracy_std:>12.4f}{float(mc.accuracies.std(ddof=1)):>13.4f}")
        print(f"  {'loss increase':<22}{pred.loss_increase:>12.4g}{mc.loss - mc.clean_loss:>13.4g}   "
              f"[{llo - mc.clean_loss:.4g}, {lhi - mc.clean_loss:.4g}]")
        print(f"  {'mean logit variance':<22}{float(pred.logit_var.mean()):>12.4g}{float(mc.logit_var.mean()):>13.4g}")
        print(f"  {'mean |logit shift|':<22}{float(pred.logit_mean_shift.abs().mean()):>12.4g}"
              f"{float(mc.logit_mean_shift.abs().mean()):>13.4g}")
    return 0


def register(sub) -> None:
    forms = ", ".join(f"{k}:LEVEL" for k in NOISE_STRING_FORMS)
    p = sub.add_parser("predict", help="analytic prediction of logits, accuracy and loss under noise",
                       description=f"Analytic prediction (no sampling) on a checkpoint. Noise forms: {forms}.")
    add_model_data_args(p)
    p.add_argument("--noise", required=True, help=f"noise model, one of: {forms}")
    p.add_argument("--method", choices=("linear", "moments"), default="linear",
                   help="linear: first order (any model); moments: moment propagation (large noise)")
    p.add_argument("--compare-mc", type=int, default=None, metavar="DRAWS",
                   help="also run Monte-Carlo with this many draws and print it beside the prediction")
    p.add_argument("--n-inputs", type=int, default=None, help="use only the first N test inputs")
    p.add_argument("--accuracy-draws", type=int, default=32,
                   help="draws of the linearised network for the chip-to-chip accuracy spread (0: skip)")
    p.add_argument("--loss-probes", type=int, default=None,
                   help="Hutchinson probes for the loss increase (0: skip; default: the exact Gauss-Newton form where "
                        "the network is piecewise linear, 16 probes otherwise); Gaussian noise only: hardware noise "
                        "(pcm, quantized, stuck) has no Hutchinson estimate")
    p.set_defaults(func=cmd_predict)
