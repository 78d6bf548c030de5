"""Monte-Carlo noise injection (DESIGN.md data flow; docs/THEORY.md §8).

One *draw* is one noisy copy of the network (one chip): every target parameter gets
``w + s(w) ⊙ z`` with fresh standard-normal ``z`` (the noise model's :meth:`perturb`),
and the whole input set is evaluated with it. The unit of replication is the draw, so
accuracy and loss intervals are Student-t intervals over per-draw values.

Engine: the network is deep-copied once per run (the user's model is never touched,
even when an exception interrupts a run), its target parameters are overwritten in
place for every draw, and forward passes run batched under ``torch.inference_mode``,
in channels-last layout for 2-D convolutions, with digital BatchNorm layers folded
into the layer before them *after* the noise (exact algebra, one pass fewer).
Logit statistics are streamed (Welford, float64), so memory does not grow with the
number of draws, and inputs are processed in batches, so it does not grow with their
number beyond one ``[N, C]`` logit table.

:func:`sweep` evaluates several noise levels with the *same* standard-normal draws
(common random numbers): all noise models are linear in their level, so the noisy
weights at level ``λ`` are ``w + λ·u(w) ⊙ z``. Curves are smooth and differences between
levels are paired.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import KW_ONLY, dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _m
from tqdm.auto import tqdm

from noiseprop.theory.hardware import HardwareNoise, PCMLike
from noiseprop.theory.hashing import inputs_fingerprint
from noiseprop.theory.linearize import LinearControlVariate, _any_training, control_variate_mean, train_mode_message
from noiseprop.theory.noise import MAX_LEVEL, WeightNoise, parse_noise
from noiseprop.theory.results import LogitResult
from noiseprop.theory.validation import check_levels, check_times
from noiseprop.theory.validation import (check_bool, check_int, check_inputs, check_logits, check_probability,
                                         check_seed, check_finite_logits, copy_model, is_fit_error,
                                         model_fit_error,
                                         warn_if_probabilities)
from noiseprop.theory.validation import check_labels as _check_labels
from noiseprop.theory.targets import (TargetPlan, _fold, find_fold_pairs, folding_affine, is_norm_layer,
                                      resolve_targets)

from .formatting import fmt_ci
from .stats import mean_ci, welford_update

__all__ = ["MCResult", "SweepResult", "monte_carlo", "sweep", "drift_sweep", "check_inputs", "NoisyEvaluator",
           "copy_model"]


def check_progress(progress, name: str = "progress"):
    """``None`` (a bar only when stderr is a terminal), ``True`` or ``False``."""
    if progress is None:
        return None
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"{name} must be True, False or None (a bar only when stderr is a terminal), "
                        f"got {type(progress).__name__} {progress!r}")
    return bool(progress)


def check_sweep_family(noise, name: str = "noise", levels_name: str = "levels"):
    """Refuse a noise string that gives a level (``"relative:0.3"``) where ``levels_name``
    gives the levels: which level is meant would be ambiguous (the string's level would be
    ignored). A bare family name (``"relative"``) or a noise model object passes; so does
    a string with settings after its level (``"quantized:8,per=channel"``: the string form
    has no other place for them), with a warning that its level is replaced."""
    if isinstance(noise, str) and ":" in noise:
        family, _, level = (part.strip() for part in noise.strip().partition(":"))
        if "," in level:
            warnings.warn(f"{name} {noise!r}: its level ({level.split(',')[0]}) is replaced by each of "
                          f"{levels_name}; its settings are kept", UserWarning, stacklevel=3)
            return noise
        raise ValueError(f"{name} {noise!r} gives a level ({level.split(',')[0]}) and {levels_name} gives the levels: "
                         f"ambiguous (the string's level would be ignored). Give the family alone ({family!r}) with "
                         f"{levels_name}" + (" (or, for settings, a noise model object, whose own level is not used)"
                                             if not name.startswith("--") else ""))
    return noise


# ----------------------------------------------------------------------------
# Input checks (check_inputs, check_int, check_labels live in noiseprop.theory.validation)
# ----------------------------------------------------------------------------
def _check_scales_fit(ev, max_level: float) -> None:
    """Refuse, by parameter name, a level whose noise scale overflows the weight's dtype."""
    for name, u in zip(ev.names, ev.unit_scales):
        if u is None:  # hardware models: the level is a time, the scales are bounded by the model
            continue
        big = float(u.abs().max()) * max_level if u.numel() else 0.0
        if not math.isfinite(big) or big > torch.finfo(u.dtype).max:
            raise ValueError(f"noise level {max_level:g}: the noise scale of parameter {name!r} overflows {u.dtype} "
                             f"(largest {torch.finfo(u.dtype).max:.3g}); use a smaller level")


def _hooks_present(model: nn.Module) -> bool:
    """Any forward (pre-)hook, on a module or registered globally, or a parametrization."""
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called"):
        if getattr(_m, name, None):
            return True
    for mod in model.modules():
        if mod._forward_hooks or mod._forward_pre_hooks or getattr(mod, "parametrizations", None):
            return True
    return False


def _standard_pair(conv: nn.Module, norm: nn.Module) -> bool:
    """Folding is provably exact only for torch's own layer classes (no overridden forward)
    and the norm layers that implement ``folding_affine`` themselves."""
    std_conv = type(conv) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    std_norm = type(norm) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) or (
        callable(getattr(norm, "folding_affine", None)) and type(norm).__module__.startswith("noiseprop."))
    patched = "forward" in vars(conv) or "forward" in vars(norm)  # forward replaced on the instance
    return std_conv and std_norm and not patched


def _warn_train_mode(model):
    if _any_training(model):
        warnings.warn(train_mode_message(model), stacklevel=3)


def _progress(total, enabled, desc):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, leave=False)


# ----------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------
def _fold_digital_norms(plan: TargetPlan, net: nn.Module | None = None):
    """A private copy of the network to evaluate, with every BatchNorm kept digital
    folded *after* the noise, and the per-parameter post-noise maps.

    A digital BatchNorm after a noisy layer computes ``a ⊙ ((W + N) x + b) + c``, which is
    the folded layer ``(a ⊙ (W + N)) x + (a ⊙ b + c)``: exact algebra that saves the
    norm layer's pass (docs/THEORY.md §4). Returns ``(net, post)`` with
    ``post[name] = (a, c)``: the stored parameter ``name`` (after noise) maps to
    ``a ⊙ p + c`` in ``net`` (``c`` is ``None`` for weights). When norms carry noise
    themselves, are already folded, or cannot be located by tracing, the network is
    copied as it is (``post`` empty): the optimisation never changes semantics. It is
    used only when it is provably the same function: no forward hooks (on any module, or
    global), no parametrizations, and only torch's own Conv/Linear and BatchNorm classes
    (or noiseprop's norm layers, which define ``folding_affine``).
    """
    t = plan.targets
    net = copy_model(plan.model, "NoisyEvaluator") if net is None else net
    if t.fold_bn or t.norm or not any(is_norm_layer(m) for m in net.modules()) or _hooks_present(net):
        return net, {}
    try:  # traced on the private copy: the user's forward is never run
        pairs = find_fold_pairs(net)
    except ValueError:
        return net, {}
    if not pairs or not all(_standard_pair(net.get_submodule(c), net.get_submodule(n)) for c, n in pairs):
        return net, {}
    net = _fold(net, pairs)  # the pairs just found: folded without tracing again
    post = {}
    targets = set(plan.names)
    for conv_name, norm_name in pairs:
        a, c = folding_affine(plan.model.get_submodule(norm_name))
        conv = plan.model.get_submodule(conv_name)
        a = a.detach().to(conv.weight.dtype)
        prefix = conv_name + "."
        if prefix + "weight" in targets:
            post[prefix + "weight"] = (a.reshape((-1,) + (1,) * (conv.weight.dim() - 1)), None)
        if prefix + "bias" in targets:
            post[prefix + "bias"] = (a, c.detach().to(conv.weight.dtype))
    return net, post


class NoisyEvaluator:
    """A private copy of the network whose target parameters can be set to
    ``w + level · u(w) ⊙ z`` in place, and evaluated in batches.

    ``u(w)`` is the noise model's unit scale (its scale at level 1). The user's model is
    deep-copied once, never modified (``net``: that copy, already made by the caller).
    """

    def __init__(self, plan: TargetPlan, noise: WeightNoise, batch_size: int | None = None,
                 net: nn.Module | None = None):
        self.net, self.post = _fold_digital_norms(plan, net)
        self.net.eval()
        self.net.requires_grad_(False)
        # 2-D convolutions run markedly faster on oneDNN in channels-last layout
        # (benchmarks/mc_throughput.py); results agree to float rounding.
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        params = dict(self.net.named_parameters())
        original = dict(plan.model.named_parameters())
        self.names = plan.names
        self.params = [params[n] for n in plan.names]
        # noise is drawn on the stored (unfolded) weights: the noise model sees W, not diag(a) W
        self.clean = [original[n].detach().clone() for n in plan.names]
        # hardware models (PCM, quantisation, stuck-at) are not linear in a level: their
        # draws are applied by the model itself, the same draws at every level (time)
        self.hardware = noise if isinstance(noise, HardwareNoise) else None
        if self.hardware is None:
            unit = noise.with_level(1.0)
            self.unit_scales = [unit.scale(w) for w in self.clean]
        else:
            self.unit_scales = [None] * len(self.clean)
        self.device = self.clean[0].device
        self.batch_size = batch_size

    def draw(self, generator: torch.Generator) -> list[torch.Tensor]:
        """Standard-normal draws, one tensor per target parameter, in plan order (a
        hardware model's own random numbers, :meth:`HardwareNoise.draw`)."""
        if self.hardware is not None:
            return [self.hardware.draw(w, generator) for w in self.clean]
        return [torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device) for w in self.clean]

    @torch.no_grad()
    def set(self, level: float, zs: Sequence[torch.Tensor] | None) -> None:
        hw = self.hardware.with_level(level) if (self.hardware is not None and zs is not None) else None
        for name, p, w, u, z in zip(self.names, self.params, self.clean, self.unit_scales, zs or [None] * len(self.params)):
            if hw is not None:
                p.copy_(hw.apply(w, z))
            else:
                p.copy_(w)
            if hw is None and z is not None and level != 0.0:
                p.addcmul_(u, z, value=float(level))
            if name in self.post:  # a digital norm layer folded after the noise: a ⊙ (w + noise) + c
                a, c = self.post[name]
                p.mul_(a)
                if c is not None:
                    p.add_(c)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, first: bool = False) -> torch.Tensor:
        """Logits ``[N, C]`` of the current network on ``x``. ``first``: the clean pass at
        the start of a run, where an error from a layer that ``x`` does not fit is
        reported as such."""
        n = x.shape[0]
        bs = self.batch_size or n
        fmt = torch.channels_last if (self.channels_last and x.dim() == 4) else torch.contiguous_format
        outs = []
        for i in range(0, n, bs):
            xb = x[i:i + bs].to(self.device, non_blocking=True).contiguous(memory_format=fmt)
            try:
                out = self.net(xb)
            except (RuntimeError, IndexError) as e:
                if first and i == 0 and is_fit_error(e):
                    raise model_fit_error(e, x) from e
                raise
            outs.append(check_logits(out, xb.shape[0]))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out


def _accuracy_and_loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    lg = logits.double()
    if not bool(torch.isfinite(lg).all()):  # argmax of NaN logits is no prediction: the draw has no accuracy
        return math.nan, math.nan
    acc = (lg.argmax(dim=1) == y).double().mean().item()
    loss = F.cross_entropy(lg, y).item()
    return acc, loss


@dataclass(frozen=True)
class _Run:
    accuracies: np.ndarray  # [L, D]
    losses: np.ndarray  # [L, D]
    logit_mean: list  # per level [N, C] float64 or None
    logit_var: list
    clean_logits: torch.Tensor
    clean_accuracy: float
    clean_loss: float
    seconds: float


def _run(model, x, y, noise, levels, draws, seed, targets, batch_size, keep_logits, progress, desc,
         cv_factory=None, who: str = "monte_carlo") -> tuple[_Run, TargetPlan]:
    """``cv_factory(x, y)``: the control variate, built after every check and the clean
    pass (the linearisation is work)."""
    x, y = check_inputs(model, x, y)
    noise = parse_noise(noise)
    draws = check_int("draws", draws, 2)
    seed = check_seed("seed", seed)
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, 1)
    progress = check_progress(progress)
    _warn_train_mode(model)
    plan = resolve_targets(model, targets)  # fold_bn: the plan holds a folded copy, which the evaluator copies
    net = copy_model(model, who) if plan.model is model else None  # before any forward: the copy the run perturbs
    ev = NoisyEvaluator(plan, noise, batch_size=batch_size, net=net)
    del net
    _check_scales_fit(ev, max(levels))
    y_dev = y.to(ev.device)
    t0 = time.perf_counter()
    clean = ev.logits(x, first=True)
    check_finite_logits(clean)
    _check_labels(y, clean.shape[1])
    warn_if_probabilities(clean)
    clean_acc, clean_loss = _accuracy_and_loss(clean, y_dev)
    cv = None
    if cv_factory is not None:
        t_cv = time.perf_counter()
        cv = cv_factory(x, y)
        t0 += time.perf_counter() - t_cv  # the run's seconds are those of the draws, as before
    L = len(levels)
    accs = np.empty((L, draws))
    losses = np.empty((L, draws))
    means = [torch.zeros(clean.shape, dtype=torch.float64, device=ev.device) if keep_logits else None for _ in levels]
    m2s = [torch.zeros(clean.shape, dtype=torch.float64, device=ev.device) if keep_logits else None for _ in levels]
    gen = torch.Generator(device=ev.device).manual_seed(seed)
    cv_vals = np.empty((L, draws, 2)) if cv is not None else None  # control variate: (X_acc, X_loss) per draw
    bar = _progress(draws * L, progress, desc)
    try:
        for d in range(draws):
            zs = ev.draw(gen)
            for li, level in enumerate(levels):
                ev.set(level, zs)
                lg = ev.logits(x)
                accs[li, d], losses[li, d] = _accuracy_and_loss(lg, y_dev)
                if keep_logits:
                    welford_update(d + 1, means[li], m2s[li], lg.double())
                if cv_vals is not None:
                    cv_vals[li, d] = cv.values(zs, level)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    bad = ~(np.isfinite(accs) & np.isfinite(losses))
    if bad.any():
        where = ", ".join(f"level {levels[i]:g}: {int(bad[i].sum())}/{draws}" for i in range(L) if bad[i].any())
        warnings.warn(f"non-finite results: some noisy networks gave NaN or infinite logits or loss ({where} draws); "
                      "the noise level is too large for the model's floating-point range. Results at those levels "
                      "are flagged (extras['nonfinite_draws']) and their means are NaN", RuntimeWarning, stacklevel=3)
    var = [m2 / (draws - 1) if m2 is not None else None for m2 in m2s]
    run = _Run(accs, losses, means, var, clean.double().cpu(), clean_acc, clean_loss, seconds)
    object.__setattr__(run, "fingerprint", inputs_fingerprint(x, y))
    object.__setattr__(run, "cv", cv)
    if cv_vals is not None:
        object.__setattr__(run, "cv_values", cv_vals)
    object.__setattr__(run, "nonfinite", bad.sum(axis=1))
    return run, plan


def _control_variate_extras(run, cv, level, confidence) -> dict:
    """Control-variate estimates of mean accuracy and loss (the linearised network with
    the same draws; :class:`noiseprop.theory.linearize.LinearControlVariate`)."""
    vals = run.cv_values[0]
    acc = control_variate_mean(run.accuracies[0], vals[:, 0], cv.expected_accuracy(level), confidence)
    loss = control_variate_mean(run.losses[0], vals[:, 1], 0.0, confidence)
    out = {}
    for name, r in (("accuracy", acc), ("loss", loss)):
        out[f"cv_{name}"] = r.estimate
        out[f"cv_{name}_se"] = r.se
        out[f"cv_{name}_ci"] = r.ci
        out[f"cv_{name}_variance_reduction"] = r.variance_reduction
    return out


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------
def _stat_columns(accuracies, losses, confidence) -> dict:
    """Mean, standard error and Student-t interval of per-draw accuracies and losses."""
    out = {}
    for q, values in (("accuracy", accuracies), ("loss", losses)):
        m, se, (lo, hi) = mean_ci(values, confidence)
        out.update({q: m, f"{q}_se": se, f"{q}_ci_low": lo, f"{q}_ci_high": hi})
    return out


def _ci4(ci) -> str:
    return fmt_ci(ci, decimals=4)


def _draw_stat(values: str, i: int) -> property:
    """Item ``i`` of :func:`~.stats.mean_ci` (mean, s.e., interval) of the per-draw ``values``."""
    return property(lambda self: mean_ci(getattr(self, values), self.confidence)[i])


@dataclass(frozen=True)
class _Draws:
    """The fields of every Monte-Carlo result: the noise and targets (display strings),
    the draws and seed, per-draw accuracies and losses, the clean values; keyword-only,
    the interval level and the setting :func:`~noiseprop.empirical.compare.compare`
    checks (the noise model and targets objects, a fingerprint of ``(x, y)``)."""

    noise: str
    targets: str
    draws: int
    seed: int
    accuracies: np.ndarray
    losses: np.ndarray
    clean_accuracy: float
    clean_loss: float
    seconds: float
    _: KW_ONLY
    confidence: float = 0.95
    noise_model: object = None
    targets_spec: object = None
    inputs_fingerprint: str | None = None


@dataclass(frozen=True)
class MCResult(_Draws, LogitResult):
    """Monte-Carlo estimate of a network's behaviour under weight noise.

    ``logit_mean``/``logit_var`` are per input and class over draws (sample variance,
    ``ddof=1``). ``accuracies``/``losses`` are per-draw (mean over all inputs; loss is
    mean cross-entropy). Intervals are Student-t over draws at ``confidence``.
    """

    logit_mean: torch.Tensor
    logit_var: torch.Tensor
    clean_logits: torch.Tensor
    extras: dict = field(default_factory=dict)

    #: mean, standard error and Student-t interval at ``confidence`` of the per-draw
    #: accuracies and losses
    accuracy = _draw_stat("accuracies", 0)
    accuracy_se = _draw_stat("accuracies", 1)
    accuracy_ci = _draw_stat("accuracies", 2)
    loss = _draw_stat("losses", 0)
    loss_se = _draw_stat("losses", 1)
    loss_ci = _draw_stat("losses", 2)

    def to_frame(self) -> pd.DataFrame:
        """One row: the noise, then accuracy and loss with standard error and
        ``confidence`` interval (Student-t over draws), the clean values, the loss
        increase, the mean logit variance and mean absolute logit shift. The same meaning
        and shared column names as
        :meth:`Prediction.to_frame <noiseprop.theory.predict.Prediction.to_frame>`; one row
        of :meth:`SweepResult.to_frame`. Per input and class: :meth:`per_input_frame`."""
        return pd.DataFrame([dict(level=self.level, noise=self.noise, targets=self.targets,
                                  **_stat_columns(self.accuracies, self.losses, self.confidence),
                                  clean_accuracy=self.clean_accuracy, clean_loss=self.clean_loss,
                                  loss_increase=self.loss - self.clean_loss,
                                  mean_logit_var=float(self.logit_var.mean()),
                                  mean_abs_logit_shift=float(self.logit_mean_shift.abs().mean()),
                                  n_inputs=self.n_inputs, num_classes=self.num_classes, draws=self.draws,
                                  seed=self.seed, seconds=self.seconds)])

    def per_input_frame(self) -> pd.DataFrame:
        """One row per (input, class): clean logit, mean and variance over draws, and
        shift (the columns of :meth:`Prediction.per_input_frame
        <noiseprop.theory.predict.Prediction.per_input_frame>` that a simulation has)."""
        n, c = self.logit_mean.shape
        return pd.DataFrame({
            "input": np.repeat(np.arange(n), c),
            "cls": np.tile(np.arange(c), n),
            "clean_logit": self.clean_logits.reshape(-1).double().numpy(),
            "logit_mean": self.logit_mean.reshape(-1).double().numpy(),
            "logit_var": self.logit_var.reshape(-1).double().numpy(),
            "logit_shift": self.logit_mean_shift.reshape(-1).double().numpy(),
        })

    def draws_frame(self) -> pd.DataFrame:
        """Per-draw accuracy and loss."""
        return pd.DataFrame({"draw": np.arange(self.draws), "accuracy": self.accuracies, "loss": self.losses})

    def summary(self) -> str:
        pct = int(round(self.confidence * 100))
        lines = [
            f"Monte-Carlo under {self.noise} noise on {self.targets}",
            f"  {self.draws} draws, seed {self.seed}, {self.n_inputs} inputs, {self.num_classes} classes, {self.seconds:.2f} s",
            f"  {'':<10}{'clean':>9}{'noisy':>9}{'s.e.':>9}   {pct}% CI",
            f"  {'accuracy':<10}{self.clean_accuracy:>9.4f}{self.accuracy:>9.4f}{self.accuracy_se:>9.4f}   {_ci4(self.accuracy_ci)}",
            f"  {'loss':<10}{self.clean_loss:>9.4f}{self.loss:>9.4f}{self.loss_se:>9.4f}   {_ci4(self.loss_ci)}",
            f"  mean logit variance {float(self.logit_var.mean()):.4g}; mean |logit shift| {float(self.logit_mean_shift.abs().mean()):.4g}",
        ]
        for k, v in self.extras.items():
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


@dataclass(frozen=True)
class SweepResult(_Draws):
    """Accuracy and loss over noise levels, with common random numbers across levels.

    ``accuracies``/``losses`` are ``[levels, draws]``: column ``d`` is the same
    standard-normal draw at every level, so differences between levels are paired.
    ``noise_model`` is the family at level 1 (hardware models: at the first time).
    """

    levels: np.ndarray
    logit_mean: list | None = None
    logit_var: list | None = None
    clean_logits: torch.Tensor | None = None
    nonfinite_draws: np.ndarray | None = None  # per level: draws with NaN/inf loss (None: none)

    def to_frame(self) -> pd.DataFrame:
        """One row per level (a time in seconds, ``time_s``, for hardware models): the
        columns of :meth:`MCResult.to_frame` that a sweep has (the logit statistics with
        ``keep_logits=True``)."""
        rows = []
        for i, lv in enumerate(self.levels):
            stats = _stat_columns(self.accuracies[i], self.losses[i], self.confidence)
            row = dict(level=float(lv), **stats, clean_accuracy=self.clean_accuracy, clean_loss=self.clean_loss,
                       loss_increase=stats["loss"] - self.clean_loss, draws=self.draws)
            if self.logit_var is not None:
                row.update(mean_logit_var=float(self.logit_var[i].mean()),
                           mean_abs_logit_shift=float((self.logit_mean[i] - self.clean_logits).abs().mean()))
            rows.append(row)
        df = pd.DataFrame(rows)
        if isinstance(self.noise_model, PCMLike):  # the level is a time: name it as DriftPrediction does
            df.insert(1, "time_s", df["level"])
        return df

    def result(self, i: int) -> MCResult:
        """The :class:`MCResult` of level ``i`` (needs ``keep_logits=True``)."""
        if self.logit_mean is None:
            raise ValueError("this sweep kept no logit statistics; run sweep(..., keep_logits=True)")
        return MCResult(
            noise=f"{self.noise}@{self.levels[i]:g}", targets=self.targets, draws=self.draws, seed=self.seed,
            logit_mean=self.logit_mean[i], logit_var=self.logit_var[i], clean_logits=self.clean_logits,
            accuracies=self.accuracies[i], losses=self.losses[i], clean_accuracy=self.clean_accuracy,
            clean_loss=self.clean_loss, seconds=self.seconds, confidence=self.confidence,
            noise_model=self.noise_model.with_level(float(self.levels[i])) if self.noise_model is not None else None,
            targets_spec=self.targets_spec, inputs_fingerprint=self.inputs_fingerprint,
            extras={"nonfinite_draws": int(self.nonfinite_draws[i])}
            if self.nonfinite_draws is not None and self.nonfinite_draws[i] else {},
        )

    def summary(self) -> str:
        pct = int(round(self.confidence * 100))
        lines = [
            f"Noise sweep: {self.noise} on {self.targets}; {self.draws} draws per level (common random numbers), seed {self.seed}",
            f"  clean accuracy {self.clean_accuracy:.4f}, clean loss {self.clean_loss:.4f}; {self.seconds:.2f} s",
            f"  {'level':>8}{'accuracy':>10}   {pct}% CI{'':<13}{'loss':>9}   {pct}% CI",
        ]
        for _, r in self.to_frame().iterrows():
            lines.append(
                f"  {r.level:>8.4g}{r.accuracy:>10.4f}   {_ci4((r.accuracy_ci_low, r.accuracy_ci_high)):<20}"
                f"{r.loss:>9.4f}   {_ci4((r.loss_ci_low, r.loss_ci_high))}"
            )
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


# ----------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------
def monte_carlo(model: nn.Module, x, y, noise, targets=None, *, draws: int = 200, seed: int = 0,
                batch_size: int | None = 1024, progress: bool | None = None, confidence: float = 0.95,
                control_variate: bool = False) -> MCResult:
    """Inject ``noise`` into ``model``'s target parameters ``draws`` times and evaluate
    on ``(x, y)``.

    Parameters
    ----------
    model: any ``nn.Module`` mapping a batch of inputs to logits ``[N, C]``; evaluated in
        eval mode (with a warning if passed in train mode), never modified.
    x, y: inputs and int64 labels in ``[0, C)``.
    noise: a :class:`~noiseprop.theory.noise.WeightNoise` or its string form.
    targets: what gets noise (:class:`~noiseprop.theory.targets.Targets`; default
        Conv/Linear weights, BatchNorm digital).
    draws: number of noisy networks (>= 2; >= 3 with ``control_variate``). seed: seeds a
        private ``torch.Generator``.
    batch_size: inputs per forward pass (``None``: all at once).
    progress: ``True`` / ``False``: a tqdm bar or none (``None``: only when stderr is a
        terminal).
    control_variate: also evaluate the linearised network on the same draws and report
        control-variate estimates of mean accuracy and loss in ``extras``
        (``cv_accuracy``, ``cv_accuracy_se``, ``cv_accuracy_ci``,
        ``cv_accuracy_variance_reduction``, and the same for ``loss``); the plain
        estimates are unchanged.

    >>> import torch
    >>> from noiseprop.theory.examples import tiny_problem
    >>> net, x, y = tiny_problem()  # a seeded ReLU net and the labels it gets right
    >>> from noiseprop.theory import RelativeGaussian
    >>> mc = monte_carlo(net, x, y, RelativeGaussian(0.05), draws=20, seed=0)
    >>> mc.accuracies.shape, mc.accuracy_ci[0] <= mc.accuracy <= mc.accuracy_ci[1]
    ((20,), True)
    """
    noise = parse_noise(noise)
    confidence = check_probability("confidence", confidence)
    control_variate = check_bool("control_variate", control_variate)
    draws = check_int("draws", draws, 2)
    if control_variate and isinstance(noise, HardwareNoise):
        raise ValueError(f"control_variate=True needs a zero-mean Gaussian noise model (it rescales one draw by a level); "
                         f"got {noise.to_string()!r}: use control_variate=False")
    cv_factory = None
    if control_variate:
        if draws < 3:
            raise ValueError(f"draws must be an integer >= 3 with control_variate=True (the control-variate estimate "
                             f"needs at least 3 paired draws), got {draws}; use draws >= 3 or control_variate=False")

        def cv_factory(xc, yc):  # built by _run after every check and the clean pass
            return LinearControlVariate(model, xc, yc, noise, targets=targets, batch_size=batch_size or xc.shape[0])
    run, plan = _run(model, x, y, noise, [noise.level], draws, seed, targets, batch_size, True, progress, "monte-carlo",
                     cv_factory=cv_factory, who="monte_carlo")
    cv = run.cv
    extras = _control_variate_extras(run, cv, noise.level, confidence) if cv is not None else {}
    if run.nonfinite[0]:
        extras["nonfinite_draws"] = int(run.nonfinite[0])
    return MCResult(
        noise=noise.to_string(), targets=plan.targets.describe(), draws=int(draws), seed=int(seed),
        logit_mean=run.logit_mean[0].cpu(), logit_var=run.logit_var[0].cpu(), clean_logits=run.clean_logits,
        accuracies=run.accuracies[0], losses=run.losses[0], clean_accuracy=run.clean_accuracy,
        clean_loss=run.clean_loss, seconds=run.seconds, confidence=confidence, extras=extras,
        noise_model=noise, targets_spec=plan.targets, inputs_fingerprint=run.fingerprint,
    )


def check_family_levels(noise, levels, name: str = "levels"):
    """``levels``, each checked to be a level the family of ``noise`` takes (whole bits
    for ``quantized``, a fraction for ``stuck``, ...) before any draw; the error names
    ``name`` (the argument, or the command line's flag)."""
    for lv in levels:
        try:
            noise.with_level(float(lv))
        except (ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"{name}: {float(lv):g} is not a level of {noise.to_string().split(':')[0]!r} noise: "
                             f"{e}") from None
    return levels


def sweep(model: nn.Module, x, y, noise, levels, targets=None, *, draws: int = 100, seed: int = 0,
          batch_size: int | None = 1024, keep_logits: bool = False, progress: bool | None = None,
          confidence: float = 0.95) -> SweepResult:
    """Accuracy/loss-vs-noise-level curve with common random numbers.

    ``noise`` names the family (a noise model, whose own level is ignored, or a family
    name such as ``"relative"``; a string with a level, ``"relative:0.3"``, is refused as
    ambiguous); ``levels`` are the levels (η or σ) to evaluate. Draw ``d`` uses the same
    standard-normal tensors at every level: weights ``w + λ u(w) ⊙ z_d``.

    >>> import torch
    >>> from noiseprop.theory.examples import tiny_problem
    >>> net, x, y = tiny_problem()  # a seeded ReLU net and the labels it gets right
    >>> s = sweep(net, x, y, "relative", [0.0, 0.5], draws=10, seed=0)
    >>> s.accuracies.shape, bool((s.accuracies[0] == s.clean_accuracy).all())
    ((2, 10), True)
    """
    noise = parse_noise(check_sweep_family(noise), default_level=1.0)
    levels = check_family_levels(noise, check_levels(levels, MAX_LEVEL))
    return _sweep(model, x, y, noise, levels, targets, draws, seed, batch_size, keep_logits, progress, confidence,
                  "sweep")


def _sweep(model, x, y, noise, levels, targets, draws, seed, batch_size, keep_logits, progress, confidence,
           who) -> SweepResult:
    """:func:`sweep` and :func:`drift_sweep` once ``noise`` and the levels are checked."""
    confidence = check_probability("confidence", confidence)
    keep_logits = check_bool("keep_logits", keep_logits)
    run, plan = _run(model, x, y, noise, list(levels), draws, seed, targets, batch_size, keep_logits, progress, "sweep",
                     who=who)
    family = noise.to_string().split(":")[0]
    return SweepResult(
        noise=family, targets=plan.targets.describe(), levels=levels, draws=int(draws), seed=int(seed),
        accuracies=run.accuracies, losses=run.losses, clean_accuracy=run.clean_accuracy, clean_loss=run.clean_loss,
        seconds=run.seconds, confidence=confidence,
        logit_mean=[m.cpu() for m in run.logit_mean] if keep_logits else None,
        logit_var=[v.cpu() for v in run.logit_var] if keep_logits else None,
        clean_logits=run.clean_logits,
        nonfinite_draws=run.nonfinite.astype(np.int64) if run.nonfinite.any() else None,
        noise_model=noise.with_level(float(levels[0])) if isinstance(noise, HardwareNoise) else noise.with_level(1.0),
        targets_spec=plan.targets, inputs_fingerprint=run.fingerprint,
    )


def drift_sweep(model: nn.Module, x, y, noise, times, targets=None, *, draws: int = 100, seed: int = 0,
                batch_size: int | None = 1024, keep_logits: bool = False, progress: bool | None = None,
                confidence: float = 0.95) -> SweepResult:
    """Accuracy/loss against time since programming for a hardware noise model whose
    level is the time (:class:`~noiseprop.theory.hardware.PCMLike`), with common random
    numbers: draw ``d`` programs the same chip (the same ``z₁, z₂, z₃`` per device) and
    reads it at every time in ``times`` (seconds >= 0). ``SweepResult.levels`` are the
    times (at most :data:`~noiseprop.theory.noise.MAX_LEVEL`, the largest level a
    simulation takes). ``noise``: a model object (its own time is not used) or a family
    name (``"pcm"``). A thin wrapper of :func:`sweep` with the times checked.

    >>> import torch
    >>> from noiseprop.theory.examples import tiny_problem
    >>> net, x, y = tiny_problem()  # a seeded ReLU net and the labels it gets right
    >>> from noiseprop.theory import PCMLike
    >>> s = drift_sweep(net, x, y, PCMLike(t=1.0), [1.0, 3.15e7], draws=4, seed=0)
    >>> s.levels.tolist(), s.accuracies.shape
    ([1.0, 31500000.0], (2, 4))
    """
    noise = parse_noise(check_sweep_family(noise, levels_name="times"), default_level=1.0)
    if not isinstance(noise, HardwareNoise) or not hasattr(noise, "t"):
        raise TypeError(f"noise must be a time-dependent hardware model such as PCMLike(...), got {noise!r}")
    tv = check_times(times)
    if np.any(tv > MAX_LEVEL):
        raise ValueError(f"times must be seconds since programming: finite numbers >= 0 and <= {MAX_LEVEL:.3g} (the "
                         f"largest level a simulation takes, about {MAX_LEVEL / 3.156e7:.2g} years), got {times!r}")
    levels = check_family_levels(noise, tv, "times")
    return _sweep(model, x, y, noise, levels, targets, draws, seed, batch_size, keep_logits, progress, confidence,
                  "drift_sweep")
