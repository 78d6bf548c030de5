"""Symbolic derivations (sympy) of the laws that explain noise robustness.

Each derivation is a function returning a frozen :class:`Derivation` (assumptions, the
sympy expressions, ``.latex()``, ``.numeric(name)`` via lambdify, ``.summary()``, the
source it follows); each is checked against a Monte-Carlo simulation of its stated
setting in ``tests/theory/test_symbolic_*.py``.

``derive(topic=None)`` returns the derivations of one topic (or all);
:data:`DERIVATIONS` maps each topic to its derivation functions.
"""
from __future__ import annotations

from .base import Derivation
from .batchnorm import (batchnorm_folded_noise, batchnorm_folding, batchnorm_layer_count, batchnorm_lognormal_scales,
                        batchnorm_scale_estimators, batchnorm_statistics_noise)
from .conv import conv_pooling, conv_spatial_covariance
from .depth import depth_recursion, depth_relu_critical, depth_residual
from .flatness import flatness_hutchinson, flatness_quadratic, flatness_second_order
from .hardware import hardware_compensation, hardware_device_moments
from .learning_rate import lr_sgd_stationary, lr_stability, lr_sweet_spot
from .linear import linear_fixed_input, linear_random_input, linear_width

#: topic -> the functions that derive its results (in reading order).
DERIVATIONS = {
    "linear": (linear_fixed_input, linear_random_input, linear_width),
    "conv": (conv_spatial_covariance, conv_pooling),
    "batchnorm": (
        batchnorm_folding,
        batchnorm_folded_noise,
        batchnorm_lognormal_scales,
        batchnorm_scale_estimators,
        batchnorm_statistics_noise,
        batchnorm_layer_count,
    ),
    "depth": (depth_recursion, depth_relu_critical, depth_residual),
    "flatness": (flatness_quadratic, flatness_second_order, flatness_hutchinson),
    "learning_rate": (lr_stability, lr_sgd_stationary, lr_sweet_spot),
    "hardware": (hardware_device_moments, hardware_compensation),
}

TOPICS = tuple(DERIVATIONS)

__all__ = ["Derivation", "DERIVATIONS", "TOPICS", "derive", "get_derivation", "DERIVATION_NAMES"] + [
    f.__name__ for fns in DERIVATIONS.values() for f in fns]


def _derivation_name(topic: str, fn) -> str:
    return f"{topic}.{fn.__name__.split('_', 1)[1]}"


#: full derivation name ("<topic>.<short name>") -> the function that derives it.
DERIVATION_NAMES = {_derivation_name(t, f): f for t, fns in DERIVATIONS.items() for f in fns}


def derive(topic: str | None = None) -> tuple[Derivation, ...]:
    """The derivations of ``topic`` (one of :data:`TOPICS`), or of every topic (each
    derivation is computed once per process and cached).

    >>> [d.name for d in derive("depth")]
    ['depth.recursion', 'depth.relu_critical', 'depth.residual']
    """
    if topic is None:
        return tuple(f() for fns in DERIVATIONS.values() for f in fns)
    if topic not in DERIVATIONS:
        raise ValueError(f"unknown derivation topic {topic!r}; accepted: {', '.join(TOPICS)}")
    return tuple(f() for f in DERIVATIONS[topic])


def get_derivation(name: str) -> Derivation:
    """One derivation by its full name ``"<topic>.<short name>"`` (see :data:`DERIVATION_NAMES`).

    >>> d = get_derivation("linear.width")
    >>> d.topic, d.tested_by[0]
    ('linear', 'tests/theory/test_symbolic_linear.py::test_width_dependence_of_relative_error')
    """
    try:
        fn = DERIVATION_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown derivation {name!r}; accepted: {', '.join(DERIVATION_NAMES)}") from None
    return fn()
