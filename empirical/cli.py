"""The ``noiseprop`` command line.

Each sub-command lives in its own module that defines ``register(subparsers)``;
this file only lists those modules, so commands can be added without touching others.
A command's handler takes the parsed ``args`` and returns an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that register sub-commands (each defines ``register(subparsers)``).
COMMAND_MODULES = [
    "noiseprop.empirical.cli_mc",  # mc, sweep
    "noiseprop.empirical.cli_train",  # train
    "noiseprop.empirical.cli_report",  # report
    "noiseprop.empirical.cli_study",  # study
    "noiseprop.empirical.cli_derive",  # derive
    "noiseprop.empirical.cli_predict",  # predict
    "noiseprop.empirical.cli_drift",  # drift
]


class CLIError(Exception):
    """A user error reported as ``noiseprop: error: ...`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noiseprop",
        description="Predict, and check by Monte-Carlo, what weight noise does to a trained network.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"noiseprop: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
