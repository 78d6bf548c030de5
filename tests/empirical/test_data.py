"""Data loaders: digits, teacher, and CIFAR / MNIST from tiny files written here."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from noiseprop.empirical.data import (
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    load_dataset,
    make_dataset,
)


def _check_normalised(ds: Dataset):
    x = ds.x_train.double()
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-6)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-5)


def _check_types(ds: Dataset, n_train, n_test, in_shape, num_classes):
    assert ds.x_train.dtype == torch.float32 and ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert ds.x_train.shape == (n_train,) + in_shape and ds.x_test.shape == (n_test,) + in_shape
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.in_shape == in_shape and ds.num_classes == num_classes
    assert isinstance(ds.fingerprint, str) and len(ds.fingerprint) == 64


# ----------------------------------------------------------------------------- digits
def test_digits_default_split_is_stratified_and_normalised():
    from sklearn.datasets import load_digits

    ds = load_dataset()
    assert ds.name == "digits"
    full = np.bincount(load_digits().target, minlength=10)
    n_test = int(np.round(0.2 * full).sum())  # per-class rounding: 359 of 1797
    assert n_test == 359
    _check_types(ds, 1797 - n_test, n_test, (1, 8, 8), 10)
    _check_normalised(ds)
    test_counts = torch.bincount(ds.y_test, minlength=10).numpy()
    assert np.array_equal(test_counts, np.round(0.2 * full).astype(int))
    assert np.array_equal(test_counts + torch.bincount(ds.y_train, minlength=10).numpy(), full)
    # train and test hold different images (no leak), all 1797 present
    raw = load_digits().images.reshape(1797, -1)
    mean, std = ds.channel_mean[0], ds.channel_std[0]
    back = np.concatenate([ds.x_train.reshape(-1, 64).double().numpy(),
                           ds.x_test.reshape(-1, 64).double().numpy()]) * std + mean
    assert np.allclose(np.sort(back, axis=0), np.sort(raw, axis=0), atol=1e-4)
    assert load_dataset("digits").fingerprint == ds.fingerprint
    other = load_dataset("digits", split_seed=1)
    assert other.fingerprint != ds.fingerprint
    assert load_dataset(**ds.spec).fingerprint == ds.fingerprint


def test_subset_and_summary():
    ds = load_dataset("digits", subset_train=100, subset_test=50)
    assert ds.n_train == 100 and ds.n_test == 50
    full = load_dataset("digits")
    assert torch.equal(ds.x_train, full.x_train[:100])
    assert ds.fingerprint != full.fingerprint
    assert load_dataset(**ds.spec).fingerprint == ds.fingerprint
    assert "digits" in ds.summary()
    assert list(ds.to_frame()["n"]) == [100, 50]
    with pytest.raises(ValueError, match="n_train"):
        full.subset(n_train=5000)


# ----------------------------------------------------------------------------- teacher
def test_teacher_is_seeded_and_labelled_by_the_teacher():
    a = load_dataset("teacher", n_train=300, n_test=100, in_shape=(2, 4, 4), num_classes=4, seed=5)
    b = load_dataset("teacher", n_train=300, n_test=100, in_shape=(2, 4, 4), num_classes=4, seed=5)
    c = load_dataset("teacher", n_train=300, n_test=100, in_shape=(2, 4, 4), num_classes=4, seed=6)
    _check_types(a, 300, 100, (2, 4, 4), 4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert not torch.equal(a.x_train, c.x_train)
    _check_normalised(a)
    assert set(torch.unique(a.y_train).tolist()) == {0, 1, 2, 3}
    # the labels are a deterministic function of the inputs: a nearest-neighbour check
    # would be weak; instead, relabel with the teacher itself (same generator order)
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((64, 32)) * np.sqrt(2 / 32)
    w2 = rng.standard_normal((4, 64)) * np.sqrt(2 / 64)
    x = rng.standard_normal((400, 32))
    logits = np.maximum(x @ w1.T, 0) @ w2.T
    y = (logits - logits[:300].mean(0)).argmax(1)
    assert np.array_equal(np.concatenate([a.y_train.numpy(), a.y_test.numpy()]), y)
    assert load_dataset(**a.spec).fingerprint == a.fingerprint


def test_builtin_datasets_reject_a_data_dir(tmp_path):
    with pytest.raises(ValueError, match="built in"):
        load_dataset("digits", data_dir=tmp_path)


def test_unknown_name_and_kwargs():
    with pytest.raises(ValueError, match="accepted.*digits"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unexpected keyword"):
        load_dataset("digits", n_train=5)


# ----------------------------------------------------------------------------- CIFAR
def _cifar_images(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar10(folder, rng, per_batch=4):
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _cifar_images(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"training batch", b"labels": y, b"data": x,
                         b"filenames": [b"a.png"] * per_batch}, f)
        xs.append(x)
        ys += y
    xt, yt = _cifar_images(rng, 3), rng.integers(0, 10, 3).tolist()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": yt, b"data": xt}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f)
    return np.concatenate(xs), np.array(ys), xt, np.array(yt)


def test_cifar10_from_pickle_batches(tmp_path):
    rng = np.random.default_rng(0)
    x, y, xt, yt = _write_cifar10(tmp_path / "cifar-10-batches-py", rng)
    for d in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        ds = load_dataset("cifar10", data_dir=d)
        _check_types(ds, 20, 3, (3, 32, 32), 10)
        _check_normalised(ds)
        assert np.array_equal(ds.y_train.numpy(), y) and np.array_equal(ds.y_test.numpy(), yt)
        raw = x.reshape(-1, 3, 32, 32) / 255.0
        mean = raw.mean(axis=(0, 2, 3))
        std = raw.std(axis=(0, 2, 3))
        expect_test = (xt.reshape(-1, 3, 32, 32) / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
        assert np.allclose(ds.x_test.numpy(), expect_test, atol=1e-5)
        assert ds.spec["data_dir"] == str(d.resolve())


def test_cifar100_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "c100"
    folder.mkdir()
    for split, n in (("train", 6), ("test", 2)):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": _cifar_images(rng, n), b"fine_labels": rng.integers(0, 100, n).tolist(),
                         b"coarse_labels": rng.integers(0, 20, n).tolist()}, f)
    fine = load_dataset("cifar100", data_dir=folder)
    coarse = load_dataset("cifar100", data_dir=folder, labels="coarse")
    _check_types(fine, 6, 2, (3, 32, 32), 100)
    assert coarse.num_classes == 20 and fine.fingerprint != coarse.fingerprint
    assert torch.equal(fine.x_train, coarse.x_train)
    assert load_dataset(**coarse.spec).fingerprint == coarse.fingerprint


def test_cifar_missing_or_incomplete_folder_lists_the_expected_files(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="data_batch_1.*test_batch"):
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")
    rng = np.random.default_rng(2)
    _write_cifar10(tmp_path / "c10", rng)
    os.remove(tmp_path / "c10" / "data_batch_3")
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path / "c10")
    with pytest.raises(DatasetNotFoundError, match="'train', 'test'"):
        load_dataset("cifar100", data_dir=tmp_path)
    monkeypatch.delenv("NOISEPROP_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError, match="NOISEPROP_DATA_DIR"):
        load_dataset("cifar10")
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _write_cifar10(tmp_path, np.random.default_rng(3))
    monkeypatch.setenv("NOISEPROP_DATA_DIR", str(tmp_path))
    assert load_dataset("cifar10").n_train == 20


def test_cifar_malformed_files(tmp_path):
    rng = np.random.default_rng(4)
    _write_cifar10(tmp_path, rng)
    (tmp_path / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetFormatError, match="data_batch_2"):
        load_dataset("cifar10", data_dir=tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:  # wrong image size
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DatasetFormatError, match="3072"):
        load_dataset("cifar10", data_dir=tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:  # labels missing
        pickle.dump({b"data": _cifar_images(rng, 4)}, f)
    with pytest.raises(DatasetFormatError, match="labels"):
        load_dataset("cifar10", data_dir=tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:  # label out of range
        pickle.dump({b"data": _cifar_images(rng, 4), b"labels": [0, 1, 2, 10]}, f)
    with pytest.raises(DatasetFormatError, match="outside"):
        load_dataset("cifar10", data_dir=tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickles_with_code_are_refused(tmp_path):
    _write_cifar10(tmp_path, np.random.default_rng(5))
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(DatasetFormatError, match="not allowed"):
        load_dataset("cifar10", data_dir=tmp_path)


# ----------------------------------------------------------------------------- MNIST
def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_mnist(folder, rng, gz=True, n=(7, 3), size=28):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n[0], size, size)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n[0]),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n[1], size, size)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n[1]),
    }
    for i, (stem, a) in enumerate(arrays.items()):
        data = _idx(a)
        use_gz = gz if isinstance(gz, bool) else (i % 2 == 0)  # "mixed": some gz, some not
        if use_gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False, "mixed"])
def test_mnist_from_idx_files(tmp_path, gz):
    arrays = _write_mnist(tmp_path, np.random.default_rng(6), gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path)
    _check_types(ds, 7, 3, (1, 28, 28), 10)
    _check_normalised(ds)
    assert np.array_equal(ds.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    raw = arrays["t10k-images-idx3-ubyte"] / 255.0
    tr = arrays["train-images-idx3-ubyte"] / 255.0
    assert np.allclose(ds.x_test[:, 0].numpy(), (raw - tr.mean()) / tr.std(), atol=1e-5)


def test_mnist_torchvision_layout(tmp_path):
    _write_mnist(tmp_path / "MNIST" / "raw", np.random.default_rng(7))
    assert load_dataset("mnist", data_dir=tmp_path).n_test == 3


def test_mnist_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\].*t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=tmp_path)
    _write_mnist(tmp_path, np.random.default_rng(8), gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    good = p.read_bytes()
    p.write_bytes(good[:-5])  # truncated
    with pytest.raises(DatasetFormatError, match="declares shape"):
        load_dataset("mnist", data_dir=tmp_path)
    p.write_bytes(bytes([0, 0, 0x0D, 3]) + good[4:])  # float idx, not ubyte
    with pytest.raises(DatasetFormatError, match="magic"):
        load_dataset("mnist", data_dir=tmp_path)
    p.write_bytes(good)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(2)))  # 3 images, 2 labels
    with pytest.raises(DatasetFormatError, match="differ in number"):
        load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetFormatError, match="could not read"):
        load_dataset("mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------- arrays
def test_make_dataset_from_arrays():
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((10, 2, 3, 3)), rng.integers(0, 3, 10)
    ds = make_dataset(x[:8], y[:8], x[8:], y[8:])
    _check_types(ds, 8, 2, (2, 3, 3), 3)
    assert make_dataset(x[:8], y[:8], x[8:], y[8:]).fingerprint == ds.fingerprint
    assert make_dataset(x[:8], y[:8], x[8:] + 1, y[8:]).fingerprint != ds.fingerprint
    _check_normalised(make_dataset(x[:8], y[:8], x[8:], y[8:], normalise=True))
    with pytest.raises(ValueError, match="N×C×H×W"):
        make_dataset(x[:8, 0], y[:8], x[8:, 0], y[8:])
    with pytest.raises(ValueError, match="integer labels"):
        make_dataset(x[:8], y[:8] + 0.5, x[8:], y[8:])
