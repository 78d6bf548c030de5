"""A resumable store of results, one file per cell, keyed by a hash of its configuration.

A *cell* is one unit of a study's grid (a training run, a Monte-Carlo sweep of one
model, a curvature measurement). Its result is a JSON document
``<root>/<key[:2]>/<key>.json`` holding the configuration and the result, written
atomically (temp file, then rename: :func:`~noiseprop.empirical.checkpoint.atomic_write`),
so a run killed at any moment leaves either the whole file or none, and a rerun
computes only the missing cells (DESIGN.md conventions).

Values are plain data: dicts, lists, strings, numbers, booleans, ``None``, numpy arrays
and torch tensors (stored as arrays with their dtype and shape). Floats are written by
``repr`` and read back bit-identical, so a result loaded from the store equals the
one computed in memory; :func:`~noiseprop.empirical.executor.run_tasks` always hands
out the loaded copy, so resumed and uninterrupted runs see the same numbers.

A file that cannot be read back (truncated by a crash of the disk, edited by hand, of
another format, or whose key does not match its configuration) is reported with a
warning, moved aside to ``*.corrupt`` and recomputed, never used.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from noiseprop.theory.hashing import config_digest

from .checkpoint import atomic_write, sweep_temp

__all__ = ["ResultStore", "Claim", "config_key", "encode", "decode", "MISSING"]

FORMAT = "noiseprop-cell"
VERSION = 1


class _Missing:
    def __repr__(self):
        return "MISSING"

    def __bool__(self):
        return False


#: Returned by :meth:`ResultStore.get` for a cell that is not (validly) stored.
MISSING = _Missing()


def _canonical(obj):
    """Plain JSON-able form of a configuration (sorted keys, tuples as lists)."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (bool, str, type(None))):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if math.isnan(f) or math.isinf(f):
            return repr(f)
        return f
    if isinstance(obj, np.ndarray):
        return _canonical(obj.tolist())
    raise TypeError(f"configuration values must be plain data (dict, list, str, number, bool, None); "
                    f"got {type(obj).__name__}: {obj!r}")


def config_key(config: dict) -> str:
    """The SHA-256 (first 32 hex digits) of the canonical JSON of ``config``: equal
    configurations (whatever their key order, tuples or lists) share a key."""
    return config_digest(_canonical(config), length=32)


def encode(value: Any):
    """Plain-data form of a result (numpy arrays and tensors tagged with dtype, shape)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"result dict keys must be strings, got {type(k).__name__}: {k!r}")
            out[k] = encode(v)
        return out
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, (bool, str, type(None))):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"arrays in results must be numeric, got dtype {value.dtype}")
        return {"__ndarray__": value.ravel().tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    raise TypeError(f"results must be plain data, numpy arrays or tensors; got {type(value).__name__}")


def decode(obj):
    """Inverse of :func:`encode` (arrays come back as numpy arrays of their dtype)."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


class Claim:
    """An exclusive claim on one cell (see :meth:`ResultStore.claim`)."""

    def __init__(self, path, fd):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # remove the file while still holding the lock, then let go
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


class ResultStore:
    """Cells on disk under ``root`` (created on first write)."""

    def __init__(self, root):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        if not (isinstance(key, str) and key and all(c in "0123456789abcdef" for c in key)):
            raise ValueError(f"a cell key is a lowercase hex string (config_key), got {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not MISSING

    def has(self, key: str) -> bool:
        return key in self

    def keys(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.stem for p in self.root.glob("*/*.json"))

    def save(self, key: str, value, config: dict | None = None) -> Path:
        """Write ``value`` (with its ``config``) atomically under ``key``."""
        payload = {"format": FORMAT, "version": VERSION, "key": key,
                   "config": _canonical(config or {}), "result": encode(value)}
        if config:
            if config_key(config) != key:
                raise ValueError(f"cell key {key!r} is not the hash of its configuration")
        text = json.dumps(payload, sort_keys=True, allow_nan=True)

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        path = self.path(key)
        atomic_write(path, write)
        return path

    def get(self, key: str):
        """The stored result, or :data:`MISSING` (absent or unreadable: an unreadable
        file is moved aside to ``*.corrupt`` with a warning)."""
        path = self.path(key)
        if not path.exists():
            return MISSING
        try:
            with open(path) as f:
                payload = json.load(f)
            if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("key") != key:
                raise ValueError("not a noiseprop cell file for this key")
            if payload.get("version") != VERSION:
                raise ValueError(f"cell format version {payload.get('version')!r}, expected {VERSION}")
            if payload.get("config") and config_key(payload["config"]) != key:
                raise ValueError("the stored configuration does not hash to the file's key")
            return decode(payload["result"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            bad = path.with_name(path.name + f".{int(time.time())}.corrupt")
            warnings.warn(f"result cell {str(path)!r} is unreadable ({e}); moved to {bad.name} and recomputed",
                          stacklevel=2)
            try:
                os.replace(path, bad)
            except OSError:
                pass
            return MISSING

    def load(self, key: str):
        """The stored result; ``KeyError`` naming the key when there is none."""
        v = self.get(key)
        if v is MISSING:
            raise KeyError(f"no stored result for cell {key} under {str(self.root)!r}")
        return v

    def config(self, key: str) -> dict:
        with open(self.path(key)) as f:
            return json.load(f).get("config", {})

    def claim(self, key: str):
        """Claim the right to compute cell ``key``: a :class:`Claim` (an exclusive,
        non-blocking ``flock`` on ``<key>.lock`` beside the cell), or ``None`` when
        another run holds it. The operating system drops the lock when its holder dies,
        so a killed run never blocks a later one; :meth:`Claim.release` removes the
        lock file. Without ``fcntl`` (Windows) every claim succeeds."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no advisory locks: no coordination
            return Claim(None, None)
        path = self.path(key).with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:  # the holder before us may have removed the file: lock the one on disk
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return Claim(path, fd)
            os.close(fd)

    def clean_temp(self, older_than: float = 3600.0) -> int:
        """Remove temp files left by killed writers: those whose writing process is gone,
        and any older than ``older_than`` s (:func:`~.checkpoint.sweep_temp`)."""
        if not self.root.exists():
            return 0
        n = sweep_temp(self.root, older_than=older_than)
        for d in self.root.iterdir():
            if d.is_dir():
                n += sweep_temp(d, older_than=older_than)
        return n
