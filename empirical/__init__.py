"""noiseprop.empirical: data, models, training, Monte-Carlo noise injection, statistics
and the studies. Imports :mod:`noiseprop.theory`, never the other way round."""
from .checkpoint import load_checkpoint, save_checkpoint
from .compare import Comparison, compare, compare_cells
from .data import Dataset, load_dataset
from .models import build_model, model_spec
from .montecarlo import MCResult, SweepResult, drift_sweep, monte_carlo, sweep

# ``train`` is both a sub-module and its main function: bind the function last, so
# ``from noiseprop.empirical import train`` gives the function.
from .train import TrainResult, default_train_config, train  # noqa: E402

__all__ = [
    "monte_carlo", "sweep", "drift_sweep", "MCResult", "SweepResult", "compare", "compare_cells", "Comparison", "load_dataset", "Dataset",
    "build_model", "model_spec", "train", "TrainResult", "default_train_config", "save_checkpoint",
    "load_checkpoint",
]
