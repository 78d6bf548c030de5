"""Input checks shared by every public entry point (prediction, Monte-Carlo, data, the
command line), so all of them reject the same inputs with the same messages.

Every error names the argument (or file, layer, environment variable) and says what is
accepted. Checks run at the boundary, before any long work starts.

Scalars: :func:`check_int`, :func:`check_number`, :func:`check_probability`,
:func:`check_seed`, :func:`check_bool`, :func:`env_int`.
Model and data: :func:`check_inputs`, :func:`check_labels`, :func:`check_model`,
:func:`check_logits`, :func:`model_fit_error`, :func:`check_noise_fits`,
:func:`warn_if_probabilities`.
Files: :func:`check_output_file`, :func:`check_output_dir`, :func:`check_figure_path`
(and :func:`save_figure`, which writes a figure whole or not at all).
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["check_inputs", "check_labels", "check_int", "check_number", "check_probability", "check_seed",
           "check_bool", "env_int", "check_model", "check_logits", "model_fit_error", "check_noise_fits",
           "check_output_file", "check_output_dir", "check_levels", "check_times", "SEED_MAX", "probe_logits", "is_fit_error",
           "warn_if_probabilities", "check_figure_path", "save_figure", "figure_formats"]

#: Largest accepted seed: torch and numpy generators both take any integer in [0, 2**63).
SEED_MAX = 2 ** 63 - 1


# ----------------------------------------------------------------------------
# Scalars
# ----------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False,
              *, what: str | None = None, wrong_type: type = TypeError):
    """An integer (not a bool, not a float) in ``[minimum, maximum]``; returns ``int``.

    ``what`` replaces the description of what is accepted in the message ("k must be
    {what}, got ..."); ``wrong_type``: the exception raised for a value that is not an
    integer (``TypeError``; ``ValueError`` where an API has always raised that)."""
    if value is None and allow_none:
        return None
    lo = "" if minimum is None else f" >= {minimum}"
    hi = "" if maximum is None else f" <= {maximum}"
    if what is None:
        what = f"an integer{lo}{' and' if lo and hi else ''}{hi}{' or None' if allow_none else ''}"
    if not _is_int(value):
        raise wrong_type(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return v


def check_number(name: str, value, minimum: float | None = None, maximum: float | None = None,
                 open_min: bool = False, open_max: bool = False, allow_none: bool = False, *,
                 what: str | None = None, wrong_type: type = TypeError) -> float | None:
    """A finite real number (int or float, not a bool or a string) in the given range;
    returns ``float``. ``what`` and ``wrong_type`` as for :func:`check_int`."""
    if value is None and allow_none:
        return None
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if open_min else '>='} {minimum:g}")
    if maximum is not None:
        parts.append(f"{'<' if open_max else '<='} {maximum:g}")
    if what is None:
        what = "a finite number" + (" " + " and ".join(parts) if parts else "") + (" or None" if allow_none else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise wrong_type(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {what}, got {value!r} (too large for a float)") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if minimum is not None and (v < minimum or (open_min and v == minimum)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if maximum is not None and (v > maximum or (open_max and v == maximum)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def check_probability(name: str, value) -> float:
    """A number strictly between 0 and 1 (a confidence level, a fraction)."""
    return check_number(name, value, 0.0, 1.0, open_min=True, open_max=True)


def check_seed(name: str, value) -> int:
    """A seed: an integer in ``[0, 2**63 - 1]`` (what torch and numpy generators take)."""
    return check_int(name, value, 0, SEED_MAX)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def env_int(var: str, default=None, minimum: int = 1):
    """The integer value of environment variable ``var`` (``default`` when unset or
    empty); an error naming the variable otherwise."""
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return default
    try:
        v = int(raw.strip())
    except ValueError:
        raise ValueError(f"environment variable {var}={raw!r} is not an integer; set it to an integer >= {minimum} "
                         f"or unset it") from None
    if v < minimum:
        raise ValueError(f"environment variable {var}={raw!r} must be an integer >= {minimum}")
    return v


# ----------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_model(model) -> nn.Module:
    """A ``torch.nn.Module`` with real (not ``meta``) finite parameters and buffers, and
    BatchNorm running variances ``>= 0``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module mapping inputs to logits, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("model is a TorchScript module (torch.jit.script or torch.jit.trace), whose parameters "
                        "cannot be replaced per call; pass the original torch.nn.Module")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type == "meta":
            raise ValueError(f"model parameter {name!r} is on the 'meta' device (no values); load real weights "
                             "first, e.g. model.to_empty(device='cpu') then load_state_dict")
        if torch.is_floating_point(p) and not torch.isfinite(p).all():
            raise ValueError(f"model parameter {name!r} contains NaN or infinite values")
    for name, m in model.named_modules():
        if isinstance(m, _BN) and not m.track_running_stats:
            raise ValueError(f"BatchNorm layer {name or type(m).__name__!r} has track_running_stats=False: it "
                             "normalises by the statistics of each batch it is given, even in eval mode, so an "
                             "input's logits depend on the other inputs of its batch; noiseprop needs running "
                             "statistics (a layer built with track_running_stats=True, trained)")
        if isinstance(m, _BN) and m.running_var is not None:
            rv = m.running_var.detach()
            if (rv + m.eps <= 0).any() or (rv < 0).any():
                bad = int((rv < 0).sum())
                raise ValueError(f"BatchNorm layer {name or type(m).__name__!r} has {bad} negative running_var "
                                 f"value(s) (min {float(rv.min()):.4g}); a variance must be >= 0")
    return model


def _from_numpy(name: str, a, what: str):
    """A numpy array as a tensor (a copy where torch cannot share its memory: negative
    strides, a read-only or non-native byte order); an array torch has no dtype for
    (object, strings) is a clear ``TypeError``; anything else is returned as given."""
    if not isinstance(a, np.ndarray):
        return a
    if a.dtype.kind not in "biufc":
        raise TypeError(f"{name} must hold {what}; got a numpy array of dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))  # copies only what torch cannot share
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def copy_model(model: nn.Module, who: str) -> nn.Module:
    """``copy.deepcopy(model)``, or a ``TypeError`` that names the model and why it is
    copied (``who``: what copies it) instead of an error from deep inside :mod:`copy` /
    :mod:`pickle` (an attribute such as a ``threading.Lock`` cannot be copied). Every
    private copy of a user's model (Monte-Carlo's, BatchNorm folding's, a training-mode
    model's eval copy) is made here."""
    import copy

    try:
        return copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - whatever a user's attribute raises when copied
        raise TypeError(f"model ({type(model).__name__}): {who} copies the model with copy.deepcopy so that the "
                        f"user's model is never changed; this model cannot be copied: "
                        f"{first_line(e, type(e).__name__)}. Make it copyable (drop or recreate the attribute in "
                        f"__deepcopy__, or keep it outside the module)") from e


def check_inputs(model, x, y):
    """Validate ``model, x, y`` at a public boundary; return ``(x, y)`` as tensors with
    ``y`` int64. Errors name the problem and what is accepted."""
    check_model(model)
    x = _from_numpy("x", x, "floating-point inputs")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor of inputs, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense tensor, got layout {x.layout}; convert with x.to_dense()")
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch of inputs [N, ...] (at least 2 dimensions), got shape {tuple(x.shape)}; "
                         "N scalar inputs are x[:, None], one input is x[None]")
    y = _from_numpy("y", y, "integer class labels")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a tensor of integer class labels, got {type(y).__name__}")
    if torch.is_floating_point(y) or torch.is_complex(y) or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels (int64 accepted, any integer dtype converted), got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"y must be 1-D (one label per input), got shape {tuple(y.shape)}")
    if x.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length: x has {x.shape[0] if x.dim() else 0} inputs, y has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("x and y are empty: at least one input is needed")
    if x.device.type == "meta":
        raise ValueError("x is on the 'meta' device (no values); give a tensor with data")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    dtypes = {p.dtype for p in model.parameters() if torch.is_floating_point(p)}
    if len(dtypes) == 1 and x.dtype not in dtypes:
        (dt,) = dtypes
        raise TypeError(f"x does not fit the model: x has dtype {x.dtype} but the model's parameters are {dt}; "
                        f"convert with x.to({dt})")
    return x, y.to(torch.int64)


def check_labels(y: torch.Tensor, num_classes: int):
    """Labels must lie in ``[0, num_classes)``."""
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} logits; found range [{lo}, {hi}]")


def check_logits(out, n: int | None = None) -> torch.Tensor:
    """What a model returned must be one ``[N, C]`` floating-point tensor of logits."""
    if not isinstance(out, torch.Tensor):
        what = type(out).__name__
        if isinstance(out, (tuple, list)):
            what += f" of {len(out)} items"
        elif isinstance(out, dict):
            what += f" with keys {sorted(map(str, out))[:5]}"
        raise TypeError(f"the model must return one tensor of logits shaped [N, C]; it returned a {what}. Wrap it "
                        "in a Module whose forward returns the logits tensor (e.g. model(x)[0] or model(x)['logits'])")
    if out.dim() != 2:
        raise ValueError(f"the model must map a batch of inputs to logits of shape [N, C]; got shape {tuple(out.shape)}")
    if n is not None and out.shape[0] != n:
        raise ValueError(f"the model returned {out.shape[0]} rows of logits for {n} inputs; it must return one row "
                         "per input")
    if not torch.is_floating_point(out):
        raise TypeError(f"the model must return floating-point logits, got dtype {out.dtype}")
    if out.shape[1] < 2:
        raise ValueError(f"the model returns {out.shape[1]} logit per input; accuracy and cross-entropy need at least "
                         "2 classes (for a binary model with one logit z, return the two logits [0, z])")
    return out


def check_finite_logits(logits: torch.Tensor, offset: int = 0) -> None:
    """Clean logits must be finite (the message Monte-Carlo gives), naming the first
    inputs where they are not (``offset``: the index of the batch's first input)."""
    bad = ~torch.isfinite(logits).all(dim=1)
    if bool(bad.any()):
        idx = (torch.nonzero(bad).flatten()[:5] + offset).tolist()
        raise ValueError(f"the model's clean logits on x contain NaN or infinite values (inputs {idx}"
                         f"{', ...' if int(bad.sum()) > 5 else ''}): the model itself overflows on these inputs, "
                         "before any noise")


_PACKAGE_DIRS = tuple(str(Path(__file__).resolve().parents[1] / d) + os.sep for d in ("theory", "empirical"))
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller of this function) of the
    first frame outside noiseprop and torch: the user's line, however deep the warning is
    raised."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIRS + (_TORCH_DIR,)):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


#: The start of :func:`warn_if_probabilities`' message (a filter for callers that have
#: already warned once, e.g. a ``Predictor`` at construction).
PROBABILITIES_WARNING = "the model's outputs are probabilities"


def warn_if_probabilities(out: torch.Tensor) -> None:
    """Warn where a model's outputs are probabilities rather than logits: every row in
    ``[0, 1]`` and summing to 1 (a final Softmax). The theory's Gaussian-logit model and
    cross-entropy loss then apply to the probabilities: accuracy is the first order of a
    saturating function and the loss increase is not the network's. (Logits of ``C ≥ 2``
    classes do not land on the simplex by chance; LogSoftmax outputs are logits.)"""
    if out.numel() == 0 or out.shape[-1] < 2:
        return
    o = out.detach()
    tol = max(1e-4, 4 * torch.finfo(o.dtype).eps * o.shape[-1])  # a half-precision softmax sums to 1 within ~C·eps
    if bool(((o >= 0) & (o <= 1)).all()) and bool(((o.double().sum(-1) - 1).abs() < tol).all()):
        warnings.warn(PROBABILITIES_WARNING + " (every row lies in [0, 1] and sums to 1: a final "
                      "Softmax?), but noiseprop treats them as logits: predictions on them are less accurate and "
                      "the loss is cross-entropy on the probabilities. Remove the final Softmax (LogSoftmax "
                      "outputs are fine)", UserWarning, stacklevel=_user_stacklevel())


def first_line(exc: BaseException, default: str = "") -> str:
    """The first line of an exception's message (``default`` when it has none): what a
    one-line error quotes of an error raised deep inside torch or a user's code."""
    msg = str(exc).strip()
    return msg.splitlines()[0] if msg else default


def model_fit_error(exc: BaseException, x: torch.Tensor, shape=None) -> ValueError:
    """A ``ValueError`` saying that ``x`` does not fit the model, for an error raised
    by the model's forward on ``x`` (wrong shape, channel count or dtype); ``shape``: the
    shape to quote (the caller's whole batch, when ``x`` is a probe of its first input)."""
    first = first_line(exc, type(exc).__name__)
    shape = tuple(x.shape if shape is None else shape)
    return ValueError(f"x does not fit the model: its forward pass on inputs of shape {shape} and dtype "
                      f"{x.dtype} failed with {type(exc).__name__}: {first}")


def check_noise_fits(noise, weights, names=None) -> None:
    """The noise model's scale must be finite for every target weight, in the weight's
    own dtype: an absurd level (e.g. ``relative:1e300`` on float32 weights) is refused
    here, by name, instead of overflowing deep inside a run."""
    for i, w in enumerate(weights):
        s = noise.scale(w)
        finfo = torch.finfo(w.dtype)
        big = float(s.detach().abs().max()) if s.numel() else 0.0
        if not math.isfinite(big) or big > finfo.max:
            nm = names[i] if names is not None else f"#{i}"
            raise ValueError(f"noise {noise.to_string()}: the noise scale of parameter {nm!r} overflows {w.dtype} "
                             f"(max {finfo.max:.3g}); use a smaller level")


# ----------------------------------------------------------------------------
# Output locations (checked before a long run starts)
# ----------------------------------------------------------------------------
def _writable_dir_ancestor(path: Path, name: str, shown=None) -> None:
    """Walk up to the first existing ancestor: it must be a writable folder."""
    shown = path if shown is None else shown
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise ValueError(f"{name} {str(shown)!r} cannot be created: {str(p)!r} is a file, not a folder")
    if p.exists():
        try:  # a real probe: permission bits do not tell root (or read-only mounts) the truth
            fd, probe = tempfile.mkstemp(prefix=".noiseprop-probe.", dir=p)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"{name} {str(shown)!r} cannot be written: no file can be created in folder "
                             f"{str(p)!r} ({e.strerror or e})") from None


def check_output_file(path, name: str = "--out") -> Path:
    """A file to write later: not a folder, under a folder that exists or can be made,
    and writable."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"{name} must be a file path, got {path!r}")
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{name} {str(p)!r} is a folder; give a file path such as {str(p / 'model.pt')!r}")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{name} {str(p)!r} exists and is not writable")
    _writable_dir_ancestor(p.parent, name, shown=p)
    return p


def figure_formats() -> dict:
    """The file formats matplotlib can write, ``{extension: description}``."""
    from matplotlib.backend_bases import FigureCanvasBase  # lazy; much lighter than pyplot

    return FigureCanvasBase.get_supported_filetypes()


def check_figure_path(path, name: str = "path") -> Path:
    """A figure file to write later (checked before the work): not a folder, a name
    whose extension is a format matplotlib writes, under a folder that exists or can be
    made and is writable. A name without extension is refused rather than silently
    given ``.png`` (matplotlib would write ``NAME.png``, not the path asked for)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"{name} must be a figure file path such as 'figure.png', got {path!r}")
    p = Path(path).expanduser()
    formats = figure_formats()
    shown = ", ".join("." + k for k in formats)
    if p.is_dir():
        raise ValueError(f"{name} {str(p)!r} is a folder; give a figure file path such as "
                         f"{str(p / 'figure.png')!r}")
    ext = p.suffix[1:].lower()
    if not ext:
        raise ValueError(f"{name} {str(p)!r} has no file extension, which sets the figure's format; give a file "
                         f"name ending in one of {shown} (e.g. {str(p) + '.png'!r})")
    if ext not in formats:
        raise ValueError(f"{name} {str(p)!r}: matplotlib cannot write {p.suffix!r} files; give a file name ending in "
                         f"one of {shown}")
    return check_output_file(p, name)


def save_figure(fig, path, **kwargs) -> None:
    """``fig.savefig`` written whole or not at all: into a temporary file beside ``path``,
    then renamed over it (a failure leaves nothing half-written). Makes the folder."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    # a unique name that savefig itself creates (the file gets the usual permissions)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part{p.suffix}")
    try:
        fig.savefig(tmp, format=p.suffix[1:].lower() or None, **kwargs)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_output_dir(path, name: str = "--out") -> Path:
    """A folder to write into later: not a file, and creatable or writable."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"{name} must be a folder path, got {path!r}")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{name} {str(p)!r} is a file; give a folder")
    _writable_dir_ancestor(p, name)
    return p


_FIT_WORDS = ("shape", "size", "channel", "dtype", "scalar type", "expected", "dimension", "must match",
              "cannot be multiplied", "input type", "weight type")


def is_fit_error(exc: BaseException) -> bool:
    """Whether an error raised by a forward pass reads like inputs that do not fit a
    layer (shape, channel count, dtype) rather than a failure of the model itself."""
    if isinstance(exc, IndexError):  # torch's "Dimension out of range" (a flatten or a view of too few dims)
        return "dimension out of range" in str(exc).lower()
    # torch's BatchNorm/InstanceNorm raise ValueError ("expected 4D input (got 3D input)")
    return isinstance(exc, (RuntimeError, ValueError)) and any(w in str(exc).lower() for w in _FIT_WORDS + ("rank",))


def probe_logits(forward, x: torch.Tensor, shape=None) -> torch.Tensor:
    """``forward(x)`` (no gradients) checked to be a ``[N, C]`` logits tensor; an error
    from a layer that ``x`` does not fit becomes "x does not fit the model: ..."
    (quoting ``shape``, the caller's batch, when ``x`` is a probe of its first input).
    For entry points that run one probe pass before the real work."""
    try:
        with torch.no_grad():
            out = forward(x)
    except (RuntimeError, IndexError, ValueError) as e:
        if is_fit_error(e):
            raise model_fit_error(e, x, shape) from e
        raise
    out = check_logits(out, x.shape[0])
    warn_if_probabilities(out)
    return out


def _real_vector(values) -> np.ndarray:
    """``values`` as a float64 vector: one real number or a flat sequence of them (no
    booleans, strings or nested sequences); ``TypeError`` otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        a = np.asarray(values)
    except (TypeError, ValueError):
        raise TypeError("not a flat sequence of numbers") from None
    if a.dtype.kind not in "iuf" or a.ndim > 1:
        raise TypeError("not a flat sequence of numbers")
    return a.astype(np.float64).ravel()


def plain_float(text) -> float:
    """``float(text)`` for a number as written on a command line or in a noise string,
    without the digit-group underscores Python's ``float`` also takes (``"1_0"`` would
    read as 10: a typo for ``1.0`` becoming a level ten times larger). Raises
    ``ValueError`` like ``float``.

    >>> plain_float("0.05"), plain_float(" 1e-3 ")
    (0.05, 0.001)
    >>> plain_float("1_0")
    Traceback (most recent call last):
    ...
    ValueError: could not convert string to float: '1_0' (an underscore is not part of a number here)
    """
    if isinstance(text, str) and "_" in text:
        raise ValueError(f"could not convert string to float: {text!r} (an underscore is not part of a number here)")
    return float(text)


def number(text) -> float:
    """:func:`plain_float` under the name argparse prints for a bad value (``argument
    --lr: invalid number value: '1_0'``): the ``type=`` of the command line's numbers."""
    return plain_float(text)


def check_levels(levels, maximum: float | None = None, name: str = "levels") -> np.ndarray:
    """Noise levels: a non-empty sequence of finite numbers ``>= 0`` (and ``<= maximum``);
    returns a float64 vector."""
    top = "" if maximum is None else f" and <= {maximum:.3g}"
    try:
        lv = _real_vector(levels)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a sequence of numbers >= 0{top}, got {levels!r}") from None
    if lv.size == 0:
        raise ValueError(f"{name} is empty: give at least one noise level >= 0")
    if not np.all(np.isfinite(lv)) or np.any(lv < 0) or (maximum is not None and np.any(lv > maximum)):
        why = " (the variance must fit in float32)" if maximum is not None else ""
        raise ValueError(f"{name} must be finite and >= 0{top}{why}, got {levels!r}")
    return lv


def check_times(times, name: str = "times") -> np.ndarray:
    """Times since programming, in seconds: a non-empty sequence of finite numbers ``>= 0``."""
    try:
        tv = _real_vector(times)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be seconds since programming (finite numbers >= 0), got {times!r}") from None
    if tv.size == 0:
        raise ValueError(f"{name} is empty: give at least one time since programming (seconds >= 0)")
    if not np.all(np.isfinite(tv)) or np.any(tv < 0):
        raise ValueError(f"{name} must be seconds since programming (finite numbers >= 0), got {times!r}")
    return tv
