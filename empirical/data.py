"""Datasets: the built-in digits, a synthetic teacher task, and CIFAR / MNIST from files.

:func:`load_dataset` returns a frozen :class:`Dataset` with float32 inputs shaped
``N×C×H×W`` and int64 labels, normalised per channel with training-set statistics
(``x ← (x − mean_c)/std_c``, mean and std over all training pixels of channel c), and a
``fingerprint`` (a SHA-256 of the tensors and of how they were made) that keys caches.

Nothing is downloaded: CIFAR and MNIST are read from a local folder in their standard
formats (python pickle batches; idx files, gzipped or not). A missing or malformed
folder raises an error that lists the expected files.
"""
from __future__ import annotations

import gzip
import inspect
import os
import pickle
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from noiseprop.theory.hashing import tensor_digest
from noiseprop.theory.validation import check_bool, check_seed

__all__ = [
    "Dataset",
    "load_dataset",
    "make_dataset",
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetFormatError",
]

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits", "teacher", "cifar10", "cifar100", "mnist")

#: Environment variable consulted when ``data_dir`` is not given for file-based datasets.
DATA_DIR_ENV = "NOISEPROP_DATA_DIR"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's folder or one of its files does not exist."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is not in the expected format."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset split into train and test.

    Attributes:
        name: dataset name (``"digits"``, ...).
        x_train, x_test: float32 tensors ``N×C×H×W``, normalised per channel with
            training-set statistics.
        y_train, y_test: int64 label tensors in ``[0, num_classes)``.
        num_classes: number of classes.
        in_shape: ``(C, H, W)``.
        fingerprint: hex SHA-256 of the tensors and the loading arguments.
        spec: JSON-able dict with which :func:`load_dataset` rebuilds it
            (``load_dataset(**spec)``; includes ``name`` and ``data_dir``).
        channel_mean, channel_std: the normalisation statistics (raw units).
    """

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    in_shape: tuple
    fingerprint: str
    spec: dict = field(default_factory=dict)
    channel_mean: tuple = ()
    channel_std: tuple = ()

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """The first ``n_train`` training and ``n_test`` test examples (a new
        fingerprint; normalisation statistics unchanged)."""
        for nm, v, tot in (("n_train", n_train, self.n_train), ("n_test", n_test, self.n_test)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= tot):
                raise ValueError(f"{nm} must be an int in [1, {tot}], got {v!r}")
        xtr, ytr = self.x_train[:n_train], self.y_train[:n_train]
        xte, yte = self.x_test[:n_test], self.y_test[:n_test]
        spec = dict(self.spec)
        if n_train is not None:
            spec["subset_train"] = n_train
        if n_test is not None:
            spec["subset_test"] = n_test
        fp = _fingerprint(self.name, {"parent": self.fingerprint, "n_train": n_train, "n_test": n_test},
                          (xtr, ytr, xte, yte))
        return replace(self, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, fingerprint=fp, spec=spec)

    def summary(self) -> str:
        counts = torch.bincount(self.y_train, minlength=self.num_classes).tolist()
        return (
            f"Dataset {self.name!r}: train {self.n_train}, test {self.n_test}, inputs {tuple(self.in_shape)}, "
            f"{self.num_classes} classes (train counts min {min(counts)}, max {max(counts)}), "
            f"fingerprint {self.fingerprint[:12]}"
        )

    def to_frame(self):
        """One row per split: examples and per-class counts."""
        rows = []
        for split, y in (("train", self.y_train), ("test", self.y_test)):
            row = {"dataset": self.name, "split": split, "n": int(y.numel())}
            for c, k in enumerate(torch.bincount(y, minlength=self.num_classes).tolist()):
                row[f"class_{c}"] = k
            rows.append(row)
        return pd.DataFrame(rows)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _fingerprint(name: str, params: dict, tensors) -> str:
    """The data set's identity: its name, parameters and the bytes of its arrays
    (:func:`noiseprop.theory.hashing.tensor_digest`, the project's one hashing scheme)."""
    return tensor_digest(tensors, header={"name": name, "params": params})


def _normalise(x_train: np.ndarray, x_test: np.ndarray):
    """Per-channel standardisation with training statistics (float64 statistics)."""
    axes = (0, 2, 3)
    mean = x_train.mean(axis=axes, dtype=np.float64)
    std = x_train.std(axis=axes, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    shape = (1, -1, 1, 1)
    xt = ((x_train - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)
    xs = ((x_test - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)
    return xt, xs, tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _build(name, x_train, y_train, x_test, y_test, num_classes, params, spec, normalise=True) -> Dataset:
    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    for nm, x in (("training", x_train), ("test", x_test)):
        if x.shape[0] == 0:
            raise DatasetFormatError(f"{name}: the {nm} set has 0 images; at least one is needed")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetFormatError(
            f"{name}: training images are {'×'.join(map(str, x_train.shape[1:]))} but test images are "
            f"{'×'.join(map(str, x_test.shape[1:]))}; both sets must have the same channels×height×width"
        )
    for nm, x in (("training", x_train), ("test", x_test)):
        if not np.isfinite(x).all():
            raise DatasetFormatError(f"{name}: the {nm} images contain NaN or infinite values")
    if normalise:
        xtr, xte, mean, std = _normalise(x_train, x_test)
    else:
        xtr, xte = x_train.astype(np.float32), x_test.astype(np.float32)
        mean, std = (), ()
    tensors = (
        torch.from_numpy(np.ascontiguousarray(xtr)),
        torch.from_numpy(np.asarray(y_train, dtype=np.int64).copy()),
        torch.from_numpy(np.ascontiguousarray(xte)),
        torch.from_numpy(np.asarray(y_test, dtype=np.int64).copy()),
    )
    for t, nm in zip(tensors[1::2], ("y_train", "y_test")):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise DatasetFormatError(f"{name}: {nm} has labels outside [0, {num_classes})")
    fp = _fingerprint(name, params, tensors)
    return Dataset(name=name, x_train=tensors[0], y_train=tensors[1], x_test=tensors[2], y_test=tensors[3],
                   num_classes=int(num_classes), in_shape=tuple(int(s) for s in tensors[0].shape[1:]),
                   fingerprint=fp, spec=spec, channel_mean=mean, channel_std=std)


def make_dataset(x_train, y_train, x_test, y_test, num_classes: int | None = None, name: str = "custom",
                 normalise: bool = False) -> Dataset:
    """Wrap arrays (``N×C×H×W`` inputs, integer labels) as a :class:`Dataset`.

    ``normalise=True`` standardises per channel with training statistics. The
    fingerprint hashes the arrays themselves.
    """
    normalise = check_bool("normalise", normalise)
    xs = [np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x) for x in (x_train, x_test)]
    ys = [np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y) for y in (y_train, y_test)]
    for nm, x in zip(("x_train", "x_test"), xs):
        if x.ndim != 4:
            raise ValueError(f"make_dataset: {nm} must be shaped N×C×H×W, got shape {x.shape}")
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise ValueError(f"make_dataset: x_train {xs[0].shape} and x_test {xs[1].shape} differ in C×H×W")
    for nm, x, y in (("train", xs[0], ys[0]), ("test", xs[1], ys[1])):
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"make_dataset: y_{nm} must be 1-D with {x.shape[0]} labels, got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"make_dataset: y_{nm} must hold integer labels, got dtype {y.dtype}")
    if num_classes is None:
        num_classes = int(max(ys[0].max(initial=0), ys[1].max(initial=0))) + 1
    return _build(name, xs[0], ys[0], xs[1], ys[1], num_classes, {"custom": True, "normalise": normalise},
                  spec={"name": name}, normalise=normalise)


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int):
    """Per class, a seeded permutation; the first round(fraction·n_c) go to test."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        k = int(round(test_fraction * idx.size))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr = np.concatenate(train_idx)
    te = np.concatenate(test_idx)
    # Interleave classes in a seeded order (so that prefixes / subsets stay mixed).
    return tr[rng.permutation(tr.size)], te[rng.permutation(te.size)]


# ----------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------
def _load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes), a stratified split
    with ``test_fraction`` (default 0.2 → 1437 train / 360 test) drawn with
    ``numpy.random.default_rng(split_seed)``."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction!r}")
    if not isinstance(split_seed, int) or isinstance(split_seed, bool):
        raise ValueError(f"digits: split_seed must be an int, got {split_seed!r}")
    try:
        split_seed = check_seed("split_seed", split_seed)
    except (ValueError, TypeError) as e:
        raise type(e)(f"digits: {e}") from None
    from sklearn.datasets import load_digits  # lazy: only the digits data set needs scikit-learn

    d = load_digits()
    x = d.images.astype(np.float64)[:, None, :, :]
    y = d.target.astype(np.int64)
    tr, te = _stratified_split(y, float(test_fraction), split_seed)
    params = {"test_fraction": float(test_fraction), "split_seed": split_seed}
    return _build("digits", x[tr], y[tr], x[te], y[te], 10, params,
                  spec={"name": "digits", "data_dir": None, **params})


# ----------------------------------------------------------------------------
# teacher
# ----------------------------------------------------------------------------
def _load_teacher(n_train: int = 2048, n_test: int = 512, in_shape=(1, 8, 8), num_classes: int = 10,
                  teacher_width: int = 64, seed: int = 0) -> Dataset:
    """Synthetic teacher-student task: inputs x ~ N(0, I) shaped ``in_shape``; labels
    ``argmax(W2 relu(W1 x) − m)`` of a random two-layer ReLU teacher (He-scaled Gaussian
    weights) where ``m`` is the teacher's mean logit over the training inputs (so classes
    are roughly balanced). Everything from ``numpy.random.default_rng(seed)``."""
    for nm, v in (("n_train", n_train), ("n_test", n_test), ("num_classes", num_classes),
                  ("teacher_width", teacher_width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"teacher: {nm} must be a positive int, got {v!r}")
    if num_classes < 2:
        raise ValueError(f"teacher: num_classes must be >= 2, got {num_classes}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"teacher: seed must be an int, got {seed!r}")
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"teacher: in_shape must be (C, H, W) with positive sizes, got {in_shape}")
    rng = np.random.default_rng(seed)
    d = int(np.prod(in_shape))
    w1 = rng.standard_normal((teacher_width, d)) * np.sqrt(2.0 / d)
    w2 = rng.standard_normal((num_classes, teacher_width)) * np.sqrt(2.0 / teacher_width)
    x = rng.standard_normal((n_train + n_test, d))
    logits = np.maximum(x @ w1.T, 0.0) @ w2.T
    logits = logits - logits[:n_train].mean(axis=0, keepdims=True)
    y = logits.argmax(axis=1).astype(np.int64)
    x = x.reshape((-1,) + in_shape)
    params = {"n_train": n_train, "n_test": n_test, "in_shape": list(in_shape), "num_classes": num_classes,
              "teacher_width": teacher_width, "seed": seed}
    return _build("teacher", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes, params,
                  spec={"name": "teacher", "data_dir": None, **params})


# ----------------------------------------------------------------------------
# CIFAR (python pickle batches)
# ----------------------------------------------------------------------------
_CIFAR = {
    "cifar10": {
        "subdir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": {"fine": b"labels"},
        "classes": {"fine": 10},
    },
    "cifar100": {
        "subdir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": {"fine": b"fine_labels", "coarse": b"coarse_labels"},
        "classes": {"fine": 100, "coarse": 20},
    },
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: only numpy arrays, dtypes and builtin containers.

    The CIFAR files are pickles; loading arbitrary pickles runs arbitrary code, so any
    global other than numpy's array reconstruction is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core") and not hasattr(np, "core"):  # pragma: no cover
                module = module.replace("numpy.core", "numpy._core")
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")


def _missing_error(name: str, folder: Path, expected: list[str], tried: list[Path]) -> DatasetNotFoundError:
    where = ", ".join(repr(str(p)) for p in tried)
    return DatasetNotFoundError(
        f"{name}: no complete dataset found in {where}. Expected the files {expected} "
        f"(the standard {'python pickle batches' if name.startswith('cifar') else 'idx files, .gz or not'}); "
        "nothing is downloaded: put them in that folder or pass data_dir="
    )


def _resolve_dir(name: str, data_dir) -> Path:
    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV)
        if not env:
            raise DatasetNotFoundError(
                f"{name}: no data_dir given and ${DATA_DIR_ENV} is not set; pass the folder that holds the "
                f"{name} files (nothing is downloaded)"
            )
        data_dir = env
    return Path(data_dir).expanduser()


def _read_cifar_batch(path: Path, label_key: bytes, name: str):
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError) as e:
        raise DatasetFormatError(f"{name}: {str(path)!r} is not a CIFAR python pickle batch ({e})") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{name}: {str(path)!r} does not hold a dict (got {type(obj).__name__})")
    obj = {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}
    if b"data" not in obj or label_key not in obj:
        raise DatasetFormatError(
            f"{name}: {str(path)!r} lacks the keys b'data' and {label_key!r} (has {sorted(map(repr, obj))})"
        )
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetFormatError(
            f"{name}: {str(path)!r} b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DatasetFormatError(
            f"{name}: {str(path)!r} has {data.shape[0]} images but labels of shape {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise DatasetFormatError(
            f"{name}: {str(path)!r} {label_key!r} must hold integer class labels, got dtype {labels.dtype}"
            + (f" (first values {labels[:3].tolist()})" if labels.size else "")
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar(name: str, data_dir=None, labels: str = "fine") -> Dataset:
    info = _CIFAR[name]
    if labels not in info["label_key"]:
        raise ValueError(f"{name}: labels must be one of {sorted(info['label_key'])}, got {labels!r}")
    root = _resolve_dir(name, data_dir)
    expected = info["train"] + info["test"]
    candidates = [root, root / info["subdir"]]
    folder = next((c for c in candidates if all((c / f).is_file() for f in expected)), None)
    if folder is None:
        raise _missing_error(name, root, expected, candidates)
    key = info["label_key"][labels]
    xs, ys = {}, {}
    for split in ("train", "test"):
        parts = [_read_cifar_batch(folder / f, key, name) for f in info[split]]
        xs[split] = np.concatenate([p[0] for p in parts]).astype(np.float64) / 255.0
        ys[split] = np.concatenate([p[1] for p in parts])
    params = {"labels": labels}
    spec = {"name": name, "data_dir": str(root.resolve())}
    if name == "cifar100":
        spec["labels"] = labels
    return _build(name, xs["train"], ys["train"], xs["test"], ys["test"], info["classes"][labels], params, spec)


# ----------------------------------------------------------------------------
# MNIST (idx files)
# ----------------------------------------------------------------------------
_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _read_idx(path: Path, ndim: int, name: str) -> np.ndarray:
    """idx format (LeCun): magic 0x0000 | type 0x08 (ubyte) | ndim, big-endian int32 sizes, data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DatasetFormatError(f"{name}: could not read {str(path)!r}: not a valid"
                                 f"{' gzip-compressed' if path.suffix == '.gz' else ''} idx file ({e})") from e
    if len(raw) < 4 + 4 * ndim:
        raise DatasetFormatError(f"{name}: {str(path)!r} is too short to be an idx file")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DatasetFormatError(
            f"{name}: {str(path)!r} has magic {raw[:4].hex()}, expected 000008{ndim:02x} (unsigned-byte idx, "
            f"{ndim} dimensions)"
        )
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    n = int(np.prod(dims))
    body = raw[4 + 4 * ndim:]
    if len(body) != n:
        raise DatasetFormatError(
            f"{name}: {str(path)!r} declares shape {dims} ({n} bytes) but holds {len(body)} bytes of data"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _load_mnist(data_dir=None) -> Dataset:
    name = "mnist"
    root = _resolve_dir(name, data_dir)
    candidates = [root, root / "MNIST" / "raw", root / "raw"]

    def find(folder, stem):
        for fn in (stem, stem + ".gz"):
            if (folder / fn).is_file():
                return folder / fn
        return None

    folder = next((c for c in candidates if all(find(c, s) for s in _MNIST_FILES.values())), None)
    if folder is None:
        raise _missing_error(name, root, [s + "[.gz]" for s in _MNIST_FILES.values()], candidates)
    arr = {}
    for k, stem in _MNIST_FILES.items():
        arr[k] = _read_idx(find(folder, stem), 3 if k.startswith("x") else 1, name)
    for split in ("train", "test"):
        if arr[f"x_{split}"].shape[0] != arr[f"y_{split}"].shape[0]:
            raise DatasetFormatError(
                f"{name}: {split} images ({arr[f'x_{split}'].shape[0]}) and labels ({arr[f'y_{split}'].shape[0]}) differ in number"
            )
    x_train = arr["x_train"][:, None].astype(np.float64) / 255.0
    x_test = arr["x_test"][:, None].astype(np.float64) / 255.0
    return _build(name, x_train, arr["y_train"], x_test, arr["y_test"], 10, {},
                  spec={"name": name, "data_dir": str(root.resolve())})


# ----------------------------------------------------------------------------
def load_dataset(name: str = "digits", data_dir=None, **kwargs) -> Dataset:
    """Load a dataset by name (see :data:`DATASETS`).

    * ``"digits"`` (default): scikit-learn's 8×8 digits, stratified 1437/360 split
      (kwargs ``test_fraction=0.2``, ``split_seed=0``).
    * ``"teacher"``: synthetic teacher-student task (kwargs ``n_train, n_test, in_shape,
      num_classes, teacher_width, seed``).
    * ``"cifar10"``, ``"cifar100"`` (kwarg ``labels="fine"|"coarse"``): the python
      pickle batches in ``data_dir`` (or ``data_dir/cifar-10-batches-py``,
      ``data_dir/cifar-100-python``).
    * ``"mnist"``: the four idx files (``.gz`` or not) in ``data_dir`` (or
      ``data_dir/MNIST/raw``).

    ``data_dir`` defaults to ``$NOISEPROP_DATA_DIR`` for the file-based datasets.
    ``subset_train`` / ``subset_test`` keep only the first examples of each split.

    >>> d = load_dataset("digits")
    >>> tuple(d.x_train.shape), tuple(d.x_test.shape), d.num_classes
    ((1438, 1, 8, 8), (359, 1, 8, 8), 10)
    """
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; accepted: {list(DATASETS)}")
    name = name.lower()
    if name in ("digits", "teacher") and data_dir is not None:
        raise ValueError(f"{name} is built in; data_dir={str(data_dir)!r} is not used (pass data_dir=None)")
    # the loader and its positional arguments (the keywords are the caller's)
    loader, lead = ((_load_digits, ()) if name == "digits" else (_load_teacher, ()) if name == "teacher" else
                    (_load_cifar, (name, data_dir)) if name in _CIFAR else (_load_mnist, (data_dir,)))
    own = [k for k in inspect.signature(loader).parameters if k not in ("name", "data_dir")]
    unknown = [k for k in kwargs if k not in own and k not in ("subset_train", "subset_test")]
    if unknown:
        accepted = own + (["data_dir"] if name not in ("digits", "teacher") else []) + ["subset_train", "subset_test"]
        raise ValueError(f"load_dataset({name!r}) got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                         f"accepted keyword arguments for {name!r}: {', '.join(accepted)}")
    sub_train = kwargs.pop("subset_train", None)
    sub_test = kwargs.pop("subset_test", None)
    ds = loader(*lead, **kwargs)
    if sub_train is not None or sub_test is not None:
        ds = ds.subset(sub_train, sub_test)
    return ds
