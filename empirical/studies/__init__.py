"""The four studies of the source papers (../shared/seeds/), at CPU scale on the
built-in digits data by default and at published scale with ``dataset="cifar10"``.

=================  ===========================================================
``architecture``   :mod:`.architecture`: architecture and depth (arXiv 2011.11840)
``batchnorm``      :mod:`.batchnorm`: BatchNorm, first-k layers, folded noise (2205.07372)
``learning_rate``  :mod:`.learning_rate`: sweet spot, sharpness vs 2/lr (2205.07856)
``norm_type``      :mod:`.norm_type`: L2 vs L1 vs TopK BatchNorm (2205.04886)
``noise_aware``    :mod:`.noise_aware`: standard vs noise-aware training (not in the
                   published set: ``noiseprop report`` runs the four above by default)
=================  ===========================================================

Each module has ``plan(grid, ...) -> StudyPlan`` (the cells) and
``analyse(plan, results, grid) -> StudyResult`` (tables, findings with computed
verdicts, figures). :func:`run_plans` runs any number of plans through one executor
and one result store, so models shared between studies are trained and measured once,
and a killed run resumes where it stopped.
"""
from __future__ import annotations

import importlib

from noiseprop.theory.symbolic.batchnorm import batchnorm_lognormal_scales
from noiseprop.theory.symbolic.learning_rate import lr_sweet_spot
from noiseprop.theory.validation import check_output_dir

from ..cells import ResultStore
from ..executor import run_tasks
from ..train import default_cache_dir
from .common import Finding, Grid, StudyPlan, StudyResult
from .figures import _mpl

__all__ = ["STUDIES", "PUBLISHED_STUDIES", "Grid", "StudyPlan", "StudyResult", "Finding", "study_module", "run_plans",
           "run_study", "default_grid", "quick_grid", "quick_options", "paper_grid", "paper_options", "PAPER_COST"]

STUDIES = ("architecture", "batchnorm", "learning_rate", "norm_type", "noise_aware")

#: The studies of the source papers: what ``noiseprop report`` runs by default.
PUBLISHED_STUDIES = ("architecture", "batchnorm", "learning_rate", "norm_type")


def study_module(name: str):
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; accepted: {list(STUDIES)}")
    return importlib.import_module(f".{name}", __name__)


#: Datasets run at CPU scale by default (small models, few epochs); any other dataset
#: (CIFAR-10/100, MNIST) runs the families at their standard widths and epochs.
CPU_SCALE_DATASETS = ("digits", "teacher")


def default_grid(**overrides) -> Grid:
    """The default grid: on the built-in digits (what ``noiseprop report`` runs) a CPU
    scale sized for about 10 minutes on 2 idle cores, with models that learned:

    - widths 8 for VGG and ResNets (the published models have 16–64);
    - the families' default epochs with a cosine schedule: 15 for VGG and ResNets (at
      10, one seed each of ResNet-20 without BatchNorm and of VGG with BatchNorm in its
      first layer only stayed under the floor), 20 for the MLPs;
    - a clean-accuracy floor of 95%, checked on the whole test set, below which a model
      is excluded with its reason;
    - the clean network and 5 noise levels (η = 0.1, 0.3, 0.5, 0.75, 1.0) × 12 draws, and
      4 training seeds, the unit of replication (with 3, the BatchNorm rows'
      Holm-adjusted p stayed at 0.2; with 4 it is 0.08);
    - the theory by moment propagation on every curve (``theory="moments"``), with the
      first order beside it where its validity diagnostic holds;
    - Monte-Carlo and theory on the first 100 of the 359 test inputs (``n_test``; the
      clean-accuracy claims use the whole test set). The moment sweeps of the 44
      convolutional models cost 10× their Monte-Carlo and 57% of the job: with
      η = 0.2 and 180 inputs the job took 798 s (``benchmarks/report_time.py``, from an
      empty cache, 2 cores), with 100 inputs and five levels 517–524 s (two runs). The price: the
      smallest detectable effects of most robustness claims grew, typically by
      20–45% and at most 84% (the depth claim's, 0.0032 → 0.0059); the BatchNorm
      rows' went from 0.074–0.28 to 0.096–0.38 normalised accuracy, still a fraction
      of the papers' 0.51–0.83. No decided verdict turned inconclusive; three
      inconclusive ones were decided (18 inconclusive, 8 reproduced, 2 contradicted,
      against 21, 5, 2): VGG's L1-against-L2 robustness, digital and folded (Holm p
      0.038 and 0.011, at the margin) and TopK's clean accuracy (whole test set).

    On CIFAR and MNIST the published scale (:func:`paper_grid`)."""
    dataset = overrides.get("dataset", "digits")
    if dataset not in CPU_SCALE_DATASETS:
        return paper_grid(**overrides)
    base = dict(etas=(0.0, 0.1, 0.3, 0.5, 0.75, 1.0), draws=12, seeds=(0, 1, 2, 3), n_test=100,
                epochs=None, widths={"vgg": 8, "resnet": 8}, curvature_inputs=64, trace_probes=8,
                eig_iters=10, gain_inputs=32, theory="moments", min_clean_accuracy=0.95)
    base.update(overrides)
    return Grid(**base)


#: Expected cost of ``noiseprop report --scale paper`` (CIFAR-10, :func:`paper_grid` and
#: :func:`paper_options`): about 90 trained models of 30 epochs (VGG-16 and ResNet-20/32/44
#: at their published widths; 3 seeds), roughly 1–3 GPU-minutes each on one modern GPU,
#: so 2–4 GPU-hours for training plus about 1 GPU-hour of Monte-Carlo and theory; on
#: CPU cores it is days. The cells are independent: ``--scheduler`` spreads them over a
#: dask cluster.
PAPER_COST = "about 90 models × 30 epochs: 2–4 GPU-hours of training plus ~1 GPU-hour of Monte-Carlo (days on CPU)"


def paper_grid(**overrides) -> Grid:
    """The published scale (``--scale paper``): CIFAR-10 by default (local files,
    ``data_dir``), the families' standard widths and 30 epochs, 20 draws per level,
    3 seeds, first-order theory with the validity diagnostic (moments: ``theory=``),
    larger curvature samples. Runs on a GPU when present (the training device of
    :func:`noiseprop.empirical.train.train`). Cost: :data:`PAPER_COST`."""
    base = dict(dataset="cifar10", etas=(0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), draws=20, seeds=(0, 1, 2),
                epochs=None, widths=None, curvature_inputs=512, trace_probes=16, eig_iters=20, gain_inputs=128,
                theory="linear", min_clean_accuracy=0.0)
    base.update(overrides)
    return Grid(**base)


def paper_options() -> dict:
    """Per-study options at published scale: the papers' architectures (VGG-16,
    ResNet-20/32/44)."""
    return {
        "architecture": {"models": ("vgg16", "resnet20", "resnet32", "resnet44")},
        "batchnorm": {"archs": ("vgg16", "resnet44")},
        "learning_rate": {"arch": "vgg16"},
        "norm_type": {"archs": ("vgg16", "resnet44")},
    }


def quick_grid(**overrides) -> Grid:
    """A reduced grid for tests and smoke runs (``--quick``): tiny models, two seeds,
    few levels and draws. Its verdicts are mostly inconclusive by design."""
    base = dict(etas=(0.0, 0.3, 0.6, 1.0), draws=4, seeds=(0, 1), epochs=2, widths={"mlp": 32, "vgg": 4,
                                                                                      "resnet": 4},
                n_test=120, n_train=400, curvature_inputs=64, trace_probes=4, eig_iters=5, gain_inputs=16)
    base.update(overrides)
    return Grid(**base)


def quick_options() -> dict:
    """Per-study options of the quick run (small models only)."""
    return {
        "architecture": {"models": ("mlp", "resnet8")},
        "batchnorm": {"archs": ("mlp",), "ks": (0, 1, None)},
        "learning_rate": {"arch": "mlp", "lrs": (0.01, 0.05, 0.25)},
        "norm_type": {"archs": ("mlp",)},
        "noise_aware": {"archs": ("mlp",)},
    }


def run_plans(plans, grid: Grid, store, executor=None, progress=None, stop_after=None):
    """Run the cells of every plan (deduplicated) through ``executor`` and ``store``;
    return ``(results, RunStats)``."""
    preload()
    tasks = [t for p in plans for t in p.tasks]
    return run_tasks(tasks, store, executor, progress=progress, stop_after=stop_after)


def preload() -> None:
    """Import what the cells use, in this process, before workers are forked (so
    each worker does not pay for the imports again)."""
    # torch.optim's first step() imports torch._dynamo (seconds): do it once, here
    for m in ("torch._dynamo", "noiseprop.empirical.train", "noiseprop.empirical.montecarlo",
              "noiseprop.empirical.compare", "noiseprop.theory", "noiseprop.theory.predict",
              "noiseprop.theory.flatness", "statsmodels.api", "statsmodels.formula.api", "scipy.stats"):
        importlib.import_module(m)
    _mpl()  # matplotlib with the Agg backend, for figures drawn in workers
    # the symbolic derivations the studies evaluate (sympy: seconds to build, cached)
    batchnorm_lognormal_scales().numeric("inflation_mean")
    d = lr_sweet_spot()
    d.numeric("lr_opt"), d.numeric("sweet_spot_exists")


def run_study(name: str, grid: Grid | None = None, store=None, executor=None, cache_dir=None, progress=None,
              **options) -> StudyResult:
    """Plan, run and analyse one study. ``store``: a
    :class:`~noiseprop.empirical.cells.ResultStore` (default: ``<cache_dir>/cells``).
    ``grid``: a :class:`Grid` (e.g. :func:`quick_grid`, :func:`default_grid`,
    :func:`paper_grid`) or ``None`` (:func:`default_grid`)."""
    # refuse what can be refused before any work
    mod = study_module(name)
    if grid is not None and not isinstance(grid, Grid):
        raise TypeError(f"grid must be a Grid (e.g. quick_grid(), default_grid() or paper_grid()) or None; "
                        f"got {type(grid).__name__} {grid!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be None or a callable progress(event, task, info); got {progress!r}")
    cache_dir = check_output_dir(cache_dir, "cache_dir") if cache_dir is not None else default_cache_dir()
    grid = grid or default_grid()
    if store is None:
        check_output_dir(cache_dir / "cells", "cache_dir")
    store = store or ResultStore(cache_dir / "cells")
    plan = mod.plan(grid, cache_dir=str(cache_dir), **options)
    results, _ = run_plans([plan], grid, store, executor, progress)
    return mod.analyse(plan, results, grid)
