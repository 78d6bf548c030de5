"""What every result of one noise setting shares (:class:`~noiseprop.theory.predict.Prediction`,
:class:`~noiseprop.empirical.montecarlo.MCResult`): the noise level of the noise model
it carries, and the shape and mean shift of its ``[N, C]`` logits."""
from __future__ import annotations

import torch

__all__ = ["LogitResult"]


class LogitResult:
    """Mixin for frozen result dataclasses with ``logit_mean``, ``clean_logits`` (``[N, C]``)
    and ``noise_model`` fields.

    >>> from types import SimpleNamespace
    >>> class R(LogitResult):
    ...     logit_mean, clean_logits, noise_model = torch.ones(2, 3), torch.zeros(2, 3), SimpleNamespace(level=0.1)
    >>> r = R()
    >>> r.n_inputs, r.num_classes, r.level, float(r.logit_mean_shift.sum())
    (2, 3, 0.1, 6.0)
    """

    __slots__ = ()

    @property
    def n_inputs(self) -> int:
        return int(self.logit_mean.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.logit_mean.shape[1])

    @property
    def logit_mean_shift(self) -> torch.Tensor:
        """``E[f(θ+ε)] − f(θ)`` per input and class (zero for a first-order prediction)."""
        return self.logit_mean - self.clean_logits

    @property
    def level(self) -> float:
        """The noise level (η, σ, or the time of a hardware model); NaN when unknown."""
        return float(self.noise_model.level) if self.noise_model is not None else float("nan")
