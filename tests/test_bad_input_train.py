"""Bad input to train / data / checkpoint: clear errors naming the argument, before any work."""
import numpy as np
import pytest
import torch
from torch import nn

from noiseprop.empirical import build_model, load_checkpoint, load_dataset, save_checkpoint, train
from noiseprop.empirical.checkpoint import CheckpointError
from noiseprop.empirical.data import make_dataset
import importlib

trainmodule = importlib.import_module("noiseprop.empirical.train")  # the module (the package exports the function)


def _tiny():
    g = np.random.default_rng(0)
    return make_dataset(g.normal(size=(40, 1, 2, 2)).astype(np.float32), g.integers(0, 3, 40),
                        g.normal(size=(12, 1, 2, 2)).astype(np.float32), g.integers(0, 3, 12), name="tiny")


def _no_fit(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training ran")
    monkeypatch.setattr(trainmodule, "_fit", boom)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()]


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.l(x.flatten(1))}


def _meta_model():
    with torch.device("meta"):
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("make, exc, words", [
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(5, 3)), ValueError, "do not fit the model"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), ValueError, "2 logits"),
    (_DictOut, TypeError, "returned a dict"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double(), TypeError, "float64"),
    (_meta_model, ValueError, "meta"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).requires_grad_(False), ValueError, "no trainable"),
])
def test_tr1_user_module_checked_before_training(monkeypatch, make, exc, words):
    _no_fit(monkeypatch)
    m = make()
    before = None if words == "meta" else _state(m)
    with pytest.raises(exc, match="model_or_spec") as ei:
        train(m, _tiny(), epochs=1, cache=False)
    assert words in str(ei.value)
    if before is not None:
        after = _state(m)
        assert before[1] == after[1] and all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_tr1_good_user_module_still_trains():
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    r = train(m, _tiny(), epochs=1, cache=False)
    assert r.model is not m and not r.from_cache


@pytest.mark.parametrize("seed", [2**64, -1])
def test_tr2_train_seed(monkeypatch, seed):
    _no_fit(monkeypatch)
    with pytest.raises(ValueError, match="seed"):
        train("mlp", _tiny(), epochs=1, cache=False, seed=seed)


def test_tr3_cache_dir_file_refused_before_training(monkeypatch, tmp_path):
    _no_fit(monkeypatch)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="cache_dir.*is a file"):
        train("mlp", _tiny(), epochs=1, cache_dir=f)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "checkpoints").write_text("x")
    with pytest.raises(ValueError, match="cache_dir.*is a file"):
        train("mlp", _tiny(), epochs=1, cache_dir=tmp_path / "c")


def test_tr4_cache_must_be_bool(monkeypatch):
    _no_fit(monkeypatch)
    with pytest.raises(TypeError, match="cache must be True or False"):
        train("mlp", _tiny(), epochs=1, cache=0)


def test_da1_digits_split_seed():
    with pytest.raises(ValueError, match="split_seed"):
        load_dataset("digits", split_seed=-1)


def test_da2_make_dataset_normalise():
    x = np.zeros((6, 1, 2, 2), np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(TypeError, match="normalise"):
        make_dataset(x, y, x, y, normalise="yes")


def _net():
    return build_model("mlp", (1, 2, 2), 3, width=4, depth=1)


def test_ck1_meta_not_dict(tmp_path):
    net = _net()
    p = save_checkpoint(tmp_path / "ok.pt", net, net.spec)
    pl = torch.load(p, weights_only=True)
    pl["meta"] = "x"
    torch.save(pl, tmp_path / "meta_str.pt")
    with pytest.raises(CheckpointError, match=r"meta_str\.pt.*'meta'.*str.*expected a dict"):
        load_checkpoint(tmp_path / "meta_str.pt")


def test_ck2_save_checkpoint_path(tmp_path):
    net = _net()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="path .* is a folder"):
        save_checkpoint(tmp_path, net, net.spec)
    with pytest.raises(ValueError, match="path .*afile"):
        save_checkpoint(afile / "x.pt", net, net.spec)
    with pytest.raises(TypeError, match="path must be"):
        save_checkpoint(None, net, net.spec)
    with pytest.raises(TypeError, match="path must be"):
        load_checkpoint(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("model, spec, meta, exc, word", [
    ("net", "mlp", None, TypeError, "spec"),
    ("net", None, None, TypeError, "spec"),
    ("net", "good", "x", TypeError, "meta"),
    ("net", "good", {"f": lambda: 1}, TypeError, "meta"),
    ({"w": torch.zeros(1)}, "good", None, TypeError, "model"),
    ("net", {"name": "resnet20"}, None, ValueError, "spec does not build"),
    ("net", {"name": "mlp", "in_shape": [1, 2, 2], "num_classes": 3, "width": 8, "depth": 1}, None, ValueError,
     "does not describe model"),
])
def test_ck2_save_checkpoint_args(tmp_path, model, spec, meta, exc, word):
    net = _net()
    model = net if model == "net" else model
    spec = net.spec if spec == "good" else spec
    with pytest.raises(exc, match=word):
        save_checkpoint(tmp_path / "m.pt", model, spec, meta)
    assert list(tmp_path.iterdir()) == []


def test_user_module_result_save_and_cache(tmp_path):
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    r = train(m, _tiny(), epochs=1, cache_dir=tmp_path)
    assert r.cache_path is not None
    r2 = train(m, _tiny(), epochs=1, cache_dir=tmp_path)
    assert r2.from_cache
    r.save(tmp_path / "user.pt")
