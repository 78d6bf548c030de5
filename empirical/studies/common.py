"""What the four studies share: the grid, the cells, the robustness metrics, the
findings and their verdicts.

This module gathers, for compatibility, the names of the modules that define them:
:mod:`.grid` (the grid), :mod:`.data_cache` (the data), :mod:`.study_cells` (the cells
and the plan), :mod:`.theory_helpers` (theory curve, folding factors, curvature, gains),
:mod:`.frames` (tables and figure data), :mod:`.verdicts` (findings, verdicts, power),
:mod:`.seed_stats` (statistics over training seeds), :mod:`.validation` (theory vs
Monte-Carlo, through :func:`noiseprop.empirical.compare.combine_cells`).

A study is a grid of trained models (factors × training seeds). Each model is two
cells of the task graph (:mod:`noiseprop.empirical.executor`):

``train``
    :func:`train_cell`: trains the model (or loads it from the checkpoint cache of
    :func:`noiseprop.empirical.train.train`) and returns its clean accuracy and history.
``eval``
    :func:`eval_cell`: the measurements of one trained model, the same protocol for
    every study so that a model shared by two studies is measured once: a Monte-Carlo
    sweep over the η grid with relative noise ``σ_l = η·std(W_l)`` on the Conv/Linear
    weights (BatchNorm digital), and, for a model with normalisation layers, the same
    sweep with BatchNorm folded into the weights first; the theory's predicted curve
    for each (:func:`noiseprop.theory.predict`), the prediction-vs-Monte-Carlo
    comparison at every level (:func:`noiseprop.empirical.compare.compare`), and the
    mechanisms (folding amplification factors, ``tr(Σ_ε H)`` for both placements of the
    noise, the top Hessian eigenvalue, per-layer gains).

Common random numbers: every sweep uses the same ``mc_seed``, so models of the same
architecture (any seed, any normalisation, folded or not) see the very same
standard-normal draws, and within a sweep every η reuses them (docs/THEORY.md §8).

Verdicts are computed, never written by hand (:func:`directional_verdict`,
:func:`equivalence_verdict`), from p-values adjusted by Holm's method over the findings
of a study.
"""

from __future__ import annotations

from .data_cache import _family_of, load_data  # noqa: F401
from .frames import (  # noqa: F401
    calibration_figure_frame,
    compare_frame,
    curve_frame,
    curve_metrics,
    curves_figure_frame,
    diverged_notes,
    eta_drop,
    layer_gain_frame,
    model_frame,
)
from .grid import Grid  # noqa: F401
from .seed_stats import (bootstrap_seed_means, bootstrap_seed_t, seed_matrix, seed_paired, seed_summary,  # noqa: F401
                         warnings_ignored)
from .study_cells import CELL_VERSION, StudyPlan, _train, eval_cell, model_cells, train_cell  # noqa: F401
from .theory_helpers import PREDICT_SETTINGS, folding_factors, layer_gains  # noqa: F401
from .validation import validation_by_eta, validation_tables  # noqa: F401
from .verdicts import (  # noqa: F401
    VERDICTS,
    Finding,
    StudyResult,
    directional_verdict,
    equivalence_verdict,
    finalise_findings,
    theory_verdict,
)

__all__ = [
    "Grid",
    "StudyPlan",
    "StudyResult",
    "Finding",
    "directional_verdict",
    "equivalence_verdict",
    "theory_verdict",
    "model_cells",
    "train_cell",
    "eval_cell",
    "curve_metrics",
    "model_frame",
    "curve_frame",
    "compare_frame",
    "finalise_findings",
    "CELL_VERSION",
]
