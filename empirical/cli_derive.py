"""``noiseprop derive [TOPIC] [--latex]``: print the symbolic derivations.

Without a topic every derivation's plain-text summary is printed (assumptions, closed
forms, symbolic checks, source); ``TOPIC`` is one of the topics of
:data:`noiseprop.theory.symbolic.TOPICS` or a full derivation name such as
``depth.relu_critical``. ``--latex`` prints LaTeX for direct inclusion in a paper
(needs ``amsmath`` and ``amssymb``).
"""
from __future__ import annotations

import sys

from noiseprop.theory.symbolic import DERIVATION_NAMES, TOPICS, derive, get_derivation


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "derive",
        help="print the symbolic derivations (closed forms, assumptions, sources)",
        description=(
            "Print the closed forms derived with sympy (theory.symbolic), with their assumptions and sources. "
            f"Topics: {', '.join(TOPICS)}."
        ),
    )
    p.add_argument(
        "topic",
        nargs="?",
        default=None,
        metavar="TOPIC",
        help=f"one of {', '.join(TOPICS)}, or a derivation name such as depth.relu_critical (default: all)",
    )
    p.add_argument("--latex", action="store_true", help="print LaTeX (align environments) instead of text summaries")
    p.add_argument("--list", action="store_true", help="only list the derivation names with their titles")
    p.set_defaults(func=cmd_derive)


def _select(topic):
    if topic is None:
        return derive()
    if topic in TOPICS:
        return derive(topic)
    if topic in DERIVATION_NAMES:
        return (get_derivation(topic),)
    raise ValueError(
        f"unknown derivation topic {topic!r}; accepted topics: {', '.join(TOPICS)} "
        f"(or a derivation name: {', '.join(DERIVATION_NAMES)})"
    )


def cmd_derive(args) -> int:
    derivations = _select(args.topic)
    if args.list:
        text = "\n".join(f"{d.name}: {d.title}" for d in derivations)
    elif args.latex:
        header = "% noiseprop derivations (theory.symbolic); needs \\usepackage{amsmath,amssymb}\n"
        text = header + "\n".join(d.latex() for d in derivations)
    else:
        text = "\n\n".join(d.summary() for d in derivations)
    sys.stdout.write(text.rstrip("\n") + "\n")
    return 0
