"""Figures of the studies: a :class:`Figure` is plain data (the frame behind it, its
kind and options); :func:`render` draws it to a PNG with matplotlib (Agg), so the
report writes the figure and the CSV of exactly what was plotted side by side.

Kinds
-----
``curves``: accuracy vs η, one line per group, mean over seeds with a ``confidence``
    band (Student-t across seeds of each seed's Monte-Carlo mean), and the theory's
    predicted curve (mean over seeds) dashed in the same colour; ``predicted_first_order``
    (optional) dotted. Columns: ``group``,
    ``panel`` (optional), ``eta``, ``accuracy``, ``ci_low``, ``ci_high``, ``predicted``.
``calibration``: observed vs predicted with the observed value's interval and the
    identity line. Columns: ``predicted``, ``observed``, ``ci_low``, ``ci_high``,
    ``group``, ``panel`` (optional); option ``log``.
``lr``: quantities against the learning rate (log axes), mean and band over seeds,
    optional reference lines (``2/lr``). Columns: ``lr``, ``series``, ``value``,
    ``ci_low``, ``ci_high``, ``panel``; options ``reference`` (list of (label, factor):
    draws ``factor/lr``), ``logy`` (per panel set).
``bars``: one bar per group with its interval. Columns: ``group``, ``value``,
    ``ci_low``, ``ci_high``, ``panel``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["Figure", "render", "THEORY_LINES"]

#: How the curve figures draw the theory (used in their captions).
THEORY_LINES = ("dashed: theory (moment propagation; the first order where moments were not run, drawn only where its validity diagnostic holds), dotted: the first order beside the moments where it holds")


@dataclass(frozen=True)
class Figure:
    name: str
    caption: str
    kind: str
    frame: pd.DataFrame
    options: dict = field(default_factory=dict)


def _mpl():
    import matplotlib  # lazy: the Agg backend is chosen before pyplot is imported (pyplot: seconds, measured)

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.grid": True,
                         "grid.alpha": 0.3, "svg.hashsalt": "noiseprop"})
    return plt


def _panels(frame):
    if "panel" in frame.columns:
        return list(dict.fromkeys(frame["panel"].tolist()))
    return [None]


def _axes(plt, n, width=4.2, height=3.3):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def render(fig_spec: Figure, path) -> Path:
    """Draw ``fig_spec`` to ``path`` (PNG, no timestamp metadata)."""
    plt = _mpl()
    path = Path(path)
    f = fig_spec.frame
    panels = _panels(f)
    fig, axes = _axes(plt, len(panels))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # one colour per group or series across all panels (order of first appearance)
    key = "series" if fig_spec.kind == "lr" else "group"
    order = list(dict.fromkeys(f[key].tolist())) if key in f.columns else []
    colour_of = {g: colors[i % len(colors)] for i, g in enumerate(order)}
    for ax, panel in zip(axes, panels):
        sub = f if panel is None else f[f["panel"] == panel]
        if fig_spec.kind == "curves":
            for g, d in sub.groupby("group", sort=False):
                c = colour_of[g]
                d = d.sort_values("eta")
                ax.plot(d["eta"], d["accuracy"], "-o", color=c, ms=3, label=str(g))
                ax.fill_between(d["eta"], d["ci_low"], d["ci_high"], color=c, alpha=0.2, lw=0)
                if "predicted" in d and d["predicted"].notna().any():
                    ax.plot(d["eta"], d["predicted"], "--", color=c, lw=1)
                if "predicted_first_order" in d and d["predicted_first_order"].notna().any():
                    ax.plot(d["eta"], d["predicted_first_order"], ":", color=c, lw=1)
            ax.set_xlabel("relative noise η (σ_l = η·std W_l)")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.02, 1.02)
        elif fig_spec.kind == "calibration":
            for g, d in sub.groupby("group", sort=False):
                c = colour_of[g]
                yerr = np.vstack([d["observed"] - d["ci_low"], d["ci_high"] - d["observed"]])
                yerr = np.where(np.isfinite(yerr), np.clip(yerr, 0, None), 0)
                ax.errorbar(d["predicted"], d["observed"], yerr=yerr, fmt="o", ms=3, color=c, label=str(g),
                            elinewidth=0.8, capsize=0)
            vals = pd.concat([sub["predicted"], sub["observed"]]).to_numpy(float)
            vals = vals[np.isfinite(vals)]
            if fig_spec.options.get("log"):
                vals = vals[vals > 0]
                if vals.size:
                    ax.set_xscale("log")
                    ax.set_yscale("log")
            if vals.size:
                lo, hi = vals.min(), vals.max()
                ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="identity")
            ax.set_xlabel("predicted")
            ax.set_ylabel("observed (Monte-Carlo)")
        elif fig_spec.kind == "lr":
            for g, d in sub.groupby("series", sort=False):
                c = colour_of[g]
                d = d.sort_values("lr")
                ax.plot(d["lr"], d["value"], "-o", color=c, ms=3, label=str(g))
                if d["ci_low"].notna().any():
                    ax.fill_between(d["lr"], d["ci_low"], d["ci_high"], color=c, alpha=0.2, lw=0)
            ax.set_xscale("log")
            refs = fig_spec.options.get("reference", {}).get(str(panel), [])
            lrs = np.sort(sub["lr"].unique())
            for (label, factor), style in zip(refs, ("k:", "k--", "k-.")):
                ax.plot(lrs, factor / lrs, style, lw=1, label=label)
            v = sub["value"].to_numpy(float)
            if str(panel) in fig_spec.options.get("logy", []) and np.any(np.isfinite(v) & (v > 0)):
                ax.set_yscale("log")
            ax.set_xlabel("learning rate")
        elif fig_spec.kind == "bars":
            d = sub.reset_index(drop=True)
            x = np.arange(len(d))
            yerr = np.vstack([d["value"] - d["ci_low"], d["ci_high"] - d["value"]])
            yerr = np.where(np.isfinite(yerr), np.clip(yerr, 0, None), 0)
            ax.bar(x, d["value"], yerr=yerr, color=[colour_of[g] for g in d["group"]], capsize=3)
            ax.set_xticks(x)
            ax.set_xticklabels([str(g) for g in d["group"]], rotation=30, ha="right")
        else:
            raise ValueError(f"unknown figure kind {fig_spec.kind!r}")
        if panel is not None:
            ax.set_title(str(panel))
        ylabel = fig_spec.options.get("ylabel")
        if ylabel:
            ax.set_ylabel(ylabel if isinstance(ylabel, str) else ylabel.get(str(panel), ""))
        if fig_spec.kind != "bars" and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        if sub.empty:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
