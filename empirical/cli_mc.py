"""``noiseprop mc`` and ``noiseprop sweep``: Monte-Carlo on a saved checkpoint."""
from __future__ import annotations

import warnings

import numpy as np

from noiseprop.theory.noise import MAX_LEVEL, NOISE_STRING_FORMS, parse_noise
from noiseprop.theory.targets import Targets
from noiseprop.theory.validation import check_int, check_levels, check_seed, plain_float

from .checkpoint import load_checkpoint
from .cli import dumps
from .data import load_dataset
from .montecarlo import check_family_levels, check_sweep_family, monte_carlo, sweep


def add_model_data_args(p) -> None:
    """Arguments shared by commands that evaluate a checkpoint on a data set."""
    p.add_argument("--model", required=True, metavar="CHECKPOINT", help="a checkpoint written by `noiseprop train`")
    p.add_argument("--dataset", default=None, help="data set to evaluate on (default: the one the checkpoint was trained on)")
    p.add_argument("--data-dir", default=None, help="folder of the data set files (cifar10/cifar100/mnist)")
    p.add_argument("--targets", default=None, help="what gets noise: words from weights,biases,norm,fold_bn joined by ',' (default: weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# Flags are checked in the CLI, by their names, before any work (the library's own checks
# would name its Python arguments: prog_noise_scale, accuracy_draws, k, p_zero, ...).
def check_batch_size(value) -> int:
    return check_int("--batch-size", value, 1)


def check_n_inputs(value):
    return check_int("--n-inputs", value, 1, allow_none=True, what="an integer >= 1 (the first N test inputs)")


def check_accuracy_draws(value) -> int:
    what = "0 (no chip-to-chip spread) or an integer >= 2"
    v = check_int("--accuracy-draws", value, 0, what=what)
    if v == 1:
        raise ValueError(f"--accuracy-draws must be {what}, got 1")
    return v


def check_draws(value) -> int:
    return check_int("--draws", value, 2, what="an integer >= 2 (Monte-Carlo draws)")


def load_model_and_data(args):
    """(model, x_test, y_test, checkpoint) for a checkpoint and its (or the given) data set."""
    check_seed("--seed", args.seed)
    check_batch_size(args.batch_size)
    try:
        Targets.parse(args.targets)
    except (ValueError, TypeError) as e:
        raise type(e)(f"--targets {args.targets!r}: {e}") from None
    ckpt = load_checkpoint(args.model)
    name = args.dataset or ckpt.meta.get("dataset")
    if not name:
        raise ValueError(f"checkpoint {args.model!r} does not record its data set; pass --dataset")
    data_dir = args.data_dir if args.data_dir is not None else ckpt.meta.get("data_dir")
    trained_on = ckpt.meta.get("dataset")
    own = not args.dataset or (trained_on is not None and str(args.dataset).lower() == str(trained_on).lower())
    kwargs = {}
    if own:  # the exact data set (and split, seed) the checkpoint was trained on, also when named
        skip = {"name", "fingerprint", "data_dir"}
        kwargs = {k: v for k, v in (ckpt.meta.get("dataset_spec") or {}).items() if k not in skip}
    data = load_dataset(name, data_dir=data_dir, **kwargs)
    if not own and trained_on:
        warnings.warn(f"--dataset {args.dataset!r}: the checkpoint {args.model!r} was trained on {trained_on!r}; "
                      f"evaluating it on {args.dataset!r}'s test inputs (leave --dataset out to use its own)", UserWarning,
                      stacklevel=2)
    return ckpt.model, data.x_test, data.y_test, ckpt


def _progress(args):
    return False if args.no_progress else None


def cmd_mc(args) -> int:
    noise = parse_noise(args.noise)
    check_draws(args.draws)
    model, x, y, _ = load_model_and_data(args)
    res = monte_carlo(model, x, y, noise, draws=args.draws, seed=args.seed, targets=args.targets,
                      batch_size=args.batch_size, progress=_progress(args))
    if args.json:
        out = {
            "noise": res.noise, "targets": res.targets, "draws": res.draws, "seed": res.seed,
            "n_inputs": res.n_inputs, "clean_accuracy": res.clean_accuracy, "clean_loss": res.clean_loss,
            "accuracy": res.accuracy, "accuracy_se": res.accuracy_se, "accuracy_ci": list(res.accuracy_ci),
            "loss": res.loss, "loss_se": res.loss_se, "loss_ci": list(res.loss_ci),
            "mean_logit_var": float(res.logit_var.mean()), "seconds": res.seconds,
            "nonfinite_draws": int(res.extras.get("nonfinite_draws", 0)),
        }
        print(dumps(out))
    else:
        print(res.summary())
    return 0


def split_list(text, flag: str, example: str) -> list[str]:
    """The comma-separated items of a list flag's value, each stripped; an empty value or
    an empty item (``1,,3``, ``1,3,``) is refused by the flag's name, not dropped."""
    items = [v.strip() for v in str(text).split(",")]
    if not any(items):
        raise ValueError(f"{flag} is empty: give comma-separated numbers such as {example}")
    if not all(items):
        where = ", ".join(str(i + 1) for i, v in enumerate(items) if not v)
        raise ValueError(f"{flag} {text!r} has an empty item (position {where}): give comma-separated numbers such "
                         f"as {example}, without doubled, leading or trailing commas")
    return items


def _parse_levels(text: str, noise=None) -> list[float]:
    """The levels of ``--levels``, each checked (when ``noise`` is given) to be a level of
    that family (a fraction for stuck, whole bits for quantized, ...), by the flag's name."""
    try:
        levels = [plain_float(v) for v in split_list(text, "--levels", "0,0.05,0.1")]
    except ValueError as e:
        if str(e).startswith("--levels"):
            raise
        raise ValueError(f"--levels must be comma-separated numbers such as 0,0.05,0.1; got {text!r}") from None
    levels = [float(v) for v in check_levels(levels, MAX_LEVEL, name="--levels")]
    return levels if noise is None else check_family_levels(noise, levels, "--levels")


def cmd_sweep(args) -> int:
    noise = parse_noise(check_sweep_family(args.noise, "--noise", "--levels"), default_level=1.0)
    levels = _parse_levels(args.levels, noise)
    check_draws(args.draws)
    model, x, y, _ = load_model_and_data(args)
    res = sweep(model, x, y, noise, levels, draws=args.draws, seed=args.seed, targets=args.targets,
                batch_size=args.batch_size, progress=_progress(args))
    if args.json:
        for i, row in enumerate(res.to_frame().to_dict(orient="records")):
            row = {k: (float(v) if isinstance(v, (np.floating, float)) else int(v) if isinstance(v, np.integer) else v)
                   for k, v in row.items()}
            row["noise"] = res.noise
            row["nonfinite_draws"] = int(res.nonfinite_draws[i]) if res.nonfinite_draws is not None else 0
            print(dumps(row))
    else:
        print(res.summary())
    return 0


def register(sub) -> None:
    forms = ", ".join(f"{k}:LEVEL" for k in NOISE_STRING_FORMS)
    p = sub.add_parser("mc", help="Monte-Carlo noise injection on a checkpoint",
                       description=f"Monte-Carlo noise injection. Noise forms: {forms}.")
    add_model_data_args(p)
    p.add_argument("--noise", required=True, help=f"noise model, one of: {forms}")
    p.add_argument("--draws", type=int, default=200)
    p.set_defaults(func=cmd_mc)

    p = sub.add_parser("sweep", help="accuracy/loss-vs-noise curve (common random numbers)",
                       description="Accuracy and loss over noise levels, same draws at every level.")
    add_model_data_args(p)
    p.add_argument("--noise", default="relative", help="noise family without a level (relative, relative-max, additive, "
                                                        "multiplicative, ...): the levels come from --levels")
    p.add_argument("--levels", default="0,0.05,0.1,0.2,0.3,0.5,0.7,1.0", help="comma-separated noise levels")
    p.add_argument("--draws", type=int, default=100)
    p.set_defaults(func=cmd_sweep)
