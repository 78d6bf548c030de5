"""One hashing scheme for the whole project: configurations, tensors and data sets.

- :func:`config_digest`: SHA-256 of the canonical JSON of plain data (sorted keys, no
  whitespace; tuples as lists; anything else by ``str``). Equal configurations share a
  digest whatever their key order.
- :func:`tensor_digest`: SHA-256 over each tensor's (or array's) dtype, shape and bytes,
  in order, after an optional header (a configuration). Used for the fingerprint of a
  result's inputs (so :func:`noiseprop.empirical.compare` can tell that a prediction
  and a simulation saw the same data), of data sets, and of model states.

Digests are hex strings; ``length`` truncates them (keys in file names).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np
import torch

__all__ = ["config_digest", "tensor_digest", "canonical_json", "inputs_fingerprint"]


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of plain data (sorted keys, compact separators)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_digest(obj: Any, length: int | None = None) -> str:
    """SHA-256 hex digest of :func:`canonical_json` of ``obj``.

    >>> config_digest({"a": 1, "b": [1, 2]}) == config_digest({"b": (1, 2), "a": 1})
    True
    >>> len(config_digest({"a": 1}, length=16))
    16
    """
    d = hashlib.sha256(canonical_json(obj).encode()).hexdigest()
    return d[:length] if length else d


def _as_array(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
            t = t.view(torch.int16)
        t = t.numpy()
    return np.ascontiguousarray(np.asarray(t))


def tensor_digest(tensors: Iterable, header: Any = None, names: Iterable[str] | None = None,
                  length: int | None = None) -> str:
    """SHA-256 hex digest over ``header`` (canonical JSON, if given) and each tensor's
    name (if given), dtype, shape and raw bytes, in order.

    >>> x = torch.arange(6.0).reshape(2, 3)
    >>> tensor_digest([x]) == tensor_digest([x.clone()]), tensor_digest([x]) == tensor_digest([x.T.contiguous()])
    (True, False)
    """
    h = hashlib.sha256()
    if header is not None:
        h.update(canonical_json(header).encode())
    names = list(names) if names is not None else None
    for i, t in enumerate(tensors):
        a = _as_array(t)
        label = f"{names[i]}:" if names is not None else ""
        h.update(f"{label}{a.dtype.str}{a.shape}".encode())
        if a.size:
            h.update(memoryview(a.reshape(-1)).cast("B"))
    d = h.hexdigest()
    return d[:length] if length else d


def inputs_fingerprint(x, y) -> str:
    """The fingerprint a result carries of the inputs and labels it was computed on
    (32 hex digits of :func:`tensor_digest`).

    >>> x, y = torch.zeros(3, 2), torch.tensor([0, 1, 1])
    >>> inputs_fingerprint(x, y) == inputs_fingerprint(x.clone(), y.clone()), len(inputs_fingerprint(x, y))
    (True, 32)
    """
    return tensor_digest([x, y], header="inputs", length=32)
