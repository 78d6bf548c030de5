"""``noiseprop train``: train a model of the zoo (cached) and write a checkpoint.

Example::

    noiseprop train --model resnet20 --norm bn --dataset digits --lr 0.05 --epochs 15 \\
        --seed 0 --out resnet20_bn.pt

Options left out take the family's defaults (:func:`.train.default_train_config`). The
checkpoint is readable by :func:`.checkpoint.load_checkpoint`; its ``meta`` holds
``dataset``, ``data_dir`` and ``dataset_spec`` so other commands can reload the test data.
"""
from __future__ import annotations

import sys

from noiseprop.theory.validation import check_output_dir, check_output_file, check_seed, number

from .cli import CLIError
from .data import DATASETS, load_dataset
from .models import NORMS, model_spec
from .train import SCHEDULES, TrainingDivergedError, default_train_config, train


_FAM = "default: the family's (see default_train_config)"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (mlp, vgg, resnet20/32/44/56) with a norm choice; cached; writes a checkpoint",
        description="Train a model of the zoo with SGD + momentum. Repeated requests load from the cache "
                    "(--cache-dir, default $NOISEPROP_CACHE_DIR or ~/.cache/noiseprop). Options left out take the "
                    "family's defaults.",
    )
    p.add_argument("--model", required=True,
                   help="mlp, vgg (vgg11/13/16/19), resnet20, resnet32, resnet44, resnet56")
    p.add_argument("--norm", default="none", choices=NORMS, help="normalisation layers (default: none)")
    p.add_argument("--norm-layers", type=int, default=None,
                   help="normalise only the first K eligible places (default: all)")
    p.add_argument("--topk-k", type=int, default=None, help="k of TopK BatchNorm (default 10)")
    p.add_argument("--width", type=int, default=None,
                   help="hidden units (mlp) or channels of the first stage (vgg, resnet)")
    p.add_argument("--depth", type=int, default=None, help="hidden layers (mlp), 11/13/16/19 (vgg)")
    p.add_argument("--dataset", default="digits", choices=DATASETS, help="default: digits (built in)")
    p.add_argument("--data-dir", default=None, help="folder with the cifar10/cifar100/mnist files")
    p.add_argument("--lr", type=number, default=None, help=_FAM)
    p.add_argument("--epochs", type=int, default=None, help=_FAM)
    p.add_argument("--batch-size", type=int, default=None, help=_FAM)
    p.add_argument("--momentum", type=number, default=None, help=_FAM)
    p.add_argument("--weight-decay", type=number, default=None, help=_FAM)
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help=_FAM)
    p.add_argument("--warmup-epochs", type=int, default=None, help=_FAM)
    p.add_argument("--seed", type=int, default=0, help="initialisation and mini-batch order (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while training (default 1: reproducible whatever the machine, and fastest "
                        "for the small digits models; part of the cache key)")
    p.add_argument("--out", default=None, help="checkpoint file to write (default: only the cache)")
    p.add_argument("--cache-dir", default=None, help="checkpoint cache folder")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=run)


def run(args) -> int:
    # everything that can be refused is refused before the training starts
    if args.out is not None:
        check_output_file(args.out, "--out")
    if args.cache_dir is not None and not args.no_cache:
        check_output_dir(args.cache_dir, "--cache-dir")
    check_seed("--seed", args.seed)
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    name = args.model
    if name.lower() == "resnet" and args.depth is not None:
        name = f"resnet{args.depth}"
    defaults = default_train_config(name, norm=args.norm, dataset=data.name)
    depth = args.depth
    if depth is None and not args.model.lower().startswith(("resnet", "vgg1")):
        depth = defaults["depth"]
    spec = model_spec(args.model, data.in_shape, data.num_classes, norm=args.norm, norm_layers=args.norm_layers,
                      width=args.width if args.width is not None else defaults["width"], depth=depth,
                      topk_k=args.topk_k)
    try:
        result = train(spec, data, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                       momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                       warmup_epochs=args.warmup_epochs, seed=args.seed, cache_dir=args.cache_dir,
                       cache=not args.no_cache, progress=False if args.quiet else "auto",
                       num_threads=args.threads)
    except TrainingDivergedError as e:
        raise CLIError(str(e)) from e
    written = None
    if args.out is not None:
        written = result.save(args.out)
    if not args.quiet:
        print(result.summary())
        if written is not None:
            print(f"checkpoint written to {written}")
        elif result.cache_path is not None:
            print(f"checkpoint in the cache: {result.cache_path}")
    if written is None and result.cache_path is None:
        print("noiseprop: warning: --no-cache without --out: the trained model was not saved", file=sys.stderr)
    return 0
