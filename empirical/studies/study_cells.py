"""The two cells of every trained model (``train`` and ``eval``) and the study plan."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

from noiseprop.theory import Targets

from ..cells import config_key
from ..executor import Task
from ..models import count_norm_layers, model_spec, norm_places
from ..train import TrainingDivergedError, default_train_config, train as _train_fn
from .data_cache import _family_of, load_data
from .grid import Grid
from .theory_helpers import _mechanisms, _variant, resolve_theory

__all__ = ["CELL_VERSION", "StudyPlan", "train_cell", "eval_cell", "model_cells"]

#: Bumped whenever a change to the cell functions changes what they compute; part of
#: every cell configuration, so stored cells of an older protocol are not reused.
CELL_VERSION = 6


def _train(model: dict, train: dict, dataset: str, data_dir, seed: int, cache_dir, n_train=None):
    data = load_data(dataset, data_dir, n_train)
    return _train_fn(dict(model), data, seed=seed, cache_dir=cache_dir, progress=False, **train), data


def train_cell(model: dict, train: dict, dataset: str, data_dir, seed: int, cache_dir, n_train=None) -> dict:
    """Train one model (or load it from the checkpoint cache); return its clean
    accuracy, loss and per-epoch history (``{"diverged": message}`` when the loss
    became NaN: the model is then left out of the analysis, with a note)."""
    try:
        res, _ = _train(model, train, dataset, data_dir, seed, cache_dir, n_train)
    except TrainingDivergedError as e:
        return {"diverged": str(e)}
    h = res.history
    hist = h.to_dict() if hasattr(h, "to_dict") else {}
    return {"test_accuracy": float(res.test_accuracy), "train_accuracy": float(res.train_accuracy),
            "final": {k: float(v) for k, v in dict(res.final).items() if isinstance(v, (int, float))},
            "history": {k: [float(x) for x in v] for k, v in hist.items() if isinstance(v, (list, tuple))},
            "train_seconds": float(res.train_seconds), "cache_key": res.cache_key,
            "n_params": int(sum(p.numel() for p in res.model.parameters()))}


def eval_cell(model: dict, train: dict, dataset: str, data_dir, seed: int, cache_dir, grid: dict,
              alpha: float = 0.05, confidence: float = 0.95, n_train=None, deps=None) -> dict:
    """All measurements of one trained model (see the module doc)."""
    if deps and any(isinstance(d, dict) and d.get("diverged") for d in deps.values()):
        return {"diverged": True, "variants": {}}
    res, data = _train(model, train, dataset, data_dir, seed, cache_dir, n_train)
    net = res.model.eval()
    n = data.n_test if grid["n_test"] is None else min(grid["n_test"], data.n_test)
    x, y = data.x_test[:n], data.y_test[:n]
    has_norm = count_norm_layers(net) > 0
    out = {"has_norm": has_norm, "variants": {}}
    method = resolve_theory(grid["theory"], _family_of(model["name"]))
    t0 = time.perf_counter()
    out["variants"]["digital"] = _variant(net, x, y, grid, Targets(), alpha, confidence, method)
    if has_norm:
        out["variants"]["folded"] = _variant(net, x, y, grid, Targets(fold_bn=True), alpha, confidence, method)
    out["mc_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        out["mechanisms"] = _mechanisms(net, data, grid, has_norm)
    except Exception as e:  # noqa: BLE001 - recorded and shown in the report
        out["mechanisms"] = {"error": f"{type(e).__name__}: {e}"}
    out["mechanism_seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyPlan:
    """A study's cells: ``tasks`` for the executor and ``index``, one row per trained
    model with its factors and the keys of its ``train`` and ``eval`` cells."""

    name: str
    title: str
    tasks: tuple
    index: pd.DataFrame
    params: dict

    @property
    def n_models(self) -> int:
        return len(self.index)


def model_cells(study: str, grid: Grid, arch: str, norm: str = "none", norm_layers=None, seed: int = 0,
                cache_dir=None, train_overrides: dict | None = None, factors: dict | None = None):
    """The ``train`` and ``eval`` tasks of one model, and its index row.

    ``train_overrides`` replace defaults of
    :func:`noiseprop.empirical.train.default_train_config` (e.g. ``lr``).
    """
    data = load_data(grid.dataset, grid.data_dir, grid.n_train)
    family = _family_of(arch)
    d = default_train_config(arch, norm=norm, dataset=data.name)
    width = grid.width(family)
    spec = model_spec(arch, list(data.in_shape), int(data.num_classes), norm=norm, norm_layers=norm_layers,
                      width=d["width"] if width is None else width, depth=d["depth"])
    tcfg = {k: d[k] for k in ("lr", "epochs", "batch_size", "momentum", "weight_decay", "schedule", "warmup_epochs")}
    if grid.epochs_of(family) is not None:
        tcfg["epochs"] = grid.epochs_of(family)
    tcfg.update(train_overrides or {})
    common = {"model": spec, "train": tcfg, "dataset": grid.dataset, "data_fingerprint": data.fingerprint,
              "seed": int(seed), "version": CELL_VERSION}
    tconf = dict(common, kind="train")
    tkey = config_key(tconf)
    kwargs = {"model": spec, "train": tcfg, "dataset": grid.dataset, "data_dir": grid.data_dir, "seed": int(seed),
              "cache_dir": None if cache_dir is None else str(cache_dir), "n_train": grid.n_train}
    label = f"{arch} norm={spec['norm']}" + (f" k={spec['norm_layers']}" if spec["norm_layers"] is not None else "") + \
        "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in (train_overrides or {}).items()) + \
        f" seed={seed}"
    ttask = Task(tkey, train_cell, kwargs, tconf, label=f"train {label}", group=study)
    econf = dict(common, kind="eval", protocol=grid.protocol(), alpha=grid.alpha, confidence=grid.confidence)
    ekey = config_key(econf)
    ekw = dict(kwargs, grid=grid.protocol(), alpha=grid.alpha, confidence=grid.confidence)
    etask = Task(ekey, eval_cell, ekw, econf, deps=(tkey,), label=f"measure {label}", group=study)
    row = {"arch": arch, "family": family, "norm": spec["norm"],
           "n_norm": _n_norm(spec), "seed": int(seed), "lr": tcfg["lr"], "train_key": tkey, "eval_key": ekey}
    row.update(factors or {})
    return [ttask, etask], row


def _n_norm(spec: dict) -> int:
    if spec["norm"] == "none":
        return 0
    if spec["norm_layers"] is not None:
        return int(spec["norm_layers"])
    return int(norm_places(spec["name"], spec["depth"]))
