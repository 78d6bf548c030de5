"""The studies' data, loaded once per process."""
from __future__ import annotations

import functools
import json

from ..data import load_dataset
from ..models import _family

__all__ = ["load_data"]


@functools.lru_cache(maxsize=4)
def _dataset_cached(spec_json: str):
    spec = json.loads(spec_json)
    return load_dataset(**spec)


def load_data(dataset: str, data_dir=None, n_train: int | None = None):
    """The dataset (cached per process), restricted to its first ``n_train`` training
    examples when given."""
    spec = {"name": dataset}
    if data_dir is not None:
        spec["data_dir"] = str(data_dir)
    data = _dataset_cached(json.dumps(spec, sort_keys=True))
    if n_train is not None and n_train < data.n_train:
        data = data.subset(n_train=int(n_train))
    return data


def _family_of(name: str) -> str:
    return _family(name, None)[0]
