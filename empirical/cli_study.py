"""``noiseprop study NAME``: run one of the five studies and write its tables, figures
and findings (the same cells, store and code as ``noiseprop report``).

Examples::

    noiseprop study batchnorm                          # digits, CPU scale
    noiseprop study batchnorm --archs vgg resnet20 --ks 0 1 3 all --seeds 0 1 2 3
    noiseprop study learning_rate --lrs 0.003 0.01 0.03 0.1 0.3 1 --arch resnet20 --norm bn
    noiseprop study architecture --dataset cifar10 --data-dir ~/data --models vgg resnet20 resnet56
    noiseprop study noise_aware --archs mlp resnet20 --train-eta 0.3
"""
from __future__ import annotations

import sys
from pathlib import Path

from noiseprop.theory.validation import check_output_dir, number

from .cells import ResultStore
from .checkpoint import check_replaceable_folder, publish_folder, sweep_temp
from .executor import check_workers, close_executor, make_executor, print_progress, stop_workers
from .train import default_cache_dir


def _ks(values):
    out = []
    for v in values:
        if str(v).lower() == "all":
            out.append(None)
        else:
            try:
                out.append(int(v))
            except ValueError:
                raise ValueError(f"--ks takes integers >= 0 or 'all', got {v!r}") from None
    return tuple(out)


def cmd_study(args) -> int:
    # before any import or work: 0 is refused (1 is the in-process executor), as by make_executor
    check_workers(args.workers, "--workers")
    # lazy: the studies load statsmodels (~2 s measured), which every other command would pay
    from .studies import STUDIES, default_grid, quick_grid, quick_options, run_plans, study_module

    if args.name not in STUDIES:
        raise ValueError(f"unknown study {args.name!r}; accepted: {list(STUDIES)}")
    # refuse what can be refused before any work
    if args.out:
        check_replaceable_folder(args.out, "--out")
    if args.cache_dir:
        check_output_dir(Path(args.cache_dir).expanduser(), "--cache-dir")
    overrides = {"dataset": args.dataset, "data_dir": args.data_dir}
    for k in ("draws", "epochs"):
        if getattr(args, k) is not None:
            overrides[k] = getattr(args, k)
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    if args.etas is not None:
        overrides["etas"] = tuple(args.etas)
    if args.theory is not None:
        overrides["theory"] = args.theory
    grid = quick_grid(**overrides) if args.quick else default_grid(**overrides)
    opts = dict(quick_options()[args.name]) if args.quick else {}
    if args.name == "architecture" and args.models:
        opts["models"] = tuple(args.models)
    if args.name in ("batchnorm", "norm_type", "noise_aware") and args.archs:
        opts["archs"] = tuple(args.archs)
    if args.name == "batchnorm" and args.ks:
        opts["ks"] = _ks(args.ks)
    if args.name == "norm_type" and args.norms:
        opts["norms"] = tuple(args.norms)
    if args.name == "learning_rate":
        if args.lrs:
            opts["lrs"] = tuple(args.lrs)
        if args.arch:
            opts["arch"] = args.arch
        if args.norm:
            opts["norm"] = args.norm
    elif args.arch or args.lrs or (args.norm and args.name != "architecture"):
        raise ValueError("--arch, --lrs and --norm apply to the learning_rate study (--norm also to architecture)")
    if args.train_eta is not None:
        if args.name != "noise_aware":
            raise ValueError("--train-eta applies to the noise_aware study")
        opts["train_eta"] = args.train_eta
    if args.name == "architecture" and args.norm:
        opts["norm"] = args.norm
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    check_output_dir(cache / "cells", "--cache-dir")
    ResultStore(cache / "cells").clean_temp()
    sweep_temp(cache / "checkpoints")  # temp files of killed runs
    mod = study_module(args.name)
    plan = mod.plan(grid, cache_dir=str(cache), **opts)
    print(f"[study {args.name}] {plan.n_models} models, {len(plan.tasks)} cells", file=sys.stderr)
    if getattr(args, "scheduler", None):
        from .cluster import make_dask_executor  # lazy: dask is optional

        executor = make_dask_executor(args.scheduler)
    else:
        executor = make_executor(args.workers)
    try:
        results, stats = run_plans([plan], grid, ResultStore(cache / "cells"), executor,
                                   progress=None if args.no_progress else print_progress())
    except KeyboardInterrupt:
        stop_workers(executor)
        raise
    finally:
        close_executor(executor)
    res = mod.analyse(plan, results, grid)
    print(res.summary())
    if args.out:
        from .report import ReportConfig, write_report  # lazy: the report loads the studies (statsmodels)

        out = publish_folder(Path(args.out), lambda staging: write_report(
            [res], grid, staging, ReportConfig(out_dir=args.out, quick=args.quick)))
        print(f"written to {out / 'report.md'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("study", help="run one study (architecture, batchnorm, learning_rate, norm_type, noise_aware)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="architecture | batchnorm | learning_rate | norm_type | noise_aware")
    p.add_argument("--dataset", default="digits", help="digits (default), teacher, cifar10, cifar100, mnist")
    p.add_argument("--data-dir", default=None, help="folder of the CIFAR/MNIST files")
    p.add_argument("--etas", type=number, nargs="+", default=None, help="relative noise levels (include 0)")
    p.add_argument("--draws", type=int, default=None, help="Monte-Carlo draws per level")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (at least 3 recommended)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the family's)")
    p.add_argument("--theory", choices=("linear", "moments", "auto"), default=None,
                   help="prediction method (auto: moments on the MLPs, first order elsewhere)")
    p.add_argument("--models", nargs="+", default=None, help="architecture: e.g. mlp vgg resnet20 resnet32 resnet44 resnet56")
    p.add_argument("--archs", nargs="+", default=None, help="batchnorm / norm_type / noise_aware: architectures")
    p.add_argument("--train-eta", type=number, default=None,
                   help="noise_aware: relative noise level injected during noise-aware training (default 0.3)")
    p.add_argument("--ks", nargs="+", default=None, help="batchnorm: numbers of BatchNorm places (integers or 'all')")
    p.add_argument("--norms", nargs="+", default=None, help="norm_type: subset of none bn l1 topk")
    p.add_argument("--arch", default=None, help="learning_rate: the architecture")
    p.add_argument("--norm", default=None, help="learning_rate / architecture: normalisation (none, bn, l1, topk)")
    p.add_argument("--lrs", type=number, nargs="+", default=None, help="learning_rate: learning rates")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, >= 1 (default min(2, cores); 1: in-process)")
    p.add_argument("--cache-dir", default=None, help="checkpoints and result cells (default $NOISEPROP_CACHE_DIR "
                                                      "or ~/.cache/noiseprop)")
    p.add_argument("--out", default=None, help="write report.md, figures and CSVs of this study to this folder")
    p.add_argument("--quick", action="store_true", help="a tiny grid (smoke test)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the cells on a dask.distributed scheduler (needs noiseprop[cluster])")
    p.set_defaults(func=cmd_study)
