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


class Deferred:
    """A value computed on first read: the stored form of a :class:`deferred_field`
    (an extra a result holds without paying for it in the call that made it). Pickling
    or deep-copying it computes it (it travels as the value)."""

    __slots__ = ("_fn", "_value")

    def __init__(self, fn):
        self._fn = fn

    def __call__(self):
        if self._fn is not None:  # computed once, also for copies that share it
            self._value, self._fn = self._fn(), None
        return self._value

    def __reduce__(self):
        return _identity, (self(),)


def _identity(v):
    return v


class deferred_field:
    """A field of a frozen result dataclass that may be given a :class:`Deferred`: the
    first read computes it and keeps the value, so ``repr``, ``==``, ``dataclasses.asdict``
    and attribute access all see the value.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class R:
    ...     x: float = deferred_field()
    >>> calls = []
    >>> r = R(Deferred(lambda: calls.append(1) or 2.5))
    >>> before = len(calls)
    >>> before, r.x, r.x, len(calls)
    (0, 2.5, 2.5, 1)
    """

    def __set_name__(self, owner, name):
        self._slot = "_deferred_" + name

    def __get__(self, obj, owner=None):
        if obj is None:  # the dataclass looking for a default: there is none
            raise AttributeError(self._slot)
        try:
            v = obj.__dict__[self._slot]
        except KeyError:
            raise AttributeError(f"{type(obj).__name__!r} object has no attribute {self._slot[10:]!r}") from None
        if type(v) is Deferred:
            v = obj.__dict__[self._slot] = v()
        return v

    def __set__(self, obj, value):
        obj.__dict__[self._slot] = value
