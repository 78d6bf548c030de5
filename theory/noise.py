"""Weight-noise models (docs/THEORY.md §1).

Every model here is Gaussian and *linear in its level*: a noisy weight is

    w̃ = w + s(w) ⊙ z,        z ~ N(0, I),        s(w) = level · u(w),

where ``u(w)`` is the model's unit scale. So the per-element noise variance is
``σ² = s(w)²`` (:meth:`WeightNoise.variance`, what the theory uses) and a noisy copy
is ``w + s(w) z`` (:meth:`WeightNoise.sample`, what Monte-Carlo uses): one object
serves both, and prediction and simulation cannot disagree on the noise.
Because ``s`` is linear in the level, the same standard-normal draws ``z`` give
the noisy weights at every level (common random numbers, :meth:`WeightNoise.perturb`).

Models
------
- :class:`AdditiveGaussian` ``(sigma)``: ``σ² = sigma²`` (absolute).
- :class:`RelativeGaussian` ``(eta, reference="std"|"max", per="layer"|"channel")``:
  ``σ_l = eta · std(W_l)`` (default: the seed papers' "analog noise" reading) or
  ``eta · max|W_l|`` (aihwkit's conductance mapping), one σ per layer or per output
  channel (dim 0).
- :class:`Multiplicative` ``(eta)``: ``w̃ = w (1 + eta z)``, ``σ² = eta² w²``.

``parse_noise("relative:0.05")`` builds one from the CLI string form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .validation import plain_float

__all__ = [
    "WeightNoise",
    "AdditiveGaussian",
    "RelativeGaussian",
    "Multiplicative",
    "parse_noise",
    "NOISE_STRING_FORMS",
    "MAX_LEVEL",
]


#: Largest accepted noise level: its square (the noise variance at unit scale) must be
#: finite in float32, the dtype of most weights; larger levels only produce inf/NaN.
MAX_LEVEL = math.sqrt(float(torch.finfo(torch.float32).max))


def _check_level(name: str, value) -> float:
    accepted = f"a finite number >= 0 and <= {MAX_LEVEL:.3g} (its square, the noise variance, must fit in float32)"
    if isinstance(value, (bool, str, bytes)) or type(value).__name__ in ("bool_", "bool") or not hasattr(value, "__float__"):
        raise ValueError(f"{name} must be {accepted}, got {type(value).__name__} {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be {accepted}, got {value!r}") from None
    if math.isnan(v) or math.isinf(v) or v < 0 or v > MAX_LEVEL:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return v


def _fmt(v: float) -> str:
    """``v`` for a string form: ``{v:g}`` where that reads back exactly (``0.05``, ``3600``),
    else the shortest exact form (``repr``), so that ``parse_noise(m.to_string()) == m``."""
    s = f"{v:g}"
    return s if float(s) == v else repr(float(v))


@dataclass(frozen=True)
class WeightNoise:
    """Base class: Gaussian weight noise ``w + level · u(w) ⊙ z``.

    Subclasses implement :meth:`unit_scale` (``u(w)``) and set ``level``.
    """

    kind: ClassVar[str] = "base"
    #: ``True`` for the Gaussian models here (``E[w̃] = w``); hardware models
    #: (:mod:`noiseprop.theory.hardware`) set it ``False`` and override :meth:`mean`.
    zero_mean: ClassVar[bool] = True
    #: the field that holds the level (``sigma``, ``eta``): checked on construction and
    #: read by :attr:`level` / :meth:`with_level`; models without one override them
    level_field: ClassVar[str | None] = None

    def __post_init__(self):
        if self.level_field is not None:
            object.__setattr__(self, self.level_field, _check_level(self.level_field, getattr(self, self.level_field)))

    @property
    def level(self) -> float:
        if self.level_field is None:  # pragma: no cover - overridden
            raise NotImplementedError
        return getattr(self, self.level_field)

    def with_level(self, level: float) -> "WeightNoise":
        """The same model at another noise level (used for curves over levels)."""
        if self.level_field is None:  # pragma: no cover - overridden
            raise NotImplementedError
        return replace(self, **{self.level_field: level})

    def unit_scale(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- what theory and Monte-Carlo share ---------------------------------
    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """Signed per-element noise scale ``s(w) = level · u(w)``, shaped like ``w``."""
        _check_weight(w)
        return self.level * self.unit_scale(w.detach())

    def variance(self, w: torch.Tensor) -> torch.Tensor:
        """Per-element noise variance ``σ² = s(w)²``, shaped like ``w``."""
        _check_weight(w, finite=True)
        return self.scale(w) ** 2

    def mean(self, w: torch.Tensor) -> torch.Tensor:
        """Per-element mean of the noisy weight, ``E[w̃]``, shaped like ``w``: ``w`` itself
        for these zero-mean models (the contract every noise model follows: the theory
        consumes ``mean(w)`` and ``variance(w)``)."""
        _check_weight(w, finite=True)
        return w.detach().clone()

    def perturb(self, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Noisy copy ``w + s(w) ⊙ z`` for given standard-normal draws ``z``."""
        if z.shape != w.shape:
            raise ValueError(f"standard-normal draws have shape {tuple(z.shape)}, weight has {tuple(w.shape)}")
        return w + self.scale(w) * z

    def sample(self, w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A noisy copy of ``w``, drawn with ``generator`` (no global RNG state touched
        when a generator is given)."""
        _check_weight(w)
        _check_generator(generator)
        z = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device)
        return self.perturb(w, z)

    def __str__(self) -> str:
        return self.to_string()

    def to_string(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError


def _check_weight(w, finite: bool = False) -> None:
    """A floating-point tensor; with ``finite``, also free of NaN and inf (one pass over
    ``w``: done where the moments are formed, not in the sampling inner loops
    (:meth:`WeightNoise.sample`/``perturb``, ``draw``/``apply``: Monte-Carlo checks its
    weights once, and in noise-aware training a non-finite weight must surface as
    ``TrainingDivergedError`` through the loss, empirical/train.py))."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor weight, got {type(w).__name__}")
    if not torch.is_floating_point(w):
        raise TypeError(f"expected a floating-point weight tensor, got dtype {w.dtype}")
    if finite and not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight w contains NaN or infinite values ({int((~torch.isfinite(w)).sum())} of "
                         f"{w.numel()}); the noise model needs finite weights")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r} "
                        "(e.g. torch.Generator().manual_seed(0))")


@dataclass(frozen=True)
class AdditiveGaussian(WeightNoise):
    """Additive absolute noise ``w + sigma · z``: ``σ² = sigma²`` for every element.

    >>> import torch
    >>> round(float(AdditiveGaussian(0.1).variance(torch.zeros(2, 3)).max()), 6)
    0.01
    """

    sigma: float
    kind: ClassVar[str] = "additive"
    level_field: ClassVar[str] = "sigma"

    def unit_scale(self, w):
        return torch.ones_like(w)

    def to_string(self):
        return f"additive:{_fmt(self.sigma)}"


@dataclass(frozen=True)
class RelativeGaussian(WeightNoise):
    """Additive noise relative to the layer's spread (docs/THEORY.md §1); its relative output
    error does not depend on the layer's width (derivation ``linear.width``).

    ``σ_l = eta · std(W_l)`` (``reference="std"``, population std) or
    ``σ_l = eta · max|W_l|`` (``reference="max"``, aihwkit's g_max mapping), computed
    over the whole tensor (``per="layer"``) or per output channel, i.e. per slice of
    dim 0 (``per="channel"``). A tensor with one element per channel (a bias, a norm
    layer's γ or β) has no spread within a channel: under ``reference="std"`` its
    channels take the whole tensor's std, as ``per="layer"`` (they had none, hence no
    noise). A 0-d or 1-element tensor has std 0, hence no noise under ``reference="std"``.

    >>> import torch
    >>> w = torch.tensor([[1.0, -1.0], [1.0, -1.0]])  # population std 1
    >>> torch.allclose(RelativeGaussian(0.1).variance(w), torch.full_like(w, 0.01))
    True
    >>> RelativeGaussian(0.1, reference="max", per="channel").to_string()
    'relative-max-channel:0.1'
    """

    eta: float
    reference: str = "std"
    per: str = "layer"
    kind: ClassVar[str] = "relative"
    level_field: ClassVar[str] = "eta"

    def __post_init__(self):
        super().__post_init__()
        if self.reference not in ("std", "max"):
            raise ValueError(f"reference must be 'std' or 'max', got {self.reference!r}")
        if self.per not in ("layer", "channel"):
            raise ValueError(f"per must be 'layer' or 'channel', got {self.per!r}")

    def unit_scale(self, w):
        if self.per == "channel" and w.dim() >= 1:
            flat = w.reshape(w.shape[0], -1)
            if self.reference == "std":
                if flat.shape[1] > 1:
                    ref = flat.std(dim=1, correction=0)
                else:  # one number per channel (a bias, a norm layer's γ or β): no spread of its own
                    whole = w.std(correction=0) if w.numel() > 1 else torch.zeros((), dtype=w.dtype, device=w.device)
                    ref = whole.expand(w.shape[0])
            else:
                ref = flat.abs().amax(dim=1)
            return ref.reshape((-1,) + (1,) * (w.dim() - 1)).expand_as(w).clone()
        if self.reference == "std":
            ref = w.std(correction=0) if w.numel() > 1 else torch.zeros((), dtype=w.dtype, device=w.device)
        else:
            ref = w.abs().max()
        return ref * torch.ones_like(w)

    def to_string(self):
        name = "relative" if self.reference == "std" else "relative-max"
        if self.per == "channel":
            name += "-channel"
        return f"{name}:{_fmt(self.eta)}"


@dataclass(frozen=True)
class Multiplicative(WeightNoise):
    """Multiplicative noise ``w (1 + eta z)``: ``σ² = eta² w²``.

    >>> import torch
    >>> [round(v, 6) for v in Multiplicative(0.1).variance(torch.tensor([2.0, -3.0])).tolist()]
    [0.04, 0.09]
    """

    eta: float
    kind: ClassVar[str] = "multiplicative"
    level_field: ClassVar[str] = "eta"

    def unit_scale(self, w):
        return w.clone()

    def to_string(self):
        return f"multiplicative:{_fmt(self.eta)}"


#: CLI string forms: ``name:level``.
NOISE_STRING_FORMS = {
    "additive": lambda v: AdditiveGaussian(v),
    "relative": lambda v: RelativeGaussian(v),
    "relative-max": lambda v: RelativeGaussian(v, reference="max"),
    "relative-channel": lambda v: RelativeGaussian(v, per="channel"),
    "relative-max-channel": lambda v: RelativeGaussian(v, reference="max", per="channel"),
    "multiplicative": lambda v: Multiplicative(v),
}

#: ``,key=value`` settings a string form takes after its level (``pcm:3600,drift=2``: what
#: the model's ``to_string`` writes for its non-default settings), per form name:
#: ``key -> (field, kind)``, ``kind`` one of ``float`` (a number), a tuple of accepted
#: words, or ``("flag", value)`` (a bare ``key`` that sets ``field`` to ``value``).
#: Filled where the forms are registered (:mod:`noiseprop.theory.hardware`); the
#: Gaussian forms here take none (their options are in the name).
NOISE_STRING_OPTIONS: dict[str, dict[str, tuple]] = {}


def _options_help(name: str) -> str:
    opts = NOISE_STRING_OPTIONS.get(name, {})
    parts = [k if isinstance(kind, tuple) and kind[:1] == ("flag",) else
             f"{k}=NUMBER" if kind is float else f"{k}={'|'.join(kind)}" for k, (_, kind) in opts.items()]
    return f"accepted settings for '{name}:LEVEL': " + ", ".join(parts) if parts else f"'{name}:LEVEL' takes no settings"


def _parse_options(spec: str, name: str, items: list[str]) -> dict:
    """The model fields set by the ``,key=value`` settings ``items`` of form ``name``."""
    opts = NOISE_STRING_OPTIONS.get(name, {})
    fields: dict = {}
    seen = set()
    for item in items:
        key, eq, raw = (part.strip() for part in item.partition("="))
        if key not in opts:
            raise ValueError(f"noise {spec!r}: unknown setting {item.strip()!r}; {_options_help(name)}")
        if key in seen:
            raise ValueError(f"noise {spec!r}: setting {key!r} is given twice")
        seen.add(key)
        field, kind = opts[key]
        if isinstance(kind, tuple) and kind[:1] == ("flag",):
            if eq:
                raise ValueError(f"noise {spec!r}: setting {key!r} takes no value; {_options_help(name)}")
            fields[field] = kind[1]
        elif not eq:
            raise ValueError(f"noise {spec!r}: setting {key!r} needs a value; {_options_help(name)}")
        elif kind is float:
            try:
                fields[field] = plain_float(raw)
            except ValueError:
                raise ValueError(f"noise {spec!r}: {key}={raw!r} is not a number{_underscore(raw)}; "
                                 f"{_options_help(name)}") from None
        elif raw in kind:
            fields[field] = raw
        else:
            raise ValueError(f"noise {spec!r}: {key} must be one of {', '.join(map(repr, kind))}, got {raw!r}")
    return fields


def _underscore(text: str) -> str:
    """Why :func:`~.validation.plain_float` refused ``text`` when an underscore is the reason."""
    return " (an underscore is not part of a number here)" if "_" in text else ""


def parse_noise(spec, default_level: float | None = None) -> WeightNoise:
    """Build a noise model from its string form, e.g. ``"relative:0.05"``.

    Accepted forms: ``additive:S``, ``relative:ETA``, ``relative-max:ETA``,
    ``relative-channel:ETA``, ``relative-max-channel:ETA``, ``multiplicative:ETA``
    (and the hardware forms ``pcm:T``, ``pcm-nocomp:T``, ``quantized:BITS``, ``stuck:P``,
    with the ``,key=value`` settings of :data:`NOISE_STRING_OPTIONS` after the level, e.g.
    ``pcm:3600,drift=2,per=channel``: every model's ``to_string`` reads back).
    With ``default_level``, a bare family name (``"relative"``) is accepted too and
    gets that level (used where only the family matters, e.g. sweeps).
    A :class:`WeightNoise` passes through unchanged.

    >>> n = parse_noise("relative:0.05")
    >>> n.level, n.to_string()
    (0.05, 'relative:0.05')
    >>> parse_noise("additive", default_level=1.0).to_string()
    'additive:1'
    """
    if isinstance(spec, WeightNoise):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"noise must be a WeightNoise or a string such as 'relative:0.05', got {type(spec).__name__}")
    accepted = ", ".join(f"'{k}:LEVEL'" for k in NOISE_STRING_FORMS)
    name, sep, value = spec.strip().partition(":")
    if not sep and default_level is not None and name in NOISE_STRING_FORMS:
        return NOISE_STRING_FORMS[name](default_level)
    if not sep or name not in NOISE_STRING_FORMS:
        raise ValueError(f"unknown noise {spec!r}; accepted forms: {accepted}")
    value, *settings = value.split(",")
    try:
        level = plain_float(value)
    except ValueError:
        raise ValueError(f"noise {spec!r}: level {value!r} is not a number{_underscore(value)}; accepted forms: "
                         f"{accepted}") from None
    try:
        out = NOISE_STRING_FORMS[name](level)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"noise {spec!r}: {e}") from None
    if not settings:
        return out
    fields = _parse_options(spec, name, settings)
    try:
        return replace(out, **fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"noise {spec!r}: {e}") from None
