"""Quality bar of the model zoo on digits: clean test accuracy and training time.

Trains each family with its default hyper-parameters (``default_train_config``) on the
built-in digits data, without the cache, and prints one JSON line per (family, norm):
model, norm, width, depth, epochs, lr, clean test / train accuracy, wall-clock and CPU
seconds of training. Target (issue 3): >= 95% clean test accuracy within 2 minutes of
training on 2 cores.

    python benchmarks/train_quality.py                      # all families, norm=bn
    python benchmarks/train_quality.py --norms bn,none,l1,topk --threads 1

Wall time is distorted on a shared machine; ``cpu_seconds`` (process CPU time, all
threads) is reported alongside.
"""
from __future__ import annotations

import argparse
import json
import time

from noiseprop.empirical.data import load_dataset
from noiseprop.empirical.train import default_train_config, train

FAMILIES = ["mlp", "vgg", "resnet20", "resnet32", "resnet44", "resnet56"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--norms", default="bn")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while training (train()'s default 1; the bar is stated for 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the default epochs")
    args = p.parse_args(argv)
    data = load_dataset("digits")
    for norm in args.norms.split(","):
        for fam in args.families.split(","):
            cfg = default_train_config(fam, norm=norm, dataset="digits")
            spec = {"name": fam, "norm": norm, "width": cfg["width"]}
            if fam in ("mlp", "vgg"):
                spec["depth"] = cfg["depth"]
            c0 = time.process_time()
            r = train(spec, data, seed=args.seed, cache=False, epochs=args.epochs, num_threads=args.threads)
            cpu = time.process_time() - c0
            print(json.dumps({
                "benchmark": "train_quality", "dataset": "digits", "model": fam, "norm": norm,
                "width": r.spec["width"], "depth": r.spec["depth"], "epochs": r.config["epochs"],
                "lr": r.config["lr"], "batch_size": r.config["batch_size"], "schedule": r.config["schedule"],
                "test_accuracy": round(r.test_accuracy, 4), "train_accuracy": round(r.train_accuracy, 4),
                "train_seconds": round(r.train_seconds, 1), "cpu_seconds": round(cpu, 1),
                "threads": args.threads, "seed": args.seed,
            }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
