"""noiseprop.theory: how weight noise propagates through a network, without sampling.

Noise models (:mod:`.noise`), target selection and BatchNorm folding (:mod:`.targets`),
analytic prediction (:mod:`.predict`), flatness (:mod:`.flatness`) and symbolic
derivations (:mod:`.symbolic`). Never imports :mod:`noiseprop.empirical`.
"""
from . import noise as _noise
from .noise import (MAX_LEVEL, NOISE_STRING_FORMS, AdditiveGaussian, Multiplicative, RelativeGaussian, WeightNoise,
                    parse_noise)
from .symbolic import DERIVATION_NAMES, DERIVATIONS, TOPICS, Derivation, derive, get_derivation
from .targets import Targets, fold_bn, resolve_targets

__all__ = list(_noise.__all__) + [
    "Targets",
    "fold_bn",
    "resolve_targets",
    "Derivation",
    "DERIVATIONS",
    "DERIVATION_NAMES",
    "TOPICS",
    "derive",
    "get_derivation",
]

from .flatness import hessian_top_eigenvalue, hessian_trace  # noqa: E402
from .predict import PredictOptions, Prediction, Predictor, clear_cache, predict, predict_sweep  # noqa: E402

__all__ += ["Prediction", "PredictOptions", "Predictor", "clear_cache", "predict", "predict_sweep", "hessian_trace", "hessian_top_eigenvalue"]

from .sensitivity import KeepDigital, NoiseBudget, Sensitivity, keep_digital, noise_budget, sensitivity  # noqa: E402

__all__ += ["Sensitivity", "NoiseBudget", "KeepDigital", "sensitivity", "noise_budget", "keep_digital"]

from .hardware import HardwareNoise, PCMLike, Quantized, StuckAt  # noqa: E402

__all__ += ["HardwareNoise", "PCMLike", "Quantized", "StuckAt"]

from .drift import DriftPrediction, predict_drift, predict_hardware  # noqa: E402

__all__ += ["DriftPrediction", "predict_drift", "predict_hardware"]
