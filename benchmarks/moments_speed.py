"""Cost of moment propagation against the simulation it replaces (issue 11).

Per model: a 10-level moments ``predict_sweep`` (accuracy curve only:
``accuracy_draws=0, loss_probes=0``) against a 10-level Monte-Carlo ``sweep`` with 100
draws per level (common random numbers), on the same trained model and inputs, timed
in the same run, alternating (``--repeats`` pairs; the median of each side), one thread.
Also the split of one level's moment propagation into the moment pass and the surrogate
(covariance) pass. Target: ``speedup = seconds_mc / seconds_moments >= 1``.

    .venv/bin/python benchmarks/moments_speed.py [--models mlp,vgg,resnet20] [--n 359]
        [--repeats 1] [--threads 1]

One JSON line per model. Figures are from a shared machine: only the ratio within a
line is meaningful.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

LEVELS = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]
MODELS = {
    "mlp": {"name": "mlp", "norm": "none"},
    "vgg": {"name": "vgg", "norm": "bn"},
    "resnet20": {"name": "resnet20", "norm": "bn"},
    "resnet32": {"name": "resnet32", "norm": "bn"},
    "resnet56": {"name": "resnet56", "norm": "bn"},
}


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,vgg,resnet20")
    ap.add_argument("--n", type=int, default=None, help="test inputs (default: all)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--noise", default="relative")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from noiseprop.empirical import sweep
    from noiseprop.empirical.data import load_dataset
    from noiseprop.empirical.train import train
    from noiseprop.theory import predict_sweep
    from noiseprop.theory.linearize import LinearizedNetwork
    from noiseprop.theory.moments import MomentPropagator
    from noiseprop.theory.moments.surrogate import propagate_moments
    from noiseprop.theory.noise import parse_noise

    data = load_dataset("digits")
    n = args.n or data.x_test.shape[0]
    x, y = data.x_test[:n], data.y_test[:n]
    for name in args.models.split(","):
        model = train(MODELS[name], data, seed=0).model.eval()
        t_mc, t_mom = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predict_sweep(model, x[:4], y[:4], args.noise, [0.1], method="moments", accuracy_draws=0, loss_probes=0)
            sweep(model, x[:4], y[:4], args.noise, [0.1], draws=2, progress=False)
            for _ in range(args.repeats):
                mc, t = _timed(lambda: sweep(model, x, y, args.noise, LEVELS, draws=100, seed=0, progress=False))
                t_mc.append(t)
                mom, t = _timed(lambda: predict_sweep(model, x, y, args.noise, LEVELS, method="moments",
                                                      accuracy_draws=0, loss_probes=0))
                t_mom.append(t)
            # one level, split into the moment pass and the surrogate pass
            lin = LinearizedNetwork(model)
            noise = parse_noise(f"{args.noise}:0.3")
            prop = MomentPropagator(lin, noise)
            _, t_pass = _timed(lambda: [prop.run(x[i:i + 32]) for i in range(0, n, 32)])
            _, t_level = _timed(lambda: propagate_moments(lin, x, noise, chunk_size=32, propagator=prop))
        sm, sp = statistics.median(t_mc), statistics.median(t_mom)
        print(json.dumps(dict(model=name, noise=args.noise, n_inputs=n, levels=len(LEVELS), mc_draws_per_level=100,
                              seconds_mc_sweep=sm, seconds_moments_sweep=sp, speedup=sm / sp, target_speedup=1.0,
                              met=bool(sm / sp >= 1.0), seconds_one_level=t_level, seconds_one_level_pass=t_pass,
                              seconds_one_level_surrogate=t_level - t_pass, threads=torch.get_num_threads(),
                              repeats=args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
