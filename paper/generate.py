"""Regenerate everything the paper includes, from the code and from a report folder.

    python paper/generate.py [--report report] [--out paper/generated]

Writes into ``--out`` (fixed file names, so ``main.tex`` never refers to a file that
is not produced, whatever the report holds):

* ``eq_<topic>.tex`` for each topic of :mod:`noiseprop.theory.symbolic`: the
  concatenated ``Derivation.latex()`` of the topic (the equations are the code's).
* ``report_info.tex``: what the report was run with (from its CSVs).
* per study ``S`` (architecture, batchnorm, learning_rate, norm_type):
  ``fig_S_curves.pdf`` (Monte-Carlo accuracy vs η per group, mean over seeds, with the
  theory's prediction dashed), ``tab_S_findings.tex`` (claims, effects, Holm p,
  verdicts), ``tab_S_summary.tex``.
* ``fig_learning_rate_sharpness.pdf``: top Hessian eigenvalue against 2/lr.
* ``fig_calibration.pdf``: predicted vs Monte-Carlo accuracy over all studies.
* ``results_<study>.tex``, ``results_overview.tex``: the results in sentences (verdicts,
  effects with intervals, power of inconclusive ones, theory agreement), from the CSVs.
* ``disagreement.tex``: the section on where theory and measurement disagree, its
  sentences and numbers computed from the CSVs.

CSV files are found by name anywhere under the report folder (``report/csv/X.csv``
or ``report/X.csv``). A table that is missing yields a sentence saying so, never a
missing file. Output is deterministic (no timestamps in the PDFs; sorted inputs).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from noiseprop.empirical.checkpoint import atomic_write  # the one atomic-write helper
from noiseprop.empirical.report import paper_table, round_to_ci
from noiseprop.empirical.studies.theory_helpers import first_order_valid
from noiseprop.theory.symbolic import derive

STUDIES = ("architecture", "batchnorm", "learning_rate", "norm_type")
#: the column that names a curve's group in each study's curves table
GROUP = {"architecture": "arch", "batchnorm": "k", "learning_rate": "lr", "norm_type": "norm_type"}
GROUP_LABEL = {"architecture": "architecture", "batchnorm": "BatchNorm places k", "learning_rate": "learning rate",
               "norm_type": "normalisation"}
TOPICS = ("linear", "conv", "depth", "batchnorm", "flatness", "learning_rate")


# ----------------------------------------------------------------------------- helpers
_UNICODE = {
    "η": r"$\eta$", "σ": r"$\sigma$", "Σ": r"$\Sigma$", "ε": r"$\varepsilon$", "λ": r"$\lambda$",
    "χ": r"$\chi$", "²": r"$^2$", "½": r"$\frac12$", "×": r"$\times$", "≤": r"$\le$", "≥": r"$\ge$",
    "≈": r"$\approx$", "→": r"$\to$", "±": r"$\pm$", "·": r"$\cdot$", "∝": r"$\propto$", "—": "---",
    "–": "--", "’": "'", "‖": r"$\|$", "√": r"$\sqrt{}$", "μ": r"$\mu$", "τ": r"$\tau$", "γ": r"$\gamma$",
    "−": r"$-$", "α": r"$\alpha$", "β": r"$\beta$", "δ": r"$\delta$", "Δ": r"$\Delta$", "κ": r"$\kappa$",
    "ν": r"$\nu$", "ρ": r"$\rho$", "θ": r"$\theta$", "φ": r"$\phi$", "Φ": r"$\Phi$", "ω": r"$\omega$",
    "∈": r"$\in$", "∞": r"$\infty$", "§": r"\S{}", "“": "``", "”": "''", "‘": "`",
}


def tex(text) -> str:
    """Escape plain text (possibly with a few Greek letters) for LaTeX; pure ASCII."""
    s = str(text)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("^", r"\^{}"), ("~", r"\~{}")):
        s = s.replace(a, b)
    s = s.replace(r"\textbackslash\{\}", r"\textbackslash{}")
    out = []
    for ch in s:
        if ord(ch) < 128:
            out.append(ch)
        elif ch in _UNICODE:
            out.append(_UNICODE[ch])
        else:  # never a silent "?" in the paper (a minus sign once printed as one)
            raise ValueError(f"paper/generate.py: no LaTeX for {ch!r} (U+{ord(ch):04X}) in {str(text)!r}; "
                             "add it to _UNICODE")
    return "".join(out)


def num(v, digits: int = 3) -> str:
    """A number for the text (``n/a`` for NaN)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return tex(v)
    if not math.isfinite(v):
        return "n/a"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        m, e = f"{v:.{digits - 1}e}".split("e")
        return rf"${m}\times10^{{{int(e)}}}$"
    return f"{v:.{digits}g}"


def find_csv(report: Path, name: str) -> pd.DataFrame | None:
    """The table ``name`` (``name.csv`` anywhere under ``report``), or None when absent/empty."""
    hits = sorted(report.rglob(f"{name}.csv"))
    if not hits:
        return None
    try:
        frame = pd.read_csv(hits[0])
    except pd.errors.EmptyDataError:
        return None
    return frame if len(frame) else None


def write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _plt():
    import matplotlib  # lazy: the backend is chosen before pyplot is imported

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.grid": True, "grid.alpha": 0.3, "pdf.fonttype": 42,
                         "svg.hashsalt": "noiseprop"})
    return plt


def save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="pdf", metadata={
            "CreationDate": None, "ModDate": None, "Producer": "noiseprop", "Creator": "noiseprop paper/generate.py"}))
    finally:
        plt.close(fig)


def empty_fig(path: Path, message: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 2.2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    save_fig(fig, path)


def latex_table(frame: pd.DataFrame, columns: dict, caption: str, label: str, align: str | None = None,
                size: str = r"\footnotesize") -> str:
    """A booktabs table of ``frame[columns]`` (``columns``: column -> header)."""
    cols = list(columns)
    align = align or ("l" + "r" * (len(cols) - 1))
    lines = [r"\begin{table}[htbp]", r"\centering", size, rf"\caption{{{caption}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(columns[c] for c in cols) + r" \\", r"\midrule"]
    for _, r in frame.iterrows():
        cells = []
        for c in cols:
            v = r.get(c, np.nan)
            cells.append(num(v) if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                         else tex(v))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def missing_table(caption: str, label: str, what: str) -> str:
    return (rf"\begin{{table}}[htbp]\centering\caption{{{caption}}}\label{{{label}}}" + "\n"
            + rf"\emph{{{tex(what)}}}" + "\n" + r"\end{table}" + "\n")


# ----------------------------------------------------------------------------- equations
def generate_equations(out: Path) -> list[Path]:
    paths = []
    for topic in TOPICS:
        text = "\n".join(d.latex() for d in derive(topic))
        p = out / f"eq_{topic}.tex"
        write(p, f"% generated by paper/generate.py from noiseprop.theory.symbolic.derive({topic!r})\n" + text)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- report
def _curve_means(curves: pd.DataFrame, study: str) -> pd.DataFrame:
    """Mean over seeds of the Monte-Carlo and predicted accuracy per (group, variant, η)."""
    g = GROUP[study]
    keys = [g] + (["variant"] if "variant" in curves.columns else []) + ["eta"]
    cols = [c for c in ("accuracy", "pred_accuracy") if c in curves.columns]
    if {"pred_accuracy", "pred_preact_frac", "theory_method"} <= set(curves.columns):
        # as in the report: the first order is drawn only where its validity diagnostic
        # holds (for every seed of the group), beside the moments as "pred_linear"
        invalid = ~first_order_valid(curves["pred_preact_frac"], curves.get("pred_first_order_flagged"))
        bad = (curves["theory_method"] == "linear").to_numpy() & invalid
        extra = {"_bad": bad.astype(float)}
        moments = (curves["theory_method"] == "moments").to_numpy()
        if "pred_accuracy_linear" in curves.columns and moments.any():
            extra.update(pred_linear=curves["pred_accuracy_linear"].where(moments),
                         _bad_linear=(moments & invalid).astype(float))
        curves = curves.assign(pred_accuracy=curves["pred_accuracy"].mask(bad), **extra)
        agg = cols + list(extra)
        m = curves.groupby(keys, sort=True, dropna=False)[agg].mean().reset_index()
        m.loc[m["_bad"] > 0, "pred_accuracy"] = np.nan
        if "pred_linear" in m.columns:
            m.loc[m["_bad_linear"] > 0, "pred_linear"] = np.nan
        return m.drop(columns=[c for c in ("_bad", "_bad_linear") if c in m.columns])
    return curves.groupby(keys, sort=True, dropna=False)[cols].mean().reset_index()


def generate_curves(report: Path, out: Path, study: str) -> None:
    path = out / f"fig_{study}_curves.pdf"
    curves = find_csv(report, f"{study}_curves")
    if curves is None or GROUP[study] not in curves.columns:
        return empty_fig(path, f"no {study} curves in this report")
    m = _curve_means(curves, study)
    plt = _plt()
    variants = sorted(m["variant"].unique()) if "variant" in m.columns else [None]
    fig, axes = plt.subplots(1, len(variants), figsize=(3.3 * len(variants), 2.6), squeeze=False)
    for ax, var in zip(axes[0], variants):
        sub = m if var is None else m[m["variant"] == var]
        for i, (grp, gs) in enumerate(sub.groupby(GROUP[study], sort=True)):
            color = f"C{i % 10}"
            ax.plot(gs["eta"], gs["accuracy"], marker="o", ms=3, color=color, label=str(grp))
            if "pred_accuracy" in gs and gs["pred_accuracy"].notna().any():
                ax.plot(gs["eta"], gs["pred_accuracy"], ls="--", color=color)
            if "pred_linear" in gs and gs["pred_linear"].notna().any():
                ax.plot(gs["eta"], gs["pred_linear"], ls=":", color=color)
        ax.set_xlabel(r"$\eta$")
        ax.set_ylabel("accuracy")
        ax.set_title(f"noise: {var}" if var is not None else study.replace("_", " "))
        ax.legend(title=GROUP_LABEL[study], fontsize=6, title_fontsize=6)
    fig.tight_layout()
    save_fig(fig, path)


def generate_findings(report: Path, out: Path, study: str) -> None:
    """The study's findings as in the report's per-paper table: our test of the claim,
    the paper's number, our effect rounded to its interval, the verdict, the theory."""
    f = find_csv(report, f"{study}_findings")
    cap = f"Findings of the {tex(study.replace('_', ' '))} study: effects with 95\\% intervals, rounded to what the interval supports."
    label = f"tab:{study}:findings"
    if f is None:
        text = missing_table(cap, label, f"no {study} findings in this report")
    else:
        t = paper_table(f)
        t["our effect (95% CI)"] = t["our effect (95% CI)"].str.replace("−", "-")
        cols = {"tested claim": "claim", "paper's number": "paper", "our effect (95% CI)": "our effect (95\\% CI)",
                "verdict": "verdict", "theory": "theory"}
        text = latex_table(t, cols, cap, label, align=r"p{0.3\linewidth}p{0.2\linewidth}p{0.2\linewidth}ll")
    write(out / f"tab_{study}_findings.tex", text)


SUMMARY_COLS = ("clean_accuracy", "robustness", "pred_robustness", "eta10")
SUMMARY_HEAD = {"clean_accuracy": "clean acc.", "robustness": "robustness", "pred_robustness": "predicted",
                "eta10": r"$\eta_{10}$", "variant": "noise on", "n_seeds": "seeds", "top_eigenvalue": r"$\lambda_{\max}$",
                "two_over_lr": "$2/\\mathrm{lr}$"}


def generate_summary(report: Path, out: Path, study: str) -> None:
    s = find_csv(report, f"{study}_summary")
    cap = (f"The {tex(study.replace('_', ' '))} study per group: mean over training seeds. Robustness: accuracy under "
           r"noise over clean accuracy, averaged over $\eta>0$; $\eta_{10}$: the noise level that costs 10 points.")
    label = f"tab:{study}:summary"
    if s is None:
        write(out / f"tab_{study}_summary.tex", missing_table(cap, label, f"no {study} summary in this report"))
        return
    first = [c for c in (GROUP[study], "variant", "n_seeds") if c in s.columns]
    extra = ["top_eigenvalue", "two_over_lr"] if study == "learning_rate" else []
    cols = first + [c for c in SUMMARY_COLS + tuple(extra) if c in s.columns]
    heads = {c: SUMMARY_HEAD.get(c, tex(GROUP_LABEL.get(study) if c == GROUP[study] else c)) for c in cols}
    write(out / f"tab_{study}_summary.tex", latex_table(s, heads, cap, label))


def generate_sharpness(report: Path, out: Path) -> None:
    path = out / "fig_learning_rate_sharpness.pdf"
    s = find_csv(report, "learning_rate_summary")
    if s is None or "top_eigenvalue" not in s.columns or not s["top_eigenvalue"].notna().any():
        return empty_fig(path, "no sharpness measurements in this report")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.4, 2.6))
    s = s.sort_values("lr")
    ax.errorbar(s["lr"], s["top_eigenvalue"],
                yerr=[s["top_eigenvalue"] - s.get("top_eigenvalue_ci_low", s["top_eigenvalue"]),
                      s.get("top_eigenvalue_ci_high", s["top_eigenvalue"]) - s["top_eigenvalue"]],
                marker="o", ms=3, label=r"$\lambda_{\max}(H)$, mean over seeds")
    ax.plot(s["lr"], 2 / s["lr"], ls="--", color="k", label=r"$2/\mathrm{lr}$ (edge of stability)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("sharpness")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_fig(fig, path)


def _all_curves(report: Path) -> pd.DataFrame:
    frames = []
    for st in STUDIES:
        c = find_csv(report, f"{st}_curves")
        if c is not None and "pred_accuracy" in c.columns:
            c = c.assign(study=st)
            frames.append(c[["study", "eta", "accuracy", "pred_accuracy"]
                            + [x for x in ("variant", "seed", GROUP[st], "theory_method") if x in c.columns]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def generate_calibration(report: Path, out: Path) -> None:
    path = out / "fig_calibration.pdf"
    c = _all_curves(report)
    c = c[c["pred_accuracy"].notna() & (c["eta"] > 0)] if len(c) else c
    if not len(c):
        return empty_fig(path, "no predictions in this report")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.2, 3.0))
    for i, (st, sub) in enumerate(c.groupby("study", sort=True)):
        ax.scatter(sub["pred_accuracy"], sub["accuracy"], s=6, color=f"C{i}", label=st.replace("_", " "))
    ax.plot([0, 1], [0, 1], color="k", lw=0.8)
    ax.set_xlabel("predicted accuracy")
    ax.set_ylabel("Monte-Carlo accuracy")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_fig(fig, path)


def generate_info(report: Path, out: Path) -> None:
    parts = []
    present = [st for st in STUDIES if find_csv(report, f"{st}_models") is not None]
    for st in present:
        mf = find_csv(report, f"{st}_models")
        c = find_csv(report, f"{st}_curves")
        n_models = len(mf.drop_duplicates([x for x in (GROUP[st], "seed", "k", "norm_type", "arch") if x in mf.columns]))
        seeds = mf["seed"].nunique() if "seed" in mf.columns else float("nan")
        etas = sorted(c["eta"].unique()) if c is not None else []
        parts.append(f"{tex(st.replace('_', ' '))}: {n_models} trained models over {seeds} seeds, "
                     f"$\\eta \\in \\{{{', '.join(num(e) for e in etas)}\\}}$")
    if parts:
        text = "The report behind this paper holds the studies " + "; ".join(parts) + ".\n"
    else:
        text = "The report behind this paper holds none of the four studies' tables.\n"
    # the curve figures' captions say which theory the dashed lines are (\theorylines)
    text = "\\newcommand{\\theorylines}{" + theory_lines(_all_curves(report)) + "}\n" + text
    write(out / "report_info.tex", text)


def theory_lines(curves: pd.DataFrame) -> str:
    """What the dashed prediction lines of the curve figures are, from the curves'
    ``theory_method``."""
    methods = set(curves["theory_method"].dropna()) if "theory_method" in curves.columns else set()
    if methods == {"moments"}:
        return ("moment propagation on every curve; dotted: the first order, drawn only where its validity "
                "diagnostic holds")
    if methods == {"linear"}:
        return "the first order, drawn only where its validity diagnostic holds"
    if methods:
        return ("moment propagation for the MLP, with the first order dotted beside it where its validity "
                "diagnostic holds; the first order for the convolutional networks, drawn only where that "
                "diagnostic holds")
    return "none: the report holds no predictions"



# ----------------------------------------------------------------------------- results in words
def _effect_words(r) -> str:
    unit = r["unit"] if isinstance(r.get("unit", ""), str) else ""
    return tex(round_to_ci(float(r["effect"]), float(r["ci_low"]), float(r["ci_high"]), unit).replace("−", "-"))


def _finding_sentence(r) -> str:
    claim = tex(str(r["claim"]))
    eff = _effect_words(r)
    v = str(r["verdict"])
    if v == "inconclusive":
        c = str(r.get("conclusion", "") or "")
        power = c.split(": ", 1)[1] if ": " in c else "its power could not be estimated"
        body = rf"inconclusive: the effect is {eff} (95\% CI), and {tex(power.replace('−', '-'))}"
    else:
        body = rf"{tex(v)}: the effect is {eff} (95\% CI, Holm-adjusted $p$ = {num(r['p_holm'], 2)})"
    th = str(r.get("theory", "") or "")
    theory = (rf"; the same test on the theory's predictions: {tex(th)}" if th and th != "nan" else "")
    return rf"\item \emph{{{claim}}} --- {body}{theory}."


def generate_results_text(report: Path, out: Path) -> None:
    r"""``results_<study>.tex``: each study's findings in sentences (what was found, how
    sure we are: effect with interval, verdict, and for an inconclusive one the effect
    this grid detects with 80\% power against the paper's); ``results_overview.tex``:
    the verdict counts and the share of cells where theory agrees with Monte-Carlo."""
    allf = []
    for st in STUDIES:
        f = find_csv(report, f"{st}_findings")
        path = out / f"results_{st}.tex"
        if f is None:
            write(path, f"This report holds no {tex(st.replace('_', ' '))} findings.\n")
            continue
        allf.append(f)
        counts = f["verdict"].value_counts()
        head = (f"We tested {len(f)} claims of this paper: "
                + ", ".join(f"{int(counts.get(v, 0))} {v}" for v in ("reproduced", "contradicted", "inconclusive"))
                + ".\n")
        paper = f[f["paper_effect"].notna()] if "paper_effect" in f.columns else f.iloc[0:0]
        if len(paper):
            head += ("The paper's own effect (its CIFAR-10 average normalised accuracy with minus without the "
                     "feature) is given beside ours where it reports one; its networks, data and noise levels "
                     "differ from ours, so the comparison is of sizes, not a replication.\n")
        items = "\n".join(_finding_sentence(r) for _, r in f.iterrows())
        write(path, head + "\\begin{itemize}\n" + items + "\n\\end{itemize}\n")
    # overview
    parts = []
    if allf:
        f = pd.concat(allf, ignore_index=True)
        c = f["verdict"].value_counts()
        parts.append(f"Over the four studies, {len(f)} findings: " + ", ".join(
            f"{int(c.get(v, 0))} {v}" for v in ("reproduced", "contradicted", "inconclusive")) + ". "
            "Every inconclusive finding is stated with the smallest effect this grid detects with 80\\% power "
            "(at Holm's strictest level).")
    v = find_csv(report, "validation")
    if v is not None and "agreement" in v.columns:
        acc = v[v["quantity"] == "accuracy"]
        if len(acc):
            a = acc.iloc[0]
            parts.append(rf"Theory against Monte-Carlo: over {int(a['cells'])} cells (model, noise placement, "
                         rf"$\eta>0$) the predicted accuracy lies inside the Monte-Carlo 95\% interval or within one "
                         rf"point of its mean in {num(100 * a['agreement'], 3)}\% of them (inside the interval: "
                         rf"{num(100 * a['ci_contains_prediction'], 3)}\%).")
    t = find_csv(report, "training")
    if t is not None:
        parts.append(rf"{int(t['trained'].sum())} models were trained; the lowest clean test accuracy is "
                     rf"{num(100 * t['lowest clean accuracy'].min(), 3)}\%, and {int(t['excluded'].sum())} models "
                     r"fell below the floor and were excluded from every comparison.")
    write(out / "results_overview.tex", (" ".join(parts) if parts else "This report holds no findings.") + "\n")


# ----------------------------------------------------------------------------- disagreement
_FIRST_ORDER_LEAVES_OUT = (r"This is the regime where the neglected terms (each layer's noise acting on its "
                           r"already-perturbed input, the ReLU mean shift, non-Gaussian logits) matter.")
_MOMENTS_LEAVE_OUT = (r"This is the regime where what moment propagation leaves out matters: the correlation "
                      r"of the gate flips that one perturbation causes in the units it reaches (a shortfall of "
                      r"logit variance) and the non-Gaussian features that the output layer reads (its own "
                      r"scale mixture is integrated).")


def _all_moments(curves: pd.DataFrame) -> bool:
    """Every prediction in ``curves`` is by moment propagation."""
    return "theory_method" in curves.columns and bool((curves["theory_method"] == "moments").all())


def _accuracy_errors(report: Path) -> list[str]:
    c = _all_curves(report)
    if not len(c):
        return [r"\item No report table holds predicted accuracies, so the accuracy prediction could not be "
                r"checked here."]
    c = c[c["eta"] > 0]
    have = c["pred_accuracy"].notna()
    items = []
    if not have.all():
        items.append(rf"\item {int((~have).sum())} of {len(c)} (model, $\eta$) cells have no prediction "
                     r"(the prediction failed or was not requested); they are left out below.")
    c = c[have]
    if not len(c):
        return items
    c = c.assign(err=c["pred_accuracy"] - c["accuracy"])
    med = float(np.median(np.abs(c["err"])))
    items.append(rf"\item Over {len(c)} curve points with $\eta>0$ (model, noise placement, $\eta$; a model "
                 r"shared by two studies counts in each), the median absolute error of the predicted accuracy is "
                 rf"{num(100 * med)} points; the mean signed error (prediction minus measurement) is "
                 rf"{num(100 * c['err'].mean())} points.")
    etas = np.sort(c["eta"].unique())
    if len(etas) >= 2:
        lo, hi = etas[0], etas[-1]
        e_lo = float(np.median(np.abs(c.loc[c["eta"] == lo, "err"])))
        e_hi = float(np.median(np.abs(c.loc[c["eta"] == hi, "err"])))
        bias_hi = float(c.loc[c["eta"] == hi, "err"].mean())
        trend = "grows" if e_hi > e_lo else "does not grow"
        items.append(rf"\item The error {trend} with the noise level: median $|$error$|$ {num(100 * e_lo)} points at "
                     rf"$\eta={num(lo)}$ and {num(100 * e_hi)} points at $\eta={num(hi)}$, where the prediction is "
                     + ("optimistic" if bias_hi > 0 else "pessimistic")
                     + rf" on average ({num(100 * bias_hi)} points). "
                     + ((_MOMENTS_LEAVE_OUT if _all_moments(c) else _FIRST_ORDER_LEAVES_OUT)
                        if bias_hi > 0 else r"A pessimistic bias points at over-counted variance."))
    per = c.groupby("study")["err"].apply(lambda e: float(np.median(np.abs(e))))
    worst = per.idxmax()
    items.append(r"\item By study, the median absolute error is "
                 + ", ".join(f"{tex(s.replace('_', ' '))} {num(100 * v)}" for s, v in per.items())
                 + rf" points; the {tex(worst.replace('_', ' '))} study is predicted worst.")
    return items


def _sharpness_items(report: Path) -> list[str]:
    s = find_csv(report, "learning_rate_summary")
    if s is None or "sharpness_x_lr_over_2" not in s.columns or not s["sharpness_x_lr_over_2"].notna().any():
        return [r"\item The report holds no sharpness measurements, so the edge-of-stability bound "
                r"$\lambda_{\max}\le 2/\mathrm{lr}$ was not checked."]
    s = s.sort_values("lr")
    r = s["sharpness_x_lr_over_2"]
    above = s.loc[r > 1, "lr"].tolist()
    return [rf"\item Sharpness against the edge of stability: $\lambda_{{\max}}\,\mathrm{{lr}}/2$ ranges from "
            rf"{num(r.min())} to {num(r.max())} over learning rates {num(s['lr'].min())}--{num(s['lr'].max())}. "
            + (rf"It exceeds 1 at lr $\in\{{{', '.join(num(x) for x in above)}\}}$: the bound holds for full-batch "
               r"gradient descent, and SGD with momentum and a decaying schedule need not obey it at the end of "
               r"training." if above else
               r"It stays below 1 everywhere, as the bound requires; the gap to 1 is the part of the "
               r"heuristic ``sharpness $\propto 1/\mathrm{lr}$'' that the measurements do not support.")]


def _folding_items(report: Path) -> list[str]:
    items = []
    for st in ("batchnorm", "norm_type"):
        m = find_csv(report, f"{st}_mechanisms")
        if m is None or "folding_inflation" not in m.columns or not m["folding_inflation"].notna().any():
            continue
        m = m[m["folding_inflation"].notna()]
        ratio = m["folding_inflation"] / m["folding_inflation_lognormal"]
        items.append(rf"\item Folding inflation ({tex(st.replace('_', ' '))} study): measured "
                     rf"{num(m['folding_inflation'].min())}--{num(m['folding_inflation'].max())}, the log-normal "
                     rf"closed form gives {num(m['folding_inflation_lognormal'].min())}--"
                     rf"{num(m['folding_inflation_lognormal'].max())} (ratio {num(ratio.min())}--{num(ratio.max())}); "
                     r"the closed form assumes log-normal, independent BatchNorm scales.")
    if not items:
        items.append(r"\item The report holds no folding measurements.")
    return items


def _finding_items(report: Path) -> list[str]:
    items = []
    rows = []
    for st in STUDIES:
        f = find_csv(report, f"{st}_findings")
        if f is not None:
            rows.append(f)
    if not rows:
        return [r"\item The report holds no findings."]
    f = pd.concat(rows, ignore_index=True)
    counts = f["verdict"].value_counts().sort_index()
    items.append(rf"\item Of {len(f)} findings, " + ", ".join(f"{int(n)} {tex(v)}" for v, n in counts.items()) + ".")
    if "theory" in f.columns:
        tc = f["theory"].fillna("no prediction").value_counts().sort_index()
        items.append(r"\item The same tests on the theory's predictions: "
                     + ", ".join(f"{int(n)} {tex(v)}" for v, n in tc.items()) + ".")
        # the theory's column speaks of predictions: the words that match each verdict
        # (empirical.studies.verdicts: reproduced ↔ predicted, contradicted ↔ predicted
        # the opposite); a disagreement is a decided verdict the theory did not match
        matching = f["verdict"].map({"reproduced": "predicted", "contradicted": "predicted the opposite"})
        dis = f[(f["theory"].notna()) & (f["theory"] != "no prediction") & (f["verdict"] != "inconclusive")
                & (f["theory"] != matching)]
        for _, r in dis.iterrows():
            items.append(rf"\item Disagreement: ``{tex(r['claim'])}'' is {tex(r['verdict'])} by measurement, "
                         rf"{tex(r['theory'])} by theory.")
    return items


def generate_disagreement(report: Path, out: Path) -> None:
    items = _accuracy_errors(report) + _sharpness_items(report) + _folding_items(report) + _finding_items(report)
    text = ("% generated by paper/generate.py from the report's CSVs\n"
            "The numbers below are computed from the report's tables when the paper is built.\n"
            "\\begin{itemize}\n" + "\n".join(items) + "\n\\end{itemize}\n")
    write(out / "disagreement.tex", text)


# ----------------------------------------------------------------------------- main
def generate(report, out) -> list[Path]:
    """Write every generated file into ``out``; return their paths (sorted)."""
    report, out = Path(report), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generate_equations(out)
    generate_info(report, out)
    for st in STUDIES:
        generate_curves(report, out, st)
        generate_findings(report, out, st)
        generate_summary(report, out, st)
    generate_sharpness(report, out)
    generate_calibration(report, out)
    generate_disagreement(report, out)
    generate_results_text(report, out)
    return sorted(p for p in out.iterdir() if p.is_file() and ".tmp" not in p.name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = Path(__file__).resolve().parent
    ap.add_argument("--report", default=str(here.parent / "report"), help="the report folder (default: report/)")
    ap.add_argument("--out", default=str(here / "generated"), help="output folder (default: paper/generated)")
    args = ap.parse_args(argv)
    if not Path(args.report).is_dir():
        print(f"generate: report folder {args.report} does not exist; run `noiseprop report` first", file=sys.stderr)
        return 2
    paths = generate(args.report, args.out)
    print(f"generate: wrote {len(paths)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
