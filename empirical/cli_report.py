"""``noiseprop report``: the main job (what ``make report`` runs)."""
from __future__ import annotations


def cmd_report(args) -> int:
    from .report import ReportConfig, make_report

    cfg = ReportConfig(out_dir=args.out, dataset=args.dataset, data_dir=args.data_dir, draws=args.draws,
                       seed=args.seed, cache_dir=args.cache_dir, quick=args.quick,
                       progress=False if args.no_progress else None)
    path = make_report(cfg)
    print(f"report written to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="run the main job and write report/")
    p.add_argument("--out", default="report", help="output folder (default: report)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="checkpoint cache (default: $NOISEPROP_CACHE_DIR or ~/.cache/noiseprop)")
    p.add_argument("--quick", action="store_true", help="a reduced run (used by the tests)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_report)
