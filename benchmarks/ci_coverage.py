"""Coverage of the Monte-Carlo accuracy interval at a study cell's few draws (issue 14).

``--quantity loss_increase`` checks the loss increase's interval the same way.

A study cell compares the predicted accuracy with the mean accuracy of ``draws``
Monte-Carlo draws (12 in the default grid) and its 95% interval. Which interval holds
its 95% at that size? Per model of the default report (trained as the report trains
it, cached in ``--cache``): a ``--population``-draw Monte-Carlo sweep over the grid's
levels gives each level's per-draw accuracies; ``--trials`` times, ``n`` draws are
resampled from that population and the BCa bootstrap interval
(:func:`noiseprop.empirical.stats.bootstrap_ci`, 1,000 resamples: what the comparison
used before) and the Student-t interval (:func:`noiseprop.empirical.stats.mean_ci`,
what it uses now) are checked against the population's mean.

    .venv/bin/python benchmarks/ci_coverage.py [--draws 12,20,50] [--population 500]
        [--trials 400] [--cache DIR] [--quantity accuracy|loss_increase]

One JSON line per model, level and ``n``, and a summary line per ``n``: the mean,
smallest and largest coverage of each interval over the cells. The coverage of one
cell carries a binomial standard error of about ``sqrt(0.95·0.05/trials)`` (1.1
points at 400 trials).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np

#: (architecture, norm, norm_layers, seed): the report's models whose curves the
#: theory misses most (BatchNorm in the first layer only), and three with norms in
#: every layer.
MODELS = (("vgg", "bn", 1, 0), ("resnet20", "bn", 1, 1), ("resnet20", "topk", None, 2), ("vgg", "bn", None, 1),
          ("resnet20", "bn", None, 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", default="12,20,50", help="draws per cell to check (comma-separated)")
    ap.add_argument("--population", type=int, default=500, help="Monte-Carlo draws per level of the population")
    ap.add_argument("--trials", type=int, default=400, help="resampled cells per level and draw count")
    ap.add_argument("--cache", default=".noiseprop-cache/ci_coverage", help="training cache directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantity", default="accuracy", choices=("accuracy", "loss_increase"),
                    help="per-draw accuracy, or per-draw loss minus the clean loss")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from scipy.stats import skew

    from noiseprop.empirical import sweep
    from noiseprop.empirical.stats import bootstrap_ci, mean_ci
    from noiseprop.empirical.studies import default_grid
    from noiseprop.empirical.studies.data_cache import load_data
    from noiseprop.empirical.studies.study_cells import _train, model_cells
    from noiseprop.theory import RelativeGaussian

    grid = default_grid()
    data = load_data(grid.dataset, grid.data_dir, grid.n_train)
    n_test = min(grid.n_test or data.n_test, data.n_test)
    x, y = data.x_test[:n_test], data.y_test[:n_test]
    sizes = [int(s) for s in args.draws.split(",")]
    rng = np.random.default_rng(0)
    summary = {n: {"bca": [], "t": []} for n in sizes}
    for arch, norm, k, seed in MODELS:
        tasks, _ = model_cells("coverage", grid, arch, norm=norm, norm_layers=k, seed=seed, cache_dir=args.cache)
        res, _ = _train(**tasks[0].kwargs)
        net = res.model.eval()
        sw = sweep(net, x, y, RelativeGaussian(1.0), grid.etas, draws=args.population, seed=99, progress=False)
        if args.quantity == "accuracy":
            per_draw = np.asarray(sw.accuracies, dtype=np.float64)
        else:
            per_draw = np.asarray(sw.losses, dtype=np.float64) - float(sw.clean_loss)
        label = f"{arch} norm={norm}" + (f" k={k}" if k is not None else "") + f" seed={seed}"
        for i, eta in enumerate(grid.etas):
            if eta == 0:
                continue
            pop = per_draw[i]
            mu = float(pop.mean())
            for n in sizes:
                hits = {"bca": 0, "t": 0}
                for _ in range(args.trials):
                    s = rng.choice(pop, n, replace=True)
                    lo, hi = bootstrap_ci(s, np.mean, 0.95, n_resamples=1000, seed=int(rng.integers(1 << 30)))
                    hits["bca"] += lo <= mu <= hi
                    _, _, (lo, hi) = mean_ci(s, 0.95)
                    hits["t"] += lo <= mu <= hi
                cov = {m: h / args.trials for m, h in hits.items()}
                for m in cov:
                    summary[n][m].append(cov[m])
                print(json.dumps({"benchmark": "ci_coverage", "quantity": args.quantity, "model": label, "eta": eta,
                                  "draws": n,
                                  "population_mean": round(mu, 4), "population_sd": round(float(pop.std()), 4),
                                  "skewness": round(float(skew(pop)), 2), "coverage_bca": cov["bca"],
                                  "coverage_t": cov["t"]}), flush=True)
    for n in sizes:
        out = {"benchmark": "ci_coverage", "quantity": args.quantity, "summary": True, "draws": n,
               "cells": len(summary[n]["t"]), "trials": args.trials}
        for m in ("bca", "t"):
            v = np.asarray(summary[n][m])
            out.update({f"coverage_{m}_mean": round(float(v.mean()), 4), f"coverage_{m}_min": round(float(v.min()), 4),
                        f"coverage_{m}_max": round(float(v.max()), 4)})
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
