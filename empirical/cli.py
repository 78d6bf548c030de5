"""The ``noiseprop`` command line.

Each sub-command lives in its own module that defines ``register(subparsers)``;
this file only lists those modules, so commands can be added without touching others.
A command's handler takes the parsed ``args`` and returns an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys

import numpy as np

from noiseprop.theory.validation import first_line

from .checkpoint import CheckpointError
from .executor import TaskError

#: Modules that register sub-commands (each defines ``register(subparsers)``).
COMMAND_MODULES = [
    "noiseprop.empirical.cli_mc",  # mc, sweep
    "noiseprop.empirical.cli_train",  # train
    "noiseprop.empirical.cli_report",  # report
    "noiseprop.empirical.cli_study",  # study
    "noiseprop.empirical.cli_derive",  # derive
    "noiseprop.empirical.cli_predict",  # predict
    "noiseprop.empirical.cli_sensitivity",  # sensitivity
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


def json_safe(obj):
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None``, so that
    ``json.dumps(..., allow_nan=False)`` writes valid JSON (``null``)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def dumps(obj) -> str:
    """Strict JSON (no bare ``NaN``): non-finite numbers become ``null``."""
    return json.dumps(json_safe(obj), allow_nan=False)


def run_command(func, args) -> int:
    """Run a command handler: user errors as one line ``noiseprop: error: ...`` (exit 2),
    Ctrl-C as one line (exit 130), never a traceback for either."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("noiseprop: interrupted; finished work is kept (rerun the same command to resume)", file=sys.stderr)
        return 130
    except TaskError as e:
        print(f"noiseprop: error: a task failed: {first_line(e, type(e).__name__)}", file=sys.stderr)
        return 1
    except (CLIError, ValueError, TypeError, FileNotFoundError, KeyError, CheckpointError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"noiseprop: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # permission denied, disk full, not a folder...
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"noiseprop: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def exit_now(code: int) -> None:
    """Leave the process at once (after flushing): used after Ctrl-C, when everything
    worth keeping is already on disk (every file is written atomically, workers are
    stopped), so the interpreter's slow teardown of torch and friends (seconds on a
    loaded machine) does not delay the prompt."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv=None) -> int:
    """The ``noiseprop`` command. With ``argv=None`` (the real command line) an
    interrupted run exits at once with status 130; with a list, the code is returned."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("noiseprop: interrupted", file=sys.stderr)
        code = 130
    else:
        code = run_command(args.func, args)
    if code == 130 and argv is None:
        exit_now(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
