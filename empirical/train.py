"""Training with SGD + momentum, deterministic on CPU, with a cache of checkpoints.

``train(model_or_spec, data, lr, epochs, batch_size, momentum, weight_decay, schedule,
seed)`` trains a model of the zoo (a spec dict or a family name) or any ``nn.Module``
(a deep copy; the user's model is never mutated) and returns a :class:`TrainResult`.

Determinism: the model is initialised from ``seed`` (:func:`.models.build_model`),
mini-batches are drawn from a ``torch.Generator`` seeded with ``seed``, the global RNG
is forked and seeded inside (so a user module that uses it, e.g. dropout, is
reproducible and the caller's RNG state is untouched), and
``torch.use_deterministic_algorithms(True)`` is set only for the duration of training.
Training runs with ``num_threads`` torch threads (default 1, restored afterwards; part
of the configuration), so the same configuration and seed give bit-identical weights
with the same torch build and CPU type, whatever the caller's thread setting.

Cache: a finished run is stored as a checkpoint (:func:`.checkpoint.save_checkpoint`,
atomic: temp file then rename) under ``cache_dir/checkpoints/`` with a file name made
from a SHA-256 of the full configuration: the model spec (or, for a user's module, its
class and a hash of its initial state dict), the dataset fingerprint, every
hyper-parameter, the seed and :data:`TRAINER_VERSION`. A repeated request loads it
(``torch.load(weights_only=True)``) instead of training. An entry that cannot be read or
whose stored key does not match is reported with a warning and retrained (then
overwritten), never used. ``cache_dir`` defaults to ``$NOISEPROP_CACHE_DIR``, else
``~/.cache/noiseprop``. A killed run leaves at most a hidden ``.*.tmp`` file, which
lookups ignore.

Schedules (the learning rate of iteration t, with ``T`` iterations per epoch, ``E``
epochs): ``constant``: lr; ``step``: lr·0.1^m with m the number of milestones (50% and
75% of the epochs) passed; ``cosine``: lr·½(1 + cos(π t/(E T))). A linear warm-up over
``warmup_epochs`` multiplies the schedule by min(1, (t + 1)/(warmup_epochs·T)).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from noiseprop.theory.hashing import tensor_digest
from noiseprop.theory.noise import parse_noise
from noiseprop.theory.targets import Targets, resolve_targets
from noiseprop.theory.validation import (check_bool, check_int, check_labels, check_model, check_number,
                                         check_output_dir, check_seed, first_line, probe_logits)

from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import (CheckpointError, _check_save_args, _torch_load, _write_checkpoint, checkpoint_meta,
                         load_checkpoint, save_checkpoint)
from .data import Dataset, load_dataset
from .models import _family, build_model, model_spec
from noiseprop.theory.validation import copy_model

__all__ = [
    "train",
    "TrainResult",
    "TrainHistory",
    "TrainingDivergedError",
    "default_train_config",
    "default_cache_dir",
    "cache_key",
    "TRAINER_VERSION",
    "SCHEDULES",
]

#: Bumped whenever a change to the trainer changes the weights it produces; part of
#: every cache key, so old cache entries are not reused.
TRAINER_VERSION = 1
SCHEDULES = ("constant", "step", "cosine")
CACHE_ENV = "NOISEPROP_CACHE_DIR"
_EVAL_BATCH = 1024


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------
# defaults
# ----------------------------------------------------------------------------
# CPU-scale defaults for the built-in 8×8 digits (and other small inputs): chosen so that
# every family reaches >= 95% clean test accuracy on digits in well under 2 minutes on 2
# cores (benchmarks/train_quality.py).
_SMALL = {
    "mlp": {"width": 128, "depth": 2, "lr": 0.05, "epochs": 20, "batch_size": 64},
    "vgg": {"width": 16, "depth": 11, "lr": 0.05, "epochs": 15, "batch_size": 64},
    "resnet": {"width": 8, "lr": 0.05, "epochs": 15, "batch_size": 64},
}
_SMALL_NONORM_LR = {"mlp": 0.05, "vgg": 0.02, "resnet": 0.02}
# Full-scale starting points for 32×32 inputs (standard widths; not tuned here).
_LARGE = {
    "mlp": {"width": 512, "depth": 2, "lr": 0.05, "epochs": 30, "batch_size": 128},
    "vgg": {"width": 64, "depth": 11, "lr": 0.05, "epochs": 30, "batch_size": 128},
    "resnet": {"width": 16, "lr": 0.1, "epochs": 30, "batch_size": 128},
}
_COMMON = {"momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 1}


def default_train_config(name: str, norm: str = "bn", dataset: str = "digits") -> dict:
    """Default model size and training hyper-parameters for a family.

    Returns a dict with ``width``, ``depth`` (model) and ``lr``, ``epochs``,
    ``batch_size``, ``momentum``, ``weight_decay``, ``schedule``, ``warmup_epochs``.
    ``dataset`` "digits", "teacher", "mnist": the CPU-scale settings (small widths);
    "cifar10", "cifar100": standard widths (untested starting points). Without
    normalisation (``norm="none"``) a smaller learning rate is used.

    >>> cfg = default_train_config("resnet20")
    >>> {"lr", "epochs", "batch_size", "width"} <= set(cfg)
    True
    """
    family, depth = _family(name, None)
    if not isinstance(norm, str) or norm not in ("none", "bn", "l1", "topk"):
        raise ValueError(f"unknown norm {norm!r}; accepted: ['none', 'bn', 'l1', 'topk']")
    small = dataset not in ("cifar10", "cifar100")
    base = (_SMALL if small else _LARGE)[family]
    out = {"width": base["width"], "depth": base["depth"] if family == "mlp" else depth}
    out.update({k: base[k] for k in ("lr", "epochs", "batch_size")})
    if small and norm == "none":
        out["lr"] = _SMALL_NONORM_LR[family]
    out.update(_COMMON)
    return out


def default_cache_dir() -> Path:
    """``$NOISEPROP_CACHE_DIR`` if set, else ``~/.cache/noiseprop``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "noiseprop"


# ----------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainHistory:
    """Per-epoch records. ``loss`` and ``train_accuracy`` are running means over the
    epoch's mini-batches (train mode); ``test_loss`` / ``test_accuracy`` are measured in
    eval mode after the epoch (NaN where not evaluated, see ``eval_every``); ``lr`` is
    the learning rate of the epoch's first step; ``seconds`` the epoch's wall time."""

    epoch: tuple = ()
    loss: tuple = ()
    train_accuracy: tuple = ()
    test_loss: tuple = ()
    test_accuracy: tuple = ()
    lr: tuple = ()
    seconds: tuple = ()

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainHistory":
        return cls(**{k: tuple(d.get(k, ())) for k in cls.__dataclass_fields__})

    def to_frame(self):
        return pd.DataFrame(self.to_dict())


@dataclass(frozen=True, eq=False)
class TrainResult:
    """A trained model (eval mode) and how it was made.

    ``spec``: the model spec (``build_model(**spec)``; ``None`` for a user's module
    without one); ``config``: hyper-parameters and seed; ``cache_key``: SHA-256 of the
    configuration; ``from_cache``: loaded rather than trained; ``train_seconds``: wall
    time of the training run (of the original run when loaded from the cache);
    ``final``: clean ``train_loss, train_accuracy, test_loss, test_accuracy`` of the
    final model in eval mode; ``dataset``: the dataset spec with its fingerprint.
    """

    model: nn.Module = field(repr=False)
    history: TrainHistory = field(repr=False)
    spec: dict | None
    config: dict
    cache_key: str
    from_cache: bool
    train_seconds: float
    final: dict
    dataset: dict
    cache_path: str | None = None
    model_id: dict = field(default_factory=dict, repr=False)

    def checkpoint_meta(self) -> dict:
        """The ``meta`` stored with the checkpoint: ``dataset`` (name), ``data_dir``,
        ``dataset_spec`` (``load_dataset(**spec)`` minus ``fingerprint``), ``config``,
        ``history``, ``final``, ``train_seconds``, ``cache_key``, ``trainer_version``."""
        meta = {
            "cache_key": self.cache_key,
            "trainer_version": TRAINER_VERSION,
            "config": dict(self.config),
            "model_id": self.model_id,
            "history": self.history.to_dict(),
            "final": dict(self.final),
            "train_seconds": float(self.train_seconds),
            "dataset": self.dataset.get("name"),
            "data_dir": self.dataset.get("data_dir"),
            "dataset_spec": dict(self.dataset),
            "torch_version": str(torch.__version__),
        }
        # plain JSON types only, so that torch.load(weights_only=True) reads it back
        return json.loads(json.dumps(meta, default=str))

    def save(self, path) -> Path:
        """Write the model as a noiseprop checkpoint (atomic; readable by
        :func:`.checkpoint.load_checkpoint` when the model has a spec)."""
        spec = self.spec if self.spec is not None else getattr(self.model, "spec", None)
        if isinstance(spec, dict) and spec:
            return save_checkpoint(path, self.model, spec, self.checkpoint_meta())
        # a user's module without a spec: stored with an empty spec (read back by the
        # cache / load_state_dict_file, not by load_checkpoint)
        path = _check_save_args(path, self.model, None)
        return _write_checkpoint(path, self.model, {}, self.checkpoint_meta())

    @property
    def test_accuracy(self) -> float:
        return float(self.final["test_accuracy"])

    @property
    def train_accuracy(self) -> float:
        return float(self.final["train_accuracy"])

    def summary(self) -> str:
        name = (self.spec or {}).get("name", self.config.get("model_class", "model"))
        norm = (self.spec or {}).get("norm", "?")
        c = self.config
        lines = [
            f"TrainResult: {name} (norm={norm}) on {self.dataset.get('name')}",
            f"  lr={c['lr']} epochs={c['epochs']} batch_size={c['batch_size']} momentum={c['momentum']} "
            f"weight_decay={c['weight_decay']} schedule={c['schedule']} warmup_epochs={c['warmup_epochs']} "
            f"seed={c['seed']} threads={c.get('threads')}",
            f"  clean train acc {self.final['train_accuracy']:.4f} (loss {self.final['train_loss']:.4f}), "
            f"test acc {self.final['test_accuracy']:.4f} (loss {self.final['test_loss']:.4f})",
            f"  {'loaded from cache' if self.from_cache else 'trained'}; training took {self.train_seconds:.1f} s; "
            f"key {self.cache_key[:16]}",
        ]
        return "\n".join(lines)

    def to_frame(self):
        """The per-epoch history as a DataFrame."""
        return self.history.to_frame()


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _state_hash(model: nn.Module) -> str:
    """SHA-256 of a user model's initial state (the one hashing scheme,
    :func:`noiseprop.theory.hashing.tensor_digest`)."""
    sd = model.state_dict()
    return tensor_digest(list(sd.values()), names=list(sd))


def cache_key(model_id: dict, data_fingerprint: str, config: dict) -> str:
    """SHA-256 of the full configuration (JSON with sorted keys)."""
    payload = {"trainer_version": TRAINER_VERSION, "model": model_id, "data": data_fingerprint, "config": config}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _lr_at(config: dict, epoch: int, step: int, steps_per_epoch: int) -> float:
    lr = config["lr"]
    e_total = config["epochs"]
    t = epoch * steps_per_epoch + step
    sched = config["schedule"]
    if sched == "step":
        m = sum(epoch >= int(round(f * e_total)) for f in (0.5, 0.75))
        lr = lr * (0.1 ** m)
    elif sched == "cosine":
        lr = lr * 0.5 * (1.0 + math.cos(math.pi * t / (e_total * steps_per_epoch)))
    w = config["warmup_epochs"] * steps_per_epoch
    if w > 0:
        lr = lr * min(1.0, (t + 1) / w)
    return lr


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (float64 accumulation)."""
    was = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        for i in range(0, x.shape[0], _EVAL_BATCH):
            out = model(x[i:i + _EVAL_BATCH])
            loss_sum += float(nn.functional.cross_entropy(out.double(), y[i:i + _EVAL_BATCH], reduction="sum"))
            correct += int((out.argmax(dim=1) == y[i:i + _EVAL_BATCH]).sum())
    finally:
        model.train(was)
    n = max(1, x.shape[0])
    return loss_sum / n, correct / n


def _describe(spec, model_class, config, data_name) -> str:
    what = f"{spec['name']} (norm={spec['norm']}, width={spec['width']}, depth={spec['depth']})" if spec else model_class
    return (f"{what} on {data_name} with lr={config['lr']}, batch_size={config['batch_size']}, "
            f"momentum={config['momentum']}, weight_decay={config['weight_decay']}, schedule={config['schedule']}, "
            f"warmup_epochs={config['warmup_epochs']}, epochs={config['epochs']}, seed={config['seed']}"
            + (f", noise-aware ({config['noise']})" if config.get("noise") else ""))


class _Progress:
    def __init__(self, progress, total, desc):
        self.callback = None
        self.bar = None
        if callable(progress) and not isinstance(progress, bool):
            self.callback = progress
        elif progress:
            self.bar = tqdm(total=total, desc=desc, unit="epoch", file=sys.stderr, leave=True,
                            disable=not getattr(sys.stderr, "isatty", lambda: False)() if progress == "auto" else False)

    def update(self, record: dict):
        if self.callback is not None:
            self.callback(dict(record))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.3f}",
                                 test=f"{record['test_accuracy']:.3f}", refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------
def _resolve_data(data) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str):
        return load_dataset(data)
    if isinstance(data, dict):
        return load_dataset(**data)
    raise TypeError(f"data must be a Dataset (see load_dataset), a dataset name or a dataset spec dict, "
                    f"got {type(data).__name__}")


def _resolve_model(model_or_spec, data: Dataset):
    """(spec or None, module or None, defaults) for the input."""
    if isinstance(model_or_spec, nn.Module):
        return None, model_or_spec
    if isinstance(model_or_spec, str):
        d = default_train_config(model_or_spec, dataset=data.name)
        spec = model_spec(model_or_spec, data.in_shape, data.num_classes, width=d["width"], depth=d["depth"])
        return spec, None
    if isinstance(model_or_spec, dict):
        s = dict(model_or_spec)
        if "name" not in s:
            raise ValueError(f"model spec needs a 'name' (one of the model zoo families), got keys {sorted(s)}")
        s.setdefault("in_shape", list(data.in_shape))
        s.setdefault("num_classes", data.num_classes)
        if s.get("width") is None or s.get("depth") is None:
            name = s["name"]
            if isinstance(name, str) and name.lower() == "resnet" and s.get("depth") is not None:
                name = f"resnet{s['depth']}"
            d = default_train_config(name, dataset=data.name)
            if s.get("width") is None:
                s["width"] = d["width"]
            if s.get("depth") is None:
                s["depth"] = d["depth"]
        if "seed" in s:
            raise ValueError("a model spec does not hold the seed; pass seed= to train() (it seeds the "
                             "initialisation and the mini-batch order)")
        try:
            spec = model_spec(**s)
        except TypeError as e:
            raise ValueError(f"invalid model spec {model_or_spec}: {e}") from e
        return spec, None
    raise TypeError(f"model_or_spec must be an nn.Module, a model spec dict or a family name, "
                    f"got {type(model_or_spec).__name__}")


def _check_user_model(model: nn.Module, data: Dataset) -> None:
    """A user's module, checked before any training (on a copy; the module is not
    touched): real finite parameters, at least one trainable, the dataset's dtype, one
    ``[N, C]`` logits tensor for a probe batch, and ``C`` covering the labels."""
    name = "model_or_spec (an nn.Module)"
    try:
        check_model(model)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{name}: {e}") from None
    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        raise ValueError(f"{name}: the model has no trainable parameters ({len(params)} parameter tensor(s), none with "
                         "requires_grad=True); unfreeze some with p.requires_grad_(True)")
    x = data.x_train
    dtypes = sorted({str(p.dtype) for p in params if torch.is_floating_point(p)})
    if dtypes and dtypes != [str(x.dtype)]:
        raise TypeError(f"{name}: the model's parameters are {', '.join(dtypes)} but the dataset {data.name!r} holds "
                        f"{x.dtype} inputs; convert the model, e.g. model.to({x.dtype})")
    probe = copy_model(model, "train").eval()  # a clear error for a module that cannot be copied
    xb = x[:2]
    try:
        with torch.random.fork_rng(devices=[]):
            out = probe_logits(probe, xb, x.shape)
    except (ValueError, TypeError) as e:
        msg = str(e).replace("x does not fit the model", f"the inputs of dataset {data.name!r} do not fit the model")
        raise type(e)(f"{name}: {msg}") from None
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward
        raise ValueError(f"{name}: the model's forward pass on dataset {data.name!r} inputs of shape "
                         f"{tuple(x.shape)} failed with {type(e).__name__}: {first_line(e)[:300]}") from e
    labels = torch.cat([data.y_train.reshape(-1), data.y_test.reshape(-1)])
    if labels.numel():
        try:
            check_labels(labels, int(out.shape[1]))
        except ValueError as e:
            raise ValueError(f"{name}: the model returns {out.shape[1]} logits but dataset {data.name!r} has "
                             f"{data.num_classes} classes ({e})") from None


def train(model_or_spec, data="digits", lr=None, epochs=None, batch_size=None, momentum=None, weight_decay=None,
          schedule=None, seed: int = 0, *, warmup_epochs=None, cache_dir=None, cache: bool = True,
          progress=None, eval_every: int = 1, num_threads: int | None = 1, noise=None,
          noise_targets=None) -> TrainResult:
    """Train a network with SGD + momentum (cross-entropy loss), or load it from the cache.

    Args:
        model_or_spec: a family name (``"resnet20"``, no normalisation), a spec dict
            for :func:`.models.build_model` or an ``nn.Module`` (a deep copy is
            trained). A spec's missing ``in_shape`` / ``num_classes`` come from the data,
            its missing ``width`` / ``depth`` from :func:`default_train_config` for the
            dataset (small widths on digits), not from ``build_model``'s defaults.
        data: a :class:`.data.Dataset`, a dataset name or a dataset spec dict.
        lr, epochs, batch_size, momentum, weight_decay, schedule, warmup_epochs: ``None``
            takes the family's default (:func:`default_train_config`; for a user's
            module the resnet defaults). ``schedule``: one of :data:`SCHEDULES`.
        seed: initialisation (spec / name) and mini-batch order.
        cache_dir: where checkpoints are cached (default :func:`default_cache_dir`).
        cache: ``False`` disables the cache (neither read nor written).
        progress: ``None``/``False``: silent; ``True``: a tqdm bar; ``"auto"``: a bar
            when stderr is a terminal; a callable: called after each epoch with a dict
            (epoch, loss, train_accuracy, test_loss, test_accuracy, lr, seconds).
        eval_every: evaluate on the test set every this many epochs (and after the last).
        num_threads: torch intra-op threads for the duration of training (restored
            afterwards); ``None``: the current setting. CPU kernels split their
            reductions by thread, so weights agree across thread counts only up to
            float rounding: the thread count is part of the configuration (and cache
            key). The default 1 makes results independent of the caller's setting, and
            is also the fastest for the small digits models on a busy machine.
        noise: noise-aware (hardware-aware) training: a
            :class:`~noiseprop.theory.noise.WeightNoise` or its string form
            (``"relative:0.1"``). At every mini-batch a fresh draw of the noise model is
            put into the target weights for the forward and backward pass, and the
            gradient taken there updates the clean weights (the weight modifier of
            aihwkit's hardware-aware training). The draws come from their own generator
            seeded from ``seed`` (deterministic); the noise and its targets are part of the
            configuration and the cache key. ``None`` (default): standard training (the
            configuration and cache key of such runs are unchanged).
        noise_targets: what gets noise during training
            (:class:`~noiseprop.theory.targets.Targets`, default the Conv/Linear
            weights, as at inference); ``fold_bn`` is not accepted here (BatchNorm folds
            only in eval mode).

    Each epoch draws a fresh permutation and uses ``max(1, N // batch_size)`` full
    mini-batches (the remainder of the permutation is dropped for that epoch).

    Raises:
        TrainingDivergedError: the loss became NaN/inf (the message names the configuration).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     r = train("mlp", "digits", epochs=1, seed=0, cache_dir=tmp)
    >>> r.spec["name"], r.from_cache, 0.5 < r.final["test_accuracy"] <= 1.0
    ('mlp', False, True)
    """
    data = _resolve_data(data)
    spec, user_model = _resolve_model(model_or_spec, data)
    if spec is not None:
        d = default_train_config(spec["name"], norm=spec["norm"], dataset=data.name)
    else:
        d = default_train_config("resnet20", dataset=data.name)
    given = {"lr": lr, "epochs": epochs, "batch_size": batch_size, "momentum": momentum,
             "weight_decay": weight_decay, "schedule": schedule, "warmup_epochs": warmup_epochs}
    cfg = {k: (d[k] if v is None else v) for k, v in given.items()}
    config = {
        "lr": check_number("lr", cfg["lr"], 0.0, open_min=True),
        "epochs": check_int("epochs", cfg["epochs"], 1),
        "batch_size": check_int("batch_size", cfg["batch_size"], 1),
        "momentum": check_number("momentum", cfg["momentum"], 0.0, 1.0),
        "weight_decay": check_number("weight_decay", cfg["weight_decay"], 0.0),
        "warmup_epochs": check_int("warmup_epochs", cfg["warmup_epochs"], 0),
        "schedule": cfg["schedule"],
        "seed": check_seed("seed", seed),
    }
    if config["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown schedule {config['schedule']!r}; accepted: {list(SCHEDULES)}")
    eval_every = check_int("eval_every", eval_every, 1)
    cache = check_bool("cache", cache)
    if not (progress is None or isinstance(progress, bool) or type(progress).__name__ == "bool_"
            or (isinstance(progress, str) and progress == "auto") or (callable(progress) and not isinstance(progress, str))):
        raise TypeError(f"progress must be None or False (silent), True (a bar), 'auto' (a bar when stderr is a "
                        f"terminal) or a callable taking each epoch's record, got {type(progress).__name__} {progress!r}")
    num_threads = torch.get_num_threads() if num_threads is None else check_int("num_threads", num_threads, 1)
    config["threads"] = num_threads
    if noise is not None:
        try:
            nm = parse_noise(noise)
        except (ValueError, TypeError) as e:
            raise type(e)(f"noise (noise-aware training): {e}") from None
        tg = Targets.parse(noise_targets)
        if tg.fold_bn:
            raise ValueError("noise_targets: fold_bn=True is not accepted for noise-aware training (BatchNorm folds "
                             "only in eval mode); inject into the unfolded weights (the default)")
        config["noise"] = nm.to_string()
        try:  # the run stores the noise by its string form (_fit reads it back): it must read back exactly
            back = parse_noise(config["noise"])
        except (ValueError, TypeError):
            back = None
        if back != nm:
            raise ValueError(f"noise (noise-aware training): {type(nm).__name__} noise {nm!r} does not read back from "
                             f"its string form {config['noise']!r} (parse_noise gives {back!r}); noise-aware training "
                             "stores the noise by that string: use a built-in model (relative, additive, "
                             "multiplicative, pcm, quantized, stuck) or its string form")
        config["noise_targets"] = {"weights": tg.weights, "biases": tg.biases, "norm": tg.norm,
                                   "layers": list(tg.layers) if tg.layers is not None else None}
    elif noise_targets is not None:
        raise ValueError("noise_targets is given without noise: pass noise= (e.g. 'relative:0.1') for noise-aware "
                         "training, or drop noise_targets")

    root = None
    if cache:  # checked before training, so that no run is lost to a bad folder
        if cache_dir is not None:
            root = check_output_dir(cache_dir, "cache_dir")
        else:
            root = check_output_dir(default_cache_dir(), f"cache_dir (default, from ${CACHE_ENV} or ~/.cache)")
        check_output_dir(root / "checkpoints", "cache_dir")
    if user_model is not None:
        _check_user_model(user_model, data)

    if spec is not None:
        if list(spec["in_shape"]) != list(data.in_shape) or spec["num_classes"] != data.num_classes:
            raise ValueError(
                f"model spec in_shape={spec['in_shape']}, num_classes={spec['num_classes']} does not match dataset "
                f"{data.name!r} (in_shape={list(data.in_shape)}, num_classes={data.num_classes})"
            )
        model_id = {"spec": spec}
        model_class = None
    else:
        model_class = f"{type(user_model).__module__}.{type(user_model).__qualname__}"
        model_id = {"class": model_class, "initial_state_sha256": _state_hash(user_model)}
    key = cache_key(model_id, data.fingerprint, config)
    dataset_info = dict(data.spec)
    dataset_info.setdefault("name", data.name)
    dataset_info["fingerprint"] = data.fingerprint
    describe = _describe(spec, model_class, config, data.name)

    path = None
    if cache:
        prefix = f"{spec['name']}-{spec['norm']}" if spec else type(user_model).__name__
        prefix = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in prefix)
        path = root / "checkpoints" / f"{prefix}-{key[:32]}.pt"
        if path.exists():
            hit = _load_cached(path, key, spec, user_model)
            if hit is not None:
                model, meta = hit
                return TrainResult(model=model, history=TrainHistory.from_dict(meta.get("history", {})), spec=spec,
                                   config=config, cache_key=key, from_cache=True,
                                   train_seconds=float(meta.get("train_seconds", float("nan"))),
                                   final=dict(meta.get("final", {})), dataset=dataset_info, cache_path=str(path),
                                   model_id=model_id)

    if spec is not None:
        model = build_model(**spec, seed=config["seed"])
    else:
        model = copy_model(user_model, "train")
    threads_before = torch.get_num_threads()
    try:
        if num_threads != threads_before:
            torch.set_num_threads(num_threads)
        model, history, final, seconds = _fit(model, data, config, eval_every, progress, describe)
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)
    result = TrainResult(model=model, history=history, spec=spec, config=config, cache_key=key, from_cache=False,
                         train_seconds=seconds, final=final, dataset=dataset_info,
                         cache_path=str(path) if path is not None else None, model_id=model_id)
    if path is not None:
        result.save(path)
    return result


def _load_cached(path: Path, key: str, spec, user_model):
    """(model, meta) from a cache entry, or None (with a warning) when it is unusable."""
    try:
        if spec is not None:
            ck = load_checkpoint(path)
            model, meta = ck.model, ck.meta
            if ck.spec != spec:
                raise CheckpointError(f"stored spec {ck.spec} differs from the requested {spec}")
        else:
            obj = _torch_load(path)
            if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{str(path)!r} is not a noiseprop checkpoint")
            sd = obj.get("state_dict")
            if not isinstance(sd, dict):
                raise CheckpointError(f"{str(path)!r} has no state dict")
            meta = checkpoint_meta(obj, path)
            model = copy_model(user_model, "train")
            model.load_state_dict(sd)
            model.eval()
        if meta.get("cache_key") != key:
            raise CheckpointError(f"stored cache key {str(meta.get('cache_key'))[:16]!r} does not match {key[:16]!r}")
        if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
            raise CheckpointError("it holds non-finite weights")
        return model, meta
    except (CheckpointError, RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        warnings.warn(f"noiseprop: cache entry {str(path)!r} is unusable ({e}); retraining and overwriting it",
                      RuntimeWarning, stacklevel=3)
        return None


def _fit(model: nn.Module, data: Dataset, config: dict, eval_every: int, progress, describe: str):
    x, y = data.x_train, data.y_train
    xt, yt = data.x_test, data.y_test
    n = x.shape[0]
    bs = min(config["batch_size"], n)
    steps = max(1, n // bs)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          weight_decay=config["weight_decay"])
    rec = {k: [] for k in TrainHistory.__dataclass_fields__}
    noisy, noise_model, noise_gen = [], None, None
    if config.get("noise"):
        noise_model = parse_noise(config["noise"])
        plan = resolve_targets(model, Targets(**config["noise_targets"]))
        named = dict(model.named_parameters())
        noisy = [named[n] for n in plan.names]
        # a stream of its own: the mini-batch order is that of the same run without noise
        noise_gen = torch.Generator().manual_seed(int(config["seed"]) * 2654435761 % 2**63 + 1)
    bar = _Progress(progress, config["epochs"], describe.split(" on ")[0])
    det_before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    t0 = time.perf_counter()
    try:
        torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])
            gen = torch.Generator().manual_seed(config["seed"])
            model.train()
            for epoch in range(config["epochs"]):
                te = time.perf_counter()
                perm = torch.randperm(n, generator=gen)
                loss_sum = torch.zeros((), dtype=torch.float64)
                correct = torch.zeros((), dtype=torch.long)
                seen = 0
                lr0 = None
                for b in range(steps):
                    lr_b = _lr_at(config, epoch, b, steps)
                    lr0 = lr_b if lr0 is None else lr0
                    for g in opt.param_groups:
                        g["lr"] = lr_b
                    idx = perm[b * bs:(b + 1) * bs]
                    xb, yb = x[idx], y[idx]
                    saved = None
                    if noisy:
                        with torch.no_grad():
                            saved = [p.detach().clone() for p in noisy]
                            for p in noisy:
                                p.copy_(noise_model.sample(p.detach(), noise_gen))
                    out = model(xb)
                    loss = nn.functional.cross_entropy(out, yb)
                    if saved is not None and not torch.isfinite(loss):
                        with torch.no_grad():
                            for p, w in zip(noisy, saved):
                                p.copy_(w)
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(
                            f"training diverged (loss {float(loss.detach())}) at epoch {epoch + 1}, step {b + 1} of {describe}; "
                            "try a smaller learning rate (or a warm-up, or a norm layer)"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if saved is not None:  # gradient at the noisy weights updates the clean ones
                        with torch.no_grad():
                            for p, w in zip(noisy, saved):
                                p.copy_(w)
                    opt.step()
                    with torch.no_grad():
                        loss_sum += loss.detach().double() * yb.shape[0]
                        correct += (out.argmax(dim=1) == yb).sum()
                        seen += yb.shape[0]
                if epoch + 1 == config["epochs"] or (epoch + 1) % eval_every == 0:
                    tl, ta = _evaluate(model, xt, yt)
                else:
                    tl, ta = float("nan"), float("nan")
                record = {"epoch": epoch + 1, "loss": float(loss_sum) / seen, "train_accuracy": int(correct) / seen,
                          "test_loss": tl, "test_accuracy": ta, "lr": lr0, "seconds": time.perf_counter() - te}
                for k, v in record.items():
                    rec[k].append(v)
                bar.update(record)
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise TrainingDivergedError(f"training produced non-finite weights for {describe}")
            seconds = time.perf_counter() - t0
            trl, tra = _evaluate(model, x, y)
            tel, tea = rec["test_loss"][-1], rec["test_accuracy"][-1]
    finally:
        torch.use_deterministic_algorithms(det_before, warn_only=warn_before)
        bar.close()
    model.eval()
    final = {"train_loss": trl, "train_accuracy": tra, "test_loss": tel, "test_accuracy": tea}
    history = TrainHistory(**{k: tuple(v) for k, v in rec.items()})
    return model, history, final, seconds
