"""Checkpoints: atomic writes, safe loads (``torch.load(..., weights_only=True)``).

A noiseprop checkpoint is a plain dict (no pickled code)::

    {"format": "noiseprop-checkpoint", "version": 1,
     "spec": {"name": ..., "in_shape": [...], "num_classes": ..., ...},  # build_model(**spec)
     "state_dict": {...},
     "meta": {...}}                         # free-form: dataset, training config, history

A bare ``state_dict`` (mapping of names to tensors) is also accepted by
:func:`load_state_dict_file`, for users who bring their own model class.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "load_state_dict_file", "atomic_write",
           "CheckpointError"]

FORMAT = "noiseprop-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, or not in an accepted format."""


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial
    file, and a failure leaves no partial file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass(frozen=True)
class Checkpoint:
    model: nn.Module
    spec: dict
    meta: dict


def save_checkpoint(path, model: nn.Module, spec: dict, meta: dict | None = None) -> Path:
    """Write ``model``'s state with the spec that rebuilds it (atomically)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": dict(spec),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return Path(path)


def _torch_load(path) -> Any:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it may be truncated or not a torch.save file. Accepted: a noiseprop checkpoint or a state dict "
            "saved with torch.save"
        ) from e


def _check_state_dict(sd, path) -> dict:
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a state dict: expected a noiseprop checkpoint or a mapping "
            f"of parameter names to tensors, got {type(sd).__name__}"
        )
    return sd


def load_state_dict_file(path) -> dict:
    """Load a bare state dict or the ``state_dict`` of a noiseprop checkpoint."""
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj.get("state_dict")
    return _check_state_dict(obj, path)


def load_checkpoint(path) -> Checkpoint:
    """Rebuild the model of a noiseprop checkpoint (eval mode) with its spec and meta."""
    obj = _torch_load(path)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a bare state dict with no model spec; the CLI needs a noiseprop "
                "checkpoint (written by `noiseprop train` or save_checkpoint). From Python, build your model and "
                "load it with load_state_dict_file"
            )
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a state dict or a noiseprop checkpoint (got {type(obj).__name__})"
        )
    if obj.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {obj.get('version')!r}; this noiseprop reads {VERSION}")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} has no model spec")
    sd = _check_state_dict(obj.get("state_dict"), path)
    from .models import build_model

    model = build_model(**spec)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its spec {spec}: {e}") from e
    model.eval()
    return Checkpoint(model=model, spec=spec, meta=dict(obj.get("meta") or {}))
