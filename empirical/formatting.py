"""One number formatter for everything a person reads: summaries, the report's tables,
the paper's text.

- :func:`fmt_number`: a value for a table cell or a sentence (``n/a`` for NaN, ``∞``,
  integers as integers, 4 significant digits by default, scientific outside
  [1e-3, 1e4)).
- :func:`fmt_p`: a p-value (2 significant digits, ``<1e-4`` below).
- :func:`fmt_ci`: an interval ``[lo, hi]`` with the same digits on both ends.
- :func:`fmt_estimate`: a value rounded to what its interval supports: the number of
  decimals that keeps the interval's half-width to two significant digits.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["fmt_number", "fmt_p", "fmt_ci", "fmt_estimate", "decimals_for"]


def fmt_number(v, digits: int = 4) -> str:
    """A number for people to read.

    >>> fmt_number(0.123456), fmt_number(3), fmt_number(float("nan")), fmt_number(2.5e-5), fmt_number(True)
    ('0.1235', '3', 'n/a', '2.5e-05', 'yes')
    """
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "n/a"
    if math.isinf(f):
        return "∞" if f > 0 else "−∞"
    if f == 0:
        return "0"
    if abs(f) >= 1e4 or abs(f) < 1e-3:
        return f"{f:.{max(1, digits - 1)}g}"
    return f"{f:.{digits}g}"


def fmt_p(p) -> str:
    """A p-value.

    >>> fmt_p(0.0312), fmt_p(3e-7), fmt_p(float("nan"))
    ('0.031', '<1e-4', 'n/a')
    """
    try:
        p = float(p)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def decimals_for(half_width: float, significant: int = 2) -> int:
    """Decimals that show ``half_width`` to ``significant`` digits (0 when it is ≥ 10).

    >>> decimals_for(0.0123), decimals_for(2.4), decimals_for(35.0)
    (3, 1, 0)
    """
    h = abs(float(half_width))
    if not math.isfinite(h) or h == 0:
        return 4
    return max(0, significant - 1 - int(math.floor(math.log10(h))))


def fmt_ci(ci, decimals: int | None = None) -> str:
    """An interval ``[lo, hi]``; ``decimals=None`` chooses them from its half-width.

    >>> fmt_ci((0.81234, 0.84567)), fmt_ci((0.81234, 0.84567), decimals=4)
    ('[0.812, 0.846]', '[0.8123, 0.8457]')
    """
    lo, hi = float(ci[0]), float(ci[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[n/a]"
    d = decimals_for((hi - lo) / 2) if decimals is None else int(decimals)
    return f"[{lo:.{d}f}, {hi:.{d}f}]"


def fmt_estimate(value, ci, unit: str = "") -> str:
    """``value [lo, hi] unit``, all rounded to what the interval supports.

    >>> fmt_estimate(-0.0241163, (-0.0312, -0.0170), "points")
    '-0.0241 [-0.0312, -0.0170] points'
    """
    lo, hi = float(ci[0]), float(ci[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{fmt_number(value)} {unit}".rstrip()
    d = decimals_for((hi - lo) / 2)
    return f"{float(value):.{d}f} {fmt_ci((lo, hi), d)} {unit}".rstrip()
