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

import glob
import io
import os
import pickle
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noiseprop.theory.validation import check_output_dir, check_output_file, first_line

from .models import build_model

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "load_state_dict_file", "atomic_write",
           "CheckpointError", "sweep_temp", "publish_folder", "check_replaceable_folder"]

FORMAT = "noiseprop-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, or not in an accepted format."""


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp(folder, name: str | None = None, older_than: float = 3600.0) -> int:
    """Remove temp files that killed writers left in ``folder``: ``.NAME.PID.*.tmp``
    (what :func:`atomic_write` creates) whose process ``PID`` is gone, and any other
    ``.*.tmp`` older than ``older_than`` seconds. ``name``: only temp files of that
    target file. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    now = time.time()
    for p in folder.glob(f".{glob_escape(name)}.*.tmp" if name else ".*.tmp"):
        stem = p.name[1:-4]  # NAME.PID.RANDOM
        rest = stem[len(name) + 1:] if name else stem
        parts = rest.split(".")
        pid = None
        if name:
            pid = int(parts[0]) if parts and parts[0].isdigit() else None
        elif len(parts) >= 3 and parts[-2].isdigit():
            pid = int(parts[-2])
        try:
            stale = (pid is not None and pid != os.getpid() and not _pid_alive(pid)) or (
                now - p.stat().st_mtime > older_than)
            if stale:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()
                n += 1
        except OSError:
            pass
    return n


#: What a report folder holds; :func:`publish_folder` replaces only such folders.
REPORT_ENTRIES = ("report.md", "report.html", "timings.json", "csv", "figures")


def check_replaceable_folder(out, name: str = "--out", entries=REPORT_ENTRIES) -> Path:
    """``out`` may be replaced as a whole: absent, empty, or holding only ``entries``
    (an earlier report); anything else is refused, so no file of the user's is lost."""
    out = check_output_dir(out, name)
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in entries and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if foreign:
            raise ValueError(f"{name} {str(out)!r} exists and holds files that are not part of a report "
                             f"({', '.join(foreign[:5])}); the report replaces its folder as a whole, so give a new "
                             f"or empty folder, or one holding an earlier report")
    return out


def publish_folder(out, fill) -> Path:
    """Write a folder as a whole: ``fill(staging)`` writes into a sibling
    ``.NAME.PID.tmp`` folder, which then replaces ``out`` by rename (under a lock on
    the parent folder, so concurrent writers never interleave). A reader sees the old
    folder or the new one, never half of one; a killed writer's staging folder is swept
    by the next run (:func:`sweep_temp`)."""
    out = Path(out).expanduser()
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    sweep_temp(parent, out.name)
    staging = parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    old = None
    try:
        fill(staging)
        with _folder_lock(parent):
            if out.exists():
                old = parent / f".{out.name}.{os.getpid()}.old.tmp"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


class _folder_lock:
    """An exclusive ``flock`` on a folder (blocking; a no-op without ``fcntl``)."""

    def __init__(self, folder):
        self.folder = folder
        self.fd = None

    def __enter__(self):
        try:
            import fcntl  # POSIX only: lazy, so that the module imports where there is no fcntl
        except ImportError:  # pragma: no cover
            return self
        self.fd = os.open(self.folder, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def glob_escape(text: str) -> str:
    return glob.escape(text)


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial
    file, and a failure leaves no partial file behind. The file gets the permissions an
    ordinary ``open`` would give (``0o666`` less the umask), and temp files of earlier
    writers of ``path`` that were killed are swept (:func:`sweep_temp`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
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


def _spec_mismatch(spec: dict, have: dict, what: str) -> str | None:
    """Where ``build_model(**spec)`` (built on the meta device: no memory) and the
    state-dict shapes ``have`` (``what``: "stored", "model") differ, in words; ``None``
    when they agree. Raises what a spec that does not build raises."""
    with torch.device("meta"):
        shell = build_model(**spec)
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    if want == have:
        return None
    diff = sorted(set(want) ^ set(have))[:3] or [k for k in want if want[k] != have.get(k)][:3]
    return ", ".join(f"{k}: spec {want.get(k)} vs {what} {have.get(k)}" for k in diff)


# bound at import for the in-memory meta check: a test that breaks torch.save to simulate a
# failed write (tests/empirical/test_train.py) must reach the write, not fail in this check
_SAVE_FOR_CHECK, _LOAD_FOR_CHECK = torch.save, torch.load


def _check_meta(meta) -> None:
    """``meta`` must be None or a dict of plain data that ``torch.load(weights_only=True)``
    reads back (what :func:`load_checkpoint` uses)."""
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict (or None), got {type(meta).__name__} {str(meta)[:40]!r}")
    buf = io.BytesIO()
    try:
        _SAVE_FOR_CHECK(meta, buf)
        buf.seek(0)
        _LOAD_FOR_CHECK(buf, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickling / weights_only unpickling errors of many kinds
        first = first_line(e)
        raise TypeError(f"meta must hold plain data (dicts, lists, str, numbers, bools, None, tensors) that "
                        f"torch.load(weights_only=True) reads back; it could not be stored ({type(e).__name__}: "
                        f"{first[:200]})") from None


def _write_checkpoint(path, model, spec, meta) -> Path:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": dict(spec),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return Path(path)


def _check_save_args(path, model, meta) -> Path:
    path = check_output_file(path, "path")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (its state_dict is stored), got {type(model).__name__}")
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor) and v.device.type == "meta":
            raise ValueError(f"model parameter {k!r} is on the 'meta' device (no values); nothing to save")
    _check_meta(meta)
    return path


def save_checkpoint(path, model: nn.Module, spec: dict, meta: dict | None = None) -> Path:
    """Write ``model``'s state with the spec that rebuilds it (atomically).

    Checked before anything is written: ``path`` a writable file path (not a folder),
    ``model`` an ``nn.Module``, ``spec`` a dict that builds (``build_model(**spec)``) a
    model with the same state-dict shapes as ``model`` (what :func:`load_checkpoint`
    requires), ``meta`` ``None`` or a dict of plain data.

    >>> import os, tempfile
    >>> from noiseprop.empirical import build_model
    >>> net = build_model("mlp", (1, 8, 8), 10)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_checkpoint(os.path.join(tmp, "m.pt"), net, net.spec)
    ...     ck = load_checkpoint(path)
    >>> ck.spec["name"], type(ck.model).__name__
    ('mlp', 'MLP')
    """
    path = _check_save_args(path, model, meta)
    if not isinstance(spec, dict):
        raise TypeError(f"spec must be a model spec dict for build_model(**spec) (e.g. model.spec of a zoo model), "
                        f"got {type(spec).__name__} {str(spec)[:40]!r}")
    try:
        detail = _spec_mismatch(spec, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "model")
    except Exception as e:  # noqa: BLE001 - any failure of a bad spec
        first = first_line(e)
        raise ValueError(f"spec does not build a model ({type(e).__name__}: {first[:200]}); load_checkpoint would "
                         f"refuse the file. spec: {spec}") from None
    if detail:
        raise ValueError(f"spec {spec} does not describe model (a {type(model).__name__}): {detail}")
    return _write_checkpoint(path, model, spec, meta)


def _torch_load(path) -> Any:
    if path is None or not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"path must be a checkpoint file path (str or os.PathLike), got {type(path).__name__} {path!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's unpickler raises many kinds on a foreign file
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read ({type(e).__name__}: {first_line(e)}); "
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
    """Rebuild the model of a noiseprop checkpoint (eval mode) with its spec and meta.

    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     bad = os.path.join(tmp, "notes.txt")
    ...     _ = open(bad, "w").write("not a checkpoint")
    ...     load_checkpoint(bad)
    Traceback (most recent call last):
    ...
    noiseprop.empirical.checkpoint.CheckpointError: ...
    """
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
    # build on the meta device first (no memory): a spec that does not build, or that
    # does not match the stored tensors (e.g. width=2**40), is refused before allocating
    try:
        detail = _spec_mismatch(spec, {k: tuple(v.shape) for k, v in sd.items()}, "stored")
    except Exception as e:  # noqa: BLE001 - any failure of a bad spec
        raise CheckpointError(f"checkpoint {str(path)!r} has a model spec that does not build ({type(e).__name__}: "
                              f"{first_line(e)}); spec: {spec}") from None
    if detail:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its spec {spec}: {detail}")
    model = build_model(**spec)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its spec {spec}: {e}") from e
    model.eval()
    return Checkpoint(model=model, spec=spec, meta=checkpoint_meta(obj, path))


def checkpoint_meta(obj: dict, path) -> dict:
    """The ``meta`` of a loaded checkpoint dict: a dict (``{}`` when absent); a
    :class:`CheckpointError` naming the file otherwise."""
    meta = obj.get("meta")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} has a 'meta' entry of type {type(meta).__name__}; expected a "
                              "dict (dataset, training config, history) or none; re-save it with save_checkpoint")
    return dict(meta)
