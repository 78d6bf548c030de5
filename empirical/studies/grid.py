"""The grid shared by every study: scale and protocol (:class:`Grid`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from noiseprop.theory.noise import MAX_LEVEL
from noiseprop.theory.validation import check_seed

__all__ = ["Grid"]


def check_grid_sequences(obj, none_keeps: bool = False) -> None:
    """``obj.etas`` and ``obj.seeds`` are sequences of values, not one value or a string
    (``none_keeps``: ``None`` is accepted too, the report's "keep the grid's")."""
    for name, example in (("etas", "(0.0, 0.1, 0.2)"), ("seeds", "(0, 1, 2)")):
        value = getattr(obj, name)
        if none_keeps and value is None:
            continue
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise TypeError(f"{name} must be {'None or ' if none_keeps else ''}a sequence (tuple or list) of "
                            f"{name[:-1]} values, e.g. {example}; got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class Grid:
    """Scale and protocol shared by the studies.

    dataset, data_dir: :func:`noiseprop.empirical.data.load_dataset` arguments.
    etas: relative noise levels ``η`` (``σ_l = η·std(W_l)``); 0 is the clean network.
    draws: Monte-Carlo draws per level (common random numbers across levels and models).
    seeds: training seeds (the unit of replication of every test).
    mc_seed: the seed of the standard-normal draws, shared by every sweep.
    epochs: training epochs, for every family or per family (``{"vgg": 10}``; ``None`` or a
        family left out: the family default of
        :func:`noiseprop.empirical.train.default_train_config`).
    widths: per-family width overrides, e.g. ``{"vgg": 8}`` (``None``: defaults).
    n_test: test inputs used (``None``: all). n_train: training examples used (``None``:
        all; part of the data fingerprint, hence of every cell key).
    theory: the prediction method, ``"linear"``, ``"moments"`` or ``"auto"`` (moments on
        the MLP family, first order elsewhere: see
        :data:`~noiseprop.empirical.studies.theory_helpers.THEORY_METHODS`).
    min_clean_accuracy: the clean test-accuracy floor; a model below it is excluded
        from every comparison, with the reason in the report (analysis only: not part
        of any cell key).
    curvature_inputs: training inputs used for Hessian quantities.
    trace_probes, eig_iters: Hutchinson probes for ``tr(Σ_ε H)``; iterations cap of
        the top-eigenvalue solver.
    gain_inputs: test inputs used for the per-layer gains (0 disables them).
    alpha: level of every test; confidence: of every interval.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    etas: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
    draws: int = 20
    seeds: tuple = (0, 1, 2)
    mc_seed: int = 20240
    epochs: int | dict | None = None
    widths: dict | None = None
    n_test: int | None = None
    n_train: int | None = None
    theory: str = "linear"
    curvature_inputs: int = 256
    trace_probes: int = 16
    eig_iters: int = 20
    gain_inputs: int = 64
    alpha: float = 0.05
    confidence: float = 0.95
    min_clean_accuracy: float = 0.0

    def __post_init__(self):
        check_grid_sequences(self)
        etas = tuple(float(e) for e in self.etas)
        if len(etas) < 2 or any(not math.isfinite(e) or e < 0 for e in etas) or list(etas) != sorted(set(etas)):
            raise ValueError(f"etas must be at least two distinct increasing levels >= 0, got {self.etas!r}")
        if max(etas) > MAX_LEVEL:
            raise ValueError(f"etas must be <= {MAX_LEVEL:.3g} (the noise variance must fit in float32), "
                             f"got {max(etas):g}")
        for s in self.seeds:
            check_seed("seeds", s)
        object.__setattr__(self, "etas", etas)
        seeds = tuple(int(s) for s in self.seeds)
        if len(seeds) < 1 or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct integers, got {self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)
        if not isinstance(self.draws, int) or self.draws < 2:
            raise ValueError(f"draws must be an integer >= 2, got {self.draws!r}")
        if self.theory not in ("linear", "moments", "auto"):
            raise ValueError(f"theory must be 'linear', 'moments' or 'auto', got {self.theory!r}")
        if not (isinstance(self.min_clean_accuracy, (int, float)) and 0 <= self.min_clean_accuracy < 1):
            raise ValueError(f"min_clean_accuracy must be a number in [0, 1), got {self.min_clean_accuracy!r}")
        if isinstance(self.epochs, dict):
            if not all(isinstance(v, int) and v >= 1 for v in self.epochs.values()):
                raise ValueError(f"epochs per family must be integers >= 1, got {self.epochs!r}")
            object.__setattr__(self, "epochs", dict(sorted(self.epochs.items())))
        elif self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"epochs must be None, an integer >= 1 or a dict family -> integer, got {self.epochs!r}")
        if self.widths is not None:
            object.__setattr__(self, "widths", dict(sorted(dict(self.widths).items())))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["etas"] = list(self.etas)
        d["seeds"] = list(self.seeds)
        return d

    def protocol(self) -> dict:
        """The part of the grid that defines an eval cell (hashed into its key)."""
        return {"etas": list(self.etas), "draws": self.draws, "mc_seed": self.mc_seed, "n_test": self.n_test,
                "theory": self.theory, "curvature_inputs": self.curvature_inputs,
                "trace_probes": self.trace_probes, "eig_iters": self.eig_iters, "gain_inputs": self.gain_inputs}

    def epochs_of(self, family: str):
        """The training epochs of ``family`` (``None``: the family default)."""
        if isinstance(self.epochs, dict):
            return self.epochs.get(family)
        return self.epochs

    def width(self, family: str):
        if self.widths and family in self.widths:
            return int(self.widths[family])
        return None
