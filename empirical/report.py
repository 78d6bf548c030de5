"""The main job's report (``noiseprop report``, what ``make report`` runs).

Runs the four studies of the source papers (:mod:`noiseprop.empirical.studies`) on the
default data (the built-in digits), through one executor (parallel processes, one torch
thread each) and one resumable result store, then writes ``report/``:

- ``report.md`` and ``report.html``: the findings at a glance (each with its test,
  effect, interval, Holm-adjusted p-value, the verdict on the source paper's claim and
  whether the theory predicted it), then each study's tables and figures, and the
  validation of the theory's predictions against Monte-Carlo;
- ``figures/*.png``: accuracy vs η with bands and the theory's curve, calibration
  plots, sharpness vs learning rate, mechanisms;
- ``csv/*.csv``: the data behind every table and figure;
- ``timings.json``: wall and compute time per study, cells loaded from the store and
  computed (kept out of report.md, so an interrupted-then-resumed run writes the same
  report as an uninterrupted one).

Resumable: every cell (a training run or the measurements of one model) is stored
atomically under a hash of its configuration (:mod:`noiseprop.empirical.cells`); a
rerun loads what is finished and computes only the rest. Every output file is written
atomically.
"""
from __future__ import annotations

import html
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from noiseprop.theory.predict import PREACT_WARN_DROP, PREACT_WARN_FRACTION, PREACT_WARN_LOW
from noiseprop.theory.validation import check_bool, check_int, check_output_dir

from .cells import ResultStore
from .checkpoint import atomic_write, check_replaceable_folder, publish_folder, sweep_temp
from .executor import check_workers, close_executor, make_executor, print_progress, stop_workers
from .formatting import fmt_number, fmt_p
from .studies import (CPU_SCALE_DATASETS, STUDIES, default_grid, paper_grid, paper_options, quick_grid, quick_options,
                      run_plans, study_module)
from .studies.common import calibration_figure_frame, validation_by_eta, validation_tables
from .studies.grid import check_grid_sequences
from .studies.figures import Figure, render
from .studies.validation import ACCURACY_TOLERANCE, validation_by_method, validation_by_model
from .train import default_cache_dir

__all__ = ["ReportConfig", "make_report", "render_markdown", "render_html"]


@dataclass(frozen=True)
class ReportConfig:
    """What ``noiseprop report`` runs.

    out_dir: the report folder. dataset, data_dir: the data (default digits).
    cache_dir: checkpoints and result cells (default
        :func:`noiseprop.empirical.train.default_cache_dir`; cells in ``cells/``).
    workers: parallel worker processes (default ``min(2, cores)``; 1 = in-process).
    quick: the reduced grid of :func:`noiseprop.empirical.studies.quick_grid` (tests).
    studies: which studies to run. draws, seeds, etas, epochs: override the grid.
    progress: print one line per study and per cell to stderr.
    stop_after: stop (``KeyboardInterrupt``) after that many computed cells (tests).
    scheduler: a ``dask.distributed`` scheduler address (or Client): the cells run
        there (:mod:`noiseprop.empirical.cluster`) instead of local worker processes.
    scale: "cpu" (the default grid on digits) or "paper" (the published architectures,
        widths and epochs, :func:`noiseprop.empirical.studies.paper_grid`; CIFAR-10 by
        default, from ``data_dir``).
    """

    out_dir: str = "report"
    dataset: str = "digits"
    data_dir: str | None = None
    cache_dir: str | None = None
    workers: int | None = None
    quick: bool = False
    studies: tuple = ("architecture", "batchnorm", "learning_rate", "norm_type")
    draws: int | None = None
    seeds: tuple | None = None
    etas: tuple | None = None
    epochs: int | None = None
    progress: bool = True
    stop_after: int | None = None
    scheduler: object = None
    scale: str = "cpu"

    def __post_init__(self):
        # refuse bad values at construction, before any work (a report runs for minutes)
        check_workers(self.workers)
        check_bool("quick", self.quick)
        check_bool("progress", self.progress)
        check_int("stop_after", self.stop_after, 1, allow_none=True)
        studies = self.studies
        if isinstance(studies, str):
            studies = (studies,)  # one study by name, not its characters
        elif isinstance(studies, (bytes, dict)) or not hasattr(studies, "__iter__"):
            raise TypeError(f"studies must be a study name or a sequence of names from {list(STUDIES)}; "
                            f"got {type(studies).__name__} {studies!r}")
        studies = tuple(studies)
        bad = [s for s in studies if not isinstance(s, str) or s not in STUDIES]
        if not studies or bad:
            raise ValueError(f"studies must be one or more of {list(STUDIES)}; "
                             + (f"unknown: {bad}" if bad else "got none"))
        object.__setattr__(self, "studies", studies)
        check_grid_sequences(self, none_keeps=True)


# ----------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------
def _fmt(v, col: str = "") -> str:
    """A table cell: :func:`~noiseprop.empirical.formatting.fmt_p` for p-value columns,
    ``> grid`` for an η beyond the grid, else :func:`~noiseprop.empirical.formatting.fmt_number`."""
    if isinstance(v, (float, np.floating)) and not isinstance(v, bool):
        f = float(v)
        if math.isinf(f) and "eta10" in col:
            return "> grid" if f > 0 else "n/a"
        if not math.isnan(f) and (col.startswith("p") or col.endswith("_p") or "pvalue" in col):
            return fmt_p(f)
    return fmt_number(v)


def _md_table(frame: pd.DataFrame, columns=None, rename=None) -> str:
    if frame is None or frame.empty:
        return "_(no rows)_\n"
    f = frame[columns] if columns else frame
    names = [rename.get(c, c) if rename else c for c in f.columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    for _, r in f.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c], c).replace("|", "\\|") for c in f.columns) + " |")
    return "\n".join(lines) + "\n"


def _html_table(frame: pd.DataFrame, columns=None, rename=None) -> str:
    if frame is None or frame.empty:
        return "<p><em>(no rows)</em></p>"
    f = frame[columns] if columns else frame
    names = [rename.get(c, c) if rename else c for c in f.columns]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(str(n))}</th>" for n in names) + "</tr></thead>",
           "<tbody>"]
    for _, r in f.iterrows():
        cells = []
        for c in f.columns:
            s = _fmt(r[c], c)
            v = r[c]
            text = isinstance(v, str) and not (c == "verdict")
            cls = f' class="{s}"' if c in ("verdict",) else (' class="t"' if text else "")
            cells.append(f"<td{cls}>{html.escape(s)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


# A document is a list of blocks: ("h", level, text), ("p", text), ("table", frame, columns, rename, csv),
# ("fig", path, caption, csv), ("list", items)
def render_markdown(blocks) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2] + "\n")
        elif kind == "p":
            out.append(b[1] + "\n")
        elif kind == "list":
            out.append("\n".join(f"- {it}" for it in b[1]) + "\n")
        elif kind == "table":
            _, frame, cols, rename, csv = b
            out.append(_md_table(frame, cols, rename) + (f"\n_Data: [{csv}]({csv})_\n" if csv else ""))
        elif kind == "fig":
            _, path, caption, csv = b
            out.append(f"![{caption}]({path})\n\n_{caption}_" + (f" _Data: [{csv}]({csv})_" if csv else "") + "\n")
    return "\n".join(out)


#: what the grid's ``theory`` puts on the curves, in the report's words
THEORY_WORDS = {
    "moments": "moment propagation on every curve, the first order beside it where its validity diagnostic holds",
    "auto": "moment propagation on the MLPs, the first order on the convolutional networks",
    "linear": "the first order (linearised network) on every curve",
}

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em;font-size:0.85em}th,td{border:1px solid #ccc;padding:2px 6px;
text-align:right}th{background:#f0f0f0}td.reproduced{background:#dfd}td.contradicted{background:#fdd}
td.inconclusive{background:#ffd}td.t{text-align:left}img{max-width:100%}.cap{font-size:0.85em;color:#555}
.tw{overflow-x:auto;max-width:100%}"""

#: a Markdown link ``[text](target)`` and a code span (one or two backticks) in a
#: paragraph or list item (after HTML escaping)
_MD_LINK = re.compile(r"\[([^\]`]+)\]\(((?:https?://)?[\w./#%-]+)\)")  # relative or http(s) targets only
_MD_CODE = re.compile(r"(``?)(.+?)\1")


def _inline(text: str) -> str:
    """``text`` escaped for HTML, its Markdown links ``[text](target)`` as ``<a>`` and its
    code spans as ``<code>`` (the Markdown version writes them so, and a study's claim
    quotes its docstring's; the HTML version showed the brackets and backticks)."""
    esc, out, pos = html.escape(text), [], 0

    def links(part: str) -> str:
        return _MD_LINK.sub(lambda m: f"<a href='{m.group(2)}'>{m.group(1)}</a>", part)

    for m in _MD_CODE.finditer(esc):  # links only outside code spans: no crossed tags
        out += [links(esc[pos:m.start()]), f"<code>{m.group(2)}</code>"]
        pos = m.end()
    return "".join(out + [links(esc[pos:])])


def render_html(blocks, title: str) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(it)}</li>" for it in b[1]) + "</ul>")
        elif kind == "table":
            _, frame, cols, rename, csv = b
            # a table wider than the page scrolls in its own box, not past the page's edge
            out.append(f"<div class='tw'>{_html_table(frame, cols, rename)}</div>")
            if csv:
                out.append(f"<p class='cap'>Data: <a href='{csv}'>{csv}</a></p>")
        elif kind == "fig":
            _, path, caption, csv = b
            out.append(f"<figure><img src='{path}' alt='{html.escape(caption)}'><figcaption class='cap'>"
                       f"{html.escape(caption)}" + (f" Data: <a href='{csv}'>{csv}</a>" if csv else "") +
                       "</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------
def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    def w(tmp):
        frame.to_csv(tmp, index=False, float_format="%.10g")

    atomic_write(path, w)


def render_figure(fig, path: str) -> str:
    """Draw one figure to ``path`` atomically (a top-level function, so a worker
    process can run it)."""
    atomic_write(Path(path), lambda tmp: render(fig, tmp))
    return path


FINDING_COLUMNS = ["claim", "test", "effect", "unit", "ci_low", "ci_high", "p_holm", "mde", "verdict", "theory"]
FINDING_NAMES = {"ci_low": "CI low", "ci_high": "CI high", "effect_size": "std. effect", "p_holm": "p (Holm)",
                 "theory": "theory", "test": "test", "mde": "detectable (80% power)"}


#: One table per paper: the claim in the paper's words (its abstract) and the source.
PAPERS = {
    "architecture": ("Fagbohungbe & Qian 2020, arXiv 2011.11840",
                     "“deeper models and models with more redundancy in design such as VGG are more robust to the "
                     "noise in general. However, the performance is also affected by the design philosophy of the "
                     "model”"),
    "batchnorm": ("Fagbohungbe & Qian 2022, IEEE Access, arXiv 2205.07372",
                  "“the presence of batch normalization layer negatively impacts noise resistant property of deep "
                  "learning model and the impact grows with the increase of the number of batch normalization "
                  "layers”"),
    "learning_rate": ("Fagbohungbe & Qian 2022, arXiv 2205.07856",
                      "“there exists a sweet spot of learning rate values that achieves a good balance between model "
                      "prediction performance and model noise-resistant property”"),
    "norm_type": ("Fagbohungbe & Qian 2022, arXiv 2205.04886",
                  "“L1 and TopK BatchNorm type has excellent noise-resistant property, and there is no sacrifice in "
                  "performance due to the change in the BatchNorm type from L2 to L1/TopK BatchNorm type”"),
}


def _decimals(lo: float, hi: float) -> int:
    """Decimals that an interval supports: the position of the first significant digit
    of its half-width (one more when that digit is 1 or 2)."""
    hw = (hi - lo) / 2
    if not (np.isfinite(hw) and hw > 0):
        return 3
    e = math.floor(math.log10(hw))
    first = int(hw / 10 ** e)
    d = -e + (1 if first <= 2 else 0)
    return int(min(max(d, 0), 6))


def round_to_ci(estimate: float, lo: float, hi: float, unit: str = "") -> str:
    """``estimate [lo, hi] unit`` rounded to what the interval supports.

    >>> round_to_ci(-0.002411, -0.0102, 0.0054, "normalised accuracy")
    '−0.002 [−0.010, 0.005] normalised accuracy'
    >>> round_to_ci(0.5, float("nan"), float("nan"))
    '0.500 (no interval)'
    """
    def f(v, d):
        return f"{v:.{d}f}".replace("-", "−")

    u = f" {unit}" if unit else ""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return (f(estimate, 3) if np.isfinite(estimate) else "n/a") + " (no interval)" + u
    d = _decimals(lo, hi)
    return f"{f(estimate, d)} [{f(lo, d)}, {f(hi, d)}]{u}"


def paper_table(findings: pd.DataFrame) -> pd.DataFrame:
    """One paper's findings for readers: our test of the claim, the paper's number, our
    effect with its unit and interval (rounded to what the interval supports), the
    conclusion (an inconclusive one with the effect this grid could detect), and
    whether the theory predicts it."""
    rows = []
    for _, r in findings.iterrows():
        pe = r.get("paper_effect", np.nan)
        unit = r.get("unit", "") if isinstance(r.get("unit", ""), str) else ""
        paper = (f"{float(pe):+.2f} {unit}".replace("-", "−") + (f" ({r['paper_note']})" if r.get("paper_note") else "")
                 if np.isfinite(pe) else str(r.get("paper_note", "") or ""))
        rows.append({"tested claim": r["claim"], "paper's number": paper,
                     "our effect (95% CI)": round_to_ci(float(r["effect"]), float(r["ci_low"]), float(r["ci_high"]),
                                                        unit),
                     "verdict": r["verdict"], "power (if inconclusive)": _power_text(r),
                     "theory": r["theory"]})
    return pd.DataFrame(rows)


def _power_text(r) -> str:
    c = str(r.get("conclusion", "") or "")
    # the detectable effect only: the paper's number has its own column
    return c.split(": ", 1)[1].split("; ")[0] if r["verdict"] == "inconclusive" and ": " in c else ""


def training_table(study_results) -> pd.DataFrame:
    """Per architecture and normalisation: trained models, their clean test accuracy
    (lowest and mean) and how many were excluded by the floor (with the first reason)."""
    parts = [f for r in study_results for n, f in r.tables.items() if n.endswith("_training") and not f.empty]
    if not parts:
        return pd.DataFrame()
    t = pd.concat(parts, ignore_index=True)
    keys = [c for c in ("arch", "norm", "n_norm", "lr", "seed") if c in t.columns]
    t = t.drop_duplicates(subset=keys)
    rows = []
    for (arch, norm), d in t.groupby(["arch", "norm"], sort=False):
        ex = d[~d["included"].astype(bool)]
        rows.append({"model": arch, "normalisation": norm, "trained": int(len(d)),
                     "lowest clean accuracy": float(d["clean_accuracy"].min()),
                     "mean clean accuracy": float(d["clean_accuracy"].mean()), "excluded": int(len(ex)),
                     "why": str(ex["reason"].iloc[0]) if len(ex) else ""})
    return pd.DataFrame(rows)


def _study_blocks(res, out: Path, written: dict) -> list:
    blocks = [("h", 2, res.title)]
    params = res.params
    mod = study_module(res.name)
    doc = (mod.__doc__ or "").strip().split("\n\n")
    blocks.append(("p", " ".join(doc[0].split())))
    if len(doc) > 1:
        blocks.append(("p", " ".join(doc[1].split())))
    keys = [k for k in ("models", "archs", "arch", "norm", "ks", "norms", "lrs", "schedule", "momentum")
            if k in params and params[k] is not None]
    blocks.append(("list", [f"{k}: {params[k]}" for k in keys] +
                   [f"seeds: {params['seeds']}; η grid: {params['etas']}; Monte-Carlo draws per level: "
                    f"{params['draws']} (common random numbers, seed {params['mc_seed']}); theory: "
                    f"{params['theory']} prediction"]))
    ff = res.findings_frame()
    blocks.append(("h", 3, "Findings"))
    blocks.append(("table", ff, FINDING_COLUMNS, FINDING_NAMES, written.get(f"{res.name}_findings")))
    notes = [f.claim + ": " + f.note for f in res.findings if f.note] + list(res.notes)
    if notes:
        blocks.append(("list", notes))
    for fig in res.figures:
        blocks.append(("fig", written[f"fig:{fig.name}"], fig.caption, written.get(f"figcsv:{fig.name}")))
    for name, frame in res.tables.items():
        if name.endswith(("_models", "_curves", "_compare", "_layers")):
            continue  # long tables: CSV only (linked below)
        blocks.append(("h", 3, name.replace("_", " ")))
        blocks.append(("table", _compact(frame), None, None, written.get(name)))
    long = [written[n] for n in res.tables if n.endswith(("_models", "_curves", "_compare", "_layers"))
            and n in written]
    if long:
        blocks.append(("p", "Per-model and per-cell data: " + ", ".join(f"[{p}]({p})" for p in long)))
    return blocks


def _compact(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop bookkeeping columns for display."""
    drop = [c for c in frame.columns if c in ("train_key", "eval_key", "theory_error", "mechanism_error",
                                              "cal_note", "cal_log", "cal_cov_type")]
    return frame.drop(columns=drop)


def make_report(cfg: ReportConfig = ReportConfig()) -> Path:
    """Run the studies and write the report folder; returns the path of report.md."""
    t_start = time.perf_counter()
    # refuse what can be refused before any work: the folders, then the grid
    out = check_replaceable_folder(cfg.out_dir, "--out")
    if cfg.cache_dir is not None:
        check_output_dir(Path(cfg.cache_dir).expanduser(), "--cache-dir")
    overrides = {k: v for k, v in (("dataset", cfg.dataset), ("data_dir", cfg.data_dir), ("draws", cfg.draws),
                                   ("seeds", cfg.seeds), ("etas", cfg.etas), ("epochs", cfg.epochs))
                 if v is not None}
    if cfg.scale not in ("cpu", "paper"):
        raise ValueError(f"scale must be 'cpu' or 'paper', got {cfg.scale!r}")
    if cfg.scale == "paper" and cfg.quick:
        raise ValueError("quick and scale='paper' exclude each other: choose one")
    if cfg.scale == "paper":
        if cfg.dataset == "digits":
            overrides["dataset"] = "cifar10"
        grid = paper_grid(**overrides)
    else:
        grid = quick_grid(**overrides) if cfg.quick else default_grid(**overrides)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else default_cache_dir()
    check_output_dir(cache / "cells", "--cache-dir")
    store = ResultStore(cache / "cells")
    store.clean_temp()
    sweep_temp(cache / "checkpoints")  # temp files of killed trainings
    opts = quick_options() if cfg.quick else (paper_options() if cfg.scale == "paper" else {})
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if cfg.progress else (lambda msg: None)
    plans = []
    for i, name in enumerate(cfg.studies):
        mod = study_module(name)
        p = mod.plan(grid, cache_dir=str(cache), **opts.get(name, {}))
        plans.append((mod, p))
        log(f"[report] study {i + 1}/{len(cfg.studies)} {name}: {p.n_models} models, {len(p.tasks)} cells")
    if cfg.scheduler is not None:
        from .cluster import make_dask_executor  # lazy: dask is optional

        executor = make_dask_executor(cfg.scheduler)
        local_pool = None  # figures are drawn here: a remote worker's files would not be ours
    else:
        executor = make_executor(cfg.workers)
        local_pool = executor
    try:
        results, stats = run_plans([p for _, p in plans], grid, store, executor,
                                   progress=print_progress() if cfg.progress else None, stop_after=cfg.stop_after)
        t_cells = time.perf_counter() - t_start
        log(f"[report] cells: {stats.computed} computed, {stats.loaded} loaded from the store; analysing")
        study_results = []
        t_analysis = {}
        for mod, p in plans:
            t0 = time.perf_counter()
            study_results.append(mod.analyse(p, results, grid))
            t_analysis[p.name] = time.perf_counter() - t0
        timings = {}

        def fill(staging: Path):
            t0 = time.perf_counter()
            write_report(study_results, grid, staging, cfg, executor=local_pool)
            t_write = time.perf_counter() - t0
            timings.update({"total_seconds": time.perf_counter() - t_start, "cells_seconds": t_cells,
                            "analysis_seconds": t_analysis, "write_seconds": t_write,
                            "compute_seconds_by_study": stats.compute_seconds, "cells_computed": stats.computed,
                            "cells_loaded": stats.loaded, "workers": getattr(executor, "_max_workers", 1),
                            "command": " ".join(sys.argv), "python": platform.python_version(),
                            "machine": platform.machine()})
            _write_text(staging / "timings.json", json.dumps(timings, indent=2, sort_keys=True, default=str) + "\n")

        publish_folder(out, fill)  # the folder is replaced as a whole: never half a report
        path = out / "report.md"
    except KeyboardInterrupt:
        stop_workers(executor)
        raise
    finally:
        close_executor(executor)
    log(f"[report] written to {path} in {timings['total_seconds']:.1f} s")
    return path


def _write_figure(fig, out: Path, executor, futures: list, written: dict) -> None:
    """Draw ``fig`` to ``figures/NAME.png`` (through ``executor`` when given; its future
    joins ``futures``) and write its frame to ``csv/figure_NAME.csv``."""
    rel = f"figures/{fig.name}.png"
    if executor is not None:
        futures.append(executor.submit(render_figure, fig, str(out / rel)))
    else:
        render_figure(fig, str(out / rel))
    written[f"fig:{fig.name}"] = rel
    rel_csv = f"csv/figure_{fig.name}.csv"
    _write_csv(out / rel_csv, fig.frame)
    written[f"figcsv:{fig.name}"] = rel_csv


def write_report(study_results, grid, out: Path, cfg: ReportConfig, executor=None) -> Path:
    """Write tables (CSV), figures (PNG, drawn through ``executor`` when given, in
    parallel), report.md and report.html under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    futures = []
    for res in study_results:
        for name, frame in res.tables.items():
            rel = f"csv/{name}.csv"
            _write_csv(out / rel, frame)
            written[name] = rel
        rel = f"csv/{res.name}_findings.csv"
        _write_csv(out / rel, res.findings_frame())
        written[f"{res.name}_findings"] = rel
        for fig in res.figures:
            _write_figure(fig, out, executor, futures, written)
    allf = pd.concat([r.findings_frame() for r in study_results], ignore_index=True) if study_results else pd.DataFrame()
    _write_csv(out / "csv/findings.csv", allf)
    cells = _cells(study_results)
    validation, by_eta, figs = overall_validation(cells, grid)
    by_method, by_model = validation_by_method(cells), validation_by_model(cells)
    _write_csv(out / "csv/validation_by_method.csv", by_method)
    _write_csv(out / "csv/validation_by_model.csv", by_model)
    _write_csv(out / "csv/validation.csv", validation)
    _write_csv(out / "csv/validation_by_eta.csv", by_eta)
    for fig in figs:
        _write_figure(fig, out, executor, futures, written)

    training = training_table(study_results)
    _write_csv(out / "csv/training.csv", training)
    title, blocks = report_blocks(study_results, grid, cfg, allf, validation, by_eta, figs, training, written,
                                  by_method, by_model)
    for f in futures:
        f.result()
    md = render_markdown(blocks)
    _write_text(out / "report.md", md)
    _write_text(out / "report.html", render_html(blocks, title))
    return out / "report.md"


def _cells(study_results) -> pd.DataFrame:
    """The studies' prediction-vs-Monte-Carlo rows, each (model, placement, η, quantity)
    cell once (a model shared by two studies appears in both)."""
    parts = [f for r in study_results for n, f in r.tables.items() if n.endswith("_compare") and not f.empty]
    if not parts:
        return pd.DataFrame()
    comp = pd.concat(parts, ignore_index=True)
    keep = [c for c in ("eval_key", "variant", "eta", "quantity") if c in comp.columns]
    return comp.drop_duplicates(subset=keep)



def report_blocks(study_results, grid, cfg, allf, validation, by_eta, figs, training, written, by_method=None,
                  by_model=None):
    """The report's content, in reading order: what was run; one table per paper (the
    claim in the paper's words, the paper's number, our effect with unit and interval,
    the conclusion, the theory's verdict and mechanism); the models (clean accuracy,
    exclusions); theory vs Monte-Carlo (the share of cells agreeing); then, as an
    appendix, each study's tables and figures with links to every CSV."""
    scale = "CPU scale" if grid.dataset in CPU_SCALE_DATASETS else "published scale"
    if len(study_results) == 1:
        title = f"noiseprop study {study_results[0].name}: {study_results[0].title} ({grid.dataset}, {scale})"
    else:
        title = f"noiseprop report: weight noise on analog hardware, the published studies at {scale}"
    blocks = [("h", 1, title)]
    blocks.append(("p", f"What was run: {grid.dataset}; relative Gaussian noise on the Conv/Linear weights, "
                        f"σ_l = η·std(W_l) per layer, η ∈ {list(grid.etas)}; {grid.draws} Monte-Carlo draws per level "
                        f"with common random numbers (the same draws for every model and level), on "
                        + ("every test input" if grid.n_test is None else f"the first {grid.n_test} test inputs")
                        + f" (theory on the same inputs: {THEORY_WORDS.get(grid.theory, grid.theory)}); training seeds "
                        f"{list(grid.seeds)}, the unit of replication of every test; models below "
                        f"{grid.min_clean_accuracy:.0%} clean accuracy excluded. Tests at α = {grid.alpha} with "
                        "Holm's correction within each study; verdicts are computed: reproduced (significant in the "
                        "claimed direction), contradicted (significant the other way, or equivalence excluded), "
                        "inconclusive (neither; stated with the smallest effect this grid detects with 80% power). "
                        "'theory' runs the same test on the theory's predicted values."
                        + (" QUICK RUN: tiny grid, for tests only; its verdicts mean little." if cfg.quick else "")))
    counts = allf["verdict"].value_counts().to_dict() if not allf.empty else {}
    blocks.append(("p", "Verdicts: " + ", ".join(f"{k}: {counts.get(k, 0)}" for k in
                                                  ("reproduced", "contradicted", "inconclusive")) + "."))
    blocks.append(("h", 2, "Findings, per paper"))
    for res in study_results:
        src, words = PAPERS.get(res.name, (getattr(res, "title", res.name), ""))
        ff = allf[allf["study"] == res.name] if not allf.empty else allf
        blocks.append(("h", 3, f"{res.title} — {src}"))
        if words:
            blocks.append(("p", f"The paper: {words}."))
        mech = next((f.mechanism for f in res.findings if getattr(f, "mechanism", "")), "")
        if mech:
            blocks.append(("p", f"The theory's mechanism: {mech}."))
        blocks.append(("table", paper_table(ff) if not ff.empty else ff, None, None, f"csv/{res.name}_findings.csv"))
    blocks.append(("h", 2, "The models"))
    blocks.append(("p", "Every comparison uses only models that learned: clean test accuracy per architecture and "
                        "normalisation, over seeds (and learning rates); a model below the floor is left out of "
                        "every test, for the reason given."))
    blocks.append(("table", training, None, None, "csv/training.csv"))
    blocks.append(("h", 2, "Theory vs Monte-Carlo"))
    acc = validation[validation["quantity"] == "accuracy"] if not validation.empty else validation
    if not acc.empty:
        r = acc.iloc[0]
        blocks.append(("p", f"Across the {int(r['cells'])} cells (model × noise placement × η > 0), the predicted "
                            f"accuracy is inside Monte-Carlo's {int(grid.confidence * 100)}% interval or within "
                            f"{ACCURACY_TOLERANCE * 100:g} point of its mean in {r['agreement']:.0%} of them "
                            f"(inside the interval: {r['ci_contains_prediction']:.0%}). Theory: "
                            f"{THEORY_WORDS.get(grid.theory, grid.theory)}."))
    if by_method is not None and not by_method.empty:
        blocks.append(("p", "Per prediction method: the share of cells agreeing (inside the interval or within 1 "
                            "point). Moment propagation is what the published comparison should use; the first "
                            "order is reliable only where its validity diagnostic holds (predict's warning: at "
                            f"most {PREACT_WARN_FRACTION:.0%} of ReLU pre-activations with predicted noise sd above "
                            f"their magnitude, and at most {PREACT_WARN_LOW:.0%} where it predicts an accuracy drop "
                            f"above {PREACT_WARN_DROP * 100:g} points)."))
        blocks.append(("table", by_method, None, None, "csv/validation_by_method.csv"))
    if by_model is not None and not by_model.empty:
        blocks.append(("p", "Per architecture, normalisation (n_norm: normalised layers), learning rate and noise "
                            "placement: the share of cells agreeing, the "
                            "mean signed error of the predicted accuracy (points; positive: the theory is optimistic) "
                            "and the largest error with its η."))
        blocks.append(("table", by_model.round({"agreement": 3, "mean_error_points": 2, "max_abs_error_points": 2}),
                       None, None, "csv/validation_by_model.csv"))
    blocks.append(("p", "Per quantity: cells, median relative error, share of intervals containing the prediction, "
                        "share agreeing (accuracy), TOST equivalences after Holm, and the calibration of observed on "
                        "predicted across cells."))
    vcols = [c for c in ("quantity", "cells", "median_abs_rel_error", "ci_contains_prediction", "agreement",
                         "equivalent_after_holm", "cal_slope", "cal_slope_ci_low", "cal_slope_ci_high")
             if c in validation.columns]
    blocks.append(("table", validation, vcols or None, None, "csv/validation.csv"))
    blocks.append(("p", "Where the theory holds, per noise placement and η (accuracy errors in accuracy units; "
                        "preact_frac: the first-order validity diagnostic)."))
    blocks.append(("table", by_eta, None, None, "csv/validation_by_eta.csv"))
    for fig in figs:
        blocks.append(("fig", written[f"fig:{fig.name}"], fig.caption, written[f"figcsv:{fig.name}"]))
    blocks.append(("h", 1, "Appendix: the studies in detail"))
    for res in study_results:
        blocks += _study_blocks(res, None, written)
    blocks.append(("h", 2, "Reproduce"))
    blocks.append(("p", "make report (or: noiseprop report" + (" --quick" if cfg.quick else "") +
                   f" --dataset {grid.dataset}). Timings of this run: timings.json."))
    return title, blocks


def overall_validation(comp: pd.DataFrame, grid):
    """Prediction vs Monte-Carlo pooled over the studies (``comp``: :func:`_cells`, each
    (model, placement, η, quantity) cell once): the summary per quantity, the table by η
    and the calibration figures (accuracy; logit variance on log axes)."""
    if comp.empty:
        return pd.DataFrame(), pd.DataFrame(), []
    _, summary = validation_tables(comp, grid.alpha, grid.confidence)
    label = lambda r: f"η = {r['eta']:g}"  # noqa: E731
    figs = [Figure("validation_accuracy", "Predicted vs Monte-Carlo accuracy, every model, noise placement and η of "
                   "every study (bars: Student-t interval of the Monte-Carlo mean over draws; colour: η).", "calibration",
                   calibration_figure_frame(comp, "accuracy", label), {}),
            Figure("validation_logit_var", "Predicted vs Monte-Carlo logit variance (mean over inputs and classes), "
                   "log axes (bars: chi-square interval; colour: η).", "calibration",
                   calibration_figure_frame(comp, "logit_var", label), {"log": True})]
    return summary, validation_by_eta(comp, grid.confidence), figs
