"""``noiseprop report``: the main job (what ``make report`` runs): the four studies on
the default data, then report/ with report.md, report.html, PNG figures and CSVs.

Resumable: every finished cell is stored (``<cache-dir>/cells``); a killed run, rerun
with the same arguments, computes only what is missing and writes the same report.
"""
from __future__ import annotations

from noiseprop.theory.validation import number

from .executor import check_workers


def cmd_report(args) -> int:
    # before any import or work: 0 is refused (1 is the in-process executor), as by make_executor
    check_workers(args.workers, "--workers")
    from .report import ReportConfig, make_report  # lazy: the studies load statsmodels (~2 s measured)
    from .studies import PUBLISHED_STUDIES, STUDIES

    studies = tuple(args.studies) if args.studies else PUBLISHED_STUDIES
    bad = [s for s in studies if s not in STUDIES]
    if bad:
        raise ValueError(f"unknown studies {bad}; accepted: {list(STUDIES)}")
    cfg = ReportConfig(out_dir=args.out, dataset=args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
                       workers=args.workers, quick=args.quick, studies=studies, draws=args.draws,
                       seeds=tuple(args.seeds) if args.seeds else None, etas=tuple(args.etas) if args.etas else None,
                       epochs=args.epochs, progress=not args.no_progress,
                       scheduler=getattr(args, "scheduler", None), scale=getattr(args, "scale", "cpu"))
    path = make_report(cfg)
    print(f"report written to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="run the main job (the four studies) and write report/",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="report", help="output folder (default: report)")
    p.add_argument("--dataset", default="digits", help="digits (default), teacher, cifar10, cifar100, mnist")
    p.add_argument("--data-dir", default=None, help="folder of the CIFAR/MNIST files")
    p.add_argument("--studies", nargs="+", default=None,
                   help="subset of: architecture batchnorm learning_rate norm_type noise_aware (default: the four "
                        "published studies)")
    p.add_argument("--draws", type=int, default=None, help="Monte-Carlo draws per noise level")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds")
    p.add_argument("--etas", type=number, nargs="+", default=None, help="relative noise levels (include 0)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs for every model")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, >= 1 (default min(2, cores); 1: in-process)")
    p.add_argument("--cache-dir", default=None,
                   help="checkpoints and result cells (default: $NOISEPROP_CACHE_DIR or ~/.cache/noiseprop)")
    p.add_argument("--quick", action="store_true", help="a tiny grid, at most 90 s (used by the tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the cells on a dask.distributed scheduler (e.g. tcp://host:8786; needs "
                        "noiseprop[cluster]) instead of local worker processes")
    p.add_argument("--scale", choices=("cpu", "paper"), default="cpu",
                   help="cpu (default: digits, sized for 10 min on 2 cores) or paper (CIFAR-10 from --data-dir, "
                        "the published architectures, widths and epochs; GPU when present)")
    p.set_defaults(func=cmd_report)
