"""Cost and accuracy of moment-propagation settings on the main job's models.

The models of the default report (``noiseprop report``: digits, widths 8, the families'
default epochs (15 for VGG and ResNets, 20 for the MLP of width 128), seed 0, BatchNorm
digital), its noise levels
(relative η = 0.1 … 1.0) and its 180 test inputs. Per model: a Monte-Carlo sweep with
``--draws`` draws per level (the reference) and one ``predict_sweep(method="moments")``
per setting, each timed (one thread); the error of the predicted accuracy in points
(predicted − Monte-Carlo) and the Monte-Carlo standard error.

Settings (``MomentPropagator`` keywords):

- ``default``: ``rank`` 32, ``spatial_rank`` 4, ``h2_rank`` 16, unit-space re-factorisation
  up to :data:`~noiseprop.theory.moments.rules.UNIT_SPACE_MAX` units;
- ``unit1024``: the defaults with unit space up to 1024 units (the earlier default);
- ``study``: :data:`noiseprop.empirical.studies.theory_helpers.MOMENT_SETTINGS` (what the
  report uses).

    .venv/bin/python benchmarks/moment_settings.py [--models mlp,vgg,resnet8,resnet20]
        [--n 180] [--draws 200] [--settings default,unit1024,study]

One JSON line per (model, setting), after one line per model with the Monte-Carlo curve.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np
import torch

LEVELS = [0.1, 0.2, 0.3, 0.5, 0.75, 1.0]


def _settings():
    from noiseprop.empirical.studies.theory_helpers import MOMENT_SETTINGS

    return {"default": {}, "unit1024": {"unit_space_max": 1024}, "study": dict(MOMENT_SETTINGS)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,vgg,resnet8,resnet20")
    ap.add_argument("--n", type=int, default=180)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--settings", default="default,unit1024,study")
    ap.add_argument("--cache-dir", default=None, help="checkpoint cache (default: noiseprop's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import noiseprop.theory.moments.rules as rules
    from noiseprop.empirical.data import load_dataset
    from noiseprop.empirical.models import model_spec
    from noiseprop.empirical.montecarlo import sweep
    from noiseprop.empirical.train import default_train_config, train
    from noiseprop.theory import RelativeGaussian, predict_sweep

    table = _settings()
    chosen = args.settings.split(",")
    unknown = [s for s in chosen if s not in table]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; accepted: {list(table)}")
    data = load_dataset("digits")
    x, y = data.x_test[:args.n], data.y_test[:args.n]
    unit = RelativeGaussian(1.0)
    # predict_sweep exposes rank/spatial_rank/h2_rank; the unit-space bound is the
    # propagator's own keyword, so it is set through its default for one call
    init = rules.MomentPropagator.__init__
    for arch in args.models.split(","):
        norm = "none" if arch == "mlp" else "bn"
        d = default_train_config(arch, norm=norm)
        spec = model_spec(arch, list(data.in_shape), int(data.num_classes), norm=norm,
                          width=128 if arch == "mlp" else 8, depth=d["depth"])
        net = train(spec, data, epochs=d["epochs"], seed=0, cache_dir=args.cache_dir).model.eval()
        sw = sweep(net, x, y, unit, LEVELS, draws=args.draws, seed=1, progress=False)
        mc = np.array([float(np.mean(a)) for a in sw.accuracies])
        se = np.array([float(np.std(a, ddof=1) / np.sqrt(len(a))) for a in sw.accuracies])
        print(json.dumps({"model": arch, "n_inputs": args.n, "levels": LEVELS, "mc_draws": args.draws,
                          "mc_accuracy": np.round(mc, 4).tolist(), "mc_se_points": np.round(100 * se, 2).tolist()}),
              flush=True)
        for name in chosen:
            kw = dict(table[name])
            usm = kw.pop("unit_space_max", None)
            if usm is not None:
                def patched(self, lin, noise, _usm=usm, **k):
                    k.setdefault("unit_space_max", _usm)
                    init(self, lin, noise, **k)
                rules.MomentPropagator.__init__ = patched
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = time.perf_counter()
                    c = predict_sweep(net, x, y, unit, LEVELS, method="moments", loss_probes=0, accuracy_draws=0,
                                      n_points=512, cache=False, **kw)
                    s = time.perf_counter() - t
            finally:
                rules.MomentPropagator.__init__ = init
            acc = np.array([float(p.accuracy) for p in c.predictions])
            err = 100 * (acc - mc)
            print(json.dumps({"model": arch, "setting": name, "options": table[name], "seconds": round(s, 2),
                              "error_points": np.round(err, 2).tolist(),
                              "max_abs_error_points": round(float(np.abs(err).max()), 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
