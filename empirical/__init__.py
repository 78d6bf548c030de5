"""noiseprop.empirical: data, models, training, Monte-Carlo noise injection, statistics
and the studies. Imports :mod:`noiseprop.theory`, never the other way round.

Public names are imported lazily, so ``import noiseprop.empirical`` stays cheap.
"""
import importlib

_PUBLIC = {
    "monte_carlo": ".montecarlo",
    "sweep": ".montecarlo",
    "MCResult": ".montecarlo",
    "SweepResult": ".montecarlo",
    "compare": ".compare",
    "Comparison": ".compare",
    "load_dataset": ".data",
    "Dataset": ".data",
    "build_model": ".models",
    "model_spec": ".models",
    "train": ".train",
    "TrainResult": ".train",
    "default_train_config": ".train",
    "save_checkpoint": ".checkpoint",
    "load_checkpoint": ".checkpoint",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
